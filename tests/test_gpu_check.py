"""The one-command GPU check (benchmarks/gpu_check.py) on a machine without a GPU.

The dry run must parse its arguments, lay out the anchor shapes and the commands, and write JSON + markdown that
say "dry run" and hold no numbers. The step runners (subprocess with a time box, result merging, markdown) are
exercised here with CPU-sized commands, so the code a GPU machine runs is not run there for the first time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import loss_head  # noqa: E402


def test_dry_run_writes_the_plan_and_no_numbers(tmp_path):
    out, wheels = tmp_path / "out", tmp_path / "wheels"
    wheels.mkdir()
    assert gpu_check.main(["--dry-run", "--no-isolation-check", "--out", str(out), "--wheels", str(wheels)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert [p["step"] for p in report["plan"]] == list(gpu_check.STEPS)
    assert report["steps"] == {s: {"status": "not run (dry run)"} for s in gpu_check.STEPS}
    assert sum(p["budget_s"] for p in report["plan"]) <= 480  # the whole check fits the 8-minute box

    plan = {p["step"]: p for p in report["plan"]}
    shapes = [(c["H"], c["V"], c["N"], c["dtype"]) for c in plan["loss_head"]["cases"]]
    assert shapes == [
        (4096, 128256, 8192, "bfloat16"),
        (4096, 151936, 8192, "bfloat16"),
        (2048, 248320, 16384, "bfloat16"),
    ]
    for case, cmd in zip(plan["loss_head"]["cases"], plan["loss_head"]["commands"], strict=True):
        assert cmd[cmd.index("--shapes") + 1] == case["shape"] and cmd[cmd.index("--device") + 1] == "cuda"
    e2e = plan["e2e"]["command"]
    assert "--bf16" in e2e and e2e[e2e.index("--device") + 1] == "cuda"
    assert set(e2e[e2e.index("--trainers") + 1].split(",")) == {"sft_padded", "sft_packed", "plw_padded", "plw_packed"}
    assert plan["install"]["command"][plan["install"]["command"].index("--find-links") + 1] == str(wheels)
    assert "--no-index" in plan["install"]["command"]
    assert any(f.endswith("test_attention.py") for f in plan["pytest"]["command"])
    assert any(f.endswith("test_kernel_gpu.py") for f in plan["pytest"]["command"])
    assert plan["epilogue"]["command"][1].endswith("epilogue.py")

    md = (out / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "h2048-v248k: H=2048, V=248320, N=16384" in md
    assert "fwd+bwd (s" not in md and "tokens/s" not in md  # no result tables


def test_dry_run_isolation_keeps_every_other_methods_record(tmp_path):
    """The dry run drives the loss-head step on CPU through the same code as on a GPU, with one method that raises and
    one that kills its process: the shape is restarted without the crashed method, and every other method keeps its
    record (the JSON lines written as they were made), while the markdown still holds no timings."""
    out = tmp_path / "out"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    iso = report["steps"]["loss_head"]["isolation"]
    assert iso["recorded"] == ["floor", "matmul", "ours"]
    assert set(iso["failed"]) == {"fake_error", "fake_crash"}
    assert "injected failure" in iso["failed"]["fake_error"] and "exited with 139" in iso["failed"]["fake_crash"]
    assert report["steps"]["loss_head"]["shapes"]["tiny"]["runs"] == 2  # the crash forced one restart
    lines = [json.loads(x) for x in (out / "loss_head.jsonl").read_text().splitlines()]
    results = [(x["method"]) for x in lines if x.get("event") == "result"]
    assert results.count("ours") == 1 and results.count("floor") == 1  # recorded before the crash, not measured again
    md = (out / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "recorded: floor, matmul, ours" in md and "fwd+bwd (s" not in md


def test_arguments(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])  # --out is required
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", str(tmp_path), "--only", "pytest,bogus"])
    args = gpu_check.parse_args(["--out", str(tmp_path), "--only", "loss_head", "--budget-s", "100"])
    plan = gpu_check.build_plan(args, tmp_path, tmp_path / "site")
    assert [p["step"] for p in plan] == ["loss_head"] and plan[0]["budget_s"] == 100  # capped by the budget


def test_wheels_folder_helpers(tmp_path):
    cmd = gpu_check.download_command(tmp_path)
    assert {"liger-kernel==0.8.5", "cut-cross-entropy==25.1.1", "trl==1.16.0"} <= set(cmd)
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "--no-deps" in cmd
    (tmp_path / "liger_kernel-0.8.5-py3-none-any.whl").touch()
    (tmp_path / "cut_cross_entropy-25.1.1-py3-none-any.whl").touch()
    assert gpu_check.find_wheel(tmp_path, "liger-kernel", "0.8.5").name.startswith("liger_kernel-0.8.5")
    assert gpu_check.find_wheel(tmp_path, "liger-kernel", "0.8.4") is None
    assert gpu_check.find_wheel(tmp_path, "trl", "1.16.0") is None
    assert gpu_check._satisfies("0.8.5", ">=0.8.2") and not gpu_check._satisfies("0.8.1", ">=0.8.2")
    assert not gpu_check._satisfies(None, ">=0")
    assert loss_head.LIGER_MIN_VERSION == (0, 8, 2)


def test_run_step_kills_a_step_past_its_budget(tmp_path):
    log = tmp_path / "log"
    run = gpu_check.run_step(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"], 2, {}, log
    )
    assert run["timed_out"] and run["wall_s"] < 15 and "started" in run["log_tail"]


def test_step_runners_on_cpu(tmp_path):
    """The loss-head and pytest runners with CPU-sized commands: merged JSON, markdown, notes, time budget."""
    out = tmp_path / "out"
    out.mkdir()
    check = gpu_check.Check(out, dry_run=False, budget_s=300)
    check.report["env"] = {"device": "CPU (test)", "python": "3", "versions": {}}
    log = out / "gpu_check.log"
    py, script = sys.executable, str(REPO / "benchmarks" / "loss_head.py")
    step = {
        "cases": [{"shape": "tiny"}, {"shape": "h2048-v248k"}],
        "commands": [
            [py, script, "--device", "cpu", "--shapes", "tiny", "--plw0-shape", "none", "--reps", "1"]
            + ["--max-other-load", "1", "--methods", "ours,full_lce", "--jsonl", str(out / "loss_head.jsonl")],
            [py, "-c", "raise SystemExit(3)"],  # a shape whose run fails: noted, the others kept
        ],
        "budget_per_shape_s": 120,
    }
    gpu_check.do_loss_head(check, step, tmp_path / "site", log)
    merged = json.loads((out / "loss_head.json").read_text())
    assert [r["case"] for r in merged["results"]] == ["tiny"]
    assert set(merged["results"][0]["methods"]) == {"ours", "full_lce"}
    assert merged["shapes"]["h2048-v248k"]["rc"] == 3
    assert any("h2048-v248k: no result (exited 3)" in n for n in check.report["notes"])
    md = (out / "gpu_check.md").read_text()
    assert "## Loss head" in md and "| ours |" in md and "DRY RUN" not in md

    tests = tmp_path / "test_tiny_gpu.py"
    tests.write_text("import pytest\n\n@pytest.mark.gpu\ndef test_a():\n    pass\n\ndef test_b():\n    pass\n")
    pytest_step = {
        "budget_s": 120,
        "command": [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
        + ["-W", "ignore::pytest.PytestUnknownMarkWarning", f"--junitxml={out / 'pytest_gpu.xml'}", str(tests)],
    }
    gpu_check.do_pytest(check, pytest_step, tmp_path / "site", log)
    assert check.report["steps"]["pytest"]["summary"] == {"tests": 1, "failures": 0, "errors": 0, "skipped": 0}
    check.save()
    assert "## pytest -m gpu" in (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_e2e_runner_on_cpu(tmp_path, smollm2_model_path):
    """The e2e step through the throughput benchmark's subprocess workers, on CPU with the random-init preset."""
    out = tmp_path / "out"
    out.mkdir()
    check = gpu_check.Check(out, dry_run=False, budget_s=300)
    check.report["env"] = {"device": "CPU (test)", "python": "3", "versions": {}}
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--device", "cpu", "--quick"]
    cmd += ["--models", "smollm2-135m-config", "--tokenizer", smollm2_model_path, "--trainers", "plw_padded"]
    cmd += ["--warmup", "0", "--steps", "1", "--max-length", "256", "--race-length", "60,90"]
    cmd += ["--tokens-per-step", "200", "--out", str(out / "e2e_throughput.json")]
    gpu_check.do_e2e(check, {"budget_s": 240, "command": cmd}, tmp_path / "site", out / "gpu_check.log")
    e2e = check.report["steps"]["e2e"]
    assert e2e["rc"] == 0 and not e2e["timed_out"], e2e
    assert set(e2e["table"]["smollm2-135m-config/race"]) == {"plw_padded"}
    check.save()
    assert "(3) PLWTrainer padded" in (out / "gpu_check.md").read_text()


def test_help_runs_as_a_script():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--wheels" in proc.stdout and "--dry-run" in proc.stdout


def test_pins_agree_with_the_bench_extra():
    """The versions gpu_check accepts for the other fused heads are the `bench` extra's, and its pins satisfy them."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bench"]
    accepted = {name: ok for name, _, ok, _ in gpu_check.REQUIREMENTS}
    for requirement in extra:
        name, spec = requirement.split(">=", 1)
        assert accepted[name] == f">={spec}", requirement
    for name, pinned, ok, _ in gpu_check.REQUIREMENTS:
        assert gpu_check._satisfies(pinned, ok), (name, pinned, ok)

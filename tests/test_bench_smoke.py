"""Smoke test of the throughput benchmark's machinery (benchmarks/throughput.py) on a tiny random Llama.

Every trainer configuration trains one epoch of the same eight examples (two optimizer steps) in this process. No
timing is asserted: only the structure of the results and the token accounting (padded and packed runs must see
exactly the same real tokens for the same examples).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import make_tiny_llama, skip_without_sft_loss
from datasets import Dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import throughput

    return throughput


def test_instruction_mix_is_deterministic(bench):
    a = bench.instruction_mix_rows(10, seed=3)
    assert a == bench.instruction_mix_rows(10, seed=3)
    assert a != bench.instruction_mix_rows(10, seed=4)
    assert {m["role"] for row in a for m in row["prompt"] + row["completion"]} == {"user", "assistant"}
    assert bench.number_words(342) == "three hundred forty-two"
    assert bench.number_words(40) == "forty"


def test_every_trainer_counts_the_same_tokens(bench, smollm2_tokenizer, tmp_path):
    max_length, examples_per_step = 128, 4
    data = Dataset.from_list(bench.instruction_mix_rows(8, seed=0, words=(4, 10)))
    stats = bench.dataset_stats(data, smollm2_tokenizer, max_length)
    assert stats["max_tokens"] < max_length  # nothing truncated: every configuration sees every token
    assert 0 < stats["rg_mean"] < 10
    skip_without_sft_loss()  # the benchmark trains TRL's SFTTrainer too
    rows = bench.packed_rows_per_step(examples_per_step, stats["mean_tokens"], stats["packed_row_mean_tokens"])

    results = {}
    for name in bench.TRAINERS:
        spec = bench.make_spec(
            name,
            "instruct",
            max_length=max_length,
            examples_per_step=examples_per_step,
            packed_rows_per_step=rows,
            warmup=1,
            steps=1,
            n_examples=len(data),
            epoch=True,
            model="tiny-llama",
        )
        model = make_tiny_llama(vocab_size=len(smollm2_tokenizer), seed=0)
        results[name] = bench.run_config(
            spec, model=model, tokenizer=smollm2_tokenizer, dataset=data, output_dir=str(tmp_path / name)
        )

    for name, result in results.items():
        steps = result["steps"]
        assert len(steps) >= 1, name
        for step in steps:
            assert step["tokens"] > 0 and step["trained_positions"] > 0 and step["step_s"] > 0, (name, step)
            assert step["positions"] >= step["tokens"], (name, step)
            assert math.isfinite(step["loss"]), (name, step)
        # one epoch = every example once, whatever the layout
        assert sum(s["tokens"] for s in steps) == stats["total_tokens"], name
        assert sum(s["sequences"] for s in steps) == len(data), name
        summary = result["summary"]
        for key in ("step_s_median", "tokens_per_s_median", "tokens_per_step_mean", "padding_fraction"):
            assert summary[key] >= 0, (name, key)
        assert result["peak_rss_bytes"] > 0
        if bench.TRAINERS[name][2]:  # packed: padding-free rows
            assert summary["padding_fraction"] == 0
            assert steps[0]["rows"] == 1

    # The SFT and PLW runs of a layout see identical batches (same tokenization, packing and sampler order)
    def per_step(name):
        return [s["tokens"] for s in results[name]["steps"]]

    assert per_step("sft_padded") == per_step("plw_padded") == per_step("full_logits_padded")
    assert per_step("sft_packed") == per_step("plw_packed")
    # PLW trains prompt tokens too (weight 0.1); completion-only SFT trains only the completion
    assert (
        results["plw_padded"]["steps"][0]["trained_positions"] > results["sft_padded"]["steps"][0]["trained_positions"]
    )

    table = bench.aggregate(list(results.values()))
    assert set(table["tiny-llama/instruct"]) == set(bench.TRAINERS)
    checks = bench.check_ratios(table)
    assert {c["check"] for c in checks} >= {"packed_vs_sft_packed", "packed_vs_full_logits", "packed_vs_padded"}
    assert "(4) PLWTrainer" in bench.markdown_table(table)
    assert bench.format_checks(checks).count("\n") == len(checks) - 1


def test_cli_bench_hands_every_argument_to_the_script(monkeypatch):
    """`trl-plw bench ARGS` runs the checkout's script with this interpreter and ARGS untouched."""
    import trl_plw.cli
    from trl_plw.cli import bench as bench_cli

    calls = []
    monkeypatch.setattr(bench_cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert trl_plw.cli.main(["bench", "--quick", "--bf16", "--trainers", "plw_packed"]) == 0
    script = str(REPO / "benchmarks" / "throughput.py")
    assert calls == [[sys.executable, script, "--quick", "--bf16", "--trainers", "plw_packed"]]
    monkeypatch.setenv("TRL_PLW_BENCHMARKS", str(REPO / "docs"))  # a folder without the script: not found
    assert bench_cli.find_benchmark() is None


def test_bench_finds_the_checkouts_script():
    """In a checkout, `trl-plw bench` runs benchmarks/throughput.py with the arguments given (its --help here)."""
    from trl_plw.cli import bench as cli_bench

    assert cli_bench.find_benchmark(REPO / "docs") == REPO / "benchmarks" / "throughput.py"
    code = "import trl_plw.cli as c; raise SystemExit(c.main(['bench', '--help']))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--from-json" in proc.stdout and "--quick" in proc.stdout


def test_benchmarks_stay_out_of_the_wheel_and_bench_says_where_to_get_them(tmp_path):
    """Build the wheel from a copy of the sources, install it into a bare target folder and run `trl-plw bench`
    outside any checkout: the wheel holds no benchmark, and the command says how to get one instead of failing
    with an import error (dependencies come from this interpreter's site-packages; the target comes first)."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "trl_plw", src / "src" / "trl_plw", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)], check=True
    )
    (wheel,) = (tmp_path / "dist").glob("trl_plw-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "trl_plw/cli/bench.py" in names
    assert not [n for n in names if "bench" in n and n != "trl_plw/cli/bench.py"], sorted(names)
    target = tmp_path / "target"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], check=True)

    env = {k: v for k, v in os.environ.items() if k != "TRL_PLW_BENCHMARKS"}
    env["PYTHONPATH"] = str(target)
    code = "import trl_plw.cli as c; print(c.__file__, flush=True); raise SystemExit(c.main(['bench', '--quick']))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.stdout.startswith(str(target))  # the installed copy, not the checkout
    assert proc.returncode == 2, proc.stderr
    assert "source checkout" in proc.stderr and "TRL_PLW_BENCHMARKS" in proc.stderr

"""Smoke test of the throughput benchmark's machinery (trl_plw.experiments.benchmarking.throughput) on a tiny random Llama.

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
from conftest import make_tiny_llama
from datasets import Dataset


@pytest.fixture(scope="module")
def bench():
    from trl_plw.experiments.benchmarking import throughput

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
    checks = bench.check_targets(table)
    assert {c["check"] for c in checks} >= {"packed_vs_sft_packed", "packed_vs_full_logits", "packed_vs_padded"}
    assert "(4) PLWTrainer" in bench.markdown_table(table)
    assert bench.format_checks(checks).count("\n") == len(checks) - 1


def test_cli_registers_bench():
    import argparse

    from trl_plw.cli import bench as bench_cli

    parser = argparse.ArgumentParser()
    bench_cli.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--quick", "--bf16", "--trainers", "plw_packed"])
    assert args.quick and args.bf16 and args.trainers == "plw_packed" and callable(args.func)


def test_bench_cli_needs_no_checkout():
    """`trl-plw bench` imports the benchmark from the package: no path into a source checkout."""
    from trl_plw.cli import bench as bench_cli

    source = Path(bench_cli.__file__).read_text()
    assert "parents[" not in source and "benchmarks/throughput.py" not in source.split('"""', 2)[2]


def test_bench_runs_from_an_installed_wheel(tmp_path):
    """Build the wheel from a copy of the sources, install it into a bare target folder and run `trl-plw bench`
    from there (dependencies come from this interpreter's site-packages; the target comes first on the path)."""
    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(repo / "src" / "trl_plw", src / "src" / "trl_plw", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)], check=True
    )
    (wheel,) = (tmp_path / "dist").glob("trl_plw-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "trl_plw/experiments/benchmarking/throughput.py",
        "trl_plw/experiments/benchmarking/common.py",
        "trl_plw/cli/bench.py",
    } <= names
    target = tmp_path / "target"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], check=True)

    env = dict(os.environ, PYTHONPATH=str(target))
    code = "import trl_plw.experiments.benchmarking.throughput as t, trl_plw.cli as c; print(t.__file__); c.main(['bench', '--help'])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(str(target))  # the installed copy, not the checkout
    assert "--from-json" in proc.stdout and "--quick" in proc.stdout

"""`trl-plw race` end to end: a 2-PLW mini sweep on a tiny random model with the real tokenizer."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from conftest import make_tiny_llama

from trl_plw.race_experiment import PRESETS, RacePreset, run_sweep, summarize, summary_markdown


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-race-model")
    model = make_tiny_llama(vocab_size=len(smollm2_tokenizer), hidden_size=32, num_layers=2)
    model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return str(folder)


def test_two_plw_mini_sweep_end_to_end(tiny_model_dir, tmp_path):
    preset = replace(
        PRESETS["cpu-demo"],
        model=tiny_model_dir,
        train_examples=8,
        eval_examples=4,
        max_steps=4,
        eval_steps=2,
        batch_size=2,
        eval_batch_size=4,
        max_length=512,
        lora_r=4,
        plws=(1.0, 0.0),
    )
    result = run_sweep(preset, tmp_path)
    for name in ("metrics.csv", "summary.json", "summary.md", "race_sweep.png", "preset.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    for plw in ("1", "0"):
        events = [json.loads(line) for line in (tmp_path / f"plw_{plw}" / "metrics.jsonl").read_text().splitlines()]
        evals = [e for e in events if "eval_completion_loss" in e]
        assert [e["step"] for e in evals] == [0, 2, 4]
        assert all(math.isfinite(e["eval_prompt_loss"]) and 0 <= e["eval_answer_accuracy"] <= 1 for e in evals)
        train_logs = [e for e in events if "loss" in e and "eval_loss" not in e]
        assert train_logs and all(e["prompt_loss_weight"] == float(plw) for e in train_logs)
    rows = result["summary"]
    assert [r["plw"] for r in rows] == [1.0, 0.0]
    # PLW=1 trains on the prompt, PLW=0 does not: after the same steps, the prompt loss must be lower with PLW=1
    assert rows[0]["final_prompt_loss"] < rows[1]["final_prompt_loss"]
    assert "| 1 |" in result["table_markdown"] and "| 0 |" in result["table_markdown"]


def test_summary_picks_accuracy_at_each_loss_minimum():
    events = [
        {"plw": 0.1, "step": 0, "eval_sequence_loss": 3.0, "eval_completion_loss": 2.0, "eval_answer_accuracy": 0.25},
        {"plw": 0.1, "step": 5, "eval_sequence_loss": 2.0, "eval_completion_loss": 1.5, "eval_answer_accuracy": 0.40},
        {"plw": 0.1, "step": 10, "eval_sequence_loss": 1.0, "eval_completion_loss": 1.7, "eval_answer_accuracy": 0.35},
        {"plw": 0.1, "step": 10, "wall_seconds": 12.0},
    ]
    (row,) = summarize(events, (0.1,))
    assert row["acc_at_min_seq_loss"] == 0.35 and row["min_seq_loss_step"] == 10
    assert row["acc_at_min_comp_loss"] == 0.40 and row["min_comp_loss_step"] == 5
    assert row["initial_acc"] == 0.25 and row["final_acc"] == 0.35 and row["train_seconds"] == 12.0
    assert "0.350 (10)" in summary_markdown([row]) and "0.400 (5)" in summary_markdown([row])


def test_paper_preset_matches_the_article():
    paper = PRESETS["paper"]
    assert paper.model == "meta-llama/Llama-2-7b-chat-hf" and paper.dataset == "ehovy/race"
    assert (paper.lora_r, paper.lora_alpha, paper.lora_dropout) == (64, 64, 0.1)
    assert (paper.learning_rate, paper.lr_scheduler_type, paper.warmup_ratio) == (2e-4, "constant_with_warmup", 0.05)
    assert (paper.weight_decay, paper.max_grad_norm, paper.bf16, paper.max_length) == (0.001, 0.3, True, 2048)
    assert paper.packing and paper.plws == (1.0, 0.5, 0.2, 0.1, 0.01, 0.0)
    assert isinstance(PRESETS["cpu-demo"], RacePreset)

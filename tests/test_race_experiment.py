"""`trl-plw race` end to end: a 2-PLW mini sweep on a tiny random model with the real tokenizer."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from conftest import make_tiny_llama

from trl_plw.cli import main
from trl_plw.experiments.race import PRESETS, RacePreset, load_race_splits, memory_estimate
from trl_plw.experiments.sweep import run_sweep, summarize, summary_markdown


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
        model_name_or_path=tiny_model_dir,
        train_examples=8,
        eval_examples=4,
        max_steps=4,
        eval_steps=2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        max_length=512,
        lora_r=4,
        plws=(1.0, 0.0),
    )
    result = run_sweep(preset, tmp_path, load_splits=load_race_splits, plot_name="race_sweep.png")
    for name in ("metrics.csv", "summary.json", "summary.md", "race_sweep.png", "config.json"):
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
    assert row["best_acc"] == 0.40 and row["steps_to_min_comp_loss"] == 5


def test_paper_preset_matches_the_article():
    paper = PRESETS["paper"]
    assert paper.model_name_or_path == "meta-llama/Llama-2-7b-chat-hf" and paper.dataset_name == "ehovy/race"
    assert (paper.lora_r, paper.lora_alpha, paper.lora_dropout) == (64, 64, 0.1)
    assert (paper.learning_rate, paper.lr_scheduler_type, paper.warmup_steps) == (2e-4, "constant_with_warmup", 0.05)
    assert (paper.weight_decay, paper.max_grad_norm, paper.max_length) == (0.001, 0.3, 2048)
    assert paper.packing and paper.plws == (1.0, 0.5, 0.2, 0.1, 0.01, 0.0)
    # the article's run_plw.py: 2,000 train / 500 validation packed rows (seed 1234), 10 epochs, eval every 20
    assert (paper.train_packed_rows, paper.eval_packed_rows, paper.subsample_seed) == (2000, 500, 1234)
    assert (paper.num_train_epochs, paper.eval_steps, paper.per_device_train_batch_size) == (10, 20, 8)
    # no preset forces bf16: None = bf16 only where native (trl_plw.precision.default_bf16)
    assert all(p.bf16 is None for p in PRESETS.values()) and isinstance(PRESETS["cpu-demo"], RacePreset)
    assert len(PRESETS["cpu-demo"].plws) >= 3 and PRESETS["cpu-long"].plws == paper.plws


def test_llama2_memory_estimate_counts_lora_parameters():
    from trl_plw.experiments.race import LLAMA2_7B_CONFIG

    m = memory_estimate(LLAMA2_7B_CONFIG, PRESETS["paper"])
    # r * (in + out) over q k v o gate up down, 32 layers, r = 64: 159.9M (the article's adapters)
    assert m["trainable_million"] == pytest.approx(159.9, abs=0.1)
    assert m["parameters_billion"] == pytest.approx(6.74, abs=0.01)
    assert 15 < m["total_gib"] < 40
    top_half = memory_estimate(LLAMA2_7B_CONFIG, replace(PRESETS["paper"], lora_last_layers=16))
    assert top_half["trainable_million"] == pytest.approx(159.9 / 2, abs=0.1)
    # Checkpointed: every layer's input is kept whatever is adapted; without it, only the adapted layers' activations.
    assert top_half["activations_gib"] == m["activations_gib"]
    no_ckpt = replace(PRESETS["paper"], activation_checkpointing=False)
    full, half = (memory_estimate(LLAMA2_7B_CONFIG, replace(no_ckpt, lora_last_layers=n)) for n in (None, 16))
    assert half["activations_gib"] == pytest.approx(full["activations_gib"] / 2)
    with pytest.raises(ValueError, match="lora_last_layers=33 must be between 1 and the model's 32 decoder layers"):
        memory_estimate(LLAMA2_7B_CONFIG, replace(PRESETS["paper"], lora_last_layers=33))


@pytest.fixture(scope="module")
def llama2_chat_tokenizer_dir(tmp_path_factory):
    """A small BPE tokenizer (Llama-2 special tokens, metaspace like sentencepiece) with Llama-2's chat template.

    Built here with `tokenizers` because the real one is gated on the Hub; its token counts differ from Llama-2's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from trl_plw.experiments.data import generate_race_rows
    from trl_plw.experiments.data.chat_templates import LLAMA2_CHAT_TEMPLATE

    texts = [r["article"] + " " + r["question"] + " " + " ".join(r["options"]) for r in generate_race_rows(200)]
    texts += ["Choose the correct option based on the context. Context: Question: Options: A. B. C. D. [INST] [/INST]"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = LLAMA2_CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("llama2-chat-tokenizer")
    fast.save_pretrained(folder)
    return str(folder)


def test_paper_preset_dry_run(llama2_chat_tokenizer_dir, capsys):
    argv = ["race", "--preset", "paper", "--dry-run", "--tokenizer", llama2_chat_tokenizer_dir,
            "--train-packed-rows", "3", "--eval-packed-rows", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "<s>[INST] Choose the correct option based on the context." in out
    assert "[/INST]" in out and "</s>" in out
    assert "packed rows of 2048: 3" in out and "packed rows of 2048: 2" in out
    assert "Rg mean" in out and "ratio of totals" in out
    # 3 rows / batch 8 -> 1 step per epoch, 10 epochs; evaluations at 0 and every 20 steps
    assert "1 per epoch" in out and "10 in total" in out
    assert "160M with grads and Adam" in out and "GiB" in out

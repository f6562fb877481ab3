"""Slow tests on the real SmolLM2-135M-Instruct (offline default model)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig

from trl_plw import PLWConfig, PLWTrainer
from trl_plw.experiments.data.race import load_race
from trl_plw.experiments.offline_model import load_model, load_tokenizer

pytestmark = pytest.mark.slow


def test_lora_on_135m_trains_and_eval_metrics_move(tmp_path):
    tokenizer = load_tokenizer()
    train = load_race("synthetic", split="train", n=12, length=(60, 70))
    evaluation = load_race("synthetic", split="validation", n=6, length=(60, 70))
    args = PLWConfig(
        output_dir=str(tmp_path),
        prompt_loss_weight=0.1,
        answer_tokens=["A", "B", "C", "D"],
        per_device_train_batch_size=2,
        per_device_eval_batch_size=6,
        max_steps=6,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        eval_strategy="steps",
        eval_steps=6,
        eval_on_start=True,
        logging_steps=3,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = PLWTrainer(
        load_model(dtype=torch.float32),
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert 0 < trainable < 5_000_000  # only the adapters train
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_completion_loss" in e]
    assert [e["step"] for e in evals] == [0, 6]
    before, after = evals
    for key in ("eval_loss", "eval_prompt_loss", "eval_completion_loss", "eval_answer_accuracy"):
        assert math.isfinite(before[key]) and math.isfinite(after[key]), key
    # The answer is one letter after a fixed chat header: a few LoRA steps must lower the completion loss a lot.
    assert after["eval_completion_loss"] < 0.8 * before["eval_completion_loss"]
    logs = [e for e in trainer.state.log_history if "completion_loss" in e and "eval_loss" not in e]
    assert logs and all(math.isfinite(e["prompt_loss"]) for e in logs)

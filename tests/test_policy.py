"""One weighting policy (issue 26): unset is told apart from set, a collator passed to PLWTrainer either agrees
with PLWConfig or conflicts loudly, and the policy is resolved once, not per batch."""

from __future__ import annotations

import pytest
from datasets import Dataset
from test_trainer import ALPACA_ROWS, RESPONSE, common_args, first_rows, tiny

from trl_plw import DataCollatorForWeightedCompletionLM, PLWConfig, PLWTrainer


def build(tokenizer, tmp_path, collator, **config):
    return PLWTrainer(
        tiny(len(tokenizer)),
        args=PLWConfig(**common_args(output_dir=str(tmp_path)), **config),
        data_collator=collator,
        train_dataset=Dataset.from_list(ALPACA_ROWS),
        processing_class=tokenizer,
    )


def test_explicit_collator_value_equal_to_its_default_still_conflicts(smollm2_tokenizer, tmp_path):
    """The collator's explicit prompt_loss_weight=0.0 is a statement, even though 0.0 was its default: with
    PLWConfig(prompt_loss_weight=0.5) that is a contradiction, and it must raise rather than train at 0.5."""
    collator = DataCollatorForWeightedCompletionLM(
        tokenizer=smollm2_tokenizer, response_template=RESPONSE, prompt_loss_weight=0.0
    )
    with pytest.raises(ValueError, match=r"prompt_loss_weight=0\.5.*data_collator.*prompt_loss_weight=0\.0"):
        build(smollm2_tokenizer, tmp_path, collator, prompt_loss_weight=0.5)


def test_unset_is_told_apart_from_set_and_resolved_once(smollm2_tokenizer, tmp_path, monkeypatch):
    collator = DataCollatorForWeightedCompletionLM(tokenizer=smollm2_tokenizer, response_template=RESPONSE)
    assert collator.policy.stated() == {"response_template": RESPONSE}  # nothing else stated
    on_its_own = collator.resolved_policy  # the collator alone: completion only, as the collator it replaces
    assert (on_its_own.prompt_loss_weight, on_its_own.completion_loss_weight) == (0.0, 1.0)
    assert on_its_own.example_weight_column == "weight"

    trainer = build(smollm2_tokenizer, tmp_path, collator, completion_only_loss=False)
    assert trainer.data_collator.prompt_loss_weight == 1.0  # unset on both sides: what SFTTrainer trains
    assert collator.prompt_loss_weight is None  # the object passed in is left as it was

    calls = []
    original = DataCollatorForWeightedCompletionLM._resolve_role_weights
    monkeypatch.setattr(
        DataCollatorForWeightedCompletionLM,
        "_resolve_role_weights",
        lambda self: calls.append(1) or original(self),
    )
    rows = first_rows(trainer.train_dataset, 2)
    trainer.data_collator(rows)
    trainer.data_collator(rows)
    assert calls == []  # the role table was built at construction, not per batch
    trainer.data_collator.prompt_loss_weight = 0.5  # an assignment resolves again, once
    assert calls == [1]
    batch = trainer.data_collator(rows)
    assert set(batch["loss_weights"][batch["prompt_mask"]].unique().tolist()) == {0.5}


def test_same_value_on_both_sides_is_no_conflict(smollm2_tokenizer, tmp_path):
    collator = DataCollatorForWeightedCompletionLM(
        tokenizer=smollm2_tokenizer, response_template=RESPONSE, prompt_loss_weight=0.0, completion_loss_weight=1.0
    )
    trainer = build(smollm2_tokenizer, tmp_path, collator, prompt_loss_weight=0.0, completion_loss_weight=1.0)
    assert trainer.args.prompt_loss_weight == 0.0


def test_span_weights_are_part_of_the_policy(smollm2_tokenizer, tmp_path):
    """span_weights exist on both sides too: different rules on the collator and in PLWConfig raise, naming both;
    rules stated on one side reach the trainer's collator."""
    collator = DataCollatorForWeightedCompletionLM(
        tokenizer=smollm2_tokenizer, response_template=RESPONSE, span_weights="think"
    )
    with pytest.raises(ValueError, match=r"span_weights='react'.*data_collator.*span_weights='think'"):
        build(smollm2_tokenizer, tmp_path, collator, span_weights="react")
    trainer = build(smollm2_tokenizer, tmp_path, collator)
    assert trainer.args.span_weights == "think"
    assert [rule.name for rule in trainer.data_collator.span_rules] == [rule.name for rule in collator.span_rules]

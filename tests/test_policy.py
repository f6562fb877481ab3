"""One weighting policy (issue 26): unset is told apart from set, a collator passed to PLWTrainer either agrees
with PLWConfig or conflicts loudly, and the policy is resolved once, not per batch."""

from __future__ import annotations

import pytest
from datasets import Dataset
from test_trainer import ALPACA_ROWS, RESPONSE, common_args, tiny

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

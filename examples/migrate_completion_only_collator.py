"""Migrating from TRL's removed ``DataCollatorForCompletionOnlyLM``: your collator, now packed and weighted.

For: TRL 0.19 users who built the completion-only collator with a response template and handed it to the trainer.
The same pattern works with `PLWTrainer`: state the template (and, new, the prompt weight) on
`DataCollatorForWeightedCompletionLM` only; PLWTrainer prepares the dataset with the collator's template, so BFD
packing (which the old collator broke) keeps every token's role, and trains with the collator's weights.

    python examples/migrate_completion_only_collator.py --prompt-loss-weight 0.1 --max-steps 20

Before (TRL 0.19)::

    collator = DataCollatorForCompletionOnlyLM("### Response:\\n", tokenizer=tokenizer)
    trainer = SFTTrainer(model, args=SFTConfig(...), data_collator=collator, train_dataset=text_dataset)

After: the lines below (``prompt_loss_weight=0`` reproduces the old completion-only loss exactly).
"""

from __future__ import annotations

from collections.abc import Sequence

from _common import PAIRS, config_kwargs, parse
from datasets import Dataset

from trl_plw import DataCollatorForWeightedCompletionLM, PLWConfig, PLWTrainer
from trl_plw.experiments.offline_model import load_model, load_tokenizer

RESPONSE_TEMPLATE = "### Response:\n"


def text_dataset() -> Dataset:
    """Plain-text rows, the format the old collator was used with."""
    return Dataset.from_list([{"text": f"### Instruction:\n{p}\n\n{RESPONSE_TEMPLATE}{c}"} for p, c in PAIRS])


def main(argv: Sequence[str] | None = None) -> PLWTrainer:
    args = parse(__doc__, argv, lambda p: p.add_argument("--prompt-loss-weight", type=float, default=0.1))
    tokenizer = load_tokenizer(args.model)
    collator = DataCollatorForWeightedCompletionLM(
        RESPONSE_TEMPLATE, tokenizer=tokenizer, prompt_loss_weight=args.prompt_loss_weight
    )
    trainer = PLWTrainer(
        load_model(args.model),
        args=PLWConfig(**config_kwargs(args, packing=True, max_length=512)),  # BFD packing, padding-free batches
        data_collator=collator,
        train_dataset=text_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()

"""Chat (``messages``) data with per-role weights and a cosine prompt-loss-weight schedule.

For: fine-tuning on conversations where the system prompt and the chat-template boilerplate should not be learned,
the user's turns a little (PLW 0.1, decaying), and the assistant's fully. Roles are found from the chat template
itself (any prefix-consistent template, no ``{% generation %}`` markers needed); the schedule is applied at loss
time, so it never re-tokenizes and is exact on resume.

    python examples/chat_role_weights_schedule.py --max-steps 20
"""

from __future__ import annotations

from collections.abc import Sequence

from _common import PAIRS, config_kwargs, parse
from datasets import Dataset

from trl_plw import PLWConfig, PLWTrainer
from trl_plw.experiments.offline_model import load_model, load_tokenizer

ROLE_WEIGHTS = {"system": 0.0, "template": 0.0}  # factors of the scheduled prompt weight; user/tool follow it
PLW_START, PLW_END = 0.1, 0.01


def chat_dataset() -> Dataset:
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "system", "content": "You are a concise assistant."},
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": answer},
                ]
            }
            for prompt, answer in PAIRS
        ]
    )


def main(argv: Sequence[str] | None = None) -> PLWTrainer:
    args = parse(__doc__, argv)
    tokenizer = load_tokenizer(args.model)
    config = PLWConfig(
        **config_kwargs(args),
        prompt_loss_weight=PLW_START,
        prompt_loss_weight_schedule="cosine",
        prompt_loss_weight_end=PLW_END,
        role_weights=ROLE_WEIGHTS,
    )
    trainer = PLWTrainer(load_model(args.model), args=config, train_dataset=chat_dataset(), processing_class=tokenizer)
    trainer.train()  # logs `prompt_loss_weight` at every step, next to prompt_loss / completion_loss
    return trainer


if __name__ == "__main__":
    main()

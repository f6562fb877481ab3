"""What every example shares: its command-line flags and the small built-in datasets.

Each example runs as a script (``python examples/<name>.py --help``) and as ``main(argv)`` from the test suite, which
passes a tiny local model and ``--max-steps 2``. The default model is the offline SmolLM2-135M-Instruct
(``smollm2-135m``, no Hub access); any Hub id or local folder works the same way.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

PAIRS = [
    ("What is the capital of France? Answer in one word.", "Paris"),
    ("Add two and three.", "Five, since 2 + 3 = 5."),
    ("Name a primary colour.", "Red"),
    ("Translate 'gato' from Spanish to English.", "Cat: 'gato' is Spanish for cat."),
    ("Say hi.", "Hi!"),
    ("Which is larger, 7 or 9?", "9 is larger."),
    ("Spell 'dog' backwards.", "god"),
    ("What colour is the sky on a clear day?", "Blue."),
]
"""Eight instruction/response pairs: enough to watch a few steps train, small enough for a CPU."""


def parser(description: str | None) -> argparse.ArgumentParser:
    """The flags every example takes (model, steps, output folder, bf16)."""
    p = argparse.ArgumentParser(description=(description or "").split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="Hub id, local folder, or the offline 'smollm2-135m'.")
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--output-dir", default="runs/example")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: PLWConfig's choice for the device).",
    )
    return p


def config_kwargs(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """PLWConfig keyword arguments for a short run; ``--bf16``/``--no-bf16`` only when given."""
    kwargs: dict[str, Any] = dict(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    if args.bf16 is not None:
        kwargs["bf16"] = args.bf16
    kwargs.update(overrides)
    return kwargs


def parse(description: str | None, argv: Sequence[str] | None, add_arguments=None) -> argparse.Namespace:
    p = parser(description)
    if add_arguments is not None:
        add_arguments(p)
    return p.parse_args(argv)

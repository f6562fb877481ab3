"""What every example shares: its command line and the small built-in datasets.

Each example runs as a script (``python examples/<name>.py --help``) and as ``main(argv)`` from the test suite, which
passes a tiny local model and ``--max_steps 2``. The flags are those of ``trl sft`` and ``trl-plw sft``: `PLWConfig`
and TRL's ``ModelConfig`` (plus an example's own dataclass, if it has one) parsed by ``trl.TrlParser``, so
``--per_device_train_batch_size``, ``--learning_rate``, ``--use_peft``/``--lora_r`` or ``--config recipe.yaml`` work
the same way in all of them. The model is named explicitly: the offline SmolLM2-135M-Instruct (``smollm2-135m``, no
Hub access) by default; any Hub id or local folder works the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from trl import ModelConfig, TrlParser

from trl_plw import PLWConfig
from trl_plw.cli.flags import bool_fields, negate_bool_flags

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

DEMO_MODEL = "smollm2-135m"

SHORT_RUN = dict(
    model_name_or_path=DEMO_MODEL,
    output_dir="runs/example",
    max_steps=20,
    per_device_train_batch_size=4,
    learning_rate=1e-3,
    lr_scheduler_type="constant",
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    seed=0,
)
"""The parser's defaults for a short run (any flag overrides them); bf16 stays PLWConfig's choice for the device."""


def parse(description: str | None, argv: Sequence[str] | None, *extra: type, **defaults: Any) -> tuple[Any, ...]:
    """``(PLWConfig, ModelConfig, *extra instances)`` from ``argv``; ``defaults`` override `SHORT_RUN` per example."""
    parser = TrlParser((PLWConfig, ModelConfig, *extra), description=(description or "").split("\n\n")[0])
    parser.set_defaults(**{**SHORT_RUN, **defaults})
    argv = negate_bool_flags(sys.argv[1:] if argv is None else list(argv), bool_fields(parser))
    return tuple(parser.parse_args_and_config(argv))

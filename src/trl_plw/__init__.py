"""trl-plw: real-valued prompt-loss weighting for TRL supervised fine-tuning.

Public names are imported lazily so that ``import trl_plw`` (e.g. for the fused loss alone) does not pull in TRL.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "weighted_linear_cross_entropy": "trl_plw.ops",
    "TokenStats": "trl_plw.ops",
    "DataCollatorForWeightedCompletionLM": "trl_plw.collator",
    "RoleWeights": "trl_plw.roles",
    "PLWConfig": "trl_plw.trainer",
    "PLWTrainer": "trl_plw.trainer",
    "select_attn_implementation": "trl_plw.attention",
    "VARLEN_ATTENTION": "trl_plw.attention",
    "prompt_weight_at": "trl_plw.schedules",
    "load_model": "trl_plw.models",
    "load_tokenizer": "trl_plw.models",
    "load_model_and_tokenizer": "trl_plw.models",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trl_plw' has no attribute {name!r}")

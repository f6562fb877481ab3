"""trl-plw: real-valued prompt-loss weighting for TRL supervised fine-tuning.

Public names are imported lazily (module ``__getattr__``): ``import trl_plw`` imports neither torch, TRL nor
matplotlib and registers nothing with transformers, so a process that wants the fused loss alone pays for nothing
else. Editors and type checkers see the names through the ``TYPE_CHECKING`` imports below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "weighted_linear_cross_entropy": "trl_plw.ops",
    "KernelOptions": "trl_plw.ops",
    "TokenStats": "trl_plw.ops",
    "DataCollatorForWeightedCompletionLM": "trl_plw.collator",
    "RoleWeights": "trl_plw.roles",
    "PLWConfig": "trl_plw.trainer",
    "PLWTrainer": "trl_plw.trainer",
    "select_attn_implementation": "trl_plw.attention",
    "VARLEN_ATTENTION": "trl_plw.attention",
    "prompt_weight_at": "trl_plw.schedules",
}

# Names that were public by mistake and stay importable for one release, with a FutureWarning: the offline demo
# model's loaders belong to the experiments, not to the training API (a trainer takes any transformers model).
_DEPRECATED = {
    "load_model": "trl_plw.experiments.offline_model",
    "load_tokenizer": "trl_plw.experiments.offline_model",
    "load_model_and_tokenizer": "trl_plw.experiments.offline_model",
}

# Written out (not derived from _EXPORTS) so that linters and editors read it; tests/test_imports.py keeps them equal.
__all__ = [
    "DataCollatorForWeightedCompletionLM",
    "KernelOptions",
    "PLWConfig",
    "PLWTrainer",
    "RoleWeights",
    "TokenStats",
    "VARLEN_ATTENTION",
    "__version__",
    "prompt_weight_at",
    "select_attn_implementation",
    "weighted_linear_cross_entropy",
]

if TYPE_CHECKING:
    from trl_plw.attention import VARLEN_ATTENTION, select_attn_implementation
    from trl_plw.collator import DataCollatorForWeightedCompletionLM
    from trl_plw.ops import KernelOptions, TokenStats, weighted_linear_cross_entropy
    from trl_plw.roles import RoleWeights
    from trl_plw.schedules import prompt_weight_at
    from trl_plw.trainer import PLWConfig, PLWTrainer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    if name in _DEPRECATED:
        import warnings

        warnings.warn(
            f"trl_plw.{name} is deprecated and will be removed in the next release: it loads the offline demo model "
            f"and is not part of the training API. Import it from {_DEPRECATED[name]}, or load any model with "
            "transformers (AutoModelForCausalLM.from_pretrained).",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_DEPRECATED[name]), name)
    raise AttributeError(f"module 'trl_plw' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

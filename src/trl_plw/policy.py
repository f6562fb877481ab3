"""What SFTTrainer trains on each kind of dataset, so that PLWTrainer with nothing set trains the same tokens.

SFTTrainer's loss depends on the data: language-modeling data (plain ``text``, chat ``messages``, bare
``input_ids``) is trained on every token unless ``assistant_only_loss=True``; prompt-completion data is trained on
the completion unless ``completion_only_loss=False``. PLWTrainer's prompt weight is therefore unset by default
(``prompt_loss_weight=None``) and resolved here, once, from the first training example: the weight SFTTrainer
implies (1 = every token, 0 = completion/assistant only). Setting ``prompt_loss_weight`` (or ``role_weights``) is
what switches real-valued weighting on.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any


class DataKind(str, enum.Enum):
    """The dataset types TRL documents, plus the per-token formats of trl-plw."""

    PROMPT_COMPLETION = "prompt-completion"  # 'prompt' + 'completion', or tokenized with 'completion_mask'
    CONVERSATIONAL = "conversational language modeling"  # 'messages' / 'conversations'
    TEXT = "language modeling"  # 'text' (or a formatting_func), or bare 'input_ids'
    TEMPLATED_TEXT = "text with response_template"  # plain text split by the response/instruction templates
    ROLES = "per-token roles or weights"  # trl-plw's own 'token_roles' / 'loss_weights' columns

    def __str__(self) -> str:
        return self.value


def detect_data_kind(
    example: Mapping[str, Any], text_field: str, has_template: bool, has_formatting_func: bool
) -> DataKind:
    """The kind of ``example`` (the first row of a dataset), in the order PLWTrainer's preparation reads them."""
    if "loss_weights" in example or "token_roles" in example:
        return DataKind.ROLES
    if "input_ids" in example:
        if "completion_mask" in example:
            return DataKind.PROMPT_COMPLETION
        return DataKind.TEMPLATED_TEXT if has_template else DataKind.TEXT
    if "prompt" in example and "completion" in example:
        return DataKind.PROMPT_COMPLETION
    if has_formatting_func or text_field in example:
        return DataKind.TEMPLATED_TEXT if has_template else DataKind.TEXT
    if "messages" in example or "conversations" in example:
        return DataKind.CONVERSATIONAL
    return DataKind.TEXT  # preparation raises, naming the columns it looked for


def sft_prompt_weight(kind: DataKind, completion_only_loss: bool | None, assistant_only_loss: bool) -> float:
    """The prompt weight that reproduces SFTTrainer's loss on ``kind`` with TRL's two switches (1 or 0).

    Prompt-completion data: TRL masks the prompt unless ``completion_only_loss=False``. Language-modeling data has
    no completion mask, so TRL trains every token (``completion_only_loss`` does not apply) unless
    ``assistant_only_loss=True``. Text split by templates and trl-plw's own per-token roles follow the
    prompt-completion rule (the removed ``DataCollatorForCompletionOnlyLM`` trained the response only)."""
    if assistant_only_loss:
        return 0.0
    if kind in (DataKind.TEXT, DataKind.CONVERSATIONAL):
        return 1.0
    return 1.0 if completion_only_loss is False else 0.0


def describe_sft_default(weight: float) -> str:
    """What the resolved default trains, in words (for the one-line policy log)."""
    if weight == 0:
        return "completion/assistant tokens only, as SFTTrainer"
    return "every token, as SFTTrainer"


POLICY_FIELDS = (
    "response_template",
    "instruction_template",
    "prompt_loss_weight",
    "completion_loss_weight",
    "role_weights",
    "example_weight_column",
    "span_weights",
    "pad_to_multiple_of",
)
"""The settings PLWConfig and DataCollatorForWeightedCompletionLM both have, with the same meaning."""

# Defaults of the settings whose unset value (None) means something other than "none". The prompt weight's default
# depends on the data (`sft_prompt_weight`), or is 0.0 for a collator used on its own (the completion-only collator
# it replaces).
_DEFAULTS = {"completion_loss_weight": 1.0, "example_weight_column": "weight"}


@dataclasses.dataclass(frozen=True)
class WeightingPolicy:
    """What decides each token's weight, once: templates, prompt/completion/role weights, the example-weight column,
    the span rules, and the padding multiple. ``None`` means *unset*, so a value equal to a default is still a statement.

    PLWConfig and DataCollatorForWeightedCompletionLM each hold one (``WeightingPolicy.of(obj)`` reads it); a
    collator passed to PLWTrainer is merged with PLWConfig's by :meth:`merge`, which raises on any setting both state
    differently, and the result is resolved once by :meth:`resolved` before training."""

    response_template: str | list[int] | None = None
    instruction_template: str | list[int] | None = None
    prompt_loss_weight: float | None = None
    completion_loss_weight: float | None = None
    role_weights: dict[str, float] | None = None
    example_weight_column: str | None = None
    span_weights: str | dict | list | None = None
    pad_to_multiple_of: int | None = None

    @classmethod
    def of(cls, obj: Any) -> WeightingPolicy:
        """The policy an object states (PLWConfig, the collator, or anything with the :data:`POLICY_FIELDS`)."""
        return cls(**{name: getattr(obj, name) for name in POLICY_FIELDS})

    def stated(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in POLICY_FIELDS if getattr(self, name) is not None}

    def merge(self, other: WeightingPolicy, name: str, other_name: str) -> WeightingPolicy:
        """Both policies in one: a setting stated by one side is taken; stated by both with different values raises,
        naming both, even where one of them equals the other side's default."""
        merged = {}
        for field in POLICY_FIELDS:
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(
                    f"{other_name}.{field}={theirs!r} but the {name} has {field}={mine!r}. The {name} passed to "
                    f"PLWTrainer is a source of the weighting policy too; state the setting in one place only (or "
                    "give both the same value)."
                )
            merged[field] = mine if mine is not None else theirs
        return WeightingPolicy(**merged)

    def resolved(self, prompt_loss_weight: float) -> WeightingPolicy:
        """Every unset weight filled in: the prompt weight with ``prompt_loss_weight`` (what SFTTrainer trains on the
        data, or 0.0 for a collator on its own), the others with their documented defaults."""
        filled = {name: value for name, value in _DEFAULTS.items() if getattr(self, name) is None}
        if self.prompt_loss_weight is None:
            filled["prompt_loss_weight"] = prompt_loss_weight
        return dataclasses.replace(self, **filled)


__all__ = [
    "POLICY_FIELDS",
    "WeightingPolicy",
    "DataKind",
    "describe_sft_default",
    "detect_data_kind",
    "sft_prompt_weight",
]

"""What SFTTrainer trains on each kind of dataset, so that PLWTrainer with nothing set trains the same tokens.

SFTTrainer's loss depends on the data: language-modeling data (plain ``text``, chat ``messages``, bare
``input_ids``) is trained on every token unless ``assistant_only_loss=True``; prompt-completion data is trained on
the completion unless ``completion_only_loss=False``. PLWTrainer's prompt weight is therefore unset by default
(``prompt_loss_weight=None``) and resolved here, once, from the first training example: the weight SFTTrainer
implies (1 = every token, 0 = completion/assistant only). Setting ``prompt_loss_weight`` (or ``role_weights``) is
what switches real-valued weighting on.
"""

from __future__ import annotations

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


__all__ = ["DataKind", "describe_sft_default", "detect_data_kind", "sft_prompt_weight"]

"""Per-message weights: a ``weight`` key on a chat message multiplies the loss weight of that message's tokens.

Data curators mark turns, not tokens: "train the last answer fully, earlier ones at 0.3", "skip this bad turn".
Axolotl reads a per-message ``weight`` (0/1) and ms-swift a per-assistant-message ``loss`` (a float); here both are
read (``loss`` is an alias of the default key ``weight``), as real numbers, for every role (prompt side included).

Which tokens a message weight multiplies: the message's content, and the end-of-turn token that closes it (the first
special token after the content inside its turn, e.g. ``<|im_end|>``); for an assistant message, the whole completion
span (from the end of the generation prompt through its end-of-turn token). Template boilerplate (``<|im_start|>user\\n``)
keeps its role weight. A token overlapping the message's characters by at least one character is multiplied (the
rule of `trl_plw.spans`). The multiplier is stored per token in the ``message_weights`` column, which truncation and
packing carry like every per-token column; the collator multiplies it into the token weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "MESSAGE_WEIGHT_ALIAS",
    "message_weight_keys",
    "read_message_weight",
    "token_message_weights",
    "any_weighted",
]

MESSAGE_WEIGHT_ALIAS = "loss"
"""ms-swift's name for the per-message weight, accepted when the key is the default ``"weight"``."""


def message_weight_keys(key: str) -> tuple[str, ...]:
    """The message keys read for ``key``: ``("weight", "loss")`` for the default key, ``(key,)`` otherwise."""
    return (key, MESSAGE_WEIGHT_ALIAS) if key == "weight" else (key,)


def read_message_weight(
    message: Mapping[str, Any], index: int, key: str, allow_negative: bool = False
) -> float | None:
    """The weight of message ``index`` (None without one); bad values raise naming the message and the key."""
    found = {k: message[k] for k in message_weight_keys(key) if k in message and message[k] is not None}
    if not found:
        return None
    if len(found) > 1 and len({_number(v) for v in found.values()}) > 1:
        raise ValueError(
            f"Message {index} has both {found!r}; '{MESSAGE_WEIGHT_ALIAS}' is an alias of '{key}', give one of them."
        )
    name, value = next(iter(found.items()))
    where = f"Message {index} ({message.get('role')!r}): `{name}`={value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where} must be a number (a weight such as 0, 0.3 or 1), not {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where} is not finite; message weights must be finite numbers.")
    if value < 0 and not allow_negative:
        raise ValueError(
            f"{where} is negative. Negative weights push the model away from those tokens; set "
            "allow_negative_weights=True if that is intended."
        )
    return value


def _number(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return repr(value)


def any_weighted(conversations: Iterable[Sequence[Mapping[str, Any]] | None], key: str) -> bool:
    """Whether any message of any conversation carries a weight under ``key`` (or its alias)."""
    keys = message_weight_keys(key)
    return any(
        isinstance(m, Mapping) and any(m.get(k) is not None for k in keys)
        for conversation in conversations
        if isinstance(conversation, list)
        for m in conversation
    )


def token_message_weights(
    messages: Sequence[Mapping[str, Any]],
    offsets: np.ndarray,
    message_chars: Sequence[Sequence[tuple[int, int]]],
    key: str,
    allow_negative: bool = False,
) -> np.ndarray:
    """Per-token multiplier (float64, 1 where no weighted message owns the token) from the messages' weights and
    the character spans each message owns (`trl_plw.roles` finds them while tokenizing)."""
    out = np.ones(offsets.shape[0], dtype=np.float64)
    starts, ends = offsets[:, 0], offsets[:, 1]
    for index, message in enumerate(messages):
        weight = read_message_weight(message, index, key, allow_negative)
        if weight is None or weight == 1.0:
            continue
        covered = np.zeros(offsets.shape[0], dtype=bool)
        for s, e in message_chars[index]:
            covered |= (starts < e) & (ends > s) & (ends > starts)
        out[covered] *= weight
    return out

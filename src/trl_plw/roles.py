"""Per-token roles: which part of a training sequence each token belongs to.

A *role* is a small integer code stored per token (the ``token_roles`` column). The collator turns roles into loss
weights through a `RoleWeights` table, so one tokenized dataset serves any prompt-loss weight, and the roles survive
truncation and packing like any other per-token column.

Roles can be built at dataset-preparation time from

* prompt/completion pairs: `tokenize_prompt_completion` (plain text or conversational, consistent with TRL's
  ``tokenize_fn``);
* whole conversations: `tokenize_messages` (any chat template that renders prefix-consistently);
* TRL's 0/1 masks: `roles_from_completion_mask`, `roles_from_assistant_masks`;
* text templates such as ``"### Response:"`` or ``"<|im_start|>assistant\\n"``: `TemplateMatcher` and
  `roles_from_templates`, the replacement for the response/instruction templates of TRL's removed
  ``DataCollatorForCompletionOnlyLM``.

Example:
```python
>>> from trl_plw.roles import Role, RoleWeights
>>> weights = RoleWeights(prompt=0.1, system=0.0)
>>> table = weights.table()
>>> [round(float(table[int(r)]), 3) for r in (Role.PROMPT, Role.COMPLETION, Role.SYSTEM, Role.USER, Role.IGNORE)]
[0.1, 1.0, 0.0, 0.1, 0.0]

```
"""

from __future__ import annotations

import enum
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "Role",
    "RoleWeights",
    "NUM_ROLES",
    "PROMPT_SIDE_ROLES",
    "TemplateMatcher",
    "TemplateNotPrefixConsistentError",
    "template_variants",
    "roles_from_templates",
    "roles_from_completion_mask",
    "roles_from_assistant_masks",
    "tokenize_prompt_completion",
    "tokenize_messages",
    "message_role_code",
    "check_weight",
    "ROLE_SOURCE_COLUMNS",
    "WEIGHT_SOURCE_COLUMNS",
    "PER_TOKEN_COLUMNS",
    "MULTIPLIER_COLUMNS",
    "first_source",
    "has_completion",
]


class Role(enum.IntEnum):
    """Role code of one token (stored as a small int in the ``token_roles`` column).

    ``IGNORE`` tokens are neither trained nor scored (e.g. a user-given label of -100). ``COMPLETION`` is everything
    the model must generate: the assistant's content *and* the assistant turn's end-of-turn token, so the model
    learns to stop. All other codes are on the prompt side; the chat-specific ones (``SYSTEM``, ``USER``, ``TOOL``,
    ``TEMPLATE``) let a prompt weight differ per role, and fall back to the ``PROMPT`` weight by default.
    """

    IGNORE = -1
    PROMPT = 0
    COMPLETION = 1
    SYSTEM = 2
    USER = 3
    TOOL = 4
    TEMPLATE = 5  # chat-template boilerplate such as "<|im_start|>user\n"


NUM_ROLES = 6
"""Number of non-negative role codes (``PROMPT`` .. ``TEMPLATE``)."""

PROMPT_SIDE_ROLES = (Role.PROMPT, Role.SYSTEM, Role.USER, Role.TOOL, Role.TEMPLATE)

_ROLE_FIELDS = ("prompt", "completion", "system", "user", "tool", "template")  # index = role code
_MAPPING_KEYS = ("prompt", "completion", "assistant", "system", "user", "tool", "template")

# Message "role" strings of chat datasets -> role code of the message's content.
_MESSAGE_ROLES = {
    "system": Role.SYSTEM,
    "developer": Role.SYSTEM,
    "user": Role.USER,
    "human": Role.USER,
    "assistant": Role.COMPLETION,
    "gpt": Role.COMPLETION,
    "model": Role.COMPLETION,
    "bot": Role.COMPLETION,
    "tool": Role.TOOL,
    "ipython": Role.TOOL,
    "function": Role.TOOL,
    "tool_response": Role.TOOL,
    "observation": Role.TOOL,
}


def message_role_code(role: str) -> Role:
    """Role code of a chat message's content from its ``"role"`` string (``"assistant"`` -> ``COMPLETION``).

    Unknown roles map to ``PROMPT`` (prompt side, weighted like the prompt).
    """
    return _MESSAGE_ROLES.get(str(role).lower(), Role.PROMPT)


# ------------------------------------------------------------------------------------------------ per-token columns
ROLE_SOURCE_COLUMNS = ("token_roles", "completion_mask", "assistant_masks")
"""Per-token columns that say what each token is, in order of precedence: role codes, then TRL's 0/1 masks."""

WEIGHT_SOURCE_COLUMNS = ("loss_weights", *ROLE_SOURCE_COLUMNS)
"""Per-token columns an example's weights come from, in order of precedence: explicit weights first, then
`ROLE_SOURCE_COLUMNS` (response/instruction templates are the fallback when an example has none of them)."""

MULTIPLIER_COLUMNS = ("message_weights", "token_spans")
"""Per-token columns that multiply whatever weight the source gives: per-message weights (floats) and the bit mask
of the span rules covering each token (`trl_plw.message_weights`, `trl_plw.spans`)."""

PER_TOKEN_COLUMNS = ("input_ids", "labels", *WEIGHT_SOURCE_COLUMNS, *MULTIPLIER_COLUMNS)
"""Every column with one value per token: truncated and packed together with ``input_ids``, kept aligned."""


def first_source(example: Mapping[str, Any], columns: Sequence[str] = WEIGHT_SOURCE_COLUMNS) -> str | None:
    """The first of ``columns`` that ``example`` has (a value other than None), or None: the one precedence rule
    that the collator (weights) and PLWTrainer (dataset checks, completion filter) both follow."""
    return next((name for name in columns if example.get(name) is not None), None)


def has_completion(example: Mapping[str, Any]) -> bool:
    """Whether an example trains on anything, judged by its first weight source: a non-zero weight, a
    ``COMPLETION`` role or a 1 in a completion mask. True when it has no source (templates decide later)."""
    source = first_source(example)
    if source is None:
        return True
    values = example[source]
    if source == "loss_weights":
        return any(w != 0 for w in values)
    return (int(Role.COMPLETION) if source == "token_roles" else 1) in values


# ----------------------------------------------------------------------------------------------------------- weights
def check_weight(
    name: str, value: Any, allow_negative: bool = False, allow_none: bool = False, opt_in: str | None = None
) -> float | None:
    """Validate one loss weight (a finite number; negative only if allowed); ``name`` is used in the error.

    ``opt_in`` is how the caller accepts negative weights (e.g. ``"allow_negative_weights=True"``), named in the
    error; None for callers that never accept them, whose error then names no switch."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a number, got None.")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} is not finite: loss weights must be finite numbers.")
    if value < 0 and not allow_negative:
        how = f"if that is intended, set {opt_in}" if opt_in else "they are not accepted here"
        raise ValueError(
            f"{name}={value} is negative. Negative weights push the model away from those tokens "
            f"(unlikelihood-style); {how}."
        )
    return value


@dataclass
class RoleWeights:
    """Loss weight of each role.

    ``system``/``user``/``tool``/``template`` default to ``None``, meaning "same as ``prompt``". The defaults
    (prompt 0, completion 1) reproduce completion-only training.

    Args:
        prompt: weight of prompt-side tokens without a more specific role.
        completion: weight of completion (assistant) tokens.
        system: override of ``prompt`` for system-message tokens (chat data).
        user: override of ``prompt`` for user-message tokens.
        tool: override of ``prompt`` for tool-message tokens.
        template: override of ``prompt`` for the chat template's own tokens (role headers, end-of-turn markers).
        allow_negative: accept negative weights (validated at construction otherwise).

    Example:
    ```python
    >>> RoleWeights.from_mapping({"prompt": 0.1, "assistant": 1.0, "template": 0.0}).resolved()
    {'prompt': 0.1, 'completion': 1.0, 'system': 0.1, 'user': 0.1, 'tool': 0.1, 'template': 0.0}

    ```
    """

    prompt: float = 0.0
    completion: float = 1.0
    system: float | None = None
    user: float | None = None
    tool: float | None = None
    template: float | None = None
    allow_negative: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in _ROLE_FIELDS:
            value = check_weight(
                f"RoleWeights.{name}",
                getattr(self, name),
                self.allow_negative,
                name not in ("prompt", "completion"),
                opt_in="allow_negative=True",
            )
            setattr(self, name, value)

    @classmethod
    def from_mapping(
        cls,
        mapping: Mapping[str, float | None] | None = None,
        *,
        allow_negative: bool = False,
        name: str = "role weights",
        **defaults: float,
    ) -> RoleWeights:
        """Build from a dict with keys among prompt, completion (alias: assistant), system, user, tool, template.

        ``defaults`` (same keys) are used where ``mapping`` has no entry, e.g.
        ``RoleWeights.from_mapping(role_weights, prompt=0.1)``. ``name`` labels the mapping in error messages.
        """
        merged: dict[str, Any] = {}
        for source_name, source in (("defaults", defaults), (name, dict(mapping or {}))):
            unknown = sorted(set(source) - set(_MAPPING_KEYS))
            if unknown:
                raise ValueError(
                    f"Unknown role weight key(s) {unknown} in {source_name}; valid keys are {list(_MAPPING_KEYS)} "
                    "('assistant' is an alias of 'completion')."
                )
            source = dict(source)
            if "assistant" in source:
                if "completion" in source and source["completion"] != source["assistant"]:
                    raise ValueError(
                        f"Role weights give both completion={source['completion']} and "
                        f"assistant={source['assistant']}; they are the same role, give one of them."
                    )
                source["completion"] = source.pop("assistant")
            merged.update(source)
        return cls(**merged, allow_negative=allow_negative)

    def resolved(self) -> dict[str, float]:
        """Weight of every role with the ``None`` fallbacks applied (keys in role-code order)."""
        return {name: (self.prompt if getattr(self, name) is None else getattr(self, name)) for name in _ROLE_FIELDS}

    def weight(self, role: int | Role) -> float:
        """Weight of one role code (0 for ``IGNORE``)."""
        if int(role) == Role.IGNORE:
            return 0.0
        return self.resolved()[_ROLE_FIELDS[int(role)]]

    def table(self) -> torch.Tensor:
        """Float32 lookup table indexed by role code: ``table()[token_roles]`` gives per-token weights.

        It has ``NUM_ROLES + 1`` entries; the last one is 0, so index ``-1`` (``Role.IGNORE``, via Python's negative
        indexing) maps to weight 0 and the table can be indexed with raw role codes, IGNORE included.
        """
        values = list(self.resolved().values()) + [0.0]
        return torch.tensor(values, dtype=torch.float32)

    def lookup(self, token_roles: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Per-token float32 weights for a tensor (or list) of role codes."""
        return self.table()[torch.as_tensor(token_roles, dtype=torch.long)]

    @property
    def is_binary(self) -> bool:
        """True when every role weight is 0 or 1 (then -100 labels alone express the weighting)."""
        return all(v in (0.0, 1.0) for v in self.resolved().values())


# ------------------------------------------------------------------------------------------------------- masks -> roles
def _as_numpy_1d(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D sequence per example, got shape {array.shape}.")
    return array


def roles_from_completion_mask(mask: Any) -> np.ndarray:
    """TRL's ``completion_mask`` (1 = completion) -> role codes (``COMPLETION``/``PROMPT``), int8."""
    return (_as_numpy_1d(mask, "completion_mask") != 0).astype(np.int8)  # COMPLETION == 1, PROMPT == 0


def roles_from_assistant_masks(mask: Any) -> np.ndarray:
    """TRL's ``assistant_masks`` (1 = assistant token) -> role codes (``COMPLETION``/``PROMPT``), int8."""
    return (_as_numpy_1d(mask, "assistant_masks") != 0).astype(np.int8)


# --------------------------------------------------------------------------------------------------------- templates
# Text placed before/after a template when tokenizing it "in context". Byte-level BPE and SentencePiece tokenizers
# often tokenize the first characters of a template differently after a space, a newline or a word (e.g. SmolLM2:
# "### Response:" alone is ["###", " Response", ":"] but after "a " it is [" ###", " Response", ":"]) and may merge
# its last characters with what follows. See `template_variants`.
_LEFT_CONTEXTS = ("", " ", "  ", "\n", "\n\n", "\n\n\n", "x", "x ", "x\n", "x\n\n", ".", ". ", ".\n", ":", "\t")
_RIGHT_CONTEXTS = ("", " ", "\n", "\n\n", "x", " x", "\nx", "\n\nx", ".")


def _is_int_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray, torch.Tensor)) and all(
        isinstance(v, (int, np.integer)) or (isinstance(v, torch.Tensor) and v.ndim == 0) for v in value
    )


def template_variants(
    tokenizer: Any,
    template: str | Sequence[int] | Sequence[Sequence[int]],
    *,
    left_contexts: Iterable[str] = _LEFT_CONTEXTS,
    right_contexts: Iterable[str] = _RIGHT_CONTEXTS,
    min_coverage: float = 0.5,
) -> tuple[tuple[int, ...], ...]:
    """The token-id sequences a template can tokenize to inside a text.

    A string template is tokenized inside every pair of left/right contexts (nothing, spaces, newlines, a word,
    punctuation) with ``return_offsets_mapping``, and each pair contributes up to two variants:

    * the tokens overlapping the template's characters, when what they add outside it is only whitespace (so
      ``[" ###", " Response", ":"]`` after a space, or a last token ``":\n"`` merged with a following newline);
    * the *core*: the tokens lying entirely inside the template's characters, which still matches when the first or
      last characters merged with a non-whitespace neighbour. A core must keep at least two tokens (when the
      template has two) and ``min_coverage`` of the template's characters, so a short leftover (a lone ``":"``)
      never matches everywhere.

    A match of a core alone (no other variant there) counts only where the decoded text around it, one token either
    side, contains the whole template: a core such as ``[" Response", ":"]`` also occurs in prose ("the Response:
    ..."), which must not move the completion boundary (`TemplateMatcher` checks this). The standalone tokenization
    is always included. Overlapping matches of several variants count as one occurrence
    (see `TemplateMatcher`). Tokenizers without offsets (slow ones) fall back to the difference between tokenizing
    ``context + template`` and ``context`` when the latter is a prefix of the former.

    Token-id templates (``list[int]``) are used as given; a list of lists gives several variants explicitly.
    """
    exact, core = _split_template_variants(tokenizer, template, left_contexts, right_contexts, min_coverage)
    return exact + core


def _split_template_variants(
    tokenizer: Any,
    template: str | Sequence[int] | Sequence[Sequence[int]],
    left_contexts: Iterable[str] = _LEFT_CONTEXTS,
    right_contexts: Iterable[str] = _RIGHT_CONTEXTS,
    min_coverage: float = 0.5,
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    if isinstance(template, str):
        if tokenizer is None:
            raise ValueError(
                f"The template {template!r} is a string; a tokenizer is needed to turn it into token ids. Pass "
                "`tokenizer=...`, or give the template as token ids."
            )
        if not template:
            raise ValueError("The template is an empty string.")
        standalone = tuple(tokenizer(template, add_special_tokens=False)["input_ids"])
        variants: dict[tuple[int, ...], None] = {standalone: None} if standalone else {}
        cores: dict[tuple[int, ...], None] = {}
        need_chars = max(1, math.ceil(min_coverage * len(template)))
        need_tokens = min(2, len(standalone)) if standalone else 1
        for left in left_contexts:
            for right in right_contexts:
                text = left + template + right
                try:
                    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                except (NotImplementedError, TypeError, ValueError):  # no offsets: compare with the context alone
                    context_ids = tokenizer(left, add_special_tokens=False)["input_ids"] if left else []
                    full_ids = tokenizer(left + template, add_special_tokens=False)["input_ids"]
                    if full_ids[: len(context_ids)] == context_ids and len(full_ids) > len(context_ids):
                        variants[tuple(full_ids[len(context_ids) :])] = None
                    continue
                lo, hi = len(left), len(left) + len(template)
                overlapping = [
                    (tok, s, e)
                    for tok, (s, e) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
                    if s < hi and e > lo and e > s
                ]
                if not overlapping:
                    continue
                # Tokens that spill over the template only by whitespace (" ###", ":\n") belong to it: keep them.
                spill = text[overlapping[0][1] : lo] + text[hi : overlapping[-1][2]]
                if not spill.strip():
                    variants[tuple(t for t, _, _ in overlapping)] = None
                # The core: tokens lying entirely inside the template, for merges with non-whitespace neighbours.
                core = [(t, s, e) for t, s, e in overlapping if lo <= s and e <= hi]
                if len(core) >= need_tokens and core[-1][2] - core[0][1] >= need_chars:
                    cores[tuple(t for t, _, _ in core)] = None
        if not variants and not cores:
            raise ValueError(f"The template {template!r} tokenizes to no tokens.")
        return tuple(variants), tuple(c for c in cores if c not in variants)
    if isinstance(template, torch.Tensor):
        template = template.tolist()
    if _is_int_sequence(template):
        if len(template) == 0:
            raise ValueError("The template token ids are empty.")
        return (tuple(int(t) for t in template),), ()
    if isinstance(template, (list, tuple)) and all(_is_int_sequence(v) and len(v) > 0 for v in template) and template:
        return tuple(dict.fromkeys(tuple(int(t) for t in v) for v in template)), ()
    raise TypeError(f"A template must be a string, a list of token ids or a list of such lists; got {template!r}.")


def _find_occurrences(
    ids: np.ndarray,
    variants: Sequence[tuple[int, ...]],
    checked: Sequence[tuple[int, ...]] = (),
    accept: Callable[[np.ndarray, int, int], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Start/end (exclusive) token positions of the occurrences of any variant, overlapping matches merged.

    Vectorized: for each variant, candidate starts are narrowed one template position at a time (a loop over the
    template's few tokens, never over the sequence). Matches of several variants that overlap are one occurrence,
    spanning from the earliest start to the latest end. Matches of the ``checked`` variants count only where
    ``accept(ids, start, end)`` says so (string templates' cores, see `template_variants`).
    """
    n = ids.shape[0]
    starts, ends = [], []
    for index, variant in enumerate((*variants, *checked)):
        length = len(variant)
        if length > n:
            continue
        candidates = np.flatnonzero(ids[: n - length + 1] == variant[0])
        for k in range(1, length):
            if candidates.size == 0:
                break
            candidates = candidates[ids[candidates + k] == variant[k]]
        if candidates.size and accept is not None and index >= len(variants):
            candidates = candidates[[accept(ids, int(c), int(c) + length) for c in candidates]]
        if candidates.size:
            starts.append(candidates)
            ends.append(candidates + length)
    if not starts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    s = np.concatenate(starts)
    e = np.concatenate(ends)
    order = np.lexsort((-e, s))
    s, e = s[order], e[order]
    running_end = np.maximum.accumulate(e)
    new_group = np.ones(s.shape[0], dtype=bool)
    new_group[1:] = s[1:] >= running_end[:-1]
    group_starts = np.flatnonzero(new_group)
    return s[new_group], np.maximum.reduceat(e, group_starts)


def _as_variants(value: Any) -> tuple[tuple[int, ...], ...]:
    if isinstance(value, TemplateMatcher):
        raise TypeError("Pass a TemplateMatcher's `.roles(input_ids)` instead of the matcher itself.")
    if isinstance(value, str):
        raise TypeError(
            "roles_from_templates takes token ids; build a TemplateMatcher(tokenizer, template) for string templates."
        )
    return template_variants(None, value)


_Finder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _named_template_variants(tokenizer: Any, template: Any, field_name: str):
    """`_split_template_variants`, with errors that name the argument the template came from."""
    try:
        return _split_template_variants(tokenizer, template)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{field_name}={template!r}: {error}") from error


def _template_roles(
    ids: np.ndarray, find_response: _Finder, find_instruction: _Finder | None
) -> tuple[np.ndarray, bool]:
    n = ids.shape[0]
    roles = np.full(n, Role.PROMPT, dtype=np.int8)
    r_starts, r_ends = find_response(ids)
    if r_starts.size == 0:
        return roles, False
    template_edges = np.zeros(n + 1, dtype=np.int32)
    np.add.at(template_edges, r_starts, 1)
    np.add.at(template_edges, r_ends, -1)
    if find_instruction is None:
        roles[r_ends[-1] :] = Role.COMPLETION
    else:
        i_starts, i_ends = find_instruction(ids)
        np.add.at(template_edges, i_starts, 1)
        np.add.at(template_edges, i_ends, -1)
        # Sweep: the end of a response template opens a completion span; the start of an instruction template (or
        # of another response template) closes it. Starts are written last so they win a tie (empty completion).
        event = np.zeros(n + 1, dtype=np.int8)
        event[r_ends] = 1
        event[r_starts] = 2
        event[i_starts] = 2
        event = event[:n]
        last_event = np.maximum.accumulate(np.where(event != 0, np.arange(n), -1))
        state = np.where(last_event >= 0, event[np.maximum(last_event, 0)], 2)
        roles[state == 1] = Role.COMPLETION
    inside_template = np.cumsum(template_edges[:n]) > 0
    roles[inside_template & (roles != Role.COMPLETION)] = Role.TEMPLATE
    return roles, True


def roles_from_templates(
    input_ids: Any,
    response_template_ids: Sequence[int] | Sequence[Sequence[int]],
    instruction_template_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
) -> tuple[np.ndarray, bool]:
    """Role codes (int8) of one sequence from response/instruction templates, like TRL's old completion-only
    collator, and whether the response template was found.

    * Without an instruction template, everything up to the end of the LAST response-template occurrence is
      prompt side and everything after it is ``COMPLETION``.
    * With one, every span from the end of a response template to the start of the next instruction template (or
      the end of the sequence) is ``COMPLETION``: all assistant turns of a multi-turn conversation are trained.

    Template tokens themselves get ``TEMPLATE`` (prompt side), the rest of the prompt ``PROMPT``. Each template is a
    token-id list or a list of token-id lists (variants, see `template_variants`); any variant matches. When the
    response template is not found, all roles are ``PROMPT`` and ``found`` is False.

    Example:
    ```python
    >>> roles, found = roles_from_templates([5, 9, 7, 1, 2, 3, 9, 8, 4, 4], [9, 7], [9, 8])
    >>> roles.tolist(), found
    ([0, 5, 5, 1, 1, 1, 5, 5, 0, 0], True)

    ```
    """
    ids = _as_numpy_1d(input_ids, "input_ids").astype(np.int64, copy=False)
    response = _as_variants(response_template_ids)
    instruction = None if instruction_template_ids is None else _as_variants(instruction_template_ids)
    return _template_roles(
        ids,
        lambda x: _find_occurrences(x, response),
        None if instruction is None else lambda x: _find_occurrences(x, instruction),
    )


class TemplateMatcher:
    """Finds response/instruction templates in token ids, robustly to context-dependent tokenization.

    A string template is expanded once into the set of token-id sequences it tokenizes to in context (see
    `template_variants`: it is tokenized after/before spaces, newlines, words and punctuation, keeping the tokens that
    lie inside the template's characters). Any variant matches; overlapping matches are one occurrence. Token-id
    templates are used as given.

    Args:
        tokenizer: needed for string templates (may be None for token-id templates).
        response_template: marks the start of a completion (e.g. ``"### Response:"``, ``"<|im_start|>assistant\\n"``).
        instruction_template: marks the start of a prompt turn (e.g. ``"<|im_start|>user\\n"``); enables
            multi-turn semantics in `roles`.

    Example:
    ```python
    >>> from trl_plw.roles import TemplateMatcher
    >>> matcher = TemplateMatcher(None, [9, 7], [9, 8])
    >>> matcher.roles([5, 9, 7, 1, 2, 3, 9, 8, 4, 4])[0].tolist()
    [0, 5, 5, 1, 1, 1, 5, 5, 0, 0]

    ```
    """

    def __init__(
        self,
        tokenizer: Any,
        response_template: str | Sequence[int] | Sequence[Sequence[int]],
        instruction_template: str | Sequence[int] | Sequence[Sequence[int]] | None = None,
    ) -> None:
        if response_template is None:
            raise ValueError("TemplateMatcher needs a response_template.")
        self.tokenizer = tokenizer
        self.response_template = response_template
        self.instruction_template = instruction_template
        self._response = _named_template_variants(tokenizer, response_template, "response_template")
        self._instruction = (
            None
            if instruction_template is None
            else _named_template_variants(tokenizer, instruction_template, "instruction_template")
        )
        self.response_variants = self._response[0] + self._response[1]
        self.instruction_variants = None if self._instruction is None else self._instruction[0] + self._instruction[1]
        self._find_response = self._finder(self._response, response_template)
        self._find_instruction = (
            None if self._instruction is None else self._finder(self._instruction, instruction_template)
        )

    def __repr__(self) -> str:
        return (
            f"TemplateMatcher(response_template={self.response_template!r}, "
            f"instruction_template={self.instruction_template!r}, response_variants={self.response_variants}, "
            f"instruction_variants={self.instruction_variants})"
        )

    def _finder(self, split: tuple, template: Any) -> _Finder:
        exact, cores = split

        def accept(ids: np.ndarray, start: int, end: int) -> bool:
            # A core left out the template's edge tokens, merged with their neighbours: those neighbours, decoded
            # with it, must spell the whole template, or the match is prose that shares its inner tokens.
            around = self.tokenizer.decode(ids[max(start - 1, 0) : end + 1].tolist())
            return template.strip() in around

        return lambda ids: _find_occurrences(ids, exact, cores, accept if cores else None)

    def find_response(self, input_ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends) of the response-template occurrences."""
        return self._find_response(_as_numpy_1d(input_ids, "input_ids").astype(np.int64, copy=False))

    def find_instruction(self, input_ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends) of the instruction-template occurrences (empty without an instruction template)."""
        if self._find_instruction is None:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        return self._find_instruction(_as_numpy_1d(input_ids, "input_ids").astype(np.int64, copy=False))

    def roles(self, input_ids: Any) -> tuple[np.ndarray, bool]:
        """Role codes (int8) and whether the response template was found; semantics of `roles_from_templates`."""
        ids = _as_numpy_1d(input_ids, "input_ids").astype(np.int64, copy=False)
        return _template_roles(ids, self._find_response, self._find_instruction)

    __call__ = roles

    def document_roles(
        self,
        input_ids: Any,
        doc_lengths: Sequence[int] | None = None,
        *,
        where: str = "an example",
        on_missing: str = "raise",
    ) -> tuple[np.ndarray, list[str]]:
        """Role codes (int8) of every document of ``input_ids`` (one per ``doc_lengths`` entry, default: one
        document), matched separately so a packed row's documents do not see each other's templates.

        A document without the response template raises (``on_missing="raise"``) or gets ``IGNORE`` roles
        (``"ignore"``), so it is neither trained nor scored: never its prompt instead. Returns the roles and a
        description of each document without the template (``where``, plus its offset in a packed row), for the
        caller's count and warning. The collator and PLWTrainer's dataset preparation both decide here."""
        ids = _as_numpy_1d(input_ids, "input_ids").astype(np.int64, copy=False)
        lengths = [ids.shape[0]] if doc_lengths is None else list(doc_lengths)
        parts, missing, offset = [], [], 0
        for length in lengths:
            doc = ids[offset : offset + length]
            roles, found = self.roles(doc)
            if not found:
                doc_where = where + (f", packed document starting at token {offset}" if len(lengths) > 1 else "")
                if on_missing == "raise":
                    raise self._missing_error(doc, doc_where)
                missing.append(doc_where)
                roles = np.full(length, Role.IGNORE, dtype=np.int8)
            parts.append(roles)
            offset += length
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)), missing

    def _missing_error(self, doc: np.ndarray, where: str) -> ValueError:
        text = self.tokenizer.decode(doc[:80].tolist()) if self.tokenizer is not None else doc[:40].tolist()
        return ValueError(
            f"response_template={self.response_template!r} was not found in {where} (starts with {text!r}); looked "
            f"for the token sequences {list(self.response_variants)}. Fix the template, drop such examples, set "
            "on_missing_template='ignore' on the DataCollatorForWeightedCompletionLM to give them weight 0 (PLWTrainer "
            "then drops them), or build `token_roles` at dataset preparation (trl_plw.roles)." + self._escape_hint()
        )

    def _escape_hint(self) -> str:
        """A template typed on a command line keeps ``\\n`` as two characters (HfArgumentParser does not unescape)."""
        literal = [t for t in (self.response_template, self.instruction_template) if isinstance(t, str) and "\\n" in t]
        if not literal:
            return ""
        return (
            f" The template {literal[0]!r} contains a backslash followed by 'n', not a newline: on a shell command line "
            "write $'### Response:\\n' (bash), or put it in a YAML config as a double-quoted \"### Response:\\n\"."
        )


# ------------------------------------------------------------------------------------------------------ tokenization
class TemplateNotPrefixConsistentError(ValueError):
    """The chat template renders a conversation prefix as text that is not a prefix of the full conversation."""


def _special_token_ids(tokenizer: Any) -> np.ndarray:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return np.fromiter(sorted(ids), dtype=np.int64)


def _content_texts(message: Mapping[str, Any]) -> list[str]:
    content = message.get("content")
    if isinstance(content, str):
        return [content] if content else []
    if isinstance(content, list):  # multimodal-style parts
        return [p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str) and p["text"]]
    return []


_MARKER = "\ue000plw-content\ue001"  # private-use characters: never produced by a template


def _find_content(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    index: int,
    kwargs: dict[str, Any],
    full: str,
    lo: int,
    hi: int,
) -> list[tuple[int, int]]:
    """Character spans of message ``index``'s content inside ``full[lo:hi]``.

    A string content is located exactly by rendering the conversation up to this message with the content replaced by
    a marker: where the marker lands is where the content starts (a plain text search could hit the same characters
    in the template's own text, e.g. a default system prompt). If that fails (the template transforms the content),
    the content, then its stripped form, is searched in the turn.
    """
    message = messages[index]
    content = message.get("content")
    if isinstance(content, str) and content:
        try:
            probe = _render(tokenizer, [*messages[:index], {**message, "content": _MARKER}], False, kwargs)
        except Exception:  # noqa: BLE001 - the probe is an optimisation; fall back to searching
            probe = ""
        pos = probe.find(_MARKER)
        if lo <= pos < hi and probe[:pos] == full[:pos]:
            for candidate in (content, content.lstrip(), content.strip()):
                if candidate and full.startswith(candidate, pos) and pos + len(candidate) <= hi:
                    return [(pos, pos + len(candidate))]
    spans = []
    cursor = lo
    for part in _content_texts(message):
        for candidate in (part, part.strip()):
            if not candidate:
                continue
            pos = full.find(candidate, cursor, hi)
            if pos >= 0:
                spans.append((pos, pos + len(candidate)))
                cursor = pos + len(candidate)
                break
    return spans


def _parse_tools(tools: Any) -> Any:
    return json.loads(tools) if isinstance(tools, str) else tools


def _render(tokenizer, messages, add_generation_prompt: bool, kwargs: dict[str, Any]) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


# Priority of each role code when a token covers characters of several roles:
# TEMPLATE < PROMPT < SYSTEM < USER < TOOL < COMPLETION.
_PRIORITY = np.array([1, 5, 2, 3, 4, 0], dtype=np.int8)
_BY_PRIORITY = np.argsort(_PRIORITY).astype(np.int8)  # priority -> role code


def _token_roles_from_chars(char_roles: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Role of each token from the roles of its characters: the highest-priority role among them (COMPLETION wins,
    so a token straddling assistant content and boilerplate is trained). Vectorized with per-role prefix sums."""
    n_chars = char_roles.shape[0]
    starts = np.clip(offsets[:, 0], 0, n_chars)
    ends = np.clip(offsets[:, 1], 0, n_chars)
    empty = ends <= starts
    # A token with an empty character range takes the role of the character at its start.
    ends = np.where(empty, np.minimum(starts + 1, n_chars), ends)
    starts = np.where(empty, np.maximum(ends - 1, 0), starts)
    best = np.zeros(offsets.shape[0], dtype=np.int8)
    priority = _PRIORITY[char_roles]
    for level in range(1, NUM_ROLES):
        counts = np.concatenate(([0], np.cumsum(priority == level)))
        present = counts[ends] - counts[starts] > 0
        best[present] = level
    return _BY_PRIORITY[best]


class _Conversation(NamedTuple):
    """A tokenized conversation: ids, roles, and the characters each message owns (its content, and for every role
    the end-of-turn token after it), which per-message weights (`trl_plw.message_weights`) multiply."""

    input_ids: list[int]
    roles: np.ndarray
    offsets: np.ndarray  # [n, 2] character range of each token
    message_chars: list[list[tuple[int, int]]]


def _end_of_turn(
    ids: np.ndarray, offsets: np.ndarray, special: np.ndarray, after: int, turn_end: int
) -> tuple[int, int] | None:
    """Character range of the first special token (the end-of-turn token) starting in ``[after, turn_end)``."""
    token_starts = offsets[:, 0]
    first = int(np.searchsorted(token_starts, after, side="left"))
    last = int(np.searchsorted(token_starts, turn_end, side="left"))
    is_special = np.isin(ids[first:last], special)
    if not is_special.any():
        return None
    token = first + int(np.argmax(is_special))
    return int(offsets[token, 0]), int(offsets[token, 1])


def _analyse_conversation(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], kwargs: dict[str, Any]
) -> _Conversation:
    if not messages:
        raise ValueError("tokenize_messages got an empty list of messages.")
    full = _render(tokenizer, messages, False, kwargs)
    bounds = [0]
    for i in range(1, len(messages)):
        try:
            prefix = _render(tokenizer, messages[:i], False, kwargs)
        except Exception as exc:  # noqa: BLE001 - a template may refuse partial conversations
            raise TemplateNotPrefixConsistentError(
                f"The chat template cannot render the first {i} message(s) alone ({type(exc).__name__}: {exc}), so "
                "token roles cannot be assigned per message. Use a chat template that renders conversation prefixes "
                "(pass chat_template=...), or give roles another way (completion_mask / response_template)."
            ) from exc
        if not full.startswith(prefix) or len(prefix) < bounds[-1]:
            raise TemplateNotPrefixConsistentError(
                f"The chat template is not prefix-consistent: the first {i} message(s) render to text that is not a "
                "prefix of the whole conversation, so characters cannot be attributed to messages. Rendered prefix "
                f"ends with {prefix[-80:]!r}; the conversation continues with {full[len(prefix) - 80 : len(prefix)]!r}. "
                "Use a chat template that renders conversations incrementally (pass chat_template=...), or give roles "
                "another way (prompt/completion columns, completion_mask, or a response_template)."
            )
        bounds.append(len(prefix))
    bounds.append(len(full))

    char_roles = np.full(len(full), Role.TEMPLATE, dtype=np.int8)
    assistant_spans = []  # (completion start, content end, turn end, message index) in characters
    other_spans = []  # (content spans, turn end, message index) of the other messages
    for i, message in enumerate(messages):
        lo, hi = bounds[i], bounds[i + 1]
        code = message_role_code(message.get("role", ""))
        if code != Role.COMPLETION:
            spans = _find_content(tokenizer, messages, i, kwargs, full, lo, hi)
            if not spans and _content_texts(message):
                warnings.warn(
                    f"tokenize_messages: the content of message {i} ({message.get('role')!r}) was not found verbatim in "
                    "its rendered turn; the whole turn gets that message's role.",
                    stacklevel=3,
                )
                spans = [(lo, hi)]
            for s, e in spans:
                char_roles[s:e] = code
            other_spans.append((spans, hi, i))
            continue
        # Assistant turn: the completion starts right after the generation prompt when the template renders it
        # prefix-consistently (as in TRL's prompt-completion split), otherwise at the content.
        start = None
        if i > 0:
            try:
                generation_prompt = _render(tokenizer, messages[:i], True, kwargs)
            except Exception:  # noqa: BLE001
                generation_prompt = None
            if (
                generation_prompt is not None
                and full.startswith(generation_prompt)
                and lo <= len(generation_prompt) <= hi
            ):
                start = len(generation_prompt)
        spans = _find_content(tokenizer, messages, i, kwargs, full, lo if start is None else start, hi)
        if start is None:
            if spans:
                start = spans[0][0]
            elif _content_texts(message):
                raise TemplateNotPrefixConsistentError(
                    f"tokenize_messages: cannot locate the assistant message {i} in its rendered turn (its content is "
                    "not rendered verbatim and the generation prompt is not a prefix of the conversation)."
                )
            else:
                # Empty assistant message (e.g. tool calls only): the whole turn is what the model generates.
                start = lo
        content_end = spans[-1][1] if spans else None
        assistant_spans.append((start, content_end, hi, i))

    try:
        encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as exc:
        raise ValueError(
            "Assigning roles per token needs character offsets (`return_offsets_mapping`), which this tokenizer "
            f"({type(tokenizer).__name__}) does not provide ({exc}). Use a fast tokenizer, or give roles another way "
            "(prompt/completion columns, or a response_template)."
        ) from exc
    input_ids = list(encoding["input_ids"])
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    special = _special_token_ids(tokenizer)
    ids = np.asarray(input_ids, dtype=np.int64)
    message_chars: list[list[tuple[int, int]]] = [[] for _ in messages]
    for start, content_end, turn_end, i in assistant_spans:
        eot = _end_of_turn(ids, offsets, special, start if content_end is None else content_end, turn_end)
        if eot is not None:
            end = eot[1]
        else:  # no end-of-turn token: the completion ends with the content (or the turn)
            end = turn_end if content_end is None else content_end
        char_roles[start:end] = Role.COMPLETION  # up to and including the end-of-turn token: the model learns to stop
        message_chars[i] = [(start, end)]
    for spans, turn_end, i in other_spans:
        eot = _end_of_turn(ids, offsets, special, spans[-1][1], turn_end) if spans else None
        message_chars[i] = list(spans) + ([eot] if eot is not None else [])
    roles = _token_roles_from_chars(char_roles, offsets) if len(full) else np.zeros(0, dtype=np.int8)
    return _Conversation(input_ids, roles, offsets, message_chars)


def _chat_kwargs(chat_template: str | None, tools: Any, chat_template_kwargs: Mapping[str, Any] | None) -> dict:
    kwargs: dict[str, Any] = dict(chat_template_kwargs or {})
    kwargs["chat_template"] = chat_template
    kwargs["tools"] = _parse_tools(tools)
    return kwargs


def tokenize_messages(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    chat_template: str | None = None,
    tools: Any = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    message_weight_key: str | None = None,
    allow_negative_weights: bool = False,
    assistant_mask_template: str | None = None,
) -> dict[str, list]:
    """Tokenize a conversation with its chat template and give every token a role.

    The ids are exactly ``tokenizer.apply_chat_template(messages, tokenize=True)``'s. Roles come from character
    spans: the conversation is rendered incrementally (first message, first two, ...) to find each message's turn,
    and the tokens are mapped back to characters with ``return_offsets_mapping``. In each turn the message content
    gets the message's role (``SYSTEM``/``USER``/``TOOL``; unknown roles ``PROMPT``) and everything else the template
    adds gets ``TEMPLATE``. For assistant turns, everything from the end of the generation prompt through the first
    special token after the content (the end-of-turn token, e.g. ``<|im_end|>``) is ``COMPLETION``; every assistant
    turn of a multi-turn conversation is. A token straddling content and boilerplate takes the content's role.

    Raises `TemplateNotPrefixConsistentError` (a ValueError) if the template does not render conversation prefixes
    as text prefixes of the whole conversation (then characters cannot be attributed to messages).

    With ``message_weight_key`` (e.g. ``"weight"``, which also reads ms-swift's ``"loss"``), the result also has
    ``message_weights``: per token, the weight of the message that owns it (1 elsewhere); see
    `trl_plw.message_weights`.

    With ``assistant_mask_template`` (a template with ``{% generation %}`` markers: what TRL's
    ``assistant_only_loss`` masks with), the conversation is rendered with it and exactly the tokens of its assistant
    mask are ``COMPLETION`` (`_apply_assistant_mask`).

    Returns:
        ``{"input_ids": list[int], "token_roles": list[int]}`` (and ``"message_weights": list[float]``).
    """
    kwargs = _chat_kwargs(assistant_mask_template or chat_template, tools, chat_template_kwargs)
    conversation = _analyse_conversation(tokenizer, messages, kwargs)
    roles = conversation.roles
    if assistant_mask_template is not None:
        roles = _apply_assistant_mask(tokenizer, messages, kwargs, conversation.input_ids, roles, start=0)
    out = {"input_ids": conversation.input_ids, "token_roles": roles.tolist()}
    if message_weight_key is not None:
        out["message_weights"] = _message_weights(messages, conversation, message_weight_key, allow_negative_weights)
    return out


def _message_weights(messages, conversation: _Conversation, key: str, allow_negative: bool) -> list[float]:
    from trl_plw.message_weights import token_message_weights

    return token_message_weights(
        messages, conversation.offsets, conversation.message_chars, key, allow_negative
    ).tolist()


def _apply_assistant_mask(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    kwargs: dict[str, Any],
    input_ids: Sequence[int],
    roles: np.ndarray,
    start: int,
) -> np.ndarray:
    """Make the template's assistant mask (from ``start`` on) the ``COMPLETION`` tokens, as TRL's
    ``assistant_only_loss`` does: tokens inside ``{% generation %}`` are completion, a completion token outside it
    (e.g. an end-of-turn token the markers leave out) becomes ``TEMPLATE``."""
    rendered = tokenizer.apply_chat_template(
        list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
    )
    if list(rendered["input_ids"]) != list(input_ids):
        raise ValueError(
            "The chat template renders different token ids with return_assistant_tokens_mask=True; the assistant "
            "mask cannot be aligned with the tokens."
        )
    mask = np.asarray(rendered["assistant_masks"], dtype=bool)
    mask[:start] = False
    roles = roles.copy()
    outside = ~mask
    outside[:start] = False
    roles[outside & (roles == Role.COMPLETION)] = Role.TEMPLATE
    roles[mask] = Role.COMPLETION
    return roles


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, Mapping) and "role" in m for m in value)


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n


def tokenize_prompt_completion(
    tokenizer: Any,
    prompt: str | Sequence[Mapping[str, Any]],
    completion: str | Sequence[Mapping[str, Any]],
    *,
    chat_template: str | None = None,
    tools: Any = None,
    add_eos: bool = True,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    message_weight_key: str | None = None,
    allow_negative_weights: bool = False,
    assistant_only: bool = False,
    assistant_mask_template: str | None = None,
) -> dict[str, list]:
    """Tokenize a prompt-completion pair like TRL's ``tokenize_fn``, with per-token roles.

    The ids are TRL's: conversational pairs are rendered with the chat template (the prompt alone with
    ``add_generation_prompt=True``), plain strings are tokenized directly, after appending the EOS token to the
    completion if it is missing (TRL's ``add_eos``; disable with ``add_eos=False``). As in TRL, the completion starts
    where the tokenized prompt and prompt+completion diverge (their common prefix), and every token after it is
    ``COMPLETION`` (exactly TRL's ``completion_mask``). Prompt-side tokens are ``PROMPT`` for plain text; for
    conversations they get per-role codes (``SYSTEM``/``USER``/``TOOL``/``TEMPLATE``; assistant turns inside the
    prompt are ``PROMPT``). If the template cannot be analysed per message, the prompt side falls back to ``PROMPT``
    with a warning. ``message_weight_key`` adds per-message weights of conversational pairs as in
    `tokenize_messages` (plain-text pairs get all-1 ``message_weights``). With ``assistant_only=True`` (TRL's
    ``assistant_only_loss``, which intersects the completion with the assistant tokens) a non-assistant turn inside a
    conversational completion keeps its own role, and with ``assistant_mask_template`` as well (see
    `tokenize_messages`) the completion tokens are exactly the template's assistant mask after the prompt.

    Returns:
        ``{"input_ids": list[int], "token_roles": list[int]}`` (and ``"message_weights": list[float]``).
    """
    conversational = _is_conversation(prompt)
    if conversational != _is_conversation(completion):
        raise ValueError(
            "tokenize_prompt_completion: prompt and completion must both be strings or both be lists of messages "
            f"(got {type(prompt).__name__} and {type(completion).__name__})."
        )
    if conversational:
        if not assistant_only:
            assistant_mask_template = None
        kwargs = _chat_kwargs(assistant_mask_template or chat_template, tools, chat_template_kwargs)
        prompt_ids = tokenizer.apply_chat_template(
            list(prompt), tokenize=True, return_dict=True, add_generation_prompt=True, **kwargs
        )["input_ids"]
        conversation = list(prompt) + list(completion)
        message_weights = None
        try:
            analysed = _analyse_conversation(tokenizer, conversation, kwargs)
            input_ids, roles = analysed.input_ids, analysed.roles
            located = True
            if message_weight_key is not None:
                message_weights = _message_weights(conversation, analysed, message_weight_key, allow_negative_weights)
        except TemplateNotPrefixConsistentError as exc:
            from trl_plw.message_weights import any_weighted

            if message_weight_key is not None and any_weighted([conversation], message_weight_key):
                raise ValueError(f"{exc} Per-message weights need the messages located in the text.") from exc
            warnings.warn(f"{exc} Prompt-side tokens get the generic PROMPT role.", stacklevel=2)
            input_ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, **kwargs)[
                "input_ids"
            ]
            roles = np.zeros(len(input_ids), dtype=np.int8)
            located = False
        roles = roles.copy()
        prompt_len = _common_prefix_length(prompt_ids, input_ids)
        head = roles[:prompt_len]
        head[head == Role.COMPLETION] = Role.PROMPT
        if not (assistant_only and located):
            roles[prompt_len:] = Role.COMPLETION
        elif assistant_mask_template is not None:
            roles = _apply_assistant_mask(tokenizer, conversation, kwargs, input_ids, roles, start=prompt_len)
        out = {"input_ids": list(input_ids), "token_roles": roles.tolist()}
        if message_weight_key is not None:
            out["message_weights"] = message_weights or [1.0] * len(input_ids)
        return out

    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError(
            "tokenize_prompt_completion: prompt and completion must be strings or lists of {'role', 'content'} "
            f"messages; got {type(prompt).__name__} and {type(completion).__name__}."
        )
    eos = getattr(tokenizer, "eos_token", None)
    if add_eos and eos and not completion.endswith(eos):
        completion = completion + eos
    prompt_ids = tokenizer(text=prompt)["input_ids"]
    input_ids = list(tokenizer(text=prompt + completion)["input_ids"])
    prompt_len = _common_prefix_length(prompt_ids, input_ids)
    roles = [int(Role.PROMPT)] * prompt_len + [int(Role.COMPLETION)] * (len(input_ids) - prompt_len)
    out = {"input_ids": input_ids, "token_roles": roles}
    if message_weight_key is not None:
        out["message_weights"] = [1.0] * len(input_ids)
    return out

"""Span weights: loss weights for regions of text found by regular expressions (agent and reasoning formats).

Agent and reasoning data put structure *inside* a turn: a ReAct trace mixes the model's ``Action:`` with the
environment's ``Observation:``, a Hermes-style turn holds ``<tool_call>`` JSON, a reasoning model writes
``<think>...</think>`` before its answer. Roles cannot tell these apart, so a `SpanRule` matches a regular expression
on the text of the tokens of chosen roles and multiplies the weight of the tokens it covers.

How a rule becomes token weights (the exact rules, also in docs/WEIGHTS.md):

* **Text.** The text is the tokenizer's decoding of the tokens (``decode(ids)``, equal to the rendered text for
  byte-level BPE tokenizers such as ChatML/Qwen/Llama-3), with each token's character range from the fast
  tokenizer's offsets (`text_and_offsets`).
* **Regions.** A rule runs on each *region*: a maximal run of consecutive tokens of one document whose role is in
  the rule's ``roles`` (default: ``completion``, i.e. each assistant answer separately) and that are not special
  tokens (``tokenizer.all_special_ids``: end-of-turn, BOS/EOS...). So a match never crosses turns or documents, never
  covers an end-of-turn token (the model always learns to stop), and ``\\Z`` matches at the end of the content.
* **Straddling tokens.** A token is covered by a match when at least one of its characters lies in the match: a token
  that straddles a match boundary gets the rule's weight (as a token straddling content and boilerplate gets the
  content's role). Empty matches cover nothing.
* **Combination.** Every rule covering a token multiplies its weight, and so do the role weight, the message weight
  and the example weight: ``w = role * message * example * prod(span weights)``.

Per token, the collator stores which rules cover it as a bit mask (``token_spans``, bit ``i`` for rule ``i``), so
the weights of the spans can change (a sweep, a schedule) without re-tokenizing, and evaluation reports a loss per
*named* rule (``eval_span_<name>_loss``).

Example:
```python
>>> rules = resolve_span_rules("react+think=0.5")
>>> [(r.name, r.weight) for r in rules]
[('react_action', 2.0), ('react_observation', 0.0), ('think', 0.5)]

```
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trl_plw.roles import Role, check_weight

__all__ = [
    "SpanRule",
    "SPAN_PRESETS",
    "MAX_SPAN_RULES",
    "resolve_span_rules",
    "rules_spec",
    "with_rule_weight",
    "span_multipliers",
    "token_span_bits",
    "text_and_offsets",
]

MAX_SPAN_RULES = 62
"""At most this many rules: each is one bit of the int64 ``token_spans`` column."""

_ROLE_CODES = {
    "prompt": Role.PROMPT,
    "completion": Role.COMPLETION,
    "assistant": Role.COMPLETION,
    "system": Role.SYSTEM,
    "user": Role.USER,
    "tool": Role.TOOL,
    "template": Role.TEMPLATE,
}
_ALL_ROLES = ("prompt", "completion", "system", "user", "tool", "template")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(frozen=True)
class SpanRule:
    """One span rule: tokens of ``roles`` covered by a match of ``pattern`` get their weight multiplied by
    ``weight``.

    Args:
        pattern: a Python regular expression, matched with `re.finditer` on each region's text (add ``(?s)`` for
            ``.`` to cross newlines).
        weight: the multiplier (0 drops the span from the loss, 2 doubles it).
        roles: role names whose tokens the rule reads and weights (``prompt``, ``completion``/``assistant``,
            ``system``, ``user``, ``tool``, ``template``).
        name: identifier of the span in metrics (``eval_span_<name>_loss``) and in ``name=weight`` overrides; a
            rule without a name weights tokens but is not reported.
    """

    pattern: str
    weight: float
    roles: tuple[str, ...] = ("completion",)
    name: str | None = None

    def __post_init__(self) -> None:
        where = f"span rule {self.name or self.pattern!r}"
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"{where}: the pattern must be a non-empty regular expression, got {self.pattern!r}.")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"{where}: {self.pattern!r} is not a valid regular expression ({exc}).") from exc
        object.__setattr__(self, "weight", check_weight(f"{where} weight", self.weight, allow_negative=True))
        roles = (self.roles,) if isinstance(self.roles, str) else tuple(self.roles)
        unknown = sorted(set(roles) - set(_ROLE_CODES))
        if not roles or unknown:
            raise ValueError(f"{where}: roles {list(roles)} must be a non-empty list among {list(_ROLE_CODES)}.")
        object.__setattr__(self, "roles", roles)
        if self.name is not None and not _NAME.fullmatch(self.name):
            raise ValueError(
                f"{where}: name {self.name!r} must be an identifier (letters, digits, '_'; it becomes a metric key)."
            )

    @property
    def role_codes(self) -> tuple[int, ...]:
        return tuple(sorted({int(_ROLE_CODES[r]) for r in self.roles}))


# The presets' patterns. A keyword that ends a ReAct section: the next section starts at one of these.
_REACT_NEXT = r"(?=\b(?:Thought|Action|Action Input|Observation|Final Answer):|\Z)"

SPAN_PRESETS: dict[str, tuple[SpanRule, ...]] = {
    # ReAct traces written into the assistant turn: the calls the model must get exactly right count double, the
    # environment's observations pasted into the turn are not the model's to predict.
    "react": (
        SpanRule(r"(?s)\bAction(?: Input)?:.*?" + _REACT_NEXT, 2.0, name="react_action"),
        SpanRule(r"(?s)(?<=Observation:).*?" + _REACT_NEXT, 0.0, name="react_observation"),
    ),
    # Hermes / Qwen tool calling: <tool_call> JSON in the answer counts double; <tool_response> blocks (the tool's
    # output, wherever the template renders it) are never trained, also when prompt-side roles have weight.
    "hermes": (
        SpanRule(r"(?s)<tool_call>.*?</tool_call>", 2.0, name="tool_call"),
        SpanRule(r"(?s)<tool_response>.*?</tool_response>", 0.0, roles=_ALL_ROLES, name="tool_response"),
    ),
    # Reasoning models: the <think> block, reported apart from the answer; its weight is yours ("think=0.3").
    "think": (SpanRule(r"(?s)<think>.*?</think>", 1.0, name="think"),),
}
"""Named rule sets for `resolve_span_rules` (``"react"``, ``"hermes"``, ``"think"``); see docs/WEIGHTS.md."""

_PRESET_RULES = {rule.name: rule for rules in SPAN_PRESETS.values() for rule in rules}


def _chain_element(element: str) -> list[SpanRule]:
    """``name`` or ``name=weight``, where name is a preset or one of its rules' names."""
    name, _, weight = element.partition("=")
    name = name.strip()
    if name in SPAN_PRESETS:
        rules = list(SPAN_PRESETS[name])
    elif name in _PRESET_RULES:
        rules = [_PRESET_RULES[name]]
    else:
        raise ValueError(
            f"span_weights: unknown preset {name!r}; presets are {sorted(SPAN_PRESETS)} (rules "
            f"{sorted(_PRESET_RULES)}), chained with '+' (e.g. 'react+think=0.5'). For your own patterns give a "
            "mapping {regex: weight}."
        )
    if weight.strip():
        try:
            value = float(weight)
        except ValueError as exc:
            raise ValueError(f"span_weights: {element!r}: the weight after '=' must be a number.") from exc
        rules = [SpanRule(r.pattern, value, r.roles, r.name) for r in rules]
    return rules


def _mapping_rules(mapping: Mapping[str, Any]) -> list[SpanRule]:
    rules = []
    for pattern, value in mapping.items():
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"weight", "roles", "name"})
            if unknown or "weight" not in value:
                raise ValueError(
                    f"span_weights[{pattern!r}] = {dict(value)!r}: give a number, or a mapping with 'weight' and "
                    "optional 'roles' and 'name'."
                )
            rules.append(SpanRule(pattern, value["weight"], value.get("roles", ("completion",)), value.get("name")))
        else:
            rules.append(SpanRule(pattern, value))
    return rules


def resolve_span_rules(spec: Any) -> tuple[SpanRule, ...]:
    """The span rules a ``span_weights`` setting stands for, in order (bit ``i`` of ``token_spans`` is rule ``i``).

    ``spec`` is one of:

    * a preset chain: ``"react"``, ``"react+think"``, ``"hermes+think=0.3"`` (``name=weight`` sets the weight of
      every rule of a preset, or of one preset rule such as ``react_observation=0.1``);
    * a mapping ``{regex: weight}`` or ``{regex: {"weight": w, "roles": [...], "name": "..."}}`` (unnamed rules read
      the completion and are not reported per span);
    * a list mixing the two (and `SpanRule` objects), or a JSON string of a mapping or list (CLI, YAML);
    * None or empty: no rule.

    A named rule given again replaces the earlier one (so ``"react+react_observation=0.1"`` keeps the action rule and
    changes the observation's weight).
    """
    if spec is None:
        return ()
    if isinstance(spec, SpanRule):
        spec = [spec]
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith(("{", "[")):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"span_weights={spec!r} is not valid JSON ({exc}).") from exc
        else:
            spec = [text] if text else []
    if isinstance(spec, Mapping):
        spec = [spec]
    if not isinstance(spec, Sequence):
        raise ValueError(
            f"span_weights must be a preset chain ('react+think'), a mapping {{regex: weight}} or a list of them; got "
            f"{type(spec).__name__}."
        )
    rules: list[SpanRule] = []
    for item in spec:
        if isinstance(item, SpanRule):
            new = [item]
        elif isinstance(item, str) and item.strip().startswith(("{", "[")):
            new = list(resolve_span_rules(item))
        elif isinstance(item, str):
            new = [rule for element in item.split("+") if element.strip() for rule in _chain_element(element)]
        elif isinstance(item, Mapping):
            new = _mapping_rules(item)
        else:
            raise ValueError(f"span_weights: cannot read {item!r} (a preset name, a mapping or a SpanRule).")
        for rule in new:
            if rule.name is not None:
                rules = [r for r in rules if r.name != rule.name]
            rules.append(rule)
    if len(rules) > MAX_SPAN_RULES:
        raise ValueError(f"span_weights has {len(rules)} rules; at most {MAX_SPAN_RULES} are supported.")
    return tuple(rules)


def rules_spec(rules: Sequence[SpanRule]) -> list[dict[str, Any]]:
    """``rules`` as a JSON-able ``span_weights`` value (one ``{pattern: {weight, roles, name}}`` mapping per rule),
    which `resolve_span_rules` reads back to the same rules, in order."""
    return [{r.pattern: {"weight": r.weight, "roles": list(r.roles), "name": r.name}} for r in rules]


def with_rule_weight(spec: Any, name: str, weight: float) -> list[dict[str, Any]]:
    """``spec`` with the weight of the rule called ``name`` set to ``weight`` (as `rules_spec`). A name ``spec``
    does not have is taken from the presets (``"think"`` adds the think rule); another name raises. This is how a
    sweep varies one span's weight (``trl-plw sweep --sweep_weight think``)."""
    rules = list(resolve_span_rules(spec))
    if not any(rule.name == name for rule in rules):
        if name not in _PRESET_RULES:
            named = sorted({r.name for r in rules if r.name} | set(_PRESET_RULES))
            raise ValueError(f"No span rule is named {name!r}: name one of {named} (or give it in span_weights).")
        rules.append(_PRESET_RULES[name])
    return rules_spec([SpanRule(r.pattern, weight, r.roles, r.name) if r.name == name else r for r in rules])


def check_span_rules(rules: Sequence[SpanRule], allow_negative: bool, opt_in: str) -> None:
    """Refuse negative span weights unless the caller allows negative weights (named by ``opt_in``)."""
    for rule in rules:
        check_weight(f"span rule {rule.name or rule.pattern!r} weight", rule.weight, allow_negative, opt_in=opt_in)


# ---------------------------------------------------------------------------------------------------- text -> tokens
def text_and_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, np.ndarray]:
    """The text of ``ids`` and each token's ``[start, end)`` character range in it.

    The text is ``tokenizer.decode(ids)`` (special tokens kept, no clean-up). Offsets come from re-tokenizing that text
    with the fast tokenizer when this gives back the same ids (so the offsets are the tokenizer's own), otherwise
    from the decoded pieces of the single tokens when they concatenate to the text. A tokenizer for which neither
    holds raises: its tokens cannot be mapped to characters.
    """
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        encoding = None
    if encoding is not None and list(encoding["input_ids"]) == ids:
        return text, np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    pieces = [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]
    if "".join(pieces) == text:
        ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
        return text, np.stack([ends - np.asarray([len(p) for p in pieces], dtype=np.int64), ends], axis=1)
    raise ValueError(
        f"span_weights: the tokens of this example cannot be mapped to characters with {type(tokenizer).__name__} "
        "(re-tokenizing the decoded text gives other ids, and the single tokens do not decode to pieces of it). Use a "
        "fast tokenizer, or give per-token `loss_weights` instead of span_weights."
    )


def _special_ids(tokenizer: Any) -> np.ndarray:
    return np.asarray(sorted(set(getattr(tokenizer, "all_special_ids", None) or [])), dtype=np.int64)


def token_span_bits(
    tokenizer: Any,
    input_ids: Sequence[int] | np.ndarray | torch.Tensor,
    token_roles: Sequence[int] | np.ndarray | torch.Tensor,
    rules: Sequence[SpanRule],
    doc_lengths: Sequence[int] | None = None,
) -> np.ndarray:
    """Bit mask (int64, one per token) of the rules covering each token; see the module docstring for the rules.

    ``doc_lengths`` splits a packed row into its documents (each is decoded and matched on its own)."""
    ids = np.asarray(torch.as_tensor(input_ids).cpu() if isinstance(input_ids, torch.Tensor) else input_ids)
    roles = np.asarray(torch.as_tensor(token_roles).cpu() if isinstance(token_roles, torch.Tensor) else token_roles)
    ids = ids.astype(np.int64, copy=False)
    roles = roles.astype(np.int64, copy=False)
    bits = np.zeros(ids.shape[0], dtype=np.int64)
    if not rules or ids.shape[0] == 0:
        return bits
    special = np.isin(ids, _special_ids(tokenizer))
    start = 0
    for length in doc_lengths if doc_lengths is not None else [ids.shape[0]]:
        end = start + int(length)
        text, offsets = text_and_offsets(tokenizer, ids[start:end])
        bits[start:end] = _document_bits(text, offsets, roles[start:end], special[start:end], rules)
        start = end
    return bits


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[first, last + 1)`` token ranges of the maximal runs of True in ``mask``."""
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def _document_bits(
    text: str, offsets: np.ndarray, roles: np.ndarray, special: np.ndarray, rules: Sequence[SpanRule]
) -> np.ndarray:
    bits = np.zeros(roles.shape[0], dtype=np.int64)
    starts, ends = offsets[:, 0], offsets[:, 1]
    for bit, rule in enumerate(rules):
        pattern = re.compile(rule.pattern)
        eligible = np.isin(roles, rule.role_codes) & ~special & (ends > starts)
        for first, last in _runs(eligible):
            lo, hi = int(starts[first]), int(ends[last - 1])
            for match in pattern.finditer(text[lo:hi]):
                s, e = match.start() + lo, match.end() + lo
                if e <= s:
                    continue
                # Tokens overlapping [s, e) by at least one character; offsets are non-decreasing in a run.
                a = first + int(np.searchsorted(ends[first:last], s, side="right"))
                b = first + int(np.searchsorted(starts[first:last], e, side="left"))
                bits[a:b] |= np.int64(1) << bit
    return bits


def span_multipliers(bits: torch.Tensor, rules: Sequence[SpanRule], dtype: torch.dtype = torch.float32):
    """Per-token product of the weights of the rules whose bit is set in ``bits`` (1 where none is)."""
    out = torch.ones(bits.shape, dtype=dtype)
    for bit, rule in enumerate(rules):
        if rule.weight != 1.0:
            covered = (bits >> bit) & 1 != 0
            out = torch.where(covered, out * rule.weight, out)
    return out

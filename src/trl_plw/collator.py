"""`DataCollatorForWeightedCompletionLM`: real-valued per-token loss weights for padded, padding-free and packed
batches.

TRL removed ``DataCollatorForCompletionOnlyLM`` (response/instruction templates turned into 0/1 label masks, broken
with packing). This collator generalizes it: every token gets a real weight from its role (prompt, completion,
system, user, tool, template), an optional per-example weight, or an explicit per-token weight, and the weights stay
aligned through padding, padding-free flattening and BFD packing. See docs/COLLATOR.md.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase
from transformers.data.data_collator import DataCollatorMixin

from trl_plw.policy import POLICY_FIELDS, WeightingPolicy
from trl_plw.roles import (
    PER_TOKEN_COLUMNS,
    ROLE_SOURCE_COLUMNS,
    WEIGHT_SOURCE_COLUMNS,
    Role,
    RoleWeights,
    TemplateMatcher,
    check_weight,
    first_source,
)
from trl_plw.spans import SpanRule, check_span_rules, resolve_span_rules, span_multipliers, token_span_bits

__all__ = ["DataCollatorForWeightedCompletionLM"]

_CONSUMER_DEPRECATION = (
    "loss_weights_consumer is deprecated and will be removed in 0.3: use loss_weights_applied=True (a bool: the loop "
    "consuming the batches applies `loss_weights` to the loss)."
)
# Keywords of TRL's DataCollatorForCompletionOnlyLM (and DataCollatorForLanguageModeling) that this collator accepts
# with their only meaningful value, so old calls keep working, without making them fields: value -> why others fail.
_LEGACY_KEYWORDS = {
    "mlm": (
        False,
        "masked language modeling is not supported: this collator weights a causal LM's next-token loss, like the "
        "DataCollatorForCompletionOnlyLM it replaces. Drop mlm or pass mlm=False.",
    ),
    "ignore_index": (
        -100,
        "labels always use -100, the index PyTorch's cross-entropy, transformers and TRL skip (the weights, not the "
        "labels, carry the policy here). Drop ignore_index.",
    ),
    "return_tensors": ("pt", "only 'pt' (PyTorch tensors) is supported. Drop return_tensors."),
}
_UNSET = object()

_IGNORE = int(Role.IGNORE)
_COMPLETION = int(Role.COMPLETION)
_MAX_ROLE = max(int(r) for r in Role)
_POLICY_INPUTS = frozenset((*POLICY_FIELDS, "allow_negative_weights"))


def _tensor(value: Any, dtype: torch.dtype, name: str, index: int) -> torch.Tensor:
    try:
        raw = torch.as_tensor(value)
        tensor = raw.to(dtype)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"Example {index}: `{name}` could not be read as a 1-D sequence of numbers ({exc}).") from exc
    if tensor.ndim != 1:
        raise ValueError(f"Example {index}: `{name}` must be a 1-D sequence, got shape {tuple(tensor.shape)}.")
    if raw.dtype.is_floating_point and not dtype.is_floating_point and not torch.equal(raw, raw.round()):
        raise ValueError(
            f"Example {index}: `{name}` holds non-integer values ({raw[raw != raw.round()][:3].tolist()}); it is read "
            "as integers (token ids, role codes or 0/1 masks), and truncating them would change the example."
        )
    return tensor


_ALIGNMENT_HINT = (
    "Per-token columns must stay aligned with input_ids: truncate and pack them together with input_ids (select them "
    "all before `pack_dataset`, truncate them with the same slice)."
)


def _sequence_length(value: Any) -> int | None:
    """Length of a 1-D list/array/tensor, None for anything else (scalars, None); O(1), no conversion."""
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 1:
        return int(value.shape[0])
    return None


def _is_tokenizer(value: Any) -> bool:
    return hasattr(value, "pad_token_id") and callable(value)


def _as_example(example: Any, index: int) -> Mapping[str, Any]:
    """An example as a mapping: bare token-id sequences (the old collator's other input) become ``input_ids``."""
    if isinstance(example, Mapping):
        return example
    if isinstance(example, (list, tuple, np.ndarray, torch.Tensor)):
        return {"input_ids": example}
    raise ValueError(
        f"Example {index} is a {type(example).__name__}; give a dict with `input_ids` (and optional per-token "
        "columns) or a sequence of token ids."
    )


def _drop_padding(example: Mapping[str, Any], index: int, example_weight_column: str) -> Mapping[str, Any]:
    """Remove the tokens an example's ``attention_mask`` marks as padding (0), from every per-token column.

    Tokenizer outputs carry an all-ones mask (nothing to do). Pre-padded examples (the old collator padded them
    further with ``tokenizer.pad``, keeping their zeros) lose their pads here and are re-padded by the collator, which
    gives the same attention and labels in padded mode and correct boundaries in padding-free mode."""
    mask = example.get("attention_mask")
    if mask is None:
        return example
    mask = _tensor(mask, torch.int64, "attention_mask", index)
    n = _sequence_length(example["input_ids"])
    if mask.numel() != n:
        raise ValueError(
            f"Example {index}: `attention_mask` has {mask.numel()} entries but `input_ids` has {n}. " + _ALIGNMENT_HINT
        )
    if bool(mask.all()):
        return example
    if example.get("seq_lengths") is not None:
        raise ValueError(
            f"Example {index} is a packed row (`seq_lengths`) with zeros in its `attention_mask`; padding inside a "
            "packed row would break the document lengths. Pack unpadded examples (drop the padding first)."
        )
    keep = mask != 0
    cleaned = dict(example)
    cleaned.pop("attention_mask")
    for name in (*PER_TOKEN_COLUMNS, example_weight_column):
        value = example.get(name)
        if _sequence_length(value) == n:
            cleaned[name] = torch.as_tensor(value)[keep]
    return cleaned


def _check_length(tensor: torch.Tensor, n: int, name: str, index: int) -> None:
    if tensor.numel() != n:
        raise ValueError(
            f"Example {index}: `{name}` has {tensor.numel()} entries but `input_ids` has {n}. " + _ALIGNMENT_HINT
        )


def _check_values(tensor: torch.Tensor, name: str, index: int, allow_negative: bool) -> None:
    if not torch.isfinite(tensor).all():
        bad = tensor[~torch.isfinite(tensor)][0].item()
        raise ValueError(f"Example {index}: `{name}` contains a non-finite weight ({bad}); weights must be finite.")
    if not allow_negative and (tensor < 0).any():
        raise ValueError(
            f"Example {index}: `{name}` contains a negative weight ({tensor.min().item()}). Negative weights push the "
            "model away from those tokens; set allow_negative_weights=True on the collator if that is intended."
        )


@dataclass
class DataCollatorForWeightedCompletionLM(DataCollatorMixin):
    """Collates tokenized examples into batches with real-valued per-token loss weights.

    Per token, the weight comes from the first source an example has, in this order (the precedence of
    `trl_plw.roles.WEIGHT_SOURCE_COLUMNS`, which PLWTrainer's dataset preparation follows too):

    1. ``loss_weights``: explicit per-token weights, used as given;
    2. ``token_roles``: role codes (`trl_plw.roles.Role`, built by `trl_plw.roles.tokenize_prompt_completion` /
       `tokenize_messages`), mapped to weights through the role table (``prompt_loss_weight``,
       ``completion_loss_weight``, ``role_weights``);
    3. ``completion_mask`` (TRL's prompt-completion mask) or 4. ``assistant_masks``: 1 -> completion, 0 -> prompt;
    5. ``response_template`` / ``instruction_template`` matched in ``input_ids`` (like TRL's removed
       ``DataCollatorForCompletionOnlyLM``, robust to context-dependent tokenization, per document in packed rows).

    Then the example weight (``example[example_weight_column]``, a scalar or one value per token), the per-message
    weights (``message_weights``, see `trl_plw.message_weights`) and the span weights (``span_weights``, see
    `trl_plw.spans`) multiply the weights, labels of -100 in an example's ``labels`` mark tokens as ``IGNORE`` (weight 0, never scored), and the
    first token of every sequence (every document of a packed row) gets weight 0: it has no prediction inside its
    sequence.

    Every output is aligned with ``input_ids`` like Hugging Face labels: position ``t`` holds the weight of
    predicting token ``t`` (from the logits at ``t - 1``); the shift happens in the loss. Keys:

    - ``input_ids`` (int64), ``labels`` (int64: ``input_ids`` with -100 where the weight is 0, at padding and at
      sequence starts), ``loss_weights`` (float32), ``completion_mask`` / ``prompt_mask`` (bool: the token's role is
      on the completion / prompt side; both False at padding, sequence starts and ``IGNORE`` tokens, so a trainer can
      report the prompt loss even when the prompt weight is 0);
    - padded: ``attention_mask`` (int64, right padding), plus ``position_ids`` (int64) if ``return_position_ids``;
    - padding-free (one flattened row): ``position_ids`` restarting at 0 per sequence, ``cu_seq_lens_q`` /
      ``cu_seq_lens_k`` (int32, 1-D), ``max_length_q`` / ``max_length_k`` (int), ``seq_idx`` (int32), no
      ``attention_mask``;
    - packed rows (examples with TRL's ``seq_lengths``) in padded mode: ``position_ids`` restarting per document and
      NO ``attention_mask``: a 2-D all-ones mask would let the documents of a row attend to each other, while
      position ids alone let the model build a block-diagonal mask (sdpa/eager/flex detect the restarts; pads get
      position 0, so each forms its own one-token document). Flash-attention varlen needs padding-free batches.

    Args:
        response_template: text (or token ids) that precedes every completion, e.g. ``"### Response:"`` or
            ``"<|im_start|>assistant\\n"``. Used only for examples without a per-token source.
        instruction_template: text (or token ids) that starts every prompt turn, e.g. ``"<|im_start|>user\\n"``;
            with it, every assistant span of a multi-turn text is completion. Without it, everything after the LAST
            response template is completion.
        tokenizer: needed for string templates and ``span_weights``; gives the pad id when ``pad_token_id`` is None.
        pad_token_id: token id used for padding; defaults to ``tokenizer.pad_token_id``.
        prompt_loss_weight: weight of prompt-side tokens. Unset (None), it is 0.0 for the collator on its own (a
            drop-in replacement for the old completion-only collator) and, handed to `trl_plw.PLWTrainer`, what
            SFTTrainer trains on the data; an explicit value is a statement even where it equals a default.
        completion_loss_weight: weight of completion tokens (unset: 1.0).
        role_weights: per-role weights overriding the two above, keys among ``prompt``, ``completion`` (alias
            ``assistant``), ``system``, ``user``, ``tool``, ``template`` (e.g. ``{"template": 0.0}``).
        example_weight_column: key of the optional per-example (scalar) or per-token (list) weight multiplier
            (unset: ``"weight"``).
        span_weights: span rules (`trl_plw.spans.resolve_span_rules`): a preset chain such as ``"react+think=0.5"``,
            a mapping ``{regex: weight}``, or a list of them. Tokens a rule's match covers get their weight
            multiplied; examples with a ``token_spans`` column (from PLWTrainer's dataset preparation) use it, others
            are matched here on the decoded tokens. Batches then carry ``token_spans`` (int64 bit masks).
        padding_free: flatten the batch into one row (for flash-attention varlen and packing).
        return_position_ids: also return position ids in padded mode.
        pad_to_multiple_of: pad the sequence length (the flattened length when padding-free) to a multiple.
        allow_negative_weights: accept negative weights (unlikelihood-style); rejected otherwise.
        on_missing_template: ``"raise"`` (default) when an example (or packed document) relying on templates has
            no response template, or ``"ignore"``: give it weight 0, count it in ``num_missing_template``, and warn
            with the running count (at the 1st, 2nd, 4th, 8th, ... occurrence). The prompt is never trained instead.
        loss_weights_applied: whether the loop consuming the batches applies ``loss_weights`` to the loss. While it
            is False, a batch with any weight other than 0 and 1 raises: plain ``trl.SFTTrainer`` ignores
            ``loss_weights`` and would train on the 0/1 labels only. ``trl_plw.PLWTrainer`` sets it on its copy; a
            custom loop or SFTTrainer subclass that applies the weights itself passes True. 0/1 weights are always
            safe: the labels carry them. (Replaces the string ``loss_weights_consumer``, still accepted with a
            FutureWarning until 0.3.)

    TRL's old keywords ``mlm=False``, ``ignore_index=-100`` and ``return_tensors="pt"`` are accepted and dropped (any
    other value raises, saying why); they are not fields.

    Migrating from TRL's ``DataCollatorForCompletionOnlyLM``: the same call works,
    ``DataCollatorForWeightedCompletionLM(response_template, tokenizer=tokenizer)`` (the first
    positional argument is ``response_template`` and the second ``instruction_template``, as there), with
    ``mlm=False``,
    ``ignore_index=-100``, ``padding_free`` and ``return_position_ids`` meaning what they meant. Examples may be
    bare sequences of token ids (``collator([[1, 2, 3]])``) or tokenizer outputs with an ``attention_mask``: tokens
    whose mask is 0 are padding and are removed before collation (with every per-token column), so the batch is
    re-padded consistently in every mode. Handed to `trl_plw.PLWTrainer`, the collator is the single source of its
    weighting policy (templates, weights, ``role_weights``, ``example_weight_column``, ``on_missing_template``):
    the trainer prepares the dataset with it, also for packing, and raises where `trl_plw.PLWConfig` states a
    different value.

    Examples:
    ```python
    >>> from trl_plw.collator import DataCollatorForWeightedCompletionLM
    >>> collator = DataCollatorForWeightedCompletionLM(pad_token_id=0, prompt_loss_weight=0.5, loss_weights_applied=True)
    >>> examples = [
    ...     {"input_ids": [1, 2, 3, 4], "completion_mask": [0, 0, 1, 1]},
    ...     {"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1], "weight": 2.0},
    ... ]
    >>> batch = collator(examples)
    >>> batch["input_ids"]
    tensor([[1, 2, 3, 4],
            [5, 6, 7, 0]])
    >>> batch["labels"]
    tensor([[-100,    2,    3,    4],
            [-100,    6,    7, -100]])
    >>> batch["loss_weights"]
    tensor([[0.0000, 0.5000, 1.0000, 1.0000],
            [0.0000, 2.0000, 2.0000, 0.0000]])
    >>> batch["prompt_mask"]
    tensor([[False,  True, False, False],
            [False, False, False, False]])
    >>> batch["attention_mask"]
    tensor([[1, 1, 1, 1],
            [1, 1, 1, 0]])

    >>> # Padding-free: one row, position ids and varlen boundaries instead of an attention mask
    >>> collator = DataCollatorForWeightedCompletionLM(pad_token_id=0, padding_free=True, loss_weights_applied=True)
    >>> batch = collator(examples)
    >>> batch["labels"], batch["position_ids"]
    (tensor([[-100, -100,    3,    4, -100,    6,    7]]), tensor([[0, 1, 2, 3, 0, 1, 2]]))
    >>> batch["loss_weights"]
    tensor([[0., 0., 1., 1., 0., 2., 2.]])
    >>> batch["cu_seq_lens_q"], batch["max_length_q"]
    (tensor([0, 4, 7], dtype=torch.int32), 4)

    >>> # A packed row (TRL's BFD packing adds `seq_lengths`): positions restart and each document's start is masked
    >>> packed = [{"input_ids": [1, 2, 3, 4, 5, 6], "token_roles": [0, 0, 1, 5, 0, 1], "seq_lengths": [3, 3]}]
    >>> batch = DataCollatorForWeightedCompletionLM(pad_token_id=0)(packed)
    >>> batch["position_ids"], batch["labels"]
    (tensor([[0, 1, 2, 0, 1, 2]]), tensor([[-100, -100,    3, -100, -100,    6]]))
    >>> "attention_mask" in batch
    False

    ```
    """

    response_template: str | list[int] | None = None
    instruction_template: str | list[int] | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    pad_token_id: int | None = None
    prompt_loss_weight: float | None = None
    completion_loss_weight: float | None = None
    role_weights: dict[str, float] | None = None
    example_weight_column: str | None = None
    span_weights: str | dict | list | None = None
    padding_free: bool = False
    return_position_ids: bool = False
    pad_to_multiple_of: int | None = None
    allow_negative_weights: bool = False
    on_missing_template: Literal["raise", "ignore"] = "raise"
    loss_weights_applied: bool = False

    # DataCollatorMixin.__call__ reads it; a class constant, not a field: only PyTorch tensors are produced.
    return_tensors: ClassVar[str] = "pt"

    def __post_init__(self) -> None:
        self._accept_old_positional_arguments()
        if self.on_missing_template not in ("raise", "ignore"):
            raise ValueError(f"on_missing_template={self.on_missing_template!r}: use 'raise' or 'ignore'.")
        if self.pad_to_multiple_of is not None and (
            isinstance(self.pad_to_multiple_of, bool)
            or not isinstance(self.pad_to_multiple_of, int)
            or self.pad_to_multiple_of < 1
        ):
            raise ValueError(f"pad_to_multiple_of={self.pad_to_multiple_of!r} must be a positive int or None.")
        if self.pad_token_id is None:
            if self.tokenizer is None or self.tokenizer.pad_token_id is None:
                raise ValueError(
                    "pad_token_id is None and no tokenizer with a pad token was given: pass pad_token_id=..., or a "
                    "tokenizer whose pad_token is set (e.g. tokenizer.pad_token = tokenizer.eos_token)."
                )
            self.pad_token_id = int(self.tokenizer.pad_token_id)
        if self.instruction_template is not None and self.response_template is None:
            raise ValueError(
                "instruction_template is set but response_template is None: the response template marks where "
                "completions start; set response_template too."
            )
        self._matcher = None
        if self.response_template is not None:
            if isinstance(self.response_template, str) or isinstance(self.instruction_template, str):
                if self.tokenizer is None:
                    raise ValueError(
                        "response_template/instruction_template given as text need the tokenizer: pass tokenizer=..., "
                        "or give the templates as token ids."
                    )
            self._matcher = TemplateMatcher(self.tokenizer, self.response_template, self.instruction_template)
        self.num_missing_template = 0
        self._resolve_policy()  # once; invalid weights raise at construction, not at the first batch

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # A policy setting changed after construction is resolved again then, never per batch.
        if name in _POLICY_INPUTS and "_weight_table" in self.__dict__:
            self._resolve_policy()

    @property
    def policy(self) -> WeightingPolicy:
        """The weighting policy this collator states (None = unset): what PLWTrainer merges with PLWConfig's."""
        return WeightingPolicy.of(self)

    def _resolve_policy(self) -> None:
        """Fill the unset settings (prompt weight 0.0: the completion-only collator this one replaces; completion
        weight 1.0; example weights from ``"weight"``), build the role -> weight table used by every batch, and parse
        the span rules."""
        self._resolved = self.policy.resolved(prompt_loss_weight=0.0)
        self._weight_table = self._resolve_role_weights().table()
        self._span_rules = resolve_span_rules(self.span_weights)
        check_span_rules(self._span_rules, self.allow_negative_weights, "allow_negative_weights=True on the collator")
        if self._span_rules and self.tokenizer is None:
            raise ValueError(
                "span_weights needs the tokenizer (to map the regular expressions' matches to tokens): pass tokenizer=."
            )

    def _accept_old_positional_arguments(self) -> None:
        """The first field is ``response_template`` (as in TRL's ``DataCollatorForCompletionOnlyLM``). Until 0.2 the
        first field was ``pad_token_id`` (and the second ``tokenizer``): an int in first place is still read as the pad
        id, with a FutureWarning."""
        if isinstance(self.response_template, (int, np.integer)) and not isinstance(self.response_template, bool):
            warnings.warn(
                f"DataCollatorForWeightedCompletionLM({self.response_template!r}, ...): the first positional argument "
                "is now response_template; an int there is read as pad_token_id for one more release. Pass "
                "pad_token_id= (and tokenizer=) by keyword.",
                FutureWarning,
                stacklevel=4,
            )
            if self.pad_token_id is not None:
                raise ValueError(
                    f"pad_token_id is given twice: {self.response_template!r} (first positional) and "
                    f"pad_token_id={self.pad_token_id!r}."
                )
            self.pad_token_id, self.response_template = int(self.response_template), None
            if self.tokenizer is None and _is_tokenizer(self.instruction_template):  # old 2nd positional: tokenizer
                self.tokenizer, self.instruction_template = self.instruction_template, None
        for name in ("response_template", "instruction_template"):
            value = getattr(self, name)
            if _is_tokenizer(value):
                raise ValueError(
                    f"A {type(value).__name__} was given as {name}. Pass the tokenizer by keyword: "
                    "DataCollatorForWeightedCompletionLM(response_template, tokenizer=tokenizer)."
                )
            if value is not None and not isinstance(value, (str, list, tuple)):
                raise ValueError(f"{name}={value!r} must be text or a list of token ids (or None).")
        if isinstance(self.pad_token_id, np.integer):
            self.pad_token_id = int(self.pad_token_id)
        if self.pad_token_id is not None and (
            isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int)
        ):
            raise ValueError(f"pad_token_id={self.pad_token_id!r} must be an int token id (or None).")

    @property
    def loss_weights_consumer(self) -> str | None:
        """Deprecated: read ``loss_weights_applied`` instead (True here reads as ``"set"``)."""
        warnings.warn(_CONSUMER_DEPRECATION, FutureWarning, stacklevel=2)
        return "set" if self.loss_weights_applied else None

    @loss_weights_consumer.setter
    def loss_weights_consumer(self, value: str | None) -> None:
        warnings.warn(_CONSUMER_DEPRECATION, FutureWarning, stacklevel=2)
        self.loss_weights_applied = value is not None

    @property
    def span_rules(self) -> tuple[SpanRule, ...]:
        """The `trl_plw.spans.SpanRule` objects ``span_weights`` stands for (bit ``i`` of ``token_spans`` is rule i)."""
        return self._span_rules

    @property
    def template_matcher(self) -> TemplateMatcher | None:
        """The `TemplateMatcher` of ``response_template``/``instruction_template`` (None without templates);
        PLWTrainer uses it to build ``token_roles`` at dataset preparation."""
        return self._matcher

    # ------------------------------------------------------------------------------------------------ role weights
    @property
    def resolved_role_weights(self) -> RoleWeights:
        """The `RoleWeights` in force (``prompt_loss_weight``/``completion_loss_weight`` merged with ``role_weights``)."""
        return self._resolve_role_weights()

    @property
    def resolved_policy(self) -> WeightingPolicy:
        """The policy in force: the stated settings with the unset ones filled in."""
        return self._resolved

    def _resolve_role_weights(self) -> RoleWeights:
        """Validate the weight settings and merge them (stated ``role_weights`` entries for ``prompt``/``completion``
        must agree with stated ``prompt_loss_weight``/``completion_loss_weight``)."""
        allow = self.allow_negative_weights
        opt_in = "allow_negative_weights=True on the collator"
        resolved = self._resolved
        prompt = check_weight("prompt_loss_weight", resolved.prompt_loss_weight, allow, opt_in=opt_in)
        completion = check_weight("completion_loss_weight", resolved.completion_loss_weight, allow, opt_in=opt_in)
        mapping = dict(self.role_weights or {})
        for name, value in mapping.items():
            check_weight(f"role_weights[{name!r}]", value, allow, allow_none=True, opt_in=opt_in)
        for keys, field_name, value, stated in (
            (("prompt",), "prompt_loss_weight", prompt, self.prompt_loss_weight is not None),
            (
                ("completion", "assistant"),
                "completion_loss_weight",
                completion,
                self.completion_loss_weight is not None,
            ),
        ):
            for k in keys:
                if k in mapping and stated and mapping[k] != value:
                    raise ValueError(
                        f"role_weights[{k!r}]={mapping[k]} conflicts with {field_name}={value}; set the weight in one "
                        "place only."
                    )
        return RoleWeights.from_mapping(
            mapping, allow_negative=allow, name="role_weights", prompt=prompt, completion=completion
        )

    # ------------------------------------------------------------------------------------------------ per example
    def _template_roles(self, index: int, ids: torch.Tensor, doc_lengths: list[int]) -> torch.Tensor:
        """Roles from the templates, per document; documents without the response template are counted and warned
        about (at the 1st, 2nd, 4th, ... occurrence) when ``on_missing_template="ignore"``."""
        roles, missing = self._matcher.document_roles(
            ids.numpy(), doc_lengths, where=f"example {index}", on_missing=self.on_missing_template
        )
        for where in missing:
            self.num_missing_template += 1
            count = self.num_missing_template
            if count & (count - 1) == 0:
                warnings.warn(
                    f"response_template={self.response_template!r} not found in {where}; it gets weight 0 "
                    f"(on_missing_template='ignore'). {count} sequence(s) without the template so far in this "
                    "process.",
                    UserWarning,
                    stacklevel=6,
                )
        return torch.from_numpy(roles.astype(np.int64, copy=False))

    def _example_roles(
        self,
        index: int,
        example: Mapping[str, Any],
        ids: torch.Tensor,
        doc_lengths: list[int],
        need: bool,
        templates: bool = True,
    ) -> torch.Tensor | None:
        """Role codes (int64) of one example from its first role source; None if it has none and ``need`` is False.

        ``templates=False`` leaves the response/instruction templates out: an example that brings its own
        ``loss_weights`` is weighted as given, and a template missing from its text must neither raise nor zero it."""
        n = ids.numel()
        source = first_source(example, ROLE_SOURCE_COLUMNS)
        if source == "token_roles":
            roles = _tensor(example[source], torch.int64, source, index)
            _check_length(roles, n, source, index)
            if n and (roles.min() < _IGNORE or roles.max() > _MAX_ROLE):
                raise ValueError(
                    f"Example {index}: `token_roles` has codes outside [{_IGNORE}, {_MAX_ROLE}] (min "
                    f"{roles.min().item()}, max {roles.max().item()}); build them with trl_plw.roles (Role codes)."
                )
            return roles
        if source is not None:  # TRL's 0/1 completion_mask / assistant_masks
            mask = _tensor(example[source], torch.int64, source, index)
            _check_length(mask, n, source, index)
            return (mask != 0).to(torch.int64)  # Role.COMPLETION == 1, Role.PROMPT == 0
        if templates and self._matcher is not None:
            return self._template_roles(index, ids, doc_lengths)
        if not need:
            return None
        raise ValueError(
            f"Example {index} has no per-token weight source: the collator looked for the columns "
            f"{list(WEIGHT_SOURCE_COLUMNS)} and found none of them among {sorted(example)}, and no response_template is "
            "set. Fix: pass response_template= (and instruction_template= for multi-turn text) to the collator, or "
            "prepare the dataset with trl_plw.PLWTrainer / trl_plw.roles.tokenize_prompt_completion / "
            "tokenize_messages, which add `token_roles`. A `labels` column alone only marks ignored (-100) tokens."
        )

    @staticmethod
    def _doc_lengths(index: int, example: Mapping[str, Any], n: int) -> tuple[list[int], bool]:
        seq_lengths = example.get("seq_lengths")
        if seq_lengths is None:
            return [n], False
        if isinstance(seq_lengths, torch.Tensor):
            seq_lengths = seq_lengths.tolist()
        lengths = [int(x) for x in seq_lengths]
        if not lengths or min(lengths) <= 0 or sum(lengths) != n:
            raise ValueError(
                f"Example {index}: `seq_lengths` {lengths} must be positive document lengths summing to "
                f"len(input_ids)={n}. It is written by TRL's pack_dataset; keep it in sync with input_ids (do not "
                "truncate a packed row, or drop `seq_lengths` if the row is not packed)."
            )
        return lengths, True

    # ------------------------------------------------------------------------------------------------ main
    def torch_call(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if len(examples) == 0:
            raise ValueError("DataCollatorForWeightedCompletionLM got an empty list of examples.")
        parsed = [self._read_example(i, example) for i, example in enumerate(examples)]
        flat = self._flat_outputs(parsed)
        if self.padding_free:
            return self._padding_free_layout(flat)
        return self._padded_layout(flat, [p.ids.numel() for p in parsed], packed=any(p.packed for p in parsed))

    def _read_example(self, i: int, example: Any) -> _Example:
        """Read and validate one example: token ids, roles, document lengths and its weight sources."""
        example = _drop_padding(_as_example(example, i), i, self._resolved.example_weight_column)
        if "input_ids" not in example:
            raise ValueError(f"Example {i} has no `input_ids` (keys: {sorted(example)}).")
        ids = _tensor(example["input_ids"], torch.int64, "input_ids", i)
        n = ids.numel()
        if n == 0:
            raise ValueError(f"Example {i} is empty (len(input_ids) == 0). Filter empty examples out of the dataset.")
        if ids.min() < 0:
            raise ValueError(
                f"Example {i}: `input_ids` has negative ids (min {ids.min().item()}); token ids are >= 0 (-100 marks "
                "ignored positions in `labels`, never in `input_ids`)."
            )
        for name in PER_TOKEN_COLUMNS:  # every per-token column, used or not, must stay aligned
            length = _sequence_length(example.get(name))
            if length is not None and length != n:
                raise ValueError(
                    f"Example {i}: `{name}` has {length} entries but `input_ids` has {n}. " + _ALIGNMENT_HINT
                )
        docs, packed = self._doc_lengths(i, example, n)

        weights = example.get("loss_weights")
        if weights is not None:
            weights = _tensor(weights, torch.float32, "loss_weights", i)
            _check_length(weights, n, "loss_weights", i)
            _check_values(weights, "loss_weights", i, self.allow_negative_weights)
            roles = self._example_roles(i, example, ids, docs, need=False, templates=False)
            if roles is None:  # no role information: what carries weight counts as completion
                roles = (weights != 0).to(torch.int64)
        else:
            roles = self._example_roles(i, example, ids, docs, need=True)

        labels = example.get("labels")
        if labels is not None:
            labels = _tensor(labels, torch.int64, "labels", i)
            _check_length(labels, n, "labels", i)
            ignored = labels == -100
            if ignored.any():
                roles = roles.masked_fill(ignored, _IGNORE)
        token_scale, scale = self._example_scale(i, example.get(self._resolved.example_weight_column), n)
        multiplier, spans = self._multipliers(i, example, ids, roles, docs)
        return _Example(ids, roles, docs, packed, weights, token_scale, scale, multiplier, spans)

    def _multipliers(
        self, i: int, example: Mapping[str, Any], ids: torch.Tensor, roles: torch.Tensor, docs: list[int]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-token product of the message weights and the span weights (None when both are 1), and the span bits.

        ``token_spans`` from dataset preparation is used as given; without it, the span rules are matched here on
        the decoded tokens (each document of a packed row on its own)."""
        n = ids.numel()
        multiplier = None
        if example.get("message_weights") is not None:
            multiplier = _tensor(example["message_weights"], torch.float32, "message_weights", i)
            _check_length(multiplier, n, "message_weights", i)
            _check_values(multiplier, "message_weights", i, self.allow_negative_weights)
        rules = self._span_rules
        if example.get("token_spans") is not None:
            spans = _tensor(example["token_spans"], torch.int64, "token_spans", i)
            _check_length(spans, n, "token_spans", i)
            if n and (spans.min() < 0 or (spans >> len(rules)).any()):
                raise ValueError(
                    f"Example {i}: `token_spans` marks span rules beyond the collator's {len(rules)} (span_weights="
                    f"{self.span_weights!r}); it was built with other span rules. Prepare the dataset with the same "
                    "span_weights, or drop the column."
                )
        elif rules:
            spans = torch.from_numpy(token_span_bits(self.tokenizer, ids, roles, rules, docs))
        else:
            return multiplier, None
        scale = span_multipliers(spans, rules)
        return (scale if multiplier is None else multiplier * scale), spans

    def _example_scale(self, i: int, scale: Any, n: int) -> tuple[torch.Tensor | None, float]:
        """The example weight as (per-token multiplier or None, scalar multiplier)."""
        name = self._resolved.example_weight_column
        if scale is None:
            return None, 1.0
        if _sequence_length(scale) is not None:
            token_scale = _tensor(scale, torch.float32, name, i)
            _check_length(token_scale, n, name, i)
            _check_values(token_scale, name, i, self.allow_negative_weights)
            return token_scale, 1.0
        try:
            value = float(scale)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"Example {i}: `{name}` must be a number or a per-token list, got {scale!r}.") from exc
        if not math.isfinite(value):
            raise ValueError(f"Example {i}: `{name}`={value} is not finite.")
        if value < 0 and not self.allow_negative_weights:
            raise ValueError(
                f"Example {i}: `{name}`={value} is negative; set allow_negative_weights=True if that is intended."
            )
        return None, value

    def _flat_outputs(self, parsed: list[_Example]) -> _Flat:
        """Weights, labels and masks of the concatenated examples (before any padding).

        Only ops that stay fast on a busy CPU are used: index_select / masked_scatter_ / cumsum rather than advanced
        indexing, boolean-mask assignment or repeat_interleave, which go through parallel kernels that stall for
        milliseconds when the cores are shared (e.g. with dataloader workers)."""
        table = self._weight_table
        offsets = [0, *itertools.accumulate(p.ids.numel() for p in parsed)]
        input_ids = torch.cat([p.ids for p in parsed])
        roles = torch.cat([p.roles for p in parsed])
        ignored = roles == _IGNORE
        # IGNORE (-1) reads the table's trailing 0 (index_select takes no negative indices).
        weights = table.index_select(0, roles.masked_fill(ignored, table.numel() - 1))
        for p, start, end in zip(parsed, offsets[:-1], offsets[1:], strict=True):
            if p.weights is not None:
                weights[start:end] = p.weights
            if p.token_scale is not None:
                weights[start:end] *= p.token_scale
            if p.multiplier is not None:
                weights[start:end] *= p.multiplier
            if p.scale != 1.0:
                weights[start:end] *= p.scale

        positions = _positions_in_documents([d for p in parsed for d in p.docs], offsets[-1])
        dropped = ignored | (positions == 0)  # a sequence's first token has no prediction inside it
        weights = weights.masked_fill(dropped, 0.0)
        if not torch.isfinite(weights).all():  # e.g. a huge example weight times a huge role weight
            raise ValueError("The combined loss_weights overflowed to a non-finite value; use smaller weights.")
        if not self.loss_weights_applied and ((weights != 0) & (weights != 1)).any():
            raise ValueError(
                "This batch has loss weights other than 0 and 1, but the collator's loss_weights_applied is False. "
                "trl.SFTTrainer ignores the `loss_weights` key and would train with 0/1 weights (the -100 labels), "
                "silently dropping the real-valued weighting. Train with trl_plw.PLWTrainer (it sets "
                "loss_weights_applied=True on its copy); a custom loop or SFTTrainer subclass that applies "
                "`loss_weights` itself should pass loss_weights_applied=True."
            )
        values = {
            "input_ids": (input_ids, self.pad_token_id),
            "labels": (input_ids.masked_fill(weights == 0, -100), -100),
            "loss_weights": (weights, 0.0),
            "completion_mask": ((roles == _COMPLETION) & ~dropped, False),
            "prompt_mask": ((roles != _COMPLETION) & ~dropped, False),
        }
        if self._span_rules:  # which rules cover each token, for the per-span metrics
            zeros = torch.zeros(0, dtype=torch.int64)
            spans = torch.cat([zeros if p.spans is None else p.spans for p in parsed])
            values["token_spans"] = (spans, 0)
        return _Flat(values, positions)

    def _width(self, length: int) -> int:
        multiple = self.pad_to_multiple_of
        return length if multiple is None else -(-length // multiple) * multiple

    def _padding_free_layout(self, flat: _Flat) -> dict[str, Any]:
        """One flattened row, position ids restarting per sequence and varlen boundaries, no attention mask."""
        total = flat.positions.numel()
        width = self._width(total)
        output = {}
        for key, (values, pad_value) in flat.values.items():
            row = torch.full((1, width), pad_value, dtype=values.dtype)
            row[0, :total] = values
            output[key] = row
        position_ids = torch.zeros((1, width), dtype=torch.int64)
        position_ids[0, :total] = flat.positions
        output["position_ids"] = position_ids
        # Every token at position 0 starts a sequence (each pad forms its own one-token sequence, as in TRL).
        is_start = position_ids[0] == 0
        seq_starts = torch.nonzero(is_start).flatten()
        cu_seq_lens = torch.cat([seq_starts, torch.tensor([width])]).to(torch.int32)
        output["cu_seq_lens_q"] = output["cu_seq_lens_k"] = cu_seq_lens
        output["max_length_q"] = output["max_length_k"] = int(cu_seq_lens.diff().max())
        output["seq_idx"] = (is_start.cumsum(0, dtype=torch.int32) - 1)[None]
        return output

    def _padded_layout(self, flat: _Flat, lengths: list[int], packed: bool) -> dict[str, Any]:
        """One right-padded row per example; packed rows get position ids and no attention mask (see the class)."""
        width = self._width(max(lengths))
        # Row-major order of the mask is the order of the concatenated examples: one masked_scatter_ pads a key.
        real = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        output = {}
        for key, (values, pad_value) in flat.values.items():
            output[key] = torch.full((len(lengths), width), pad_value, dtype=values.dtype).masked_scatter_(
                real, values
            )
        if packed or self.return_position_ids:
            output["position_ids"] = torch.zeros((len(lengths), width), dtype=torch.int64).masked_scatter_(
                real, flat.positions
            )
        if not packed:
            output["attention_mask"] = real.to(torch.int64)
        return output


_dataclass_init = DataCollatorForWeightedCompletionLM.__init__


@functools.wraps(_dataclass_init)
def _init_with_legacy_keywords(self, *args, loss_weights_consumer: Any = _UNSET, **kwargs) -> None:
    """The dataclass ``__init__``, also taking TRL's old keywords (``mlm``, ``ignore_index``, ``return_tensors``,
    checked and dropped) and the deprecated ``loss_weights_consumer`` (mapped onto ``loss_weights_applied``).

    Wrapping ``__init__`` rather than declaring fields (or InitVars) keeps them out of the signature that
    ``inspect.signature`` shows (functools.wraps points it at the dataclass one), out of `dataclasses.fields`,
    ``replace`` and ``repr``, and off the object: nothing reads them, so nothing should pretend to hold them."""
    for name, (accepted, why) in _LEGACY_KEYWORDS.items():
        value = kwargs.pop(name, accepted)
        if value != accepted:
            raise ValueError(f"{name}={value!r} is not supported: {why}")
    if loss_weights_consumer is not _UNSET:
        warnings.warn(_CONSUMER_DEPRECATION, FutureWarning, stacklevel=2)
        if loss_weights_consumer is not None:
            if kwargs.get("loss_weights_applied") is False:
                raise ValueError("loss_weights_consumer is set but loss_weights_applied=False; give one of them.")
            kwargs["loss_weights_applied"] = True
    _dataclass_init(self, *args, **kwargs)


DataCollatorForWeightedCompletionLM.__init__ = _init_with_legacy_keywords


class _Example(NamedTuple):
    """One validated example, as `DataCollatorForWeightedCompletionLM._read_example` returns it."""

    ids: torch.Tensor  # int64 [n]
    roles: torch.Tensor  # int64 [n] role codes (IGNORE where labels were -100)
    docs: list[int]  # document lengths (one entry unless packed)
    packed: bool  # the example is a packed row (it had `seq_lengths`)
    weights: torch.Tensor | None  # explicit float32 `loss_weights`, replacing the role weights
    token_scale: torch.Tensor | None  # per-token example weight
    scale: float  # scalar example weight
    multiplier: torch.Tensor | None  # per-token message weight x span weights
    spans: torch.Tensor | None  # int64 bit mask of the span rules covering each token


class _Flat(NamedTuple):
    """The batch's outputs over its concatenated tokens: key -> (values, pad value), and positions per document."""

    values: dict[str, tuple[torch.Tensor, Any]]
    positions: torch.Tensor


def _positions_in_documents(doc_lengths: list[int], total: int) -> torch.Tensor:
    """Position of every token within its document: +1 per token, reset to 0 at every document start (cumsum of
    steps, which avoids repeat_interleave)."""
    doc_starts = list(itertools.accumulate(doc_lengths[:-1]))
    steps = torch.ones(total, dtype=torch.int64)
    steps[0] = 0
    if doc_starts:
        steps[torch.tensor(doc_starts)] = 1 - torch.tensor(doc_lengths[:-1])
    return steps.cumsum(0)

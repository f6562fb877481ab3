"""`PLWConfig` and `PLWTrainer`: TRL's SFT with real-valued per-token loss weights.

What changes relative to `trl.SFTTrainer`, and why:

* **Dataset preparation keeps roles.** TRL folds its masks into -100 labels, truncates only ``input_ids``/``labels``
  and packs only those two columns, so a prompt weight has nothing left to act on. Here tokenization records a
  per-token role (`trl_plw.roles.Role`), and truncation and packing carry every per-token column together.
* **The loss is weighted and fused.** ``loss_weights`` are taken out of the batch before the forward; the backbone
  runs once and `trl_plw.ops.weighted_linear_cross_entropy` consumes its hidden states tile by tile (no
  ``[tokens, vocab]`` logits), through a head patched into the model's forward so DDP/FSDP see it.
* **The denominator is global.** ``_get_num_items_in_batch`` returns the sum of weights (or the count of non-zero
  weights) over the whole gradient-accumulation window and over all processes, so the update does not depend on how
  a global batch is split into micro-batches or ranks. (The article's trainer divided every micro-batch by its own
  weight sum: a mean of means.)
* **Metrics split prompt from completion** from the same fused pass, without logits, also when the prompt weight
  is 0 (evaluation scores weight-0 targets for the statistics only).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer
from trl.data_utils import (
    is_conversational,
    is_conversational_from_value,
    maybe_convert_to_chatml,
    pack_dataset,
)

from trl_plw._compat import (
    add_train_tokens,
    assistant_mask_template,
    dataset_column_names,
    lm_head_adapter_check_disabled,
    moe_aux_loss_coef,
    normalize_loss_type,
    record_metric,
    set_metric,
    tensor_parallel_size,
    warn_if_untested,
)
from trl_plw.attention import ensure_registered
from trl_plw.collator import DataCollatorForWeightedCompletionLM
from trl_plw.message_weights import any_weighted
from trl_plw.metrics import SplitMetrics
from trl_plw.policy import DataKind, WeightingPolicy, describe_sft_default, detect_data_kind, sft_prompt_weight
from trl_plw.roles import (
    PER_TOKEN_COLUMNS,
    ROLE_SOURCE_COLUMNS,
    WEIGHT_SOURCE_COLUMNS,
    Role,
    RoleWeights,
    check_weight,
    first_source,
    has_completion,
    tokenize_messages,
    tokenize_prompt_completion,
)
from trl_plw.schedules import SCHEDULE_KINDS, prompt_weight_at
from trl_plw.spans import resolve_span_rules, token_span_bits
from trl_plw.weighted_head import add_weighted_lm_head

logger = logging.getLogger(__name__)


@dataclass
class PLWConfig(SFTConfig):
    r"""
    Configuration for [`PLWTrainer`]: everything of [`trl.SFTConfig`] plus the prompt-loss-weight policy.

    Parameters:
        prompt_loss_weight (`float`, *optional*):
            Weight of every prompt-side token (system, user, tool and chat-template tokens) in the loss. `0.0` is
            TRL's completion-only loss, `1.0` its full-sequence loss; values in between are the point of this
            library. With a schedule, this is the starting value. Unset (`None`), it is what SFTTrainer trains on
            the training data (`trl_plw.policy.sft_prompt_weight`): every token of language-modeling data (`text`,
            `messages`, bare `input_ids`) unless `assistant_only_loss=True`, the completion of prompt-completion data
            unless `completion_only_loss=False`; so a PLWTrainer with nothing set computes SFTTrainer's loss.
        completion_loss_weight (`float`, *optional*, defaults to `1.0` when unset):
            Weight of every completion (assistant) token.
        role_weights (`dict[str, float]` or `str`, *optional*):
            Per-role weights for chat data overriding `prompt_loss_weight` for some prompt-side roles, keys among
            `system`, `user`, `tool`, `template`. A JSON string is accepted (CLI/YAML). With a schedule, they are
            relative factors multiplied by the scheduled prompt weight.
        loss_normalization (`str`, *optional*, defaults to `"weights"`):
            Denominator of the loss: `"weights"` divides the weighted sum by the sum of weights (the article's
            PLWTrainer); `"nonzero_tokens"` divides by the number of tokens with a non-zero weight (Weighted
            Instruction Tuning, arXiv 2507.07817), so lowering the prompt weight also lowers the prompt's share.
            Both are global over the accumulation window and across processes.
        prompt_loss_weight_schedule (`str`, *optional*, defaults to `"constant"`):
            `"constant"`, `"linear"` or `"cosine"`: moves the prompt weight from `prompt_loss_weight` to
            `prompt_loss_weight_end` over training.
        prompt_loss_weight_end (`float`, *optional*):
            Final prompt weight of a linear or cosine schedule.
        response_template (`str`, *optional*):
            For plain-text datasets without a prompt/completion split: the text that starts each response, e.g.
            `"### Response:"`. Everything up to its last occurrence is prompt (as the old
            `DataCollatorForCompletionOnlyLM` did).
        instruction_template (`str`, *optional*):
            With `response_template`: the text that starts each user turn, so multi-turn text weights every
            response span as completion.
        example_weight_column (`str`, *optional*, defaults to `"weight"` when unset):
            Name of an optional dataset column with a per-example multiplier of all its token weights.
        span_weights (`str`, `dict` or `list`, *optional*):
            Span rules multiplying the weight of the tokens a regular expression covers
            ([`trl_plw.spans.resolve_span_rules`]): a preset chain (`"react"`, `"hermes"`, `"think"`, chained with
            `+`, e.g. `"react+think=0.5"`), a mapping `{regex: weight}`, a list of them, or their JSON. Named rules are
            reported per span in evaluation (`eval_span_<name>_loss`). See docs/WEIGHTS.md.
        message_weight_key (`str` or `None`, *optional*, defaults to `"weight"`):
            Key of a per-message weight in chat data (`{"role": ..., "content": ..., "weight": 0.3}`); with the
            default key, ms-swift's `"loss"` is read too. It multiplies the message's content and end-of-turn token.
            `None` ignores such keys.
        answer_tokens (`list[str]`, *optional*):
            Strings whose first token counts as an answer (e.g. `["A", "B", "C", "D"]`): evaluation then reports
            `eval_answer_accuracy`, the teacher-forced argmax accuracy on completion tokens that are answers.
        loss_memory_budget_mb (`int`, *optional*):
            Memory budget of one tile of the fused loss; by default the kernel picks one for the device.
    """

    prompt_loss_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of prompt-side tokens in the loss (0 = completion-only, 1 = full sequence). Unset: what "
            "SFTTrainer trains on this data (every token of text/messages, the completion of prompt-completion data)."
        },
    )
    completion_loss_weight: float | None = field(
        default=None, metadata={"help": "Weight of completion tokens (unset: 1.0)."}
    )
    role_weights: dict | str | None = field(
        default=None,
        metadata={"help": 'Per-role weights for chat data, e.g. \'{"system": 0.0, "template": 0.0}\'.'},
    )
    loss_normalization: str = field(
        default="weights",
        metadata={"help": "Loss denominator.", "choices": ["weights", "nonzero_tokens"]},
    )
    prompt_loss_weight_schedule: str = field(
        default="constant",
        metadata={"help": "Schedule of the prompt weight over training.", "choices": list(SCHEDULE_KINDS)},
    )
    prompt_loss_weight_end: float | None = field(
        default=None, metadata={"help": "Final prompt weight of a linear or cosine schedule."}
    )
    response_template: str | None = field(
        default=None, metadata={"help": "Response template for plain-text datasets (e.g. '### Response:')."}
    )
    instruction_template: str | None = field(
        default=None, metadata={"help": "Instruction template for multi-turn plain-text datasets."}
    )
    example_weight_column: str | None = field(
        default=None,
        metadata={"help": "Dataset column with a per-example weight multiplier, if present (unset: 'weight')."},
    )
    span_weights: dict | str | None = field(
        default=None,
        metadata={"help": "Span rules: a preset chain ('react+think=0.5') or a JSON {regex: weight} mapping."},
    )
    message_weight_key: str | None = field(
        default="weight",
        metadata={"help": "Key of per-message weights in chat data ('weight'; ms-swift's 'loss' is an alias)."},
    )
    answer_tokens: list[str] | None = field(
        default=None, metadata={"help": "Answer strings for eval_answer_accuracy, e.g. A B C D."}
    )
    loss_memory_budget_mb: int | None = field(
        default=None, metadata={"help": "Memory budget (MiB) of one tile of the fused weighted loss."}
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:
            self._choose_bf16()
        super().__post_init__()
        if isinstance(self.role_weights, str):
            try:
                self.role_weights = json.loads(self.role_weights)
            except json.JSONDecodeError as err:
                raise ValueError(f"role_weights must be a JSON object, got {self.role_weights!r}: {err}") from err
        if isinstance(self.span_weights, str) and self.span_weights.strip().startswith(("{", "[")):
            try:
                self.span_weights = json.loads(self.span_weights)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"span_weights must be a preset chain or JSON, got {self.span_weights!r}: {err}"
                ) from err
        resolve_span_rules(self.span_weights)  # bad patterns or presets raise here, naming the rule
        if self.loss_normalization not in ("weights", "nonzero_tokens"):
            raise ValueError(
                f"loss_normalization={self.loss_normalization!r}; use 'weights' (divide by the sum of weights) or "
                "'nonzero_tokens' (divide by the number of tokens with a non-zero weight)."
            )
        if self.prompt_loss_weight_schedule not in SCHEDULE_KINDS:
            raise ValueError(f"prompt_loss_weight_schedule must be one of {SCHEDULE_KINDS}.")
        if self.prompt_loss_weight_schedule != "constant" and (
            self.prompt_loss_weight_end is None or self.prompt_loss_weight is None
        ):
            raise ValueError(
                f"prompt_loss_weight_schedule={self.prompt_loss_weight_schedule!r} needs prompt_loss_weight (the weight "
                "at the first step) and prompt_loss_weight_end (the weight reached at the last step)."
            )
        for name in ("prompt_loss_weight", "completion_loss_weight", "prompt_loss_weight_end"):
            check_weight(name, getattr(self, name), allow_none=True)

    def _choose_bf16(self) -> None:
        """Resolve ``bf16=None`` by what the hardware does natively, instead of SFTConfig's bf16-wherever-possible.

        On an accelerator: bf16 where it supports it. On CPU (``use_cpu`` or no accelerator): bf16 autocast only where
        the CPU computes bf16 natively (AVX512-BF16/AMX/Arm BF16); elsewhere it is emulated, ~3x slower than fp32,
        so fp32. A CPU-only machine gets ``use_cpu=True`` with bf16, which transformers requires for CPU autocast and
        which changes nothing else there.
        """
        from trl_plw.precision import accelerator_bf16_available, cpu_bf16_is_native

        on_cpu = self.use_cpu or not torch.accelerator.is_available()
        if on_cpu:
            self.bf16 = cpu_bf16_is_native()
            if self.bf16:
                self.use_cpu = True
        else:
            self.bf16 = accelerator_bf16_available()
        logger.info("PLWConfig: bf16=%s chosen for this %s.", self.bf16, "CPU" if on_cpu else "accelerator")

    @property
    def has_schedule(self) -> bool:
        return self.prompt_loss_weight_schedule != "constant"


class PLWTrainer(SFTTrainer):
    """[`trl.SFTTrainer`] with real-valued per-token loss weights, a fused weighted loss and split metrics.

    The weighting policy comes from `PLWConfig` or from a `DataCollatorForWeightedCompletionLM` passed as
    ``data_collator`` (the path of TRL 0.19's ``DataCollatorForCompletionOnlyLM`` users). A given collator is the
    single source of what it states: its ``response_template``/``instruction_template`` build the ``token_roles`` of
    plain-text data at dataset preparation (so packing carries them), its ``prompt_loss_weight``,
    ``completion_loss_weight``, ``role_weights``, ``example_weight_column``, ``span_weights``, ``pad_to_multiple_of`` and
    ``on_missing_template`` apply to every data format, and ``self.args`` is updated to them. Both hold one
    `trl_plw.policy.WeightingPolicy`, where unset is None: a setting stated on both sides with different values
    raises naming both, even where one equals the other side's default. The policy is resolved once, at
    construction, and the trainer trains with a copy of the collator built with it (padding-free when the
    configuration is), so the object you passed is left unchanged.

    With nothing set, PLWTrainer trains what SFTTrainer trains on the data (docs/COMPATIBILITY.md): every token of
    language-modeling data (``text``, ``messages``, bare ``input_ids``), the completion of prompt-completion data;
    setting ``prompt_loss_weight`` (or ``role_weights``) switches weighting on. TRL's switches keep their meaning:
    ``completion_only_loss=True`` and ``assistant_only_loss=True`` require every prompt-side weight to be 0 (they
    raise otherwise); ``assistant_only_loss=True`` needs conversational data and trains TRL's assistant mask where
    TRL has one for the template, else the assistant turns PLWTrainer finds for any prefix-consistent template.
    ``completion_only_loss=False`` is TRL's full-sequence loss (an unset prompt weight resolves to 1; an explicit 0
    contradicts it and raises).

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from trl_plw import PLWConfig, PLWTrainer
    >>> data = Dataset.from_list([{"prompt": "2+2=", "completion": "4"}] * 8)
    >>> args = PLWConfig("out", prompt_loss_weight=0.1, max_steps=2, report_to="none")
    >>> trainer = PLWTrainer("HuggingFaceTB/SmolLM2-135M-Instruct", args=args, train_dataset=data)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    _tag_names = ["trl", "sft", "trl-plw"]

    def __init__(
        self,
        model,
        args: PLWConfig | None = None,
        data_collator: DataCollatorForWeightedCompletionLM | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        **kwargs: Any,
    ):
        warn_if_untested()
        args = _as_plw_config(args, model)
        normalize_loss_type(args)  # "chunked_nll" (TRL 1.10-1.15's default) is "nll" computed by a chunked head
        self._check_supported(args, data_collator, compute_loss_func, compute_metrics, preprocess_logits_for_metrics)
        # A given collator is the single source of its weighting policy: merged into args (conflicts raise). Then an
        # unset prompt weight becomes what SFTTrainer trains on this data, and TRL's completion_only_loss /
        # assistant_only_loss are mapped onto the weights (contradictions raise).
        self._plw_data_kind = _first_data_kind(args, data_collator, train_dataset, eval_dataset, kwargs)
        _resolve_weighting_policy(args, data_collator, self._plw_data_kind)
        if isinstance(model, str):
            model = self._prepare_model_name(model, args)
        self._plw_args = args  # `_prepare_dataset` runs inside super().__init__, before `self.args` exists
        self._plw_collator = data_collator
        with self._assistant_only_loss_hidden(args), lm_head_adapter_check_disabled():
            super().__init__(
                model,
                args=args,
                data_collator=None,  # ours is set below: TRL refuses a custom collator together with padding-free
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                **kwargs,
            )
        self._plw_tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        self._check_parallelism()
        self._check_peft_method()
        # The trainer's collator, built once with the resolved policy (a schedule's value multiplies the prompt
        # weight 1.0 at loss time); a collator passed in is copied, so the object the caller holds is unchanged.
        weights = {
            "prompt_loss_weight": 1.0 if args.has_schedule else args.prompt_loss_weight,
            "completion_loss_weight": args.completion_loss_weight,
            "role_weights": args.role_weights,
            "example_weight_column": args.example_weight_column,
            "span_weights": args.span_weights,
            "pad_to_multiple_of": args.pad_to_multiple_of,
        }
        if data_collator is None:
            data_collator = DataCollatorForWeightedCompletionLM(
                pad_token_id=self._plw_tokenizer.pad_token_id,
                tokenizer=self._plw_tokenizer,
                padding_free=self.padding_free,
                **weights,
            )
        else:
            if self.padding_free and not data_collator.padding_free:
                # BFD packing (or padding_free=True) needs one flattened row per batch for varlen attention;
                # switching the copy's layout changes no weight.
                logger.info("The data_collator is switched to padding_free=True (this configuration is padding-free).")
            data_collator = dataclasses.replace(
                data_collator, padding_free=data_collator.padding_free or self.padding_free, **weights
            )
        data_collator.loss_weights_applied = True  # compute_loss applies loss_weights
        self.data_collator = data_collator

        add_weighted_lm_head(
            self.model.get_base_model() if is_peft_model(self.model) else self.model,
            memory_budget_bytes=None if args.loss_memory_budget_mb is None else args.loss_memory_budget_mb << 20,
        )
        # compute_loss returns the loss already divided by the window's global denominator
        self.loss_is_scaled_for_ga = True
        self._answer_token_ids = self._resolve_answer_tokens(args.answer_tokens)
        span_names = tuple(rule.name for rule in data_collator.span_rules)
        self._split_metrics = {"train": SplitMetrics(span_names), "eval": SplitMetrics(span_names)}
        attention = getattr(self.model.config, "_attn_implementation", None)
        ensure_registered(attention)  # a model whose config names our backend (e.g. set after loading) can run it
        if self.padding_free and self.args.device.type == "cuda" and attention in ("sdpa", "eager"):
            logger.warning(
                "Packed batches run with attn_implementation=%r, which builds a dense block-diagonal mask; "
                "'plw_varlen' (torch's varlen flash kernel) or 'flash_attention_2' avoid it: call "
                "trl_plw.attention.register_attention_backends() before from_pretrained(..., "
                "attn_implementation='plw_varlen'), or switch a loaded model with "
                "model.set_attn_implementation('plw_varlen').",
                attention,
            )
        logger.info(
            "PLWTrainer: attention=%s, padding_free=%s, packing=%s, prompt_loss_weight=%s (%s), normalization=%s",
            attention,
            self.padding_free,
            args.packing,
            args.prompt_loss_weight,
            args.prompt_loss_weight_schedule,
            args.loss_normalization,
        )

    @contextlib.contextmanager
    def _assistant_only_loss_hidden(self, args: PLWConfig):
        """Run SFTTrainer.__init__ with ``assistant_only_loss=False``, restoring it afterwards.

        With it set, TRL swaps in a training chat template with ``{% generation %}`` markers, or raises for templates
        it cannot patch (SmolLM2's among them). PLWTrainer does not use that template: `tokenize_messages` finds the
        assistant turns of any prefix-consistent template, and the weights (prompt side 0, checked before) do the
        rest. The value is kept for `_prepare_dataset`, which checks that the data is conversational, like TRL."""
        self._assistant_only_loss = args.assistant_only_loss
        args.assistant_only_loss = False
        try:
            yield
        finally:
            args.assistant_only_loss = self._assistant_only_loss

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _prepare_model_name(model: str, args: PLWConfig) -> str:
        """Pick an attention backend for the device unless one is given, and register it if it is one of ours.

        The name itself is passed to TRL unchanged (a Hub id or a local folder): demo aliases such as the offline
        default model are resolved by the commands that offer them (`trl_plw.experiments.offline_model.resolve_model_path`)."""
        from trl_plw.attention import SDPA, select_attn_implementation

        kwargs = dict(args.model_init_kwargs or {})
        if kwargs.get("attn_implementation") in (None, "auto"):
            packed = args.padding_free or (args.packing and args.packing_strategy in ("bfd", "bfd_split"))
            choice = select_attn_implementation(args.device, packed=packed)
            if choice == SDPA:
                # transformers' own default: sdpa where the model class supports it, the class's choice elsewhere
                # (GPT-OSS rejects sdpa), so every model SFTTrainer trains loads here too.
                kwargs.pop("attn_implementation", None)
            else:
                kwargs["attn_implementation"] = choice
        ensure_registered(kwargs.get("attn_implementation"))  # TRL loads the model by this name in __init__
        args.model_init_kwargs = kwargs
        return model

    @staticmethod
    def _check_supported(args, data_collator, compute_loss_func, compute_metrics, preprocess_logits_for_metrics):
        if compute_loss_func is not None:
            raise ValueError(
                "PLWTrainer does not take `compute_loss_func`: its loss is the fused weighted cross-entropy, and a "
                "custom loss would need the full logits it exists to avoid. Subclass PLWTrainer instead."
            )
        if compute_metrics is not None or preprocess_logits_for_metrics is not None:
            raise ValueError(
                "PLWTrainer does not take `compute_metrics`/`preprocess_logits_for_metrics`: they need the full "
                "[tokens, vocab] logits its fused loss exists to avoid. It computes eval_loss, eval_prompt_loss, "
                "eval_completion_loss, eval_completion_accuracy and TRL's eval_mean_token_accuracy itself, without "
                "logits (usable as metric_for_best_model); use `answer_tokens` for answer accuracy, or evaluate "
                "generations in a callback."
            )
        if args.loss_type != "nll":
            raise ValueError(
                f"loss_type={args.loss_type!r} is not supported by PLWTrainer; only 'nll' (or its alias 'chunked_nll') "
                "is weighted."
            )
        if args.label_smoothing_factor > 0:
            raise ValueError("label_smoothing_factor > 0 needs full logits; PLWTrainer's fused loss does not smooth.")
        if data_collator is not None and not isinstance(data_collator, DataCollatorForWeightedCompletionLM):
            raise TypeError(
                "PLWTrainer needs a DataCollatorForWeightedCompletionLM (it emits loss_weights, prompt_mask and "
                f"completion_mask); got {type(data_collator).__name__}. Leave data_collator unset to get one."
            )

    def _check_parallelism(self) -> None:
        if self.args.n_gpu > 1:  # TRL refuses it since 1.16; checked here for every version
            raise ValueError(
                f"{type(self).__name__} does not support `nn.DataParallel`, which `Trainer` uses when several GPUs are "
                "visible to a single process: its replicas would not run the weighted head, and its loss is a mean of "
                "per-GPU means. Launch the script with `accelerate launch` or `torchrun`, or make a single GPU visible "
                "with `CUDA_VISIBLE_DEVICES`."
            )
        config = getattr(self.accelerator, "parallelism_config", None)
        if config is None:
            return
        if getattr(config, "cp_enabled", False) or getattr(config, "sp_enabled", False):
            raise ValueError(
                "Context/sequence parallelism shards each sequence across ranks and feeds pre-shifted labels; "
                "PLWTrainer's weighted head shifts weights and targets itself, so it would misalign them. Use data "
                "parallelism (DDP, FSDP2, DeepSpeed ZeRO) instead."
            )

    def _check_peft_method(self) -> None:
        if not is_peft_model(self.model):
            return
        for adapter, config in self.model.peft_config.items():
            # Prefix tuning adds prefix keys/values to every layer but no position to the sequence: the head sees
            # the real tokens' hidden states only, so the weighted loss is exact (tests/test_trainer_heads.py).
            if getattr(config, "is_prompt_learning", False) and config.peft_type != "PREFIX_TUNING":  # a str enum
                raise ValueError(
                    f"peft_config (adapter {adapter!r}) is a {type(config).__name__}, a prompt-learning method that "
                    "prepends virtual tokens to every row (prompt tuning, P-tuning). Those positions have no token, "
                    "role or loss weight, and PEFT lets the last virtual token predict the row's first token, which "
                    "no weighting here describes, so PLWTrainer cannot reproduce that loss. Use prefix tuning "
                    "(PrefixTuningConfig, which adds no position) or an adapter that keeps the sequence as it is "
                    "(LoraConfig, including on lm_head)."
                )

    def _resolve_answer_tokens(self, answers: list[str] | None) -> torch.Tensor | None:
        if not answers:
            return None
        ids: set[int] = set()
        for answer in answers:
            for text in (answer, " " + answer):
                tokens = self._plw_tokenizer(text, add_special_tokens=False)["input_ids"]
                if tokens:
                    ids.add(tokens[0])
        return torch.tensor(sorted(ids), dtype=torch.long)

    # ------------------------------------------------------------------ data
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [*PER_TOKEN_COLUMNS, "seq_lengths", self.args.example_weight_column]

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        args = self._plw_args
        # `processing_class` as TRL resolved it (loaded from the model name if none was given)
        tokenizer = self._plw_tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if isinstance(dataset, Dataset) and dataset.format["type"] == "custom":
            # TRL's guard (1.10+), kept since this override replaces TRL's preparation: map() would run the user's
            # transform on every row and fail inside it.
            raise ValueError(
                "PLWTrainer cannot prepare a dataset that uses `Dataset.with_transform()`: preparation runs `map()`, "
                "which would apply the transform to every row. Apply the transform with `dataset.map(...)` instead, "
                "or prepare the dataset yourself (token_roles or loss_weights columns) and set "
                "`dataset_kwargs={'skip_prepare_dataset': True}`."
            )
        map_kwargs: dict[str, Any] = {}
        if isinstance(dataset, Dataset):
            map_kwargs["num_proc"] = args.dataset_num_proc

        columns = dataset_column_names(dataset)
        if getattr(self, "_assistant_only_loss", False):
            first = next(iter(dataset))
            if not (is_conversational(first) or "assistant_masks" in first or "token_roles" in first):
                raise ValueError(
                    f"You set `assistant_only_loss=True`, but the {dataset_name} dataset is not conversational (no "
                    "'messages' or conversational 'prompt'/'completion'). This option is only supported for "
                    "conversational datasets; for plain text use response_template/instruction_template instead."
                )
        if "input_ids" not in columns:
            if formatting_func is not None:
                dataset = dataset.map(lambda ex: {"text": formatting_func(ex)}, **map_kwargs)
            first = next(iter(dataset))
            if is_conversational_from_value(first):
                dataset = dataset.map(
                    maybe_convert_to_chatml,
                    remove_columns="conversations" if "conversations" in dataset_column_names(dataset) else None,
                    **map_kwargs,
                )
                first = next(iter(dataset))
            dataset = dataset.map(
                self._tokenize_example,
                fn_kwargs={
                    "tokenizer": tokenizer,
                    "text_field": args.dataset_text_field,
                    "message_weight_key": self._message_weight_key(dataset, first),
                    "allow_negative": self._allow_negative_weights,
                    "assistant_only": getattr(self, "_assistant_only_loss", False),
                    # TRL's assistant mask, where TRL has one for this template: the same tokens trained
                    "mask_template": assistant_mask_template(tokenizer)
                    if getattr(self, "_assistant_only_loss", False)
                    else None,
                },
                remove_columns=[c for c in ("prompt", "completion", "messages") if c in first]
                + ([args.dataset_text_field] if args.dataset_text_field in first and "prompt" not in first else []),
                **map_kwargs,
            )
        columns = dataset_column_names(dataset)
        if not any(c in columns for c in WEIGHT_SOURCE_COLUMNS):
            if self._template_matcher is not None:
                dataset = self._apply_templates(dataset, dataset_name, map_kwargs)
            elif all(weight == 1.0 for weight in _prompt_side_peaks(args).values()):
                # Language-modeling data: SFTTrainer trains every token, and so does the policy in force.
                dataset = dataset.map(
                    lambda ex: {"token_roles": [int(Role.COMPLETION)] * len(ex["input_ids"])}, **map_kwargs
                )
            else:
                raise ValueError(
                    f"The {dataset_name} dataset has no prompt/completion split, so the prompt-side weights "
                    f"{_prompt_side_peaks(args)} have nothing to act on: PLWTrainer looked for the columns "
                    "'prompt'+'completion' (prompt-completion data), 'messages' (chat data), or per-token "
                    f"{', '.join(repr(c) for c in WEIGHT_SOURCE_COLUMNS)} in {columns}. Provide one of them, or set "
                    "`response_template` (and `instruction_template` for multi-turn text) in PLWConfig or on the "
                    "data_collator; or leave prompt_loss_weight/role_weights unset to train every token, as "
                    "SFTTrainer does on language-modeling data."
                )

        dataset = self._add_token_spans(dataset, map_kwargs)
        per_token = [c for c in PER_TOKEN_COLUMNS if c in dataset_column_names(dataset)]
        example_weight = args.example_weight_column
        has_example_weight = example_weight in dataset_column_names(dataset)
        if has_example_weight and packing:
            # A scalar weight would be lost when rows are concatenated; spread it over the example's tokens first.
            first_value = next(iter(dataset))[example_weight]
            if not isinstance(first_value, list):
                dataset = dataset.map(
                    lambda ex: {example_weight: [float(ex[example_weight])] * len(ex["input_ids"])}, **map_kwargs
                )
            per_token.append(example_weight)

        # BFD packing would cut long examples itself (keep_start), *after* the completion filter below, and ignore
        # truncation_mode; truncating here first makes the filter see what training sees. "bfd_split" and "wrapped"
        # keep every token (an overflow fragment is trained with its tokens' own weights), so they are left whole.
        truncate_first = not packing or args.packing_strategy == "bfd"
        if args.max_length is not None and truncate_first:
            if args.truncation_mode not in ("keep_start", "keep_end"):
                raise ValueError(f"truncation_mode={args.truncation_mode!r}: use 'keep_start' or 'keep_end'.")
            keep = (
                slice(None, args.max_length) if args.truncation_mode == "keep_start" else slice(-args.max_length, None)
            )
            truncated = per_token + (
                [example_weight] if has_example_weight and example_weight not in per_token else []
            )

            def truncate(example):
                return {c: example[c][keep] if isinstance(example[c], list) else example[c] for c in truncated}

            dataset = dataset.map(truncate, **map_kwargs)

        # An example whose completion was cut away (or that never had one) would train on its prompt alone.
        dataset = dataset.filter(has_completion, **map_kwargs)

        if packing:
            if args.max_length is None:
                raise ValueError("packing=True needs max_length (the length of the packed rows).")
            dataset = dataset.select_columns(per_token)
            if args.shuffle_dataset:
                dataset = dataset.shuffle(seed=args.seed)
            dataset = pack_dataset(dataset, args.max_length, args.packing_strategy, map_kwargs)
        elif args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    def _message_weight_key(self, dataset, first: dict[str, Any]) -> str | None:
        """``args.message_weight_key`` when some message of the dataset carries a weight, else None (then no
        ``message_weights`` column is stored).

        A stream (IterableDataset) cannot be scanned ahead, and judging it by its first example would drop a weight
        first seen later without a word; so a conversational stream always reads its messages' weights (the column
        holds 1.0 where no message sets one, which changes no loss)."""
        key = self._plw_args.message_weight_key
        columns = [c for c in ("messages", "prompt", "completion") if c in first]
        if key is None or not columns:
            return None
        if isinstance(dataset, Dataset):
            found = any(any_weighted(dataset[c], key) for c in columns)
        else:
            found = any(isinstance(first[c], list) for c in columns)
        return key if found else None

    @property
    def _allow_negative_weights(self) -> bool:
        collator = self._plw_collator
        return collator is not None and collator.allow_negative_weights

    @staticmethod
    def _tokenize_example(
        example: dict[str, Any],
        tokenizer,
        text_field: str,
        message_weight_key: str | None = None,
        allow_negative: bool = False,
        assistant_only: bool = False,
        mask_template: str | None = None,
    ) -> dict[str, Any]:
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        # Per-example template arguments (a dataset column, as TRL reads them), e.g. a harmony model's identity.
        kwargs = {
            "tools": tools,
            "chat_template_kwargs": example.get("chat_template_kwargs") or None,
            "message_weight_key": message_weight_key,
            "allow_negative_weights": allow_negative,
        }
        if "prompt" in example and "completion" in example:
            return tokenize_prompt_completion(
                tokenizer,
                example["prompt"],
                example["completion"],
                assistant_only=assistant_only,
                assistant_mask_template=mask_template,
                **kwargs,
            )
        if "messages" in example and is_conversational(example):
            return tokenize_messages(tokenizer, example["messages"], assistant_mask_template=mask_template, **kwargs)
        if text_field in example:
            text = example[text_field]
            if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
                text += tokenizer.eos_token
            return {"input_ids": tokenizer(text)["input_ids"]}  # special tokens as TRL adds them (e.g. BOS)
        raise ValueError(
            "PLWTrainer found no 'prompt'+'completion', 'messages' or "
            f"'{text_field}' column in an example with keys {sorted(example)}."
        )

    def _add_token_spans(self, dataset, map_kwargs: dict[str, Any]):
        """``token_spans`` (the span rules covering each token) before truncation and packing, which carry it like
        every per-token column; the roles it reads come from the example's first role source."""
        rules = resolve_span_rules(self._plw_args.span_weights)
        if not rules or "token_spans" in dataset_column_names(dataset):
            return dataset
        tokenizer = self._plw_tokenizer

        def add(example):
            source = first_source(example, ROLE_SOURCE_COLUMNS)
            if source == "token_roles":
                roles = example[source]
            elif source is not None:
                roles = [int(v != 0) for v in example[source]]  # Role.COMPLETION == 1, Role.PROMPT == 0
            else:  # explicit loss_weights only: what carries weight counts as completion
                roles = [int(w != 0) for w in example["loss_weights"]]
            return {"token_spans": token_span_bits(tokenizer, example["input_ids"], roles, rules).tolist()}

        return dataset.map(add, **map_kwargs)

    @property
    def _on_missing_template(self) -> str:
        collator = self._plw_collator
        return "raise" if collator is None else collator.on_missing_template

    def _apply_templates(self, dataset, dataset_name: str, map_kwargs: dict[str, Any]):
        """``token_roles`` from the response/instruction templates, so that truncation and packing carry them.

        An example without the response template raises, or, with the collator's ``on_missing_template="ignore"``,
        gets only IGNORE roles and is dropped by the completion filter (counted in a warning), as the collator
        would give it weight 0."""
        dataset = dataset.map(self._roles_from_templates, **map_kwargs)
        if self._on_missing_template == "ignore" and isinstance(dataset, Dataset):
            missing = sum(1 for found in dataset["_template_found"] if not found)
            if missing:
                logger.warning(
                    "%d of %d %s examples have no response template %r; they are dropped "
                    "(on_missing_template='ignore').",
                    missing,
                    len(dataset),
                    dataset_name,
                    self._plw_args.response_template,
                )
        return dataset.remove_columns("_template_found")

    def _roles_from_templates(self, example: dict[str, Any]) -> dict[str, Any]:
        roles, missing = self._template_matcher.document_roles(
            example["input_ids"], on_missing=self._on_missing_template
        )
        return {"token_roles": roles.tolist(), "_template_found": not missing}

    @property
    def _template_matcher(self):
        """The collator's template matcher if it has templates, else one built from PLWConfig's, else None."""
        if getattr(self, "_template_matcher_cache", None) is None:
            collator = self._plw_collator
            if collator is not None and collator.template_matcher is not None:
                self._template_matcher_cache = collator.template_matcher
            elif self._plw_args.response_template is not None:
                from trl_plw.roles import TemplateMatcher

                self._template_matcher_cache = TemplateMatcher(
                    self._plw_tokenizer, self._plw_args.response_template, self._plw_args.instruction_template
                )
        return getattr(self, "_template_matcher_cache", None)

    # ------------------------------------------------------------------ weights and denominator
    @property
    def current_prompt_loss_weight(self) -> float:
        """The prompt weight in force at the current optimizer step (schedules are functions of the step)."""
        args = self.args
        return prompt_weight_at(
            self.state.global_step,
            self.state.max_steps,
            args.prompt_loss_weight,
            args.prompt_loss_weight_end,
            args.prompt_loss_weight_schedule,
        )

    def _effective_weights(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token weights in force now. With a schedule the collator put weight 1 (times role and example factors)
        on prompt tokens, and the scheduled value multiplies them here, at loss time, so a schedule never needs
        re-collation and stays exact under prefetching and dataloader workers."""
        weights = batch["loss_weights"]
        if not self.args.has_schedule:
            return weights
        scale = torch.where(batch["prompt_mask"], self.current_prompt_loss_weight, 1.0)
        return weights * scale

    def _denominator(self, weights: torch.Tensor) -> torch.Tensor:
        """Local loss denominator of one batch, over predicted positions (the first token predicts nothing)."""
        shifted = weights[..., 1:]
        if self.args.loss_normalization == "weights":
            return shifted.sum(dtype=torch.float64)
        return (shifted != 0).sum().to(torch.float64)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        if not batch_samples or "loss_weights" not in batch_samples[0]:
            return super()._get_num_items_in_batch(batch_samples, device)
        total = sum(self._denominator(self._effective_weights(b)) for b in batch_samples)
        total = torch.as_tensor(total, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return total / tensor_parallel_size(self)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        weights = self._effective_weights(inputs).float()
        inputs.pop("loss_weights")
        prompt_mask = inputs.pop("prompt_mask").bool()
        completion_mask = inputs.pop("completion_mask").bool()
        token_spans = inputs.pop("token_spans", None)
        inputs.pop("labels", None)
        input_ids = inputs["input_ids"]
        scorable = prompt_mask | completion_mask | (weights != 0)
        targets = torch.where(scorable, input_ids, torch.full_like(input_ids, -100))

        if num_items_in_batch is None:
            normalizer = self._denominator(weights)
        else:
            normalizer = torch.as_tensor(num_items_in_batch, dtype=torch.float64, device=weights.device)
        # A window without weight has a zero numerator too; divide by 1 to return a finite 0.
        # Kept in float64: the kernel casts it to its accumulation dtype (float64 for float64 models).
        normalizer = torch.where(normalizer > 0, normalizer, torch.ones_like(normalizer))

        if self.aux_loss_enabled:  # MoE: the model returns its router's load-balancing loss (SFTTrainer's switch)
            inputs["output_router_logits"] = True
        outputs = model(
            **inputs,
            use_cache=False,
            plw_weights=weights,
            plw_targets=targets,
            plw_normalizer=normalizer,
            plw_score_all=mode == "eval",
        )
        loss = outputs.loss
        # Like Trainer.compute_loss: the denominator counts every rank, and DDP averages gradients over ranks.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // tensor_parallel_size(self))
        if self.aux_loss_enabled and outputs.aux_loss is not None:
            # Like SFTTrainer: the aux loss is a per-micro-batch mean (DDP averages it over ranks); with a global
            # denominator Trainer leaves accumulation to the loss, so it is averaged over the accumulation steps.
            steps = getattr(self, "current_gradient_accumulation_steps", 1) if num_items_in_batch is not None else 1
            aux = outputs.aux_loss.to(loss.device)
            loss = loss + moe_aux_loss_coef(self) * aux / steps
            record_metric(self, mode, "aux_loss", self.accelerator.gather_for_metrics(aux.detach()).mean().item())

        answer_mask = None
        if self._answer_token_ids is not None:
            if self._answer_token_ids.device != input_ids.device:  # moved once, not copied per micro-batch
                self._answer_token_ids = self._answer_token_ids.to(input_ids.device)
            answer_mask = torch.isin(input_ids[:, 1:], self._answer_token_ids)
        scored = outputs.scored
        if mode == "eval" and (kept := self._kept_eval_tokens(inputs, input_ids)) is not None:
            scored = scored & kept[:, 1:].to(scored.device)
        self._split_metrics[mode].update(
            outputs.token_ce,
            outputs.is_argmax,
            scored,
            weights[:, 1:],
            prompt_mask[:, 1:],
            completion_mask[:, 1:],
            answer_mask,
            None if token_spans is None else token_spans[:, 1:],
        )
        if mode == "train":
            if "attention_mask" in inputs:
                local_tokens = inputs["attention_mask"].sum()
            else:
                local_tokens = torch.tensor(input_ids.numel(), device=input_ids.device)
            local_tokens = int(self.accelerator.gather_for_metrics(local_tokens).sum()) // tensor_parallel_size(self)
            set_metric(self, mode, "num_tokens", add_train_tokens(self, local_tokens))
        return (loss, outputs) if return_outputs else loss

    def _kept_eval_tokens(self, inputs: dict[str, Any], input_ids: torch.Tensor) -> torch.Tensor | None:
        """Mask of the tokens of this evaluation batch that count, or None when all do.

        With several processes accelerate evens out the last evaluation batch by repeating samples from the start of
        the set (``even_batches``), and ``gather_for_metrics`` drops the repeats from what Trainer gathers: it keeps the
        first ``remainder`` samples of the last global batch, in rank order. The split metrics are sums reduced once
        per loop, so they drop the same samples here: rank r keeps the first ``remainder - r * batch`` of its last
        batch. A sample is a row, or in a padding-free batch a document (``seq_idx``).
        """
        state = self.accelerator.gradient_state
        if self.accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
            return None
        if self.padding_free:
            packed = self.args.packing if self.args.eval_packing is None else self.args.eval_packing
            if packed or "seq_idx" not in inputs:
                # One flattened row of packed samples keeps no trace of where each sample ends.
                if not getattr(self, "_warned_repeated_eval_samples", False):
                    logger.warning(
                        "Evaluation metrics include %d samples that accelerate repeated to even out the last batch "
                        "across %d processes: a padding-free batch of packed samples does not say where each sample "
                        "ends, so they cannot be dropped. Make the evaluation set a multiple of "
                        "per_device_eval_batch_size x processes, or set eval_packing=False, for exact metrics.",
                        state.active_dataloader.total_batch_size - state.remainder,
                        self.accelerator.num_processes,
                    )
                    self._warned_repeated_eval_samples = True
                return None
            sample = inputs["seq_idx"].long()
        else:
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            sample = rows[:, None].expand_as(input_ids)
        local_samples = int(sample.max()) + 1
        real = min(max(state.remainder - self.accelerator.process_index * local_samples, 0), local_samples)
        return sample < real

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------ logging
    def _compute_split_metrics(self, mode: str) -> dict[str, float]:
        split = self._split_metrics[mode]
        metrics = split.compute(
            reduce_fn=lambda t: self.accelerator.reduce(t, reduction="sum"),
            normalization=self.args.loss_normalization,
            include_answer=self._answer_token_ids is not None,
        )
        split.reset()
        return metrics

    def evaluation_loop(
        self,
        dataloader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ):
        """Trainer's loop, plus the split metrics of exactly this loop under the loop's own prefix.

        ``evaluate`` and ``predict`` name their metrics here (``eval``, ``eval_<name>`` for each set of a dict of
        evaluation sets, ``test``); ``log`` never learns the prefix, and ``predict`` never logs, so the sums are
        reset, computed and named here rather than when logging.
        """
        self._split_metrics["eval"].reset()  # nothing carried over from an interrupted loop
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        # The exact weighted loss over the whole set replaces Trainer's mean of per-batch losses.
        metrics = self._compute_split_metrics("eval")
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in metrics.items()})
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and not self._split_metrics["train"].empty:
            metrics = self._compute_split_metrics("train")
            metrics.pop("loss")  # Trainer already logs the optimized loss
            metrics.pop("sequence_loss", None)
            logs.update(metrics)
            logs["prompt_loss_weight"] = self.current_prompt_loss_weight
        super().log(logs, start_time)


def _as_plw_config(args: Any, model: Any) -> PLWConfig:
    """The trainer's own copy of its configuration: a PLWConfig built from ``args`` as SFTTrainer builds an SFTConfig
    (None -> defaults, a ``transformers.TrainingArguments`` converted field by field), copied so that resolving the
    policy never changes the object the caller holds."""
    if args is None:
        name = model if isinstance(model, str) else model.config.name_or_path
        return PLWConfig(f"{name.split('/')[-1]}-PLW")
    if isinstance(args, PLWConfig):
        return copy.copy(args)
    if isinstance(args, TrainingArguments):
        if isinstance(args, SFTConfig):
            logger.info("args is an SFTConfig: converted to a PLWConfig with the default weighting policy.")
        values = args.to_dict()  # as SFTTrainer converts: enums as their values ...
        for name in values:
            if name.endswith("_token"):  # ... and the fields to_dict hides (hub_token; SFTConfig's eos/pad_token)
                values[name] = getattr(args, name)
        return PLWConfig(**values)
    raise TypeError(
        f"`args` must be a PLWConfig (or an SFTConfig/TrainingArguments to convert), got {type(args).__name__}."
    )


def _first_data_kind(
    args: PLWConfig,
    collator: DataCollatorForWeightedCompletionLM | None,
    train_dataset: Any,
    eval_dataset: Any,
    kwargs: dict[str, Any],
) -> DataKind | None:
    """The kind of the training data (else of the first evaluation set), read from its first example; None when
    there is no example to read (the policy then falls back to completion-only, logged)."""
    dataset = train_dataset
    if dataset is None and eval_dataset is not None:
        dataset = next(iter(eval_dataset.values())) if isinstance(eval_dataset, dict) else eval_dataset
    if dataset is None:
        return None
    skip_prepare = bool((args.dataset_kwargs or {}).get("skip_prepare_dataset"))
    if isinstance(dataset, Dataset) and (
        len(dataset) == 0 or (dataset.format["type"] == "custom" and not skip_prepare)
    ):
        return None  # empty, or a with_transform dataset that preparation refuses: nothing to read here
    has_template = args.response_template is not None or (
        collator is not None and collator.response_template is not None
    )
    first = next(iter(dataset))
    return detect_data_kind(first, args.dataset_text_field, has_template, kwargs.get("formatting_func") is not None)


def _resolve_weighting_policy(
    args: PLWConfig, collator: DataCollatorForWeightedCompletionLM | None, kind: DataKind | None
) -> None:
    """Resolve the weighting policy once, into ``args`` (the trainer's copy).

    A given collator's policy and PLWConfig's are merged (`WeightingPolicy.merge`): a setting stated on both sides
    with different values raises, naming both, even where one equals the other side's default (unset is None on
    both). An unset prompt weight becomes SFTTrainer's for the data (`sft_prompt_weight`), the other unset settings
    their defaults. Then TRL's ``completion_only_loss``/``assistant_only_loss`` are checked against the weights, and
    the policy in force is logged in one line."""
    ours = WeightingPolicy.of(args)
    policy = ours if collator is None else collator.policy.merge(ours, "data_collator", "PLWConfig")
    if collator is not None and collator.prompt_loss_weight is not None:
        weight_source = "set on the data_collator"
    else:
        weight_source = "set in PLWConfig"
    default = 0.0
    if policy.prompt_loss_weight is None:
        default = 0.0 if kind is None else sft_prompt_weight(kind, args.completion_only_loss, args.assistant_only_loss)
        weight_source = "default: " + (
            "no example to read, completion only" if kind is None else describe_sft_default(default)
        )
        if args.completion_only_loss is True and kind is DataKind.CONVERSATIONAL:
            # SFTTrainer ignores the switch on language-modeling data (no completion mask) and trains every token.
            logger.warning(
                "completion_only_loss=True on conversational language-modeling data ('messages'): SFTTrainer ignores "
                "it there and trains every token; PLWTrainer trains the assistant turns only (prompt weight 0). Use "
                "assistant_only_loss=True for TRL's equivalent, or drop completion_only_loss to train every token."
            )
            default, weight_source = 0.0, "completion_only_loss=True"
    for name, value in dataclasses.asdict(policy.resolved(prompt_loss_weight=default)).items():
        setattr(args, name, value)
    _apply_loss_switches(args, kind)
    logger.info(
        "PLWTrainer policy: %s data, prompt_loss_weight=%s (%s)%s, completion_loss_weight=%s, role_weights=%s, "
        "loss_normalization=%s",
        kind if kind is not None else "unknown",
        args.prompt_loss_weight,
        weight_source,
        f" -> {args.prompt_loss_weight_end} ({args.prompt_loss_weight_schedule})" if args.has_schedule else "",
        args.completion_loss_weight,
        args.role_weights,
        args.loss_normalization,
    )


def _prompt_side_peaks(args: PLWConfig) -> dict[str, float]:
    """The largest weight each prompt-side role (prompt, system, user, tool, template) gets during training."""
    if args.has_schedule:  # role weights are factors of the scheduled prompt weight
        peak = max(args.prompt_loss_weight, args.prompt_loss_weight_end)
        factors = RoleWeights.from_mapping(args.role_weights, allow_negative=True, prompt=1.0).resolved()
        weights = {role: peak * factor for role, factor in factors.items()}
    else:
        weights = RoleWeights.from_mapping(
            args.role_weights, allow_negative=True, prompt=args.prompt_loss_weight
        ).resolved()
    weights.pop("completion")
    return weights


def _apply_loss_switches(args: PLWConfig, kind: DataKind | None) -> None:
    """Check TRL's ``completion_only_loss``/``assistant_only_loss`` against the weights, and raise where they
    contradict them: never ignore them silently. Plain text without templates has no prompt side, so neither switch
    changes a weight there (SFTTrainer trains every token of it too)."""
    if kind is DataKind.TEXT:
        return
    trained = {role: weight for role, weight in _prompt_side_peaks(args).items() if weight != 0}
    for switch, what in (("completion_only_loss", "the completion"), ("assistant_only_loss", "the assistant turns")):
        if getattr(args, switch) is True and trained:
            raise ValueError(
                f"{switch}=True trains only {what}, but prompt-side tokens have non-zero weights {trained} "
                f"(prompt_loss_weight={args.prompt_loss_weight}, role_weights={args.role_weights}, schedule="
                f"{args.prompt_loss_weight_schedule!r}). Drop {switch} (PLWTrainer weights the prompt instead of "
                "masking it), or set the prompt-side weights to 0."
            )
    if args.completion_only_loss is False and not trained:
        raise ValueError(
            "completion_only_loss=False asks for a loss on the prompt too, but every prompt-side weight is 0 "
            f"(prompt_loss_weight={args.prompt_loss_weight}, role_weights={args.role_weights}, schedule="
            f"{args.prompt_loss_weight_schedule!r}). Leave prompt_loss_weight unset (TRL's full-sequence loss), set a "
            "non-zero one, or drop completion_only_loss."
        )

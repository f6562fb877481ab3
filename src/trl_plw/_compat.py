"""Every private or version-dependent name of TRL, transformers and peft that trl-plw uses, in one place.

A plugin lives inside its users' environments, so it has to run on the TRL/transformers they already have. The
rest of the package touches these libraries only through their public API and through this module; each entry
below says which versions it serves and when it can go. ``tests/test_compat.py`` checks that every name listed in
:data:`PRIVATE_NAMES` and :data:`PRIVATE_METHODS` exists with the expected signature in the installed versions,
so a release that moves one fails in CI with the name, not deep inside a training step.

The tested range (:data:`TESTED_RANGES`) is the one ``scripts/compat_matrix.py`` measured (docs/COMPATIBILITY.md);
pyproject's bounds allow the whole next major, and :func:`warn_if_untested` says once when the installed versions
lie outside what was measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import inspect
import logging
import warnings
from collections.abc import Iterator
from typing import Any

from packaging.version import Version

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ versions

TESTED_RANGES: dict[str, tuple[str, str]] = {
    # package: (oldest measured, newest measured), both inclusive; see docs/COMPATIBILITY.md
    "trl": ("1.0.0", "1.16.0"),
    "transformers": ("5.0.0", "5.25.0"),
}


def installed_version(package: str) -> Version | None:
    try:
        return Version(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return None


def _minor(version: Version) -> tuple[int, int]:
    return version.major, version.minor


def untested_versions() -> dict[str, str]:
    """``{package: installed version}`` for each package of :data:`TESTED_RANGES` outside its measured range
    (compared by minor version: a patch release of a tested minor counts as tested)."""
    outside = {}
    for package, (low, high) in TESTED_RANGES.items():
        version = installed_version(package)
        if version is not None and not _minor(Version(low)) <= _minor(version) <= _minor(Version(high)):
            outside[package] = str(version)
    return outside


_warned_untested = False


def warn_if_untested() -> None:
    """Warn once per process when TRL/transformers lie outside the measured range: trl-plw may still work there,
    but its equivalence with SFTTrainer was not checked on them."""
    global _warned_untested
    if _warned_untested:
        return
    _warned_untested = True
    outside = untested_versions()
    if outside:
        ranges = ", ".join(f"{p} {TESTED_RANGES[p][0]}-{TESTED_RANGES[p][1]}" for p in TESTED_RANGES)
        found = ", ".join(f"{p} {v}" for p, v in outside.items())
        warnings.warn(
            f"trl-plw was tested with {ranges}; this environment has {found}. Training may work, but its "
            "equivalence with SFTTrainer is unverified here: run scripts/compat_matrix.py or the test suite to check.",
            UserWarning,
            stacklevel=3,
        )


def trl_at_least(version: str) -> bool:
    installed = installed_version("trl")
    return installed is not None and installed >= Version(version)


# ------------------------------------------------------------------------------------------------ TRL

# TRL < 1.16: `SFTConfig.loss_type` has a `"chunked_nll"` value (the default of 1.10-1.15 when unset), the same
# negative log-likelihood computed by a chunked head that TRL patches into the model. TRL 1.16 made it a deprecated
# alias of "nll". PLWTrainer computes that loss with its own fused head, so both names mean "nll" here.
# Can go when the oldest supported TRL is 2.0 (the alias is removed there).
NLL_LOSS_TYPES = ("nll", "chunked_nll")


def normalize_loss_type(args: Any) -> None:
    """Set ``args.loss_type`` to ``"nll"`` where it names the same loss (``None``/``"chunked_nll"``), so that no TRL
    version patches its own chunked head into the model under ours."""
    if args.loss_type is None or args.loss_type == "chunked_nll":
        args.loss_type = "nll"


@contextlib.contextmanager
def lm_head_adapter_check_disabled() -> Iterator[None]:
    """Run ``SFTTrainer.__init__`` without its refusal of PEFT adapters on ``lm_head``.

    TRL refuses them because its fused head reads ``lm_head.weight`` and would never train the adapter. The weighted
    head computes LoRA/DoRA heads exactly (tests/test_head_matrix.py) and refuses by itself the head wrappers it
    cannot reproduce. TRL 1.16 checks with ``isinstance(head, BaseTunerLayer)`` on a name imported at module level
    in ``trl.trainer.sft_trainer``: it is swapped for a class nothing is an instance of, and restored on exit.
    TRL 1.5-1.15 check only under ``loss_type="chunked_nll"``, which :func:`normalize_loss_type` turns into "nll"
    before, so there is nothing to disable. Can go if TRL drops the check or makes it overridable.
    """
    from trl.trainer import sft_trainer

    original = getattr(sft_trainer, "BaseTunerLayer", None)
    if original is None:
        yield
        return

    class _NoTunerLayer:  # isinstance(head, _NoTunerLayer) is never true
        pass

    sft_trainer.BaseTunerLayer = _NoTunerLayer
    try:
        yield
    finally:
        sft_trainer.BaseTunerLayer = original


def record_metric(trainer: Any, mode: str, name: str, value: float) -> None:
    """Append ``value`` to SFTTrainer's per-mode metric lists, which its ``log`` averages and logs under ``name``
    (``eval_`` prefixed in evaluation). ``SFTTrainer._metrics``: TRL 1.0-1.16."""
    trainer._metrics[mode][name].append(value)


def set_metric(trainer: Any, mode: str, name: str, value: float) -> None:
    """Replace SFTTrainer's logged value of ``name`` (for running totals such as ``num_tokens``)."""
    trainer._metrics[mode][name] = [value]


def add_train_tokens(trainer: Any, count: int) -> int:
    """Add ``count`` to SFTTrainer's running count of trained tokens (saved in its checkpoints) and return the total.
    ``SFTTrainer._total_train_tokens``: TRL 1.0-1.16."""
    trainer._total_train_tokens += count
    return trainer._total_train_tokens


def tensor_parallel_size(trainer: Any) -> int:
    """Size of the tensor-parallel group: its ranks see the same batch, so a token count gathered over all processes
    counts each token that many times. SFTTrainer stores it as ``_tp_size`` since TRL 1.14; computed here the same
    way (from accelerate's ``parallelism_config``) for every version."""
    config = getattr(trainer.accelerator, "parallelism_config", None)
    return 1 if config is None else int(config.tp_size)


def assistant_mask_template(processing_class: Any) -> str | None:
    """The chat template whose ``{% generation %}`` markers SFTTrainer's ``assistant_only_loss`` masks with: the
    tokenizer's own when it has markers, else the training template TRL swaps in for known models
    (``trl.chat_template_utils.get_training_chat_template``, used by SFTTrainer since TRL 1.1), else None (TRL then
    refuses the template; trl-plw finds the assistant turns itself). The lookup can go when the oldest supported TRL is 1.1."""
    import re

    template = getattr(processing_class, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        return None
    if re.search(r"\{%-?\s*generation\s*-?%\}", template):
        return template
    from trl.trainer import sft_trainer

    training_template = getattr(sft_trainer, "get_training_chat_template", None)
    if training_template is None:
        return None
    try:
        return training_template(processing_class)
    except ValueError:  # a template TRL cannot patch (SFTTrainer refuses it for assistant_only_loss)
        return None


def moe_aux_loss_coef(trainer: Any) -> float:
    """The MoE load-balancing loss coefficient SFTTrainer applies: ``self.router_aux_loss_coef`` since TRL 1.14;
    before, the model config's (TRL 1.10-1.13 write ``args.router_aux_loss_coef`` there, TRL 1.0-1.9 use the
    architecture's own). Can go when the oldest supported TRL is 1.14."""
    coef = getattr(trainer, "router_aux_loss_coef", None)
    if coef is not None:
        return float(coef)
    config = trainer.model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return float(getattr(text_config, "router_aux_loss_coef", 0.0))


def dataset_column_names(dataset: Any) -> list[str]:
    """Column names of a Dataset or IterableDataset (an IterableDataset of unknown features: its first row's keys).
    ``trl.data_utils.get_dataset_column_names`` does this since TRL 1.8; written here for 1.0-1.7 (can go when the oldest supported TRL is 1.8)."""
    names = dataset.column_names
    return list(next(iter(dataset)).keys()) if names is None else list(names)


def lm_head_gather_context(*params: Any) -> contextlib.AbstractContextManager:
    """TRL's context that all-gathers ZeRO-3-partitioned head parameters for a fused loss
    (``trl.trainer.utils.maybe_gather_lm_head_ctx``, TRL >= 1.9). Older TRL has none: outside ZeRO-3 nothing needs
    gathering; under ZeRO-3 the head would read an empty weight, so it raises naming the fix.
    Can go when the oldest supported TRL is 1.9."""
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except ImportError:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise RuntimeError(
                "DeepSpeed ZeRO-3 with trl-plw's fused head needs TRL >= 1.9 (trl.trainer.utils."
                "maybe_gather_lm_head_ctx gathers the sharded lm_head); upgrade TRL, or use ZeRO-2/FSDP."
            ) from None
        return contextlib.nullcontext()
    return maybe_gather_lm_head_ctx(*params)


# ------------------------------------------------------------------------------------------------ transformers


def checkpointing_field() -> str:
    """TrainingArguments' activation-checkpointing switch under the installed transformers' name:
    ``activation_checkpointing`` since 5.23 (``gradient_checkpointing`` then warns, removed in v6), the old name
    before. Can go when the oldest supported transformers is 5.23."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def checkpointing_kwargs(enabled: bool) -> dict[str, bool]:
    """``{checkpointing_field(): enabled}``: the switch set under the name the installed transformers reads."""
    return {checkpointing_field(): enabled}


def attention_backend_registered(name: str) -> bool:
    """Whether transformers knows ``name`` as an attention implementation (built in or registered).
    ``AttentionInterface._global_mapping``: transformers 4.48-5.x (its public ``valid_keys()`` is per instance)."""
    from transformers import AttentionInterface

    return name in AttentionInterface._global_mapping


# ------------------------------------------------------------------------------------------------ peft


def peft_type(module_path: str, name: str) -> type | None:
    """A class of peft by its module path, or None where peft (or that class) is absent: the head works without
    peft, and adapters it does not know cannot be on the model."""
    try:
        return getattr(importlib.import_module(module_path), name)
    except (ImportError, AttributeError):
        return None


# ``(module, name)`` of the peft classes the weighted head tells apart (peft 0.17-0.21; ``TrainableTokensWrapper``
# since 0.15).
PEFT_LORA_LAYER = ("peft.tuners.lora", "LoraLayer")
PEFT_TUNER_LAYER = ("peft.tuners.tuners_utils", "BaseTunerLayer")
PEFT_TRAINABLE_TOKENS = ("peft.utils.other", "TrainableTokensWrapper")
PEFT_MODULES_TO_SAVE = ("peft.utils.other", "ModulesToSaveWrapper")


# ------------------------------------------------------------------------------------------------ the checked list

# Private attributes and module-level names used above: (owner, attribute, versions served). ``owner`` is a module
# path, or ``"instance:trl.SFTTrainer"`` for attributes SFTTrainer sets in ``__init__`` (checked on an instance).
PRIVATE_NAMES: tuple[tuple[str, str, str], ...] = (
    ("transformers.AttentionInterface", "_global_mapping", "transformers 4.48-5.x"),
    ("instance:trl.SFTTrainer", "_signature_columns", "transformers 4.x-5.x (set by Trainer.__init__)"),
    ("instance:trl.SFTTrainer", "_metrics", "TRL 1.0-1.16"),
    ("instance:trl.SFTTrainer", "_total_train_tokens", "TRL 1.0-1.16"),
    ("instance:trl.SFTTrainer", "padding_free", "TRL 1.0-1.16"),
    ("instance:trl.SFTTrainer", "aux_loss_enabled", "TRL 1.0-1.16"),
    *((module, name, "peft 0.17-0.21") for module, name in (PEFT_LORA_LAYER, PEFT_TUNER_LAYER, PEFT_MODULES_TO_SAVE)),
    (*PEFT_TRAINABLE_TOKENS, "peft 0.15-0.21"),
)

# Private methods PLWTrainer overrides or calls, with the parameters (after ``self``) it relies on. A release that
# renames one would silently stop calling an override, so the test compares the names.
PRIVATE_METHODS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # SFTTrainer tokenizes and packs here; PLWTrainer keeps roles through both (TRL 1.0-1.16).
    (
        "trl.SFTTrainer",
        "_prepare_dataset",
        ("dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name"),
    ),
    # Trainer sums the loss denominator of a gradient-accumulation window here (transformers 4.46-5.x).
    ("transformers.Trainer", "_get_num_items_in_batch", ("batch_samples", "device")),
    # Trainer drops dataset columns outside this list before collation (transformers 4.x-5.x).
    ("transformers.Trainer", "_set_signature_columns_if_needed", ()),
    # Called by PLWTrainer.prediction_step, as Trainer's own does (transformers 4.x-5.x).
    ("transformers.Trainer", "_prepare_inputs", ("inputs",)),
)


def resolve_owner(path: str) -> Any:
    """The object a dotted path names (``"trl.SFTTrainer"`` -> the class)."""
    module, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attribute)
    except ModuleNotFoundError:
        return importlib.import_module(path)


def parameter_names(function: Any) -> tuple[str, ...]:
    return tuple(name for name in inspect.signature(function).parameters if name != "self")

"""A weighted LM head patched into a causal LM's ``forward``, equal to the model's own head in every configuration
it accepts.

The loss is computed *inside* the model's forward rather than in the trainer, for the same reason TRL's fused head
is: DDP and FSDP only see computation that runs through the wrapped module's ``forward``.

How the hidden states are obtained: the model's **own** forward runs, with its output-embedding module
(``get_output_embeddings()``) swapped, for that one call, for a capture that records its input and returns a
``[..., 1]`` placeholder instead of logits. So the hidden state the weighted loss sees is by construction the one the
model's own head would see, whatever the wrapper does around its backbone (multimodal ``*ForConditionalGeneration``
classes, backbones not called ``base_model``, final norms or rope logic in the outer class), and everything else the
model's forward returns, such as an MoE router's ``aux_loss``, comes back as the model computed it.

What the head computes from that hidden state is what the output-embedding module would compute:

* ``nn.Linear`` (tied or untied, with or without bias; PEFT ``modules_to_save`` copies);
* PEFT LoRA on the head (``target_modules=[..., "lm_head"]``): logits ``x W^T + b + s·(A·drop(x))^T B^T`` are one
  matmul over concatenated operands ``[x | s·A·drop(x)] @ [W | B]^T``, so the low-rank term rides in the same tiles
  (``r`` extra columns) and the adapter's dropout is applied exactly as PEFT applies it;
* PEFT DoRA on the head: the magnitude rescales the rows, with PEFT's detached weight norm, also as extra columns.

Logit transforms applied after the head (Gemma-2/3 softcapping, Cohere/Granite/Falcon-H1 scales): the config names
the candidates, like TRL's fused head reads them, and the capture's placeholder (a probe value per position) passed
through the model's own forward shows which of them this class applies; one that matches none is refused. Anything else on the head (other PEFT tuners, LoRA variants, LoRA bias) is
refused when the head is added, naming the reason.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from trl_plw._compat import (
    PEFT_LORA_LAYER,
    PEFT_MODULES_TO_SAVE,
    PEFT_TRAINABLE_TOKENS,
    PEFT_TUNER_LAYER,
    lm_head_gather_context,
    peft_type,
)

_PATCHED_FLAG = "_trl_plw_weighted_head"


@dataclass
class WeightedLMOutput(ModelOutput):
    """Output of the weighted head. Per-token fields are aligned with the *predicted* token (shifted: index t holds
    the prediction of token t+1) and have shape ``[batch, seq_len - 1]``. ``aux_loss`` is the MoE router's
    load-balancing loss as the model computed it (unweighted; ``None`` for dense models or when not requested)."""

    loss: torch.Tensor | None = None
    token_ce: torch.Tensor | None = None
    is_argmax: torch.Tensor | None = None
    scored: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def head_logit_transform(config) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` of a model config, for the architectures that scale or cap their logits.

    The same attributes TRL's fused head reads (``trl.trainer.utils.add_fused_lm_head``): Gemma-2/3 cap with
    ``final_logit_softcapping``; Cohere multiplies by ``logit_scale`` (Muse Glimmer by ``output_multiplier``,
    Falcon-H1 by ``lm_head_multiplier``); Granite and MiniCPM3 divide by ``logits_scaling``, HyperCLOVA X multiplies
    by it. Every other architecture returns ``(1.0, None)``.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if getattr(text_config, "model_type", None) == "hyperclovax" else 1.0 / scaling
    return (1.0 if scale is None else float(scale)), softcap


# ---------------------------------------------------------------------------------------------------- the head


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """FSDP2 shards parameters as DTensors; the kernel needs the whole tensor (gathered once, like TRL's head)."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def _is_lora(head: nn.Module) -> bool:
    lora = peft_type(*PEFT_LORA_LAYER)
    return lora is not None and isinstance(head, lora)


def check_head_supported(model) -> None:
    """Raise (naming the model class and the reason) if the weighted head cannot reproduce this model's own head."""
    head = model.get_output_embeddings()
    name = type(model).__name__
    if head is None:
        raise ValueError(
            f"{name} has no output embeddings (get_output_embeddings() is None), so it has no LM head to weight. "
            "PLWTrainer needs a causal LM (a *ForCausalLM or *ForConditionalGeneration with an lm_head)."
        )
    if _is_lora(head):
        _check_lora_head(head, name)
        return
    tuner = peft_type(*PEFT_TUNER_LAYER)
    if tuner is not None and isinstance(head, tuner):
        raise ValueError(
            f"The LM head of {name} is wrapped by the PEFT tuner {type(head).__name__}; the weighted head reproduces "
            "plain, LoRA and DoRA heads only. Leave the head out of target_modules, or use LoRA/DoRA or "
            "modules_to_save on it."
        )
    trainable_tokens = peft_type(*PEFT_TRAINABLE_TOKENS)
    if trainable_tokens is not None and isinstance(head, trainable_tokens):
        raise ValueError(
            f"The LM head of {name} is wrapped by PEFT's TrainableTokensWrapper, which `trainable_token_indices` "
            "(LoraConfig/TrainableTokensConfig) puts on a tied head: it swaps the trained rows into the weight inside "
            "its own forward, and the weighted head, which reads the weight directly, would score the frozen rows "
            "instead. Drop `trainable_token_indices`, or train the whole head with modules_to_save=['lm_head']."
        )
    linear = _active_linear(head)
    if linear is None or type(linear).forward is not nn.Linear.forward:
        raise ValueError(
            f"The LM head of {name} is a {type(linear or head).__name__}, not an nn.Linear; the weighted head computes "
            "`hidden @ weight.T + bias` and cannot prove that this module does the same (quantized heads, custom "
            "projections). Use a model whose get_output_embeddings() is an nn.Linear, or keep the head unquantized."
        )


def _active_linear(head: nn.Module) -> nn.Module | None:
    """The module that actually projects: the head itself, or the active copy inside PEFT's ModulesToSaveWrapper."""
    modules_to_save = peft_type(*PEFT_MODULES_TO_SAVE)
    if modules_to_save is not None and isinstance(head, modules_to_save):
        adapters = head.active_adapters
        if len(adapters) != 1:
            return None
        return head.modules_to_save[adapters[0]] if adapters[0] in head.modules_to_save else head.original_module
    return head if isinstance(head, nn.Linear) else None


def _check_lora_head(head: nn.Module, name: str) -> None:
    if not isinstance(head.get_base_layer(), nn.Linear):
        raise ValueError(
            f"LoRA on the LM head of {name} wraps a {type(head.get_base_layer()).__name__}, not nn.Linear."
        )
    if getattr(head, "fan_in_fan_out", False):
        raise ValueError(
            f"LoRA on the LM head of {name} has fan_in_fan_out=True, which the weighted head does not read."
        )
    for adapter, lora_b in head.lora_B.items():
        if getattr(lora_b, "bias", None) is not None:
            raise ValueError(
                f"LoRA adapter {adapter!r} on the LM head of {name} has a bias (lora_bias=True); the weighted head "
                "does not reproduce it. Set lora_bias=False, or leave lm_head out of target_modules."
            )
    variants = getattr(head, "lora_variant", {}) or {}
    for adapter, variant in variants.items():
        if type(variant).__name__ != "DoraLinearVariant":
            raise ValueError(
                f"LoRA adapter {adapter!r} on the LM head of {name} uses the variant {type(variant).__name__}; the "
                "weighted head reproduces plain LoRA and DoRA only."
            )


def _head_operands(head: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(hidden, weight, bias)`` with ``head(x) == hidden @ weight.T + bias``, for the kernel.

    A plain head returns its own tensors (no copy). A LoRA/DoRA head returns concatenated operands: the low-rank
    terms become extra columns of ``hidden`` and ``weight``, so one tiled matmul computes exactly what PEFT's forward
    computes and autograd routes the gradients back to A, B, the magnitude and ``x``.
    """
    if not _is_lora(head):
        return x, _full(head.weight), _full(head.bias)
    base = head.get_base_layer()
    weight, bias = _full(base.weight), _full(base.bias)
    if head.disable_adapters or head.merged:
        return x, weight, bias
    active = [a for a in head.active_adapters if a in head.lora_A]
    variants = getattr(head, "lora_variant", {}) or {}
    if len(active) > 1 and any(a in variants for a in active):
        raise ValueError(
            "Several active adapters on the LM head with DoRA among them: PEFT's DoRA composes with the "
            "running result there, which the weighted head does not reproduce. Activate one adapter."
        )
    hidden_parts, weight_parts = [x], [weight]
    for adapter in active:
        lora_a, lora_b = _full(head.lora_A[adapter].weight), _full(head.lora_B[adapter].weight)
        dropout, scaling = head.lora_dropout[adapter], head.scaling[adapter]
        x_in = x.to(lora_a.dtype)
        if adapter not in variants:  # plain LoRA: + s * B A drop(x)
            hidden_parts.append((nn.functional.linear(dropout(x_in), lora_a) * scaling).to(x.dtype))
            weight_parts.append(lora_b.to(weight.dtype))
            continue
        # DoRA: + (c - 1) * W x' + c * s * B A x', c = magnitude / ||W + s B A||_row (norm detached, as in PEFT),
        # x' = drop(x) in training with dropout, else x.
        magnitude = _full(head.lora_magnitude_vector[adapter].weight)
        with torch.no_grad():
            norm = torch.linalg.norm(weight + scaling * (lora_b @ lora_a).to(weight.dtype), dim=1).to(weight.dtype)
        c = (magnitude / norm).to(weight.dtype)[:, None]
        dropped = not isinstance(dropout, nn.Identity) and head.training
        x_dora = dropout(x_in).to(x.dtype) if dropped else x
        if dropped:
            hidden_parts.append(x_dora)
            weight_parts.append((c - 1) * weight)
        else:  # fold (c - 1) W into the base part: W x + (c - 1) W x = c W x
            weight_parts[0] = c * weight
        hidden_parts.append((nn.functional.linear(x_dora.to(lora_a.dtype), lora_a) * scaling).to(x.dtype))
        weight_parts.append(c * lora_b.to(weight.dtype))
    return torch.cat(hidden_parts, dim=-1), torch.cat(weight_parts, dim=-1), bias


PROBE_RANGE = 50.0  # wide enough that scales of 1/4..4 and softcaps up to ~50 all bend it visibly


def _apply_transform(x: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    x = x * scale
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _resolve_logit_transform(model, probe: torch.Tensor, logits: torch.Tensor | None) -> tuple[float, float | None]:
    """The ``(logit_scale, softcap)`` this model's forward really applies after its head.

    The config says which transforms an architecture *has* (`head_logit_transform`), but not whether a given class
    applies them: ``Gemma3ForConditionalGeneration`` carries ``final_logit_softcapping`` in its text config and does
    not cap, ``Gemma3ForCausalLM`` does. The probe passed through the model's own forward decides among the
    config's candidates; a model whose output matches none is refused rather than trained on a wrong loss.
    """
    scale, softcap = head_logit_transform(model.config)
    if logits is None:
        raise ValueError(
            f"{type(model).__name__}.forward returned no logits; the weighted head cannot verify its head."
        )
    seen = logits.detach().reshape(-1).double()
    probe = probe.detach().reshape(-1).double()
    if seen.shape != probe.shape:
        raise ValueError(
            f"{type(model).__name__}.forward reshapes its head's output ({tuple(probe.shape)} -> {tuple(seen.shape)}); "
            "the weighted head cannot prove its loss equals the model's."
        )
    low_precision = logits.dtype in (torch.float16, torch.bfloat16) or probe.dtype in (torch.float16, torch.bfloat16)
    tolerance = 2e-2 if low_precision else 1e-5
    candidates = dict.fromkeys([(scale, softcap), (scale, None), (1.0, softcap), (1.0, None)])
    for candidate in candidates:
        expected = _apply_transform(probe, *candidate)
        if torch.allclose(seen, expected, rtol=tolerance, atol=tolerance):
            return candidate
    raise ValueError(
        f"{type(model).__name__}.forward transforms its head's output in a way its config does not declare (neither "
        f"logit_scale={scale} nor softcap={softcap} explain it); the weighted head refuses to compute a different loss."
    )


class _HiddenCapture:
    """Stands in for the output-embedding module's ``forward`` during one model forward: records the input hidden
    states and returns a ``[..., 1]`` placeholder, so no ``[tokens, vocab]`` logits are ever computed."""

    def __init__(self, module_name: str):
        self.module_name = module_name
        self.hidden: torch.Tensor | None = None

    def __call__(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.hidden is not None:
            raise RuntimeError(
                f"{self.module_name} called its LM head twice in one forward; the weighted head supports models that "
                "project the final hidden states once."
            )
        self.hidden = hidden
        # One probe value per position instead of logits: what the model's forward makes of them tells which
        # transform it applies after its head (see `_resolve_logit_transform`).
        count = hidden[..., 0].numel()
        probe = torch.linspace(-PROBE_RANGE, PROBE_RANGE, count, device=hidden.device, dtype=torch.float32)
        self.probe = probe.to(hidden.dtype).view(*hidden.shape[:-1], 1)
        return self.probe


@contextlib.contextmanager
def _capture_head_input(model):
    head = model.get_output_embeddings()
    capture = _HiddenCapture(type(model).__name__)
    shadowed = head.__dict__.get("forward")  # e.g. an accelerate hook's forward
    head.forward = capture  # instance attribute: shadows the class's forward; module hooks (FSDP, ZeRO-3) still run
    try:
        yield capture, head
    finally:
        if shadowed is None:
            del head.forward
        else:
            head.forward = shadowed


def _head_params(head: nn.Module) -> list[torch.Tensor]:
    return [p for p in head.parameters() if p is not None]


def add_weighted_lm_head(model, memory_budget_bytes: int | None = None) -> None:
    """Patch ``model.forward`` (a causal LM; for PEFT pass ``peft_model.get_base_model()``) in place.

    Extra forward kwargs when the weighted path is wanted:
    ``plw_weights [B,T]`` (aligned with ``input_ids``: weight of predicting token t), ``plw_targets [B,T]``
    (normally ``input_ids``; -100 where nothing may be scored: padding, sequence starts), ``plw_normalizer``
    (denominator of the loss; ``None`` means ``sum(w)``) and ``plw_score_all`` (also score weight-0 targets, for
    evaluation metrics). Raises at once if the model's head is one the weighted loss cannot reproduce.
    """
    if getattr(model, _PATCHED_FLAG, False):
        return
    check_head_supported(model)
    from trl_plw.ops import KernelOptions, weighted_linear_cross_entropy

    options = KernelOptions(memory_budget_bytes=memory_budget_bytes)

    previous_forward = model.forward
    transform: list[tuple[float, float | None]] = []  # resolved on the first weighted call, then fixed

    @functools.wraps(type(model).forward)
    def forward(
        self,
        *args,
        plw_weights: torch.Tensor | None = None,
        plw_targets: torch.Tensor | None = None,
        plw_normalizer: torch.Tensor | float | None = None,
        plw_score_all: bool = False,
        **kwargs,
    ):
        if plw_weights is None:
            return previous_forward(*args, **kwargs)
        if plw_targets is None:
            raise ValueError("`plw_targets` is required with `plw_weights` (usually the batch's input_ids).")
        for key in ("labels", "shift_labels", "num_items_in_batch", "fused_lm_head", "logits_to_keep"):
            kwargs.pop(key, None)
        kwargs["use_cache"] = False  # with a cache, transformers ignores position_ids packing
        with _capture_head_input(self) as (capture, head):
            outputs = previous_forward(*args, **kwargs)
        if capture.hidden is None:
            raise RuntimeError(
                f"{type(self).__name__}.forward never called its output embeddings ({type(head).__name__}); the "
                "weighted head cannot find the hidden states it projects."
            )
        if not transform:
            transform.append(_resolve_logit_transform(self, capture.probe, getattr(outputs, "logits", None)))
        logit_scale, softcap = transform[0]
        hidden = capture.hidden  # [B, T, H]
        batch, seq_len, _ = hidden.shape
        # Shift once, here: the hidden state at t predicts token t+1. The last position predicts nothing; its
        # target is set to the ignore index instead of slicing, which keeps `hidden` contiguous (no copy).
        targets = plw_targets.new_full((batch, seq_len), -100)
        targets[:, :-1] = plw_targets[:, 1:]
        weights = plw_weights.new_zeros((batch, seq_len), dtype=torch.float32)
        weights[:, :-1] = plw_weights[:, 1:]
        # DeepSpeed ZeRO-3 shards the head to empty placeholders outside its own forward; TRL's helper gathers it
        # for the duration of this direct access. The kernel forms its gradients in this forward, so the backward
        # needs no second gather.
        with lm_head_gather_context(*_head_params(head)):
            device = next(iter(_head_params(head))).device
            flat_hidden, weight, bias = _head_operands(head, hidden.reshape(batch * seq_len, -1).to(device))
            loss, stats = weighted_linear_cross_entropy(
                flat_hidden,
                weight,
                targets.reshape(-1).to(device),
                weights.reshape(-1).to(device),
                bias=bias,
                reduction="mean" if plw_normalizer is None else "sum",
                normalizer=plw_normalizer,
                softcap=softcap,
                logit_scale=logit_scale,
                return_token_stats=True,
                score_zero_weight_tokens=plw_score_all,
                options=options,
            )

        def per_token(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, seq_len)[:, :-1]

        return WeightedLMOutput(
            loss=loss,
            token_ce=per_token(stats.ce),
            is_argmax=per_token(stats.is_argmax),
            scored=per_token(stats.scored),
            aux_loss=getattr(outputs, "aux_loss", None),
        )

    model.forward = forward.__get__(model)
    setattr(model, _PATCHED_FLAG, True)

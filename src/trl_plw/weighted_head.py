"""A weighted LM head patched into a causal LM's ``forward``.

The loss is computed *inside* the model's forward rather than in the trainer, for the same reason TRL's fused head
is: DDP and FSDP only see computation that runs through the wrapped module's ``forward``. Calling the backbone
directly from the trainer would skip DDP's gradient hooks and FSDP's parameter gathering.

``model(**batch, plw_weights=w, plw_targets=t)`` runs the backbone once and feeds its hidden states to
`trl_plw.ops.weighted_linear_cross_entropy`, tile by tile, so the ``[tokens, vocab]`` logits never exist. Without
``plw_weights`` the forward is the one that was there before, so generation and TRL's own paths are unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

_PATCHED_FLAG = "_trl_plw_weighted_head"


@dataclass
class WeightedLMOutput(ModelOutput):
    """Output of the weighted head. Per-token fields are aligned with the *predicted* token (shifted: index t holds
    the prediction of token t+1) and have shape ``[batch, seq_len - 1]``."""

    loss: torch.Tensor | None = None
    token_ce: torch.Tensor | None = None
    is_argmax: torch.Tensor | None = None
    scored: torch.Tensor | None = None


def head_logit_transform(config) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` of a model config, for the architectures that scale or cap their logits.

    Gemma-2/3 cap with ``final_logit_softcapping``; Cohere multiplies by ``logit_scale``; Granite divides by
    ``logits_scaling``. Every other architecture returns ``(1.0, None)``.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scale = 1.0 / text_config.logits_scaling
    return (1.0 if scale is None else float(scale)), softcap


def add_weighted_lm_head(model, memory_budget_bytes: int | None = None) -> None:
    """Patch ``model.forward`` (a ``*ForCausalLM``; for PEFT pass ``peft_model.get_base_model()``) in place.

    Extra forward kwargs when the weighted path is wanted:
    ``plw_weights [B,T]`` (aligned with ``input_ids``: weight of predicting token t), ``plw_targets [B,T]``
    (normally ``input_ids``; -100 where nothing may be scored: padding, sequence starts), ``plw_normalizer``
    (denominator of the loss; ``None`` means ``sum(w)``) and ``plw_score_all`` (also score weight-0 targets, for
    evaluation metrics).
    """
    if getattr(model, _PATCHED_FLAG, False):
        return
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    from trl_plw.ops import weighted_linear_cross_entropy

    previous_forward = model.forward
    logit_scale, softcap = head_logit_transform(model.config)

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
        for key in ("labels", "shift_labels", "num_items_in_batch", "fused_lm_head"):
            kwargs.pop(key, None)
        kwargs["use_cache"] = False  # with a cache, transformers ignores position_ids packing
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # [B, T, H]
        batch, seq_len, hidden_size = hidden.shape
        # Shift once, here: the hidden state at t predicts token t+1. The last position predicts nothing; its
        # target is set to the ignore index instead of slicing, which keeps `hidden` contiguous (no copy).
        targets = plw_targets.new_full((batch, seq_len), -100)
        targets[:, :-1] = plw_targets[:, 1:]
        weights = plw_weights.new_zeros((batch, seq_len), dtype=torch.float32)
        weights[:, :-1] = plw_weights[:, 1:]
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor: gather the head once, like TRL's fused head
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        # DeepSpeed ZeRO-3 shards the head to empty placeholders outside its own forward; TRL's helper gathers it
        # for the duration of this direct access. The kernel forms its gradients in this forward, so the backward
        # needs no second gather.
        with maybe_gather_lm_head_ctx(weight, bias):
            loss, stats = weighted_linear_cross_entropy(
                hidden.reshape(-1, hidden_size).to(weight.device),
                weight,
                targets.reshape(-1).to(weight.device),
                weights.reshape(-1).to(weight.device),
                bias=bias,
                reduction="mean" if plw_normalizer is None else "sum",
                normalizer=plw_normalizer,
                softcap=softcap,
                logit_scale=logit_scale,
                return_token_stats=True,
                score_zero_weight_tokens=plw_score_all,
                memory_budget_bytes=memory_budget_bytes,
            )

        def per_token(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, seq_len)[:, :-1]

        return WeightedLMOutput(
            loss=loss, token_ce=per_token(stats.ce), is_argmax=per_token(stats.is_argmax), scored=per_token(stats.scored)
        )

    model.forward = forward.__get__(model)
    setattr(model, _PATCHED_FLAG, True)

"""Fused LM head + cross-entropy with real-valued per-token weights, without materializing ``[N, V]`` logits.

For the scalar reductions (``"mean"``/``"sum"``) the per-token weights are known in the forward pass, so the
gradients are computed there, tile by tile, while the tile's logits are still in memory:

    for each tile of ``n`` scored tokens:
        Z  = transform(h_tile @ W.T + b)           # 1 matmul
        D  = (softmax(Z) - onehot(target)) * dZ/dY  # dZ/dY = 1, or 1 - tanh^2 with softcapping
        grad_h[tile] = (D @ W) * c                  # 1 matmul, c = weight / normalizer * logit_scale per row
        grad_W      += D.T @ (h_tile * c)           # 1 matmul, fp32 accumulator
        grad_b      += D.T @ c

Three matmuls per tile instead of the four of a head that recomputes the logits in backward. The backward only
scales the stored gradients by the incoming scalar. ``reduction="none"`` has a per-token upstream gradient that is
unknown in the forward, so that path saves its inputs and recomputes the tiles in backward.

Two tile loops implement it (`IMPLEMENTATIONS`): ``"torch"`` (`trl_plw.ops._eager`: fp32 tile, in-place softmax;
the reference, and CPU's default) and ``"fused"`` (`trl_plw.ops._fused`: the tile in the matmul dtype and one fused
epilogue between the GEMMs, Triton on CUDA; CUDA's default).

Tokens that are not scored (target == ``ignore_index``, or weight 0 unless ``score_zero_weight_tokens``) are
dropped before any matmul and their results are scattered back afterwards. The number of scored tokens, read back
together with the value checks, is the one host read of a call (on CPU the eager loop adds one more flag read).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from trl_plw.ops._eager import eager_pass
from trl_plw.ops._fused import fused_pass
from trl_plw.ops._tiling import default_memory_budget, fused_rows_per_tile, rows_per_tile

# The public API. The tiling helpers (`rows_per_tile`, `default_memory_budget`) stay importable from this module for
# benchmarks and tests, but are not part of it.
__all__ = ["KernelOptions", "TokenStats", "weighted_linear_cross_entropy"]

_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)
_EPILOGUES = ("triton", "torch")


class TokenStats(NamedTuple):
    """Per-token evaluation statistics computed in the same pass as the loss (all ``[N]``, detached).

    ``ce``: float32 cross-entropy of the target (0 where not scored). ``is_argmax``: the target's logit is strictly
    greater than every other logit (ties count as wrong; False where not scored). ``scored``: which positions were
    scored (target != ignore_index and weight != 0, or any weight with ``score_zero_weight_tokens=True``).
    """

    ce: torch.Tensor
    is_argmax: torch.Tensor
    scored: torch.Tensor


@dataclass(frozen=True)
class KernelOptions:
    """How :func:`weighted_linear_cross_entropy` computes, not what: every choice here gives the same loss and
    gradients (to rounding). Like ``torch.nn.LinearCrossEntropyOptions``, kept apart from the math arguments."""

    impl: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Tile loop: 'fused' (matmul-dtype tile + one fused epilogue, Triton on CUDA) or 'torch' (fp32 "
            "tile, the eager reference). None picks 'fused' on CUDA and 'torch' elsewhere."
        },
    )
    memory_budget_bytes: int | None = dataclasses.field(
        default=None,
        metadata={"help": "Bound on the per-tile buffers in bytes. None: `default_memory_budget` for the device."},
    )
    vocab_major: bool | None = dataclasses.field(
        default=None,
        metadata={
            "help": "impl='torch' only: tile layout [V, n] instead of [n, V]. None picks [V, n] on CPU, where MKL "
            "runs W @ h.T faster for small tiles. Both layouts give the same result to rounding."
        },
    )
    validate: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "Check values (NaN/inf or negative weights, out-of-range targets, a bad tensor normalizer) "
            "at scored positions. The flags are read back with the scored-token count the op reads anyway, so "
            "this adds no host sync."
        },
    )
    allow_negative_weights: bool = dataclasses.field(
        default=False, metadata={"help": "Accept negative token weights (refused by default: usually a data bug)."}
    )
    epilogue: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "impl='fused' only: 'triton' (CUDA, or CPU under TRITON_INTERPRET=1 for tests) or 'torch'. "
            "None picks 'triton' on CUDA when triton imports, else 'torch'."
        },
    )

    def __post_init__(self):
        if self.impl is not None and self.impl not in IMPLEMENTATIONS:
            raise ValueError(
                f"impl={self.impl!r} is not a weighted_linear_cross_entropy implementation; choose one of "
                f"{sorted(IMPLEMENTATIONS)} (or None for the device's default)."
            )
        budget = self.memory_budget_bytes
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
            raise ValueError(f"memory_budget_bytes must be a positive int or None, got {budget!r}.")
        if self.epilogue is not None and self.epilogue not in _EPILOGUES:
            raise ValueError(f"epilogue={self.epilogue!r}: choose one of {list(_EPILOGUES)} or None.")
        if self.impl == "fused" and self.vocab_major:
            raise ValueError("vocab_major=True applies to impl='torch'; the fused path's tile is [n, V].")
        if self.impl == "torch" and self.epilogue is not None:
            raise ValueError("epilogue applies to impl='fused'; impl='torch' has no separate epilogue.")


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(KernelOptions))


@dataclass(frozen=True)
class _HeadConfig:
    logit_scale: float
    softcap: float | None
    compute_dtype: torch.dtype  # dtype of the matmul inputs (autocast dtype, or the inputs' dtype)
    acc_dtype: torch.dtype  # softmax and gradient accumulators: fp32 (fp64 for fp64 inputs)
    rows: int  # tokens per tile (at most)
    want_argmax: bool
    impl: str = "torch"  # a key of IMPLEMENTATIONS
    vocab_major: bool = False  # impl="torch": tile layout [V, n] instead of [n, V]
    epilogue: str = "torch"  # impl="fused": "triton" or "torch"


def _head_pass(h, w, b, targets, coef, cfg: _HeadConfig, need_gh=False, need_gw=False, need_gb=False):
    """One pass over the scored tokens, by the tile loop ``cfg.impl`` names.

    ``h [M, H]``, ``targets [M]`` (all in ``[0, V)``), ``coef [M]`` (dLoss/dZ scale per row, without logit_scale)
    or None for a forward-only pass. Returns ``ce [M]`` (acc dtype), ``is_argmax [M]`` or None, and the gradients
    ``grad_h [M, H]``, ``grad_W [V, H]``, ``grad_b [V]`` (acc dtype; None when not requested).
    """
    return IMPLEMENTATIONS[cfg.impl](h, w, b, targets, coef, cfg, need_gh, need_gw, need_gb)


IMPLEMENTATIONS: dict[str, Callable] = {"torch": eager_pass, "fused": fused_pass}
"""``impl`` name -> tile loop, called as ``(h, w, b, targets, coef, cfg, need_gh, need_gw, need_gb)`` (the
contract of `_head_pass`). Input checks, compaction, normalization and autograd are shared."""


# ---------------------------------------------------------------------------------------------- autograd glue


def _autocast_off(device_type: str):
    """Autocast off for the tile loop (its matmul dtype is chosen once, up front). Devices without autocast (``meta``,
    which benchmarks/roofline.py traces on) need nothing switched off."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _scale_grad(g: torch.Tensor | None, grad_out: torch.Tensor, dtype: torch.dtype, unit: bool):
    """``g * grad_out`` in ``dtype``, in one pass (the multiply and the cast share a kernel); ``unit``: grad_out is
    known to be 1, so only the cast (if any) remains."""
    if g is None:
        return None
    if unit:
        return g if g.dtype == dtype else g.to(dtype)
    scale = grad_out.to(g.dtype)
    if g.dtype == dtype:
        return g.mul_(scale)
    return torch.mul(g, scale, out=torch.empty_like(g, dtype=dtype))


def _is_unit(grad_out: torch.Tensor, cfg: _HeadConfig) -> bool:
    """Whether the incoming gradient is 1, where asking costs nothing: the eager loop on CPU reads it once per backward
    and skips a pass over grad_W when it is. The fused loop never reads it (on a GPU the read would be a host sync)."""
    return cfg.impl == "torch" and grad_out.device.type == "cpu" and float(grad_out) == 1.0


class _ReducedHead(torch.autograd.Function):
    """Scalar loss ``sum(coef * ce)``; gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, h, w, b, targets, coef, cfg, need_gh, need_gw, need_gb):
        with _autocast_off(h.device.type):
            ce, is_argmax, gh, gw, gb = _head_pass(h, w, b, targets, coef, cfg, need_gh, need_gw, need_gb)
            loss = torch.dot(coef.to(ce.dtype), ce)
        ctx.save_for_backward(h, w, b, targets, coef)
        ctx.cfg = cfg
        ctx.needs = (need_gh, need_gw, need_gb)
        ctx.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype)
        ctx.grads = (gh, gw, gb)
        if is_argmax is None:
            is_argmax = torch.empty(0, dtype=torch.bool, device=h.device)
        ctx.mark_non_differentiable(ce, is_argmax)
        return loss, ce, is_argmax

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_argmax):
        grads, ctx.grads = ctx.grads, None
        h, w, b, targets, coef = ctx.saved_tensors
        if grads is None:
            # A second backward through a retained graph: the stored gradients were handed out (and possibly
            # modified) by the first one, so recompute them from the saved inputs.
            with _autocast_off(h.device.type):
                _, _, gh, gw, gb = _head_pass(h, w, b, targets, coef, ctx.cfg, *ctx.needs)
            grads = (gh, gw, gb)
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        gh, gw, gb = grads
        unit = _is_unit(grad_loss, ctx.cfg)
        return (
            _scale_grad(gh, grad_loss, h_dtype, unit),
            _scale_grad(gw, grad_loss, w_dtype, unit),
            _scale_grad(gb, grad_loss, b_dtype, unit) if b_dtype is not None else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


class _PerTokenHead(torch.autograd.Function):
    """Per-token ``ce [M]``; the backward recomputes the tiles with the per-token upstream gradient."""

    @staticmethod
    def forward(ctx, h, w, b, targets, cfg, need_gh, need_gw, need_gb):
        with _autocast_off(h.device.type):
            ce, is_argmax, _, _, _ = _head_pass(h, w, b, targets, None, cfg)
        ctx.save_for_backward(h, w, b, targets)
        ctx.cfg = cfg
        ctx.needs = (need_gh, need_gw, need_gb)
        ctx.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype)
        if is_argmax is None:
            is_argmax = torch.empty(0, dtype=torch.bool, device=h.device)
        ctx.mark_non_differentiable(is_argmax)
        return ce, is_argmax

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce, _grad_argmax):
        h, w, b, targets = ctx.saved_tensors
        cfg = ctx.cfg
        if cfg.want_argmax:
            cfg = dataclasses.replace(cfg, want_argmax=False)
        with _autocast_off(h.device.type):
            _, _, gh, gw, gb = _head_pass(h, w, b, targets, grad_ce, cfg, *ctx.needs)
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        return (
            None if gh is None else gh.to(h_dtype),
            None if gw is None else gw.to(w_dtype),
            None if gb is None else gb.to(b_dtype),
            None,
            None,
            None,
            None,
            None,
        )


# ------------------------------------------------------------------------------------------------- validation


def _check_tensors(hidden, weight, targets, token_weights, bias) -> None:
    """Types, shapes and devices of the tensor arguments (no host reads), one concern per helper."""
    _check_head_operands(hidden, weight)
    _check_targets(targets, hidden.shape[0])
    _check_optional_vectors(token_weights, bias, hidden.shape[0], weight.shape[0])
    _check_devices(hidden, weight=weight, targets=targets, token_weights=token_weights, bias=bias)


def _check_is_tensor(name: str, t, optional: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {kind}, got {type(t).__name__}.")


def _check_floating(name: str, t: torch.Tensor, fix: str = "") -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}{fix}.")


def _check_head_operands(hidden, weight) -> None:
    """``hidden [N, H]`` and ``weight [V, H]``: 2-D floating matrices sharing ``H``."""
    _check_is_tensor("hidden", hidden)
    _check_is_tensor("weight", weight)
    if hidden.dim() != 2:
        raise ValueError(
            f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}; flatten the batch dims first, "
            "e.g. hidden.reshape(-1, hidden.shape[-1])."
        )
    _check_floating("hidden", hidden)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H] (the LM head weight), got shape {tuple(weight.shape)}.")
    _check_floating("weight", weight)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[1] = {hidden.shape[1]}, got shape {tuple(weight.shape)}; "
            "pass the head weight as stored by nn.Linear (out_features x in_features), not its transpose."
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0).")


def _check_targets(targets, n: int) -> None:
    """``targets [N]``, an integer tensor (its values are checked later, with the one host read)."""
    _check_is_tensor("targets", targets)
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(
            f"targets must be 1-D [N] with N = hidden.shape[0] = {n}, got shape {tuple(targets.shape)}; "
            "flatten it like hidden, e.g. targets.reshape(-1)."
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (torch.long), got dtype {targets.dtype}.")


def _check_optional_vectors(token_weights, bias, n: int, vocab: int) -> None:
    """``token_weights [N]`` and ``bias [V]``, when given: 1-D floating tensors of the right length."""
    if token_weights is not None:
        _check_is_tensor("token_weights", token_weights, optional=True)
        if token_weights.dim() != 1 or token_weights.shape[0] != n:
            raise ValueError(
                f"token_weights must be 1-D [N] with N = hidden.shape[0] = {n}, got shape "
                f"{tuple(token_weights.shape)}; flatten it like hidden."
            )
        _check_floating("token_weights", token_weights, "; convert it with token_weights.float()")
    if bias is not None:
        _check_is_tensor("bias", bias, optional=True)
        if bias.dim() != 1 or bias.shape[0] != vocab:
            raise ValueError(
                f"bias must be 1-D [V] with V = weight.shape[0] = {vocab}, got shape {tuple(bias.shape)}."
            )
        _check_floating("bias", bias)


def _check_devices(hidden, **tensors) -> None:
    """Every tensor argument on ``hidden``'s device (the op moves nothing behind the caller's back)."""
    for name, t in tensors.items():
        if t is not None and t.device != hidden.device:
            raise ValueError(
                f"{name} is on {t.device} but hidden is on {hidden.device}; move it with .to(hidden.device)."
            )


def _check_math(hidden, reduction, normalizer, softcap, logit_scale) -> None:
    """The loss's scalar arguments (a tensor normalizer's value is checked with the other values)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
    if normalizer is not None:
        if reduction == "none":
            raise ValueError("normalizer only applies to reduction='mean' or 'sum'; drop it for reduction='none'.")
        if isinstance(normalizer, torch.Tensor):
            if normalizer.numel() != 1:
                raise ValueError(
                    f"normalizer must be a float or a 0-dim tensor, got a tensor of shape {tuple(normalizer.shape)}."
                )
            if normalizer.device != hidden.device and normalizer.device.type != "cpu":
                raise ValueError(
                    f"normalizer is on {normalizer.device} but hidden is on {hidden.device}; "
                    "move it with .to(hidden.device)."
                )
        elif isinstance(normalizer, (int, float)) and not isinstance(normalizer, bool):
            if not math.isfinite(normalizer) or normalizer < 0:
                raise ValueError(f"normalizer must be finite and >= 0, got {normalizer}.")
        else:
            raise TypeError(f"normalizer must be a float, a 0-dim tensor or None, got {type(normalizer).__name__}.")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0:
            raise ValueError(f"softcap must be a positive float or None, got {softcap!r}.")
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be a finite float, got {logit_scale!r}.")


def _count_and_check(
    scored, valid, targets, *, token_weights, normalizer, vocab: int, ignore_index: int, options: KernelOptions
) -> int:
    """The number of scored tokens, read back together with the value checks' flags: one host read per call.

    The count sizes the compaction and the tiles, so it must reach the host anyway; the flags ride along, so value
    validation costs no sync of its own (a device-side assert would, in addition, kill the CUDA context with an
    unreadable error). Only when a flag is set are the offending values read, to name them.
    """
    count = scored.sum()
    if not options.validate:
        return int(count)
    flags = {"targets": (((targets < 0) | (targets >= vocab)) & valid).any()}
    if token_weights is not None:
        flags["nonfinite"] = (~torch.isfinite(token_weights) & valid).any()
        if not options.allow_negative_weights:
            flags["negative"] = ((token_weights < 0) & valid).any()
    if isinstance(normalizer, torch.Tensor):
        norm = normalizer.detach().reshape(()).to(count.device)
        flags["normalizer"] = ~torch.isfinite(norm) | (norm < 0)
    values = torch.stack([count] + [f.to(count.dtype) for f in flags.values()]).tolist()
    found = dict(zip(flags, values[1:], strict=True))
    if found["targets"]:
        bad = targets[((targets < 0) | (targets >= vocab)) & valid]
        raise ValueError(
            f"targets must be in [0, V={vocab}) or equal to ignore_index={ignore_index}; found {bad[:5].tolist()}. "
            "Check the tokenizer/vocab size and the ignore_index used by the collator."
        )
    if found.get("nonfinite"):
        raise ValueError("token_weights contains NaN or inf at scored positions; weights must be finite.")
    if found.get("negative"):
        raise ValueError(
            "token_weights contains negative values; pass options=KernelOptions(allow_negative_weights=True) if "
            "that is intended."
        )
    if found.get("normalizer"):
        raise ValueError(f"normalizer must be finite and >= 0, got {normalizer.item()}.")
    return int(values[0])


def _resolve_options(options: KernelOptions | None, deprecated: dict) -> KernelOptions:
    """``options``, with the tuning keywords of the old flat signature folded in (one release, with a warning)."""
    if options is not None and not isinstance(options, KernelOptions):
        raise TypeError(f"options must be a trl_plw.ops.KernelOptions or None, got {type(options).__name__}.")
    options = options or KernelOptions()
    if not deprecated:
        return options
    unknown = sorted(set(deprecated) - set(_OPTION_NAMES))
    if unknown:
        raise TypeError(f"weighted_linear_cross_entropy() got unexpected keyword argument(s) {unknown}.")
    names = ", ".join(f"{k}=..." for k in deprecated)
    warnings.warn(
        f"weighted_linear_cross_entropy({names}) is deprecated and will be removed in the next release; pass "
        f"options=KernelOptions({names}) instead.",
        FutureWarning,
        stacklevel=3,
    )
    return dataclasses.replace(options, **deprecated)


def _pick_impl(options: KernelOptions, device: torch.device) -> tuple[str, str]:
    """``(impl, epilogue)`` for this device: the options' choice, else fused + Triton on CUDA, eager elsewhere."""
    from trl_plw.ops._epilogue import triton_available

    impl = options.impl
    if impl is None:  # a layout or epilogue choice implies its tile loop
        if options.vocab_major or options.epilogue is not None:
            impl = "torch" if options.vocab_major else "fused"
        else:
            impl = "fused" if device.type == "cuda" else "torch"
    if impl != "fused":
        return impl, "torch"
    epilogue = options.epilogue or ("triton" if triton_available(device) else "torch")
    if epilogue == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"epilogue='triton' on {device.type} runs only under Triton's interpreter: set TRITON_INTERPRET=1 "
            "before importing triton (tests do), or leave epilogue=None."
        )
    return impl, epilogue


# ---------------------------------------------------------------------------------------------------- public API


def weighted_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_token_stats: bool = False,
    score_zero_weight_tokens: bool = False,
    options: KernelOptions | None = None,
    **deprecated_options,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """Weighted cross-entropy of ``logits = softcap(logit_scale * (hidden @ weight.T + bias))`` without ever
    materializing the ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` float (fp32/bf16/fp16/fp64) final hidden states.
        weight: ``[V, H]`` LM head weight (may be tied to the input embeddings, may be frozen).
        targets: ``[N]`` integer targets; ``ignore_index`` marks positions that are never scored.
        token_weights: ``[N]`` float weights (None = all ones). Weight-0 tokens are skipped (no matmul work) unless
            ``score_zero_weight_tokens``. Treated as constants: no gradient flows to them.
        bias: optional ``[V]`` head bias.
        reduction: ``"mean"``: ``sum(w*ce)/sum(w)`` (0 when ``sum(w) == 0``); ``"sum"``: ``sum(w*ce)``;
            ``"none"``: per-token ``w*ce`` ``[N]`` (0 where not scored).
        normalizer: with ``"mean"``/``"sum"``, the loss is ``sum(w*ce)/normalizer`` instead (a float or 0-dim
            tensor, treated as a constant; 0 gives a 0 loss). Use it for a global denominator across gradient
            accumulation steps and ranks.
        softcap: Gemma-2 final logit softcapping, ``softcap * tanh(logits / softcap)``.
        logit_scale: multiplies the logits before the softcap.
        return_token_stats: also return :class:`TokenStats` (ce, is_argmax, scored), computed in the same pass.
        score_zero_weight_tokens: score weight-0 tokens too (for evaluation stats); they still contribute nothing
            to the loss or the gradients.
        options: :class:`KernelOptions` (implementation, memory budget, layout, validation). The keywords
            ``impl``, ``memory_budget_bytes``, ``vocab_major``, ``validate`` and ``allow_negative_weights`` are
            still accepted here for one release, with a ``FutureWarning``.

    Returns:
        The loss (0-dim for ``"mean"``/``"sum"``, ``[N]`` for ``"none"``; float32, or float64 for float64 inputs),
        or ``(loss, TokenStats)`` when ``return_token_stats``.

    Under ``torch.autocast`` the three matmuls take autocast-dtype inputs (like ``nn.Linear``); softmax and gradient
    accumulation stay in float32 and the gradients come back in the inputs' dtypes.
    """
    options = _resolve_options(options, deprecated_options)
    _check_tensors(hidden, weight, targets, token_weights, bias)
    _check_math(hidden, reduction, normalizer, softcap, logit_scale)
    device = hidden.device
    n_tokens = hidden.shape[0]
    compute_dtype = _compute_dtype(hidden, weight)
    acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32

    # which tokens are scored
    if targets.dtype != torch.long:
        targets = targets.long()
    valid = targets != ignore_index
    if token_weights is None:
        w = valid.to(acc_dtype)
        scored = valid
    else:
        w = torch.where(valid, token_weights.to(acc_dtype), 0)
        scored = valid if score_zero_weight_tokens else valid & (w != 0)
    m = _count_and_check(
        scored,
        valid,
        targets,
        token_weights=token_weights,
        normalizer=normalizer,
        vocab=weight.shape[0],
        ignore_index=ignore_index,
        options=options,
    )
    compact = m != n_tokens
    if compact:
        idx = torch.nonzero_static(scored, size=m).squeeze(1) if m else scored.new_zeros(0, dtype=torch.long)
        h_c, t_c, w_c = hidden.index_select(0, idx), targets.index_select(0, idx), w.index_select(0, idx)
    else:
        h_c, t_c, w_c = hidden, targets, w

    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    cfg = _head_config(hidden, weight, softcap, logit_scale, compute_dtype, any(needs), return_token_stats, options)

    if reduction == "none":
        if any(needs):
            ce_c, arg_c = _PerTokenHead.apply(h_c, weight, bias, t_c, cfg, *needs)
        else:
            with _autocast_off(device.type):
                ce_c, arg_c, _, _, _ = _head_pass(h_c.detach(), weight.detach(), _detach(bias), t_c, None, cfg)
        per_tok = w_c * ce_c
        loss = per_tok.new_zeros(n_tokens).index_copy(0, idx, per_tok) if compact else per_tok
    else:
        coef = _loss_coefficients(w_c, reduction, normalizer, device)
        if any(needs):
            loss, ce_c, arg_c = _ReducedHead.apply(h_c, weight, bias, t_c, coef, cfg, *needs)
        else:
            with _autocast_off(device.type):
                ce_c, arg_c, _, _, _ = _head_pass(h_c.detach(), weight.detach(), _detach(bias), t_c, None, cfg)
                loss = torch.dot(coef, ce_c)
    loss = loss.to(acc_dtype)

    if not return_token_stats:
        return loss
    ce_c = ce_c.detach()
    if compact:
        ce = torch.zeros(n_tokens, dtype=torch.float32, device=device).index_copy_(0, idx, ce_c.float())
        is_argmax = torch.zeros(n_tokens, dtype=torch.bool, device=device).index_copy_(0, idx, arg_c)
    else:
        ce, is_argmax = ce_c.float(), arg_c
    return loss, TokenStats(ce=ce, is_argmax=is_argmax, scored=scored)


# ------------------------------------------------------------------------------------------------- planning


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's where it applies (like ``nn.Linear``), else the inputs' common dtype."""
    device_type = hidden.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if autocast and hidden.dtype in _AUTOCAST_ELIGIBLE and weight.dtype in _AUTOCAST_ELIGIBLE:
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype outside autocast; "
            "cast hidden to weight.dtype or run under torch.autocast."
        )
    return hidden.dtype


def _head_config(hidden, weight, softcap, logit_scale, compute_dtype, any_grad, want_argmax, options) -> _HeadConfig:
    """The tile loop's settings: the options resolved for this device, and the tile height from the memory budget."""
    device = hidden.device
    vocab = weight.shape[0]
    acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    impl, epilogue = _pick_impl(options, device)
    if options.memory_budget_bytes is not None:
        budget = options.memory_budget_bytes
    else:
        budget = default_memory_budget(device, vocab * hidden.shape[1] * (8 if acc_dtype == torch.float64 else 4))
    if impl == "fused":
        rows = fused_rows_per_tile(
            vocab, budget, tile_dtype=compute_dtype, acc_dtype=acc_dtype, torch_epilogue=epilogue == "torch"
        )
    else:
        rows = rows_per_tile(
            vocab, budget, acc_dtype=acc_dtype, compute_dtype=compute_dtype, softcap=softcap is not None and any_grad
        )
    return _HeadConfig(
        logit_scale=float(logit_scale),
        softcap=None if softcap is None else float(softcap),
        compute_dtype=compute_dtype,
        acc_dtype=acc_dtype,
        rows=rows,
        want_argmax=want_argmax,
        impl=impl,
        vocab_major=impl == "torch"
        and ((device.type == "cpu") if options.vocab_major is None else options.vocab_major),
        epilogue=epilogue,
    )


def _loss_coefficients(w_c: torch.Tensor, reduction: str, normalizer, device: torch.device) -> torch.Tensor:
    """Per scored token, dLoss/dce: its weight over the denominator (``sum(w)`` for "mean", the normalizer if
    given, none for "sum"); 0 everywhere when the denominator is 0."""
    if normalizer is None:
        denom = w_c.sum() if reduction == "mean" else None
    elif isinstance(normalizer, torch.Tensor):
        denom = normalizer.detach().reshape(()).to(device=device, dtype=w_c.dtype)
    else:
        denom = float(normalizer)  # a kernel argument: no host-to-device copy (which would sync)
    if denom is None:
        return w_c
    if isinstance(denom, float):
        return w_c / denom if denom != 0 else torch.zeros_like(w_c)
    return torch.where(denom != 0, w_c / denom, torch.zeros_like(w_c))


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()

"""Fused LM head + cross-entropy with real-valued per-token weights, without materializing ``[N, V]`` logits.

For the scalar reductions (``"mean"``/``"sum"``) the per-token weights are known in the forward pass, so the
gradients are computed there, tile by tile, while the tile's logits are still in memory:

    for each tile of ``n`` scored tokens:
        Z  = transform(h_tile @ W.T + b)          # 1 matmul, fp32 [n, V] buffer reused across tiles
        P  = softmax(Z)  (in place)                # ce = -log P[target]
        D  = (P - onehot(target)) * dZ/dY          # in place; dZ/dY = 1, or 1 - tanh^2 with softcapping
        grad_h[tile] = (D @ W) * c                 # 1 matmul, c = weight / normalizer * logit_scale per row
        grad_W      += D.T @ (h_tile * c)          # 1 matmul, fp32 accumulator
        grad_b      += D.T @ c

Three matmuls per tile instead of the four of a head that recomputes the logits in backward. The backward only
scales the stored gradients by the incoming scalar. ``reduction="none"`` has a per-token upstream gradient that is
unknown in the forward, so that path saves its inputs and recomputes the tiles in backward.

Tokens that are not scored (target == ``ignore_index``, or weight 0 unless ``score_zero_weight_tokens``) are
dropped before any matmul and their results are scattered back afterwards.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

# The public API. The tiling helpers (`rows_per_tile`, `default_memory_budget`) stay importable from this module for
# benchmarks and tests, but are not part of it.
__all__ = ["TokenStats", "weighted_linear_cross_entropy"]

_MiB = 1 << 20
_CPU_DEFAULT_BUDGET = 256 * _MiB
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


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
class _HeadConfig:
    logit_scale: float
    softcap: float | None
    compute_dtype: torch.dtype  # dtype of the matmul inputs (autocast dtype, or the inputs' dtype)
    acc_dtype: torch.dtype  # logits tile, softmax, gradient accumulators: fp32 (fp64 for fp64 inputs)
    rows: int  # tokens per tile
    want_argmax: bool
    vocab_major: bool = False  # tile layout [V, n] instead of [n, V] (faster projection GEMM with MKL on CPU)


def default_memory_budget(device: torch.device, weight_grad_bytes: int | None = None) -> int:
    """Bytes the per-tile buffers may use when ``memory_budget_bytes`` is None.

    CPU: 1/8 of the fp32 weight-gradient buffer (``V * H * 4``, which any trainable head needs anyway), clamped to
    [16 MiB, 256 MiB]; so the tiles add at most ~12% to the gradient memory, and for large heads the tiles are big
    enough (>= 256 rows) that the ``grad_W += D.T @ h`` accumulation stays compute-bound. CUDA: 1/64 of the device
    memory, clamped to [256 MiB, 4 GiB] (1.25 GiB on an 80 GB GPU).
    """
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return int(min(max(total // 64, 256 * _MiB), 4096 * _MiB))
    if weight_grad_bytes is None:
        return _CPU_DEFAULT_BUDGET
    return int(min(max(weight_grad_bytes // 8, 16 * _MiB), _CPU_DEFAULT_BUDGET))


def rows_per_tile(
    vocab_size: int,
    memory_budget_bytes: int,
    *,
    acc_dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float32,
    softcap: bool = False,
) -> int:
    """Tokens per tile so that the tile buffers (``[n, V]`` accumulator tile, its low-precision copy when the matmuls
    run in bf16/fp16, the ``tanh^2`` buffer with softcapping) fit in ``memory_budget_bytes``."""
    acc_bytes = torch.empty((), dtype=acc_dtype).element_size()
    per_row = vocab_size * acc_bytes * (2 if softcap else 1)
    if compute_dtype != acc_dtype:
        per_row += vocab_size * torch.empty((), dtype=compute_dtype).element_size()
    rows = max(1, int(memory_budget_bytes) // per_row)
    for step in (64, 16):  # matmul-friendly sizes
        if rows >= 2 * step:
            return rows - rows % step
    return rows


# ---------------------------------------------------------------------------------------------------- tile loop


_MIXED_MM_CACHE: dict[tuple[str, torch.dtype], bool] = {}


def _mixed_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` works for ``dtype`` inputs here (CUDA, torch >= 2.8)."""
    if device.type != "cuda":
        return False
    key = (str(device), dtype)
    if key not in _MIXED_MM_CACHE:
        try:
            a = torch.zeros(2, 2, dtype=dtype, device=device)
            torch.mm(a, a, out_dtype=torch.float32)
            _MIXED_MM_CACHE[key] = True
        except (RuntimeError, TypeError):
            _MIXED_MM_CACHE[key] = False
    return _MIXED_MM_CACHE[key]


def _mm_into(out, a, b, *, accumulate=False, mixed=False, scratch=None) -> None:
    """``out (+)= a @ b`` with ``out`` in the accumulation dtype, also when ``a``/``b`` are bf16/fp16.

    ``mixed``: the device has an fp32-output low-precision GEMM. Otherwise the low-precision GEMM's result (computed
    with fp32 accumulation inside, rounded once) goes through ``scratch`` (or a temporary) and is converted.
    """
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif mixed:
        if accumulate:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:
        prod = torch.mm(a, b, out=scratch) if scratch is not None else torch.mm(a, b)
        if accumulate:
            out.add_(prod)
        else:
            out.copy_(prod)


def _logits_into(tile, lp_tile, h_rows, w_c, bias_f, fold, cfg, mixed) -> None:
    """``tile = fold * (h_rows @ W.T + b)`` in the accumulation dtype (``bias_f`` is already multiplied by fold).

    With ``cfg.vocab_major`` the tile holds the transpose, ``[V, n]`` (computed as ``W @ h_rows.T``).
    """
    vm = cfg.vocab_major
    if cfg.compute_dtype == cfg.acc_dtype:
        hs = h_rows if fold == 1.0 else h_rows * fold
        a, b = (w_c, hs.t()) if vm else (hs, w_c.t())
        if bias_f is not None:
            torch.addmm(bias_f.unsqueeze(1) if vm else bias_f, a, b, out=tile)
        else:
            torch.mm(a, b, out=tile)
        return
    # Matmul inputs in the autocast dtype (like nn.Linear under autocast), everything after it in fp32
    h_lp = h_rows.to(cfg.compute_dtype)
    a, b = (w_c, h_lp.t()) if vm else (h_lp, w_c.t())
    _mm_into(tile, a, b, mixed=mixed, scratch=lp_tile)
    if bias_f is not None:
        torch.add(bias_f.unsqueeze(1) if vm else bias_f, tile, alpha=fold, out=tile)
    elif fold != 1.0:
        tile.mul_(fold)


def _head_pass(h, w, b, targets, coef, cfg: _HeadConfig, need_gh=False, need_gw=False, need_gb=False):
    """One pass over the scored tokens.

    ``h [M, H]``, ``targets [M]`` (all in ``[0, V)``), ``coef [M]`` (dLoss/dZ scale per row, without logit_scale)
    or None for a forward-only pass. Returns ``ce [M]`` (acc dtype), ``is_argmax [M]`` or None, and the gradients
    ``grad_h [M, H]``, ``grad_W [V, H]``, ``grad_b [V]`` (acc dtype; None when not requested).
    """
    M, H = h.shape
    V = w.shape[0]
    dev, acc = h.device, cfg.acc_dtype
    lp = cfg.compute_dtype != acc
    mixed = lp and _mixed_mm_available(dev, cfg.compute_dtype)
    grads = coef is not None
    need_gh, need_gw, need_gb = grads and need_gh, grads and need_gw, grads and need_gb and b is not None

    ce = torch.empty(M, dtype=acc, device=dev)
    is_argmax = torch.empty(M, dtype=torch.bool, device=dev) if cfg.want_argmax else None
    gh = torch.empty(M, H, dtype=acc, device=dev) if need_gh else None
    gw = torch.empty(V, H, dtype=acc, device=dev) if need_gw else None  # the first tile writes, later tiles add
    gb = torch.empty(V, dtype=acc, device=dev) if need_gb else None
    if M == 0:
        for g in (gw, gb):
            if g is not None:
                g.zero_()
        return ce, is_argmax, gh, gw, gb

    rows = min(cfg.rows, M)
    vm = cfg.vocab_major
    # flat buffers, so that the ragged last tile is a contiguous view in either layout
    tile_buf = torch.empty(rows * V, dtype=acc, device=dev)
    lp_buf = torch.empty(rows * V, dtype=cfg.compute_dtype, device=dev) if lp else None
    sq_buf = torch.empty(rows * V, dtype=acc, device=dev) if (cfg.softcap is not None and grads) else None
    w_c = w if w.dtype == cfg.compute_dtype else w.to(cfg.compute_dtype)
    # logit_scale (and 1/softcap) is folded into the [n, H] rows instead of a pass over the [n, V] tile
    fold = cfg.logit_scale if cfg.softcap is None else cfg.logit_scale / cfg.softcap
    bias_f = None if b is None else b.to(acc) * fold
    if grads:
        coef = coef.to(acc) * cfg.logit_scale
    arange = torch.arange(rows, device=dev)
    target_logit = torch.empty(M, dtype=acc, device=dev)
    p_target = torch.empty(M, dtype=acc, device=dev)
    vdim = 0 if vm else 1  # the vocabulary dimension of the tile

    def shaped(buf, n):
        return None if buf is None else buf[: n * V].view((V, n) if vm else (n, V))

    for start in range(0, M, rows):
        end = min(start + rows, M)
        n = end - start
        tile, lp_tile, sq = shaped(tile_buf, n), shaped(lp_buf, n), shaped(sq_buf, n)
        r = arange[:n]
        tgt = targets[start:end]
        at = (tgt, r) if vm else (r, tgt)  # the target logit of every token
        h_rows = h[start:end]
        if not lp and h_rows.dtype != acc:
            h_rows = h_rows.to(acc)

        _logits_into(tile, lp_tile, h_rows, w_c, bias_f, fold, cfg, mixed)
        if cfg.softcap is not None:
            tile.tanh_()  # t = tanh(y * scale / softcap)
            if sq is not None:
                torch.mul(tile, tile, out=sq)
            tile.mul_(cfg.softcap)
        z_t = tile[at]
        target_logit[start:end] = z_t
        if is_argmax is not None:
            # the largest *other* logit: hide the target, reduce, restore (no [n, V] temporary)
            tile[at] = -math.inf
            is_argmax[start:end] = z_t > tile.amax(dim=vdim)
            tile[at] = z_t
        torch.softmax(tile, dim=vdim, out=tile)  # in place
        p_t = tile[at]
        p_target[start:end] = p_t
        if not grads:
            continue

        tile[at] = p_t - 1  # P - onehot
        if sq is not None:
            tile.addcmul_(tile, sq, value=-1)  # * (1 - t^2)
        c = coef[start:end]
        if lp and (need_gh or (need_gw and mixed)):
            lp_tile.copy_(tile)  # the logits gradient as the matmul input dtype, like autocast's backward
        d = tile.t() if vm else tile  # [n, V] view of the logits gradient
        d_lp = None if lp_tile is None else (lp_tile.t() if vm else lp_tile)
        if need_gh:
            g = gh[start:end]
            _mm_into(g, d_lp if lp else d, w_c, mixed=mixed)
            g.mul_(c.unsqueeze(1))
        if need_gw:
            hc = h_rows.to(cfg.compute_dtype).to(acc) if lp else h_rows
            hc = hc * c.unsqueeze(1)
            if mixed:
                _mm_into(gw, d_lp.t(), hc.to(cfg.compute_dtype), accumulate=start > 0, mixed=True)
            else:
                # fp32 GEMM over the fp32 tile: no per-tile rounding of the product before accumulation
                _mm_into(gw, d.t(), hc, accumulate=start > 0)
        if need_gb:
            if start == 0:
                torch.mv(d.t(), c, out=gb)
            else:
                gb.addmv_(d.t(), c)

    torch.log(p_target, out=ce).neg_()
    # -log(p) loses precision once p is subnormal (ce > ~87 in fp32): recompute those rows' logsumexp exactly
    tiny = torch.finfo(acc).tiny * 2.0**24
    low = p_target < tiny
    if bool(low.any()):
        idx = low.nonzero().squeeze(1)
        k = idx.numel()
        z = torch.empty((V, k) if vm else (k, V), dtype=acc, device=dev)
        lp_z = torch.empty(z.shape, dtype=cfg.compute_dtype, device=dev) if lp else None
        h_rows = h.index_select(0, idx)
        if not lp and h_rows.dtype != acc:
            h_rows = h_rows.to(acc)
        _logits_into(z, lp_z, h_rows, w_c, bias_f, fold, cfg, mixed)
        if cfg.softcap is not None:
            z.tanh_().mul_(cfg.softcap)
        ce[idx] = torch.logsumexp(z, dim=vdim) - target_logit[idx]
    return ce, is_argmax, gh, gw, gb


# ---------------------------------------------------------------------------------------------- autograd glue


def _scale_grad(g: torch.Tensor | None, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    if g is None:
        return None
    # On CPU the check is free; on GPU it would be a host sync, so always multiply (one cheap elementwise pass)
    if not (grad_out.device.type == "cpu" and float(grad_out) == 1.0):
        g.mul_(grad_out.to(g.dtype))
    return g if g.dtype == dtype else g.to(dtype)


class _ReducedHead(torch.autograd.Function):
    """Scalar loss ``sum(coef * ce)``; gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, h, w, b, targets, coef, cfg, need_gh, need_gw, need_gb):
        with torch.autocast(h.device.type, enabled=False):
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
            with torch.autocast(h.device.type, enabled=False):
                _, _, gh, gw, gb = _head_pass(h, w, b, targets, coef, ctx.cfg, *ctx.needs)
            grads = (gh, gw, gb)
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        gh, gw, gb = grads
        return (
            _scale_grad(gh, grad_loss, h_dtype),
            _scale_grad(gw, grad_loss, w_dtype),
            _scale_grad(gb, grad_loss, b_dtype) if b_dtype is not None else None,
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
        with torch.autocast(h.device.type, enabled=False):
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
        with torch.autocast(h.device.type, enabled=False):
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


def _check_inputs(hidden, weight, targets, token_weights, bias, reduction, normalizer, softcap, logit_scale, budget):
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}.")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}.")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}.")
    if hidden.dim() != 2:
        raise ValueError(
            f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}; flatten the batch dims first, "
            "e.g. hidden.reshape(-1, hidden.shape[-1])."
        )
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating tensor, got dtype {hidden.dtype}.")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H] (the LM head weight), got shape {tuple(weight.shape)}.")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor, got dtype {weight.dtype}.")
    n, h = hidden.shape
    if weight.shape[1] != h:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[1] = {h}, got shape {tuple(weight.shape)}; "
            "pass the head weight as stored by nn.Linear (out_features x in_features), not its transpose."
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0).")
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(
            f"targets must be 1-D [N] with N = hidden.shape[0] = {n}, got shape {tuple(targets.shape)}; "
            "flatten it like hidden, e.g. targets.reshape(-1)."
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (torch.long), got dtype {targets.dtype}.")
    tensors = {"weight": weight, "targets": targets}
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor):
            raise TypeError(f"token_weights must be a torch.Tensor or None, got {type(token_weights).__name__}.")
        if token_weights.dim() != 1 or token_weights.shape[0] != n:
            raise ValueError(
                f"token_weights must be 1-D [N] with N = hidden.shape[0] = {n}, got shape "
                f"{tuple(token_weights.shape)}; flatten it like hidden."
            )
        if not token_weights.is_floating_point():
            raise TypeError(
                f"token_weights must be a floating tensor, got dtype {token_weights.dtype}; "
                "convert it with token_weights.float()."
            )
        tensors["token_weights"] = token_weights
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}.")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias must be 1-D [V] with V = weight.shape[0] = {weight.shape[0]}, got shape {tuple(bias.shape)}."
            )
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a floating tensor, got dtype {bias.dtype}.")
        tensors["bias"] = bias
    for name, t in tensors.items():
        if t.device != hidden.device:
            raise ValueError(
                f"{name} is on {t.device} but hidden is on {hidden.device}; move it with .to(hidden.device)."
            )
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
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
        raise ValueError(f"memory_budget_bytes must be a positive int or None, got {budget!r}.")


def _check_values(targets, valid, token_weights, normalizer, vocab, ignore_index, allow_negative_weights):
    """Value checks, batched into a single host sync."""
    flags = [((targets < 0) | (targets >= vocab)) & valid]
    names = ["targets"]
    if token_weights is not None:
        flags.append(~torch.isfinite(token_weights) & valid)
        names.append("nonfinite")
        if not allow_negative_weights:
            flags.append((token_weights < 0) & valid)
            names.append("negative")
    found = torch.stack([f.any() for f in flags])
    if isinstance(normalizer, torch.Tensor):
        bad_norm = ~torch.isfinite(normalizer.reshape(())) | (normalizer.reshape(()) < 0)
        found = torch.cat([found, bad_norm.reshape(1).to(found.device)])
        names.append("normalizer")
    found = dict(zip(names, found.tolist(), strict=True))
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
            "token_weights contains negative values; pass allow_negative_weights=True if that is intended."
        )
    if found.get("normalizer"):
        raise ValueError(f"normalizer must be finite and >= 0, got {normalizer.item()}.")


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
    allow_negative_weights: bool = False,
    return_token_stats: bool = False,
    score_zero_weight_tokens: bool = False,
    memory_budget_bytes: int | None = None,
    vocab_major: bool | None = None,
    validate: bool = True,
    impl: str = "torch",
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
        allow_negative_weights: accept negative token weights.
        return_token_stats: also return :class:`TokenStats` (ce, is_argmax, scored), computed in the same pass.
        score_zero_weight_tokens: score weight-0 tokens too (for evaluation stats); they still contribute nothing
            to the loss or the gradients.
        memory_budget_bytes: bound on the per-tile buffers (see :func:`rows_per_tile`); default
            :func:`default_memory_budget`.
        vocab_major: tile layout ``[V, n]`` (the projection is ``W @ h.T``) instead of ``[n, V]``; None picks
            vocab-major on CPU, where MKL runs ``W @ h.T`` faster for small tiles, and row-major elsewhere. Both give
            the same result to rounding.
        validate: run the value checks (NaN/negative weights, out-of-range targets: one host sync); pass False on GPU
            once the data pipeline is trusted. Shape, dtype and device checks always run.
        impl: the implementation, a key of :data:`IMPLEMENTATIONS`: ``"torch"`` (tiled PyTorch, any device) today;
            a compiled or Triton kernel registers beside it under its own name, with the same arguments.

    Returns:
        The loss (0-dim for ``"mean"``/``"sum"``, ``[N]`` for ``"none"``; float32, or float64 for float64 inputs),
        or ``(loss, TokenStats)`` when ``return_token_stats``.

    Under ``torch.autocast`` the three matmuls take autocast-dtype inputs (like ``nn.Linear``); the logits,
    softmax and gradient accumulation stay in float32 and the gradients come back in the inputs' dtypes.
    """
    try:
        implementation = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(
            f"impl={impl!r} is not a weighted_linear_cross_entropy implementation; choose one of "
            f"{sorted(IMPLEMENTATIONS)}."
        ) from None
    return implementation(
        hidden,
        weight,
        targets,
        token_weights,
        bias=bias,
        ignore_index=ignore_index,
        reduction=reduction,
        normalizer=normalizer,
        softcap=softcap,
        logit_scale=logit_scale,
        allow_negative_weights=allow_negative_weights,
        return_token_stats=return_token_stats,
        score_zero_weight_tokens=score_zero_weight_tokens,
        memory_budget_bytes=memory_budget_bytes,
        vocab_major=vocab_major,
        validate=validate,
    )


def _torch_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None,
    *,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    normalizer: float | torch.Tensor | None,
    softcap: float | None,
    logit_scale: float,
    allow_negative_weights: bool,
    return_token_stats: bool,
    score_zero_weight_tokens: bool,
    memory_budget_bytes: int | None,
    vocab_major: bool | None,
    validate: bool,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """The ``"torch"`` implementation: tiles over scored tokens with gradients formed in the forward (module doc)."""
    _check_inputs(
        hidden, weight, targets, token_weights, bias, reduction, normalizer, softcap, logit_scale, memory_budget_bytes
    )
    device = hidden.device
    n_tokens = hidden.shape[0]
    vocab = weight.shape[0]

    # dtypes
    autocast = torch.is_autocast_enabled(device.type)
    if autocast and hidden.dtype in _AUTOCAST_ELIGIBLE and weight.dtype in _AUTOCAST_ELIGIBLE:
        compute_dtype = torch.get_autocast_dtype(device.type)
    else:
        if hidden.dtype != weight.dtype:
            raise TypeError(
                f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype outside autocast; "
                "cast hidden to weight.dtype or run under torch.autocast."
            )
        compute_dtype = hidden.dtype
    acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32

    # which tokens are scored
    if targets.dtype != torch.long:
        targets = targets.long()
    valid = targets != ignore_index
    if validate:
        _check_values(targets, valid, token_weights, normalizer, vocab, ignore_index, allow_negative_weights)
    if token_weights is None:
        w = valid.to(acc_dtype)
        scored = valid
    else:
        w = torch.where(valid, token_weights.to(acc_dtype), 0)
        scored = valid if score_zero_weight_tokens else valid & (w != 0)
    idx = scored.nonzero().squeeze(1)
    m = idx.numel()
    compact = m != n_tokens
    h_c = hidden.index_select(0, idx) if compact else hidden
    t_c = targets.index_select(0, idx) if compact else targets
    w_c = w.index_select(0, idx) if compact else w

    if memory_budget_bytes is not None:
        budget = memory_budget_bytes
    else:
        budget = default_memory_budget(device, vocab * hidden.shape[1] * (8 if acc_dtype == torch.float64 else 4))
    grad_on = torch.is_grad_enabled()
    need_gh = grad_on and hidden.requires_grad
    need_gw = grad_on and weight.requires_grad
    need_gb = grad_on and bias is not None and bias.requires_grad
    any_grad = need_gh or need_gw or need_gb
    cfg = _HeadConfig(
        logit_scale=float(logit_scale),
        softcap=None if softcap is None else float(softcap),
        compute_dtype=compute_dtype,
        acc_dtype=acc_dtype,
        rows=rows_per_tile(
            vocab,
            budget,
            acc_dtype=acc_dtype,
            compute_dtype=compute_dtype,
            softcap=softcap is not None and any_grad,
        ),
        want_argmax=return_token_stats,
        vocab_major=(device.type == "cpu") if vocab_major is None else bool(vocab_major),
    )
    out_dtype = acc_dtype

    if reduction == "none":
        if any_grad:
            ce_c, arg_c = _PerTokenHead.apply(h_c, weight, bias, t_c, cfg, need_gh, need_gw, need_gb)
        else:
            with torch.autocast(device.type, enabled=False):
                ce_c, arg_c, _, _, _ = _head_pass(h_c.detach(), weight.detach(), _detach(bias), t_c, None, cfg)
        per_tok = w_c * ce_c
        loss = per_tok.new_zeros(n_tokens).index_copy(0, idx, per_tok) if compact else per_tok
        loss = loss.to(out_dtype)
    else:
        if normalizer is None:
            denom = w_c.sum() if reduction == "mean" else None
        elif isinstance(normalizer, torch.Tensor):
            denom = normalizer.detach().reshape(()).to(device=device, dtype=acc_dtype)
        else:
            denom = torch.tensor(float(normalizer), dtype=acc_dtype, device=device)
        coef = w_c if denom is None else torch.where(denom != 0, w_c / denom, torch.zeros_like(w_c))
        if any_grad:
            loss, ce_c, arg_c = _ReducedHead.apply(h_c, weight, bias, t_c, coef, cfg, need_gh, need_gw, need_gb)
        else:
            with torch.autocast(device.type, enabled=False):
                ce_c, arg_c, _, _, _ = _head_pass(h_c.detach(), weight.detach(), _detach(bias), t_c, None, cfg)
                loss = torch.dot(coef, ce_c)
        loss = loss.to(out_dtype)

    if not return_token_stats:
        return loss
    ce_c = ce_c.detach()
    if compact:
        ce = torch.zeros(n_tokens, dtype=torch.float32, device=device).index_copy_(0, idx, ce_c.float())
        is_argmax = torch.zeros(n_tokens, dtype=torch.bool, device=device).index_copy_(0, idx, arg_c)
    else:
        ce, is_argmax = ce_c.float(), arg_c
    return loss, TokenStats(ce=ce, is_argmax=is_argmax, scored=scored)


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor | tuple[torch.Tensor, TokenStats]]] = {"torch": _torch_impl}
"""``impl`` name -> implementation of :func:`weighted_linear_cross_entropy` (same positional and keyword
arguments, less ``impl``). The seam for a compiled/Triton path, as cut-cross-entropy's ``impl=``."""

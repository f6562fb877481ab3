"""The Triton epilogue (contract: `trl_plw.ops._epilogue`). Imported only where Triton is, and on first use.

One program per tile row. Pass 1 streams the row once: online max and sum of ``exp`` (rescaled when the max grows),
the target's logit, the largest other logit. Pass 2 streams it again and overwrites it with
``(exp(z - lse) - onehot) * dZ/dY`` in the tile's dtype. All arithmetic is in fp32 (fp64 for fp64 tiles, which only
the CPU interpreter tests use). The vocabulary size is a compile-time constant: one compile per model, and the
loop bounds and each row's alignment (``row * V``: 16-byte aligned rows whenever V is a multiple of 8, so the loads
and stores are vectorized) are known to the compiler. ``tanh`` is written with ``exp`` because Triton's math namespaces differ between
versions; the form below saturates correctly for large ``|x|`` and its absolute error (~1e-7) is far below a bf16
logit's rounding.

Runs on CPU under ``TRITON_INTERPRET=1`` (the test suite does, at small V).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trl_plw.ops._epilogue import acc_dtype_for


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _transform(y, bias_ptr, cols, mask, fold, softcap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """``(z, tanh(u))`` for a block of the row (``tanh`` is ``u`` itself without softcapping, unused then)."""
    u = y * fold
    if HAS_BIAS:
        u += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(u.dtype)
    if SOFTCAP:
        t = _tanh(u)
        z = t * softcap
    else:
        t = u
        z = u
    return z, t


@triton.jit
def _wce_epilogue_kernel(
    tile_ptr,
    targets_ptr,
    bias_ptr,
    lse_ptr,
    z_t_ptr,
    max_other_ptr,
    fold,
    softcap,
    V: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    WANT_ARGMAX: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = tile_ptr + row * V  # V is a compile-time constant: the compiler sees each row's alignment
    target = tl.load(targets_ptr + row)
    offsets = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")

    run_max = tl.full((), neg_inf, ACC)
    run_sum = tl.zeros((), ACC)
    z_t = tl.zeros((), ACC)
    max_other = tl.full((), neg_inf, ACC)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        mask = cols < V
        y = tl.load(row_ptr + cols, mask=mask, other=0.0).to(ACC)
        z, _ = _transform(y, bias_ptr, cols, mask, fold, softcap, HAS_BIAS, SOFTCAP)
        z = tl.where(mask, z, neg_inf)
        new_max = tl.maximum(run_max, tl.max(z, axis=0))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        run_max = new_max
        is_target = cols == target
        z_t += tl.sum(tl.where(is_target, z, 0.0), axis=0)
        if WANT_ARGMAX:
            max_other = tl.maximum(max_other, tl.max(tl.where(is_target, neg_inf, z), axis=0))
    lse = run_max + tl.log(run_sum)
    tl.store(lse_ptr + row, lse)
    tl.store(z_t_ptr + row, z_t)
    if WANT_ARGMAX:
        tl.store(max_other_ptr + row, max_other)

    if WANT_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            mask = cols < V
            y = tl.load(row_ptr + cols, mask=mask, other=0.0).to(ACC)
            z, t = _transform(y, bias_ptr, cols, mask, fold, softcap, HAS_BIAS, SOFTCAP)
            d = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
            if SOFTCAP:
                d = d * (1.0 - t * t)
            tl.store(row_ptr + cols, d.to(tile_ptr.dtype.element_ty), mask=mask)


_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


def block_config(vocab_size: int, element_size: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)``: 4 KiB of the row per block (2,048 bf16 or 1,024 fp32 values), never more than the row
    needs, and 4 warps. Measured on an H200 (benchmarks/epilogue.py, 4,096 rows, bf16, docs/BENCHMARKS.md): 3.20 TB/s
    at V=151,936 and 3.02 at V=248,320, against 2.5-3.0 for 8-16 KiB blocks with 8-32 warps; a plain copy moved
    3.8-4.0 TB/s."""
    return min(triton.next_power_of_2(vocab_size), 4096 // element_size), 4


def epilogue_triton(
    tile: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    fold: float,
    softcap: float | None,
    want_grad: bool,
    want_argmax: bool,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the kernel over the tile's rows (``tile`` row-contiguous ``[n, V]``; ``bias`` in the accumulation
    dtype, already multiplied by ``fold``). ``block_v``/``num_warps`` override `block_config` (benchmarks/epilogue.py
    sweeps them)."""
    n, vocab = tile.shape
    if not tile.is_contiguous():
        raise ValueError("the Triton epilogue needs a contiguous row-major [n, V] tile")
    acc = acc_dtype_for(tile.dtype)
    lse = torch.empty(n, dtype=acc, device=tile.device)
    z_t = torch.empty(n, dtype=acc, device=tile.device)
    max_other = torch.empty(n if want_argmax else 0, dtype=acc, device=tile.device)
    if n == 0:
        return lse, z_t, max_other
    block, warps = block_config(vocab, tile.element_size())
    block, warps = block_v or block, num_warps or warps
    _wce_epilogue_kernel[(n,)](
        tile,
        targets,
        bias if bias is not None else lse,  # never read without HAS_BIAS
        lse,
        z_t,
        max_other if want_argmax else lse,  # never written without WANT_ARGMAX
        float(fold),
        float(softcap) if softcap is not None else 1.0,
        V=vocab,
        HAS_BIAS=bias is not None,
        SOFTCAP=softcap is not None,
        WANT_GRAD=want_grad,
        WANT_ARGMAX=want_argmax,
        ACC=_TL_ACC[acc],
        BLOCK_V=block,
        num_warps=warps,
    )
    return lse, z_t, max_other

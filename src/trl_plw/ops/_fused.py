"""The fused tile loop (``impl="fused"``, the default on CUDA): GEMM -> one epilogue op -> two GEMMs per tile.

Per tile of ``n`` scored tokens::

    Y  = h_tile @ W.T                    # GEMM 1, written in the matmul dtype (bf16 under autocast, as nn.Linear)
    lse, z_t, max_other; Y <- D          # the epilogue (`trl_plw.ops._epilogue`): 2 reads + 1 write of Y
    grad_h[tile]  = (D @ W) * c          # GEMM 2, fp32 result; c = weight / normalizer * logit_scale per row
    grad_W       += D.T @ (h_tile * c)   # GEMM 3, fp32 accumulator across tiles
    grad_b       += D.T @ c

Nothing else touches the ``[n, V]`` tile, so per tile it is written once by GEMM 1, read twice and written once by the
epilogue, and read once by each gradient GEMM: 6 tile-sizes of traffic in bf16 (`benchmarks/roofline.py` counts
them; a test pins it). ``ce = lse - z_t`` is exact in fp32 even where ``p_target`` underflows, so there is no
recompute pass and no host read. The tile boundaries are Python ints fixed before the loop, so no iteration reads a
device value (the only host read of a call is the scored-token count, before the loop).
"""

from __future__ import annotations

import torch

from trl_plw.ops._epilogue import wce_epilogue
from trl_plw.ops._gemm import gemm_support, mm_into
from trl_plw.ops._tiling import balanced_tiles


def fused_pass(h, w, b, targets, coef, cfg, need_gh=False, need_gw=False, need_gb=False):
    """One pass over the scored tokens, with the contract of `trl_plw.ops.weighted_linear_ce._head_pass`."""
    M, H = h.shape
    V = w.shape[0]
    dev, acc, compute = h.device, cfg.acc_dtype, cfg.compute_dtype
    grads = coef is not None
    need_gh, need_gw, need_gb = grads and need_gh, grads and need_gw, grads and need_gb and b is not None
    low_precision = compute != acc
    support = gemm_support(dev, compute) if low_precision else "addmm"

    gh = torch.empty(M, H, dtype=acc, device=dev) if need_gh else None
    gw = torch.empty(V, H, dtype=acc, device=dev) if need_gw else None  # the first tile writes, later tiles add
    gb = torch.zeros(V, dtype=acc, device=dev) if need_gb else None
    lse = torch.empty(M, dtype=acc, device=dev)
    z_target = torch.empty(M, dtype=acc, device=dev)
    max_other = torch.empty(M, dtype=acc, device=dev) if cfg.want_argmax else None
    tiles = balanced_tiles(M, cfg.rows)
    if not tiles:
        if gw is not None:
            gw.zero_()
        return lse, None if max_other is None else torch.zeros(0, dtype=torch.bool, device=dev), gh, gw, gb

    w_c = w if w.dtype == compute else w.to(compute)
    fold = cfg.logit_scale if cfg.softcap is None else cfg.logit_scale / cfg.softcap
    bias_f = None if b is None else b.to(acc) * fold
    if grads:
        coef = coef.to(acc) * cfg.logit_scale
    widest = max(end - start for start, end in tiles)
    tile_buf = torch.empty(widest * V, dtype=compute, device=dev)  # flat: the ragged last tile is a contiguous view
    gw_scratch = None

    for i, (start, end) in enumerate(tiles):
        n = end - start
        tile = tile_buf[: n * V].view(n, V)
        h_rows = h[start:end]
        h_c = h_rows if h_rows.dtype == compute else h_rows.to(compute)
        torch.mm(h_c, w_c.t(), out=tile)
        tile_lse, tile_z_t, tile_other = wce_epilogue(
            tile, targets[start:end], bias_f, fold, cfg.softcap, grads, cfg.want_argmax, cfg.epilogue
        )
        lse[start:end] = tile_lse
        z_target[start:end] = tile_z_t
        if max_other is not None:
            max_other[start:end] = tile_other
        if not grads:
            continue
        c = coef[start:end].unsqueeze(1)
        if need_gh:
            g = gh[start:end]
            mm_into(g, tile, w_c, accumulate=False, support=support)
            g.mul_(c)
        if need_gw:
            hc = (h_c.to(acc) * c).to(compute) if low_precision else h_c * c
            if i > 0 and low_precision and support != "addmm" and gw_scratch is None:
                gw_scratch = torch.empty(V, H, dtype=compute, device=dev)
            mm_into(gw, tile.t(), hc, accumulate=i > 0, support=support, scratch=gw_scratch)
        if need_gb:
            if low_precision:
                gb.add_(torch.mv(tile.t(), c.squeeze(1).to(compute)))
            else:
                gb.addmv_(tile.t(), c.squeeze(1))

    ce = lse.sub_(z_target)
    is_argmax = None if max_other is None else torch.gt(z_target, max_other)
    return ce, is_argmax, gh, gw, gb

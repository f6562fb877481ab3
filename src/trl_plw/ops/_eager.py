"""The eager tile loop (``impl="torch"``): the reference implementation, and the default on CPU.

Per tile: the logits into an fp32 (fp64) buffer, an in-place softmax, ``P - onehot`` and the three matmuls. On CPU
this runs at the 3-matmul floor (the row-local softmax stays in cache, and the ``[V, n]`` "vocab-major" layout lets
MKL run the projection faster), so the fused path's fewer passes would buy nothing there. On CUDA the fp32 tile and
its extra passes cost ~1.3x the GEMM floor, which is why ``impl="fused"`` is CUDA's default.
"""

from __future__ import annotations

import torch

from trl_plw.ops._gemm import gemm_support, mm_into


def _logits_into(tile, lp_tile, h_rows, w_c, bias_f, fold, cfg, support) -> None:
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
    mm_into(tile, a, b, accumulate=False, support=support, scratch=lp_tile)
    if bias_f is not None:
        torch.add(bias_f.unsqueeze(1) if vm else bias_f, tile, alpha=fold, out=tile)
    elif fold != 1.0:
        tile.mul_(fold)


def eager_pass(h, w, b, targets, coef, cfg, need_gh=False, need_gw=False, need_gb=False):
    """One pass over the scored tokens, with the contract of `trl_plw.ops.weighted_linear_ce._head_pass`."""
    M, H = h.shape
    V = w.shape[0]
    dev, acc = h.device, cfg.acc_dtype
    lp = cfg.compute_dtype != acc
    support = gemm_support(dev, cfg.compute_dtype) if lp else "addmm"
    mixed = lp and support == "addmm"
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
        target_col = tgt.unsqueeze(0) if vm else tgt.unsqueeze(1)  # the same positions, as a scatter index
        h_rows = h[start:end]
        if not lp and h_rows.dtype != acc:
            h_rows = h_rows.to(acc)

        _logits_into(tile, lp_tile, h_rows, w_c, bias_f, fold, cfg, support)
        if cfg.softcap is not None:
            tile.tanh_()  # t = tanh(y * scale / softcap)
            if sq is not None:
                torch.mul(tile, tile, out=sq)
            tile.mul_(cfg.softcap)
        z_t = tile[at]
        target_logit[start:end] = z_t
        if is_argmax is not None:
            # the largest *other* logit: hide the target, reduce, restore (no [n, V] temporary). The scatter takes
            # -inf as a kernel argument: an index_put of a Python scalar would copy it to the device every tile.
            tile.scatter_(vdim, target_col, float("-inf"))
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
            mm_into(g, d_lp if lp else d, w_c, accumulate=False, support=support)
            g.mul_(c.unsqueeze(1))
        if need_gw:
            hc = h_rows.to(cfg.compute_dtype).to(acc) if lp else h_rows
            hc = hc * c.unsqueeze(1)
            if mixed:
                mm_into(gw, d_lp.t(), hc.to(cfg.compute_dtype), accumulate=start > 0, support=support)
            else:
                # fp32 GEMM over the fp32 tile: no per-tile rounding of the product before accumulation (fast and
                # exact on CPU; on a GPU without fp32-output bf16 GEMMs the fused path is the one to use)
                mm_into(gw, d.t(), hc, accumulate=start > 0, support=support)
        if need_gb:
            if start == 0:
                torch.mv(d.t(), c, out=gb)
            else:
                gb.addmv_(d.t(), c)

    torch.log(p_target, out=ce).neg_()
    # -log(p) loses precision once p is subnormal (ce > ~87 in fp32): recompute those rows' logsumexp exactly. This
    # reads one flag back per pass (the fused path computes ce = lse - z_t and needs no such pass).
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
        _logits_into(z, lp_z, h_rows, w_c, bias_f, fold, cfg, support)
        if cfg.softcap is not None:
            z.tanh_().mul_(cfg.softcap)
        ce[idx] = torch.logsumexp(z, dim=vdim) - target_logit[idx]
    return ce, is_argmax, gh, gw, gb

"""The kernel on a CUDA device: bf16 against a float64 reference, every GEMM path, and no host sync in the tile loop.

Skipped without a GPU (``-m gpu`` selects them; `benchmarks/gpu_check.py` runs them first). What a CPU can check
of the same code (the Triton epilogue in the interpreter, the emulated torch versions, the dispatch-level sync
audit) is in test_weighted_linear_ce.py, test_kernel_versions.py and test_sync_audit.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import trl_plw.ops._gemm as gemm
import trl_plw.ops.weighted_linear_ce as wlc
from trl_plw.ops import KernelOptions, weighted_linear_cross_entropy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
IGNORE = -100


def reference(h, w, b, t, tw, softcap):
    """Full logits in float64 from the same (bf16-rounded) values."""
    logits = h.double() @ w.double().T
    if b is not None:
        logits = logits + b.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ce = F.cross_entropy(logits, t, ignore_index=IGNORE, reduction="none")
    tw = tw.double() * (t != IGNORE)
    return (tw * ce).sum() / tw.sum(), ce, logits


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make(n=3000, hdim=256, vocab=50_000, bias=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, hdim, generator=g)
    w = torch.randn(vocab, hdim, generator=g) * 0.05
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    t[::7] = IGNORE
    tw = torch.rand(n, generator=g) + 0.1
    tw[1::5] = 0
    cuda = [x.cuda() if x is not None else None for x in (h, w, b, t, tw)]
    return cuda


@pytest.fixture
def force_support(monkeypatch):
    """Force the GEMM path (`gemm_support`'s level) whatever the installed torch offers."""

    def force(level):
        if level != "probed":
            monkeypatch.setattr(gemm, "gemm_support", lambda device, dtype: level)
            for module in ("trl_plw.ops._fused", "trl_plw.ops._eager"):
                monkeypatch.setattr(f"{module}.gemm_support", lambda device, dtype: level)

    return force


@pytest.mark.parametrize("support", ["probed", "mm", "none"])
@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("softcap,bias", [(None, False), (30.0, True)])
@pytest.mark.parametrize("params", ["bf16", "fp32_autocast"])
def test_bf16_multi_tile_matches_float64(support, impl, softcap, bias, params, force_support):
    force_support(support)
    h, w, b, t, tw = make(bias=bias)
    dtype = torch.bfloat16 if params == "bf16" else torch.float32
    leaves = [x.to(dtype).requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
    opts = KernelOptions(impl=impl, memory_budget_bytes=700 * 50_000 * 2)  # ~700-row tiles: 5 tiles for 2,5xx rows
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=params == "fp32_autocast"):
        loss, stats = weighted_linear_cross_entropy(
            leaves[0], leaves[1], t, tw, bias=leaves[2] if bias else None, softcap=softcap,
            return_token_stats=True, options=opts,
        )  # fmt: skip
    loss.backward()
    # the reference sees the values the matmuls saw: inputs rounded to bf16
    ref_leaves = [x.detach().to(torch.bfloat16).double().requires_grad_() for x in leaves]
    ref_loss, ref_ce, logits = reference(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None, t, tw, softcap)
    ref_loss.backward()
    # bf16 logits carry a relative rounding of 2^-9: the loss is a mean of ~10-nat terms, so 1e-2 relative covers it,
    # and the gradients (softmax differences of those logits) likewise
    assert rel_err(loss, ref_loss) <= 1e-2
    for leaf, ref in zip(leaves, ref_leaves, strict=True):
        assert leaf.grad.dtype == dtype
        assert rel_err(leaf.grad, ref.grad) <= 3e-2
    scored = stats.scored
    assert torch.equal(scored, (t != IGNORE) & (tw != 0))
    assert (stats.ce[scored].double() - ref_ce[scored]).abs().max().item() <= 0.1
    masked = logits.detach().clone()
    rows = torch.arange(len(t), device=t.device)[scored]
    masked[rows, t[scored]] = -float("inf")
    margin = logits.detach()[rows, t[scored]] - masked[rows].amax(1)
    clear = margin.abs() > 0.1  # away from near-ties, which bf16 rounding may flip
    assert torch.equal(stats.is_argmax[scored][clear], (margin > 0)[clear])


def test_tile_loop_makes_no_host_sync_and_the_call_one():
    """The fused loop under sync debug mode "error" (any host sync raises), then the whole call under "warn": one sync
    (the scored-token count with the value checks) in the forward, none in the backward."""
    h, w, b, t, tw = make(bias=True)
    leaves = [x.to(torch.bfloat16).requires_grad_() for x in (h, w, b)]
    cfg = wlc._HeadConfig(
        logit_scale=1.0, softcap=30.0, compute_dtype=torch.bfloat16, acc_dtype=torch.float32, rows=700,
        want_argmax=True, impl="fused", epilogue="triton",
    )  # fmt: skip
    valid = t != IGNORE
    h_c, t_c = leaves[0].detach()[valid], t[valid]
    coef = torch.rand(h_c.shape[0], device="cuda")
    wlc._head_pass(h_c, leaves[1].detach(), leaves[2].detach(), t_c, coef, cfg, True, True, True)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        wlc._head_pass(h_c, leaves[1].detach(), leaves[2].detach(), t_c, coef, cfg, True, True, True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()

    normalizer = tw.sum()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss = weighted_linear_cross_entropy(
                leaves[0], leaves[1], t, tw, bias=leaves[2], reduction="sum", normalizer=normalizer,
                return_token_stats=True,
            )[0]  # fmt: skip
            forward_syncs = sum("synchroniz" in str(x.message) for x in caught)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    total_syncs = sum("synchroniz" in str(x.message) for x in caught)
    assert forward_syncs == 1, [str(x.message) for x in caught]
    assert total_syncs == 1


def test_default_is_the_fused_triton_loop():
    assert wlc._pick_impl(KernelOptions(), torch.device("cuda")) == ("fused", "triton")


def test_gemm_support_of_this_torch_is_a_bf16_path():
    level = gemm.gemm_support(torch.device("cuda"), torch.bfloat16)
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    expected = "addmm" if (major, minor) >= (2, 10) else ("mm" if (major, minor) >= (2, 8) else "none")
    assert level in gemm.GEMM_SUPPORT_LEVELS
    # recorded, not enforced beyond the table: a torch that offers more than its row of the table is fine
    assert gemm.GEMM_SUPPORT_LEVELS.index(level) <= gemm.GEMM_SUPPORT_LEVELS.index(expected), (level, expected)

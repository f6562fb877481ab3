"""Exactness and behaviour of the fused weighted linear + cross-entropy op against a full-logits reference.

Every test runs once per tile loop and layout (`LOOPS`): the eager reference in both tile layouts, and the fused loop
with its PyTorch epilogue. Under ``TRITON_INTERPRET=1`` the fused loop with the Triton epilogue runs too (on CPU, in
Triton's interpreter): ``test_triton_epilogue_runs_every_kernel_test`` starts this file that way in a subprocess.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

import trl_plw.ops
import trl_plw.ops.weighted_linear_ce as wlc
from trl_plw.ops import KernelOptions, TokenStats, weighted_linear_cross_entropy

IGNORE = -100
_OP = weighted_linear_cross_entropy
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
LOOPS = {
    "row_major": KernelOptions(impl="torch", vocab_major=False),
    "vocab_major": KernelOptions(impl="torch", vocab_major=True),
    "fused": KernelOptions(impl="fused", epilogue="torch"),
}
if TRITON_INTERPRETED:  # only the Triton loop: the others ran in the parent pytest
    LOOPS = {"fused_triton": KernelOptions(impl="fused", epilogue="triton")}
OPTION_NAMES = {f.name for f in dataclasses.fields(KernelOptions)}


@pytest.fixture(autouse=True, params=list(LOOPS))
def tile_loop(request, monkeypatch):
    """The module's ``weighted_linear_cross_entropy`` becomes the op with this loop's options, for the duration of
    the test; tuning keywords a test passes (``memory_budget_bytes=...``) are merged into those options."""
    base = LOOPS[request.param]

    def op(*args, options=None, **kw):
        tuning = {k: kw.pop(k) for k in list(kw) if k in OPTION_NAMES}
        return _OP(*args, options=dataclasses.replace(options or base, **tuning), **kw)

    monkeypatch.setitem(globals(), "weighted_linear_cross_entropy", op)
    return request.param


def test_impl_registry_and_public_api(tile_loop):
    h, w, t, tw = torch.randn(5, 4), torch.randn(11, 4), torch.randint(0, 11, (5,)), torch.rand(5)
    expected = _OP(h, w, t, tw, options=KernelOptions(impl="torch"))
    torch.testing.assert_close(weighted_linear_cross_entropy(h, w, t, tw), expected)
    assert set(wlc.IMPLEMENTATIONS) == {"torch", "fused"}
    with pytest.raises(ValueError, match=r"impl='triton'.*\['fused', 'torch'\]"):
        KernelOptions(impl="triton")
    assert trl_plw.ops.__all__ == ["KernelOptions", "TokenStats", "weighted_linear_cross_entropy"]
    assert not hasattr(wlc, "VALIDATE_VALUES") and not hasattr(wlc, "VOCAB_MAJOR_TILES")  # options are arguments


def test_default_impl_per_device():
    cpu = torch.device("cpu")
    assert wlc._pick_impl(KernelOptions(), cpu) == ("torch", "torch")
    assert wlc._pick_impl(KernelOptions(impl="fused"), cpu) == ("fused", "torch")
    assert wlc._pick_impl(KernelOptions(vocab_major=True), cpu) == ("torch", "torch")
    if not TRITON_INTERPRETED:
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            wlc._pick_impl(KernelOptions(epilogue="triton"), cpu)
    with pytest.raises(ValueError, match="vocab_major=True applies to impl='torch'"):
        KernelOptions(impl="fused", vocab_major=True)
    with pytest.raises(ValueError, match="epilogue applies to impl='fused'"):
        KernelOptions(impl="torch", epilogue="torch")


def test_old_flat_tuning_keywords_warn_and_still_work():
    h, w, t, tw = torch.randn(5, 4), torch.randn(11, 4), torch.randint(0, 11, (5,)), torch.rand(5) - 0.3
    expected = _OP(h, w, t, tw, options=KernelOptions(memory_budget_bytes=88, allow_negative_weights=True))
    with pytest.warns(FutureWarning, match=r"options=KernelOptions\(memory_budget_bytes=\.\.\., allow_neg"):
        old = _OP(h, w, t, tw, memory_budget_bytes=88, allow_negative_weights=True)
    torch.testing.assert_close(old, expected)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        _OP(h, w, t, tw, memory_budget=88)
    with pytest.raises(TypeError, match="options must be a trl_plw.ops.KernelOptions"):
        _OP(h, w, t, tw, options={"impl": "torch"})


def reference(h, w, targets, token_weights=None, *, bias=None, reduction="mean", normalizer=None, softcap=None,
              logit_scale=1.0, ignore_index=IGNORE):  # fmt: skip
    """Full-logits loss: the op must match this (computed in float64 by the tests)."""
    logits = h @ w.T
    if bias is not None:
        logits = logits + bias
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ce = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    tw = torch.ones_like(ce) if token_weights is None else token_weights.to(ce.dtype)
    tw = tw * (targets != ignore_index)
    per_token = tw * ce
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if normalizer is not None:
        return total / normalizer
    if reduction == "mean":
        return total / tw.sum() if tw.sum() != 0 else total * 0
    return total


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (elementwise relative error is meaningless for entries near 0)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_inputs(n=37, hdim=16, vocab=101, dtype=torch.float64, bias=False, seed=0, ignore_every=5, zero_every=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=g, dtype=dtype)
    w = torch.randn(vocab, hdim, generator=g, dtype=dtype) * 0.5
    b = torch.randn(vocab, generator=g, dtype=dtype) if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    if ignore_every:
        t[::ignore_every] = IGNORE
    tw = torch.rand(n, generator=g, dtype=dtype) * 2
    if zero_every:
        tw[1::zero_every] = 0
    return h, w, b, t, tw


def loss_and_grads(fn, h, w, b, t, tw, **kw):
    params = [x.detach().clone().requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
    out = fn(params[0], params[1], t, tw, bias=params[2] if b is not None else None, **kw)
    upstream = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * upstream).sum(), params)
    return out.detach(), grads


def assert_matches(kw, dtype=torch.float64, tol=1e-10, bias=False, **make_kw):
    h, w, b, t, tw = make_inputs(dtype=dtype, bias=bias, **make_kw)
    out, grads = loss_and_grads(weighted_linear_cross_entropy, h, w, b, t, tw, **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "memory_budget_bytes"}
    ref_args = [x.double() if x is not None else None for x in (h, w, b, tw)]
    ref_out, ref_grads = loss_and_grads(reference, ref_args[0], ref_args[1], ref_args[2], t, ref_args[3], **ref_kw)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(out, ref_out) <= tol, (rel_err(out, ref_out), out, ref_out)
    for g, rg, name in zip(grads, ref_grads, ("hidden", "weight", "bias"), strict=False):
        assert g.dtype == dtype
        assert rel_err(g, rg) <= tol, (name, rel_err(g, rg))


# -------------------------------------------------------------------------------------------------- exactness

TINY_TILE = 3 * 101 * 8  # 3 rows of a V=101 float64 tile: many tiles and a ragged last one


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "kw,bias",
    [
        ({}, False),
        ({}, True),
        ({"memory_budget_bytes": TINY_TILE}, True),
        ({"reduction": "sum"}, False),
        ({"reduction": "none"}, True),
        ({"reduction": "none", "memory_budget_bytes": TINY_TILE}, False),
        ({"normalizer": 7.5}, False),
        ({"reduction": "sum", "normalizer": torch.tensor(3.25)}, True),
        ({"softcap": 2.0}, True),
        ({"softcap": 1.5, "logit_scale": 0.7, "memory_budget_bytes": TINY_TILE}, True),
        ({"logit_scale": 1.7}, False),
        ({"softcap": 3.0, "reduction": "none"}, True),
    ],
)
def test_matches_full_logits(kw, bias, dtype, tol):
    assert_matches(kw, dtype=dtype, tol=tol, bias=bias)


def test_single_token_and_tile_larger_than_n():
    assert_matches({}, n=1, ignore_every=0, zero_every=0)
    assert_matches({"reduction": "none"}, n=1, ignore_every=0, zero_every=0, bias=True)
    # default budget: one tile holds all tokens
    assert_matches({"memory_budget_bytes": None}, n=5)


def test_many_tiles_each_one_row():
    assert_matches({"memory_budget_bytes": 1}, n=7, bias=True)  # rows_per_tile clamps to 1


def test_unweighted_matches_plain_cross_entropy():
    h, w, _, t, _ = make_inputs()
    ours = weighted_linear_cross_entropy(h, w, t)
    ref = F.cross_entropy(h @ w.T, t, ignore_index=IGNORE)
    assert rel_err(ours, ref) <= 1e-12


def test_rows_per_tile_respects_budget():
    assert wlc.rows_per_tile(1000, 4000 * 10) == 10
    assert wlc.rows_per_tile(1000, 4000 * 10, softcap=True) == 5
    assert wlc.rows_per_tile(1000, 6000 * 10, compute_dtype=torch.bfloat16) == 10
    assert wlc.rows_per_tile(1000, 1) == 1
    assert wlc.rows_per_tile(1000, 4000 * 200) == 192  # multiples of 64 once large


def test_negative_weights_allowed_when_asked():
    h, w, _, t, tw = make_inputs()
    tw = tw - 0.5
    assert_ref = reference(h, w, t, tw, reduction="sum")
    ours = weighted_linear_cross_entropy(h, w, t, tw, reduction="sum", allow_negative_weights=True)
    assert rel_err(ours, assert_ref) <= 1e-12


# -------------------------------------------------------------------------------------------- gradient plumbing


def test_frozen_weight_computes_no_weight_grad(monkeypatch):
    calls = []
    real = wlc._head_pass

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(wlc, "_head_pass", spy)
    h, w, b, t, tw = make_inputs(bias=True)
    h = h.requires_grad_()
    loss = weighted_linear_cross_entropy(h, w, t, tw, bias=b)
    loss.backward()
    assert w.grad is None and b.grad is None
    assert len(calls) == 1
    _, _, gh, gw, gb = calls[0]
    assert gh is not None and gw is None and gb is None
    ref_h = h.detach().clone().requires_grad_()
    reference(ref_h, w, t, tw, bias=b).backward()
    assert rel_err(h.grad, ref_h.grad) <= 1e-6


def test_no_grad_builds_no_gradients(monkeypatch):
    seen = []
    real = wlc._head_pass

    def spy(h, w, b, targets, coef, cfg, *needs):
        seen.append((coef, needs))
        return real(h, w, b, targets, coef, cfg, *needs)

    monkeypatch.setattr(wlc, "_head_pass", spy)
    h, w, b, t, tw = make_inputs(bias=True)
    params = [x.requires_grad_() for x in (h, w, b)]
    with torch.no_grad():
        for red in ("mean", "none"):
            out = weighted_linear_cross_entropy(params[0], params[1], t, tw, bias=params[2], reduction=red)
            assert not out.requires_grad
            assert rel_err(out, reference(h.detach(), w.detach(), t, tw, bias=b.detach(), reduction=red)) <= 1e-12
    assert [s[0] for s in seen] == [None, None]  # forward-only passes: no coefficients, so no gradient buffers
    # and nothing requires grad (grad mode on): same forward-only pass, no autograd graph
    out = weighted_linear_cross_entropy(h.detach(), w.detach(), t, tw)
    assert not out.requires_grad and seen[-1][0] is None


def test_all_zero_weights_give_zero_loss_and_zero_grads():
    h, w, b, t, tw = make_inputs(bias=True)
    for red, norm in (("mean", None), ("sum", None), ("sum", 4.0), ("none", None)):
        params = [x.detach().clone().requires_grad_() for x in (h, w, b)]
        out = weighted_linear_cross_entropy(
            params[0], params[1], t, torch.zeros_like(tw), bias=params[2], reduction=red, normalizer=norm
        )
        assert torch.isfinite(out).all() and (out == 0).all()
        out.sum().backward()
        for p in params:
            assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad == 0).all()


def test_all_targets_ignored():
    h, w, _, t, tw = make_inputs()
    h = h.requires_grad_()
    loss = weighted_linear_cross_entropy(h, w, torch.full_like(t, IGNORE), tw)
    assert loss.item() == 0.0
    loss.backward()
    assert (h.grad == 0).all()


def test_zero_normalizer_gives_zero_loss():
    h, w, _, t, tw = make_inputs()
    h = h.requires_grad_()
    loss = weighted_linear_cross_entropy(h, w, t, tw, reduction="sum", normalizer=torch.tensor(0.0))
    assert loss.item() == 0.0
    loss.backward()
    assert (h.grad == 0).all()


def test_tied_embeddings_accumulate_both_paths():
    vocab, hdim = 53, 12
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (4, 9))
    targets = torch.randint(0, vocab, (36,))
    tw = torch.rand(36, dtype=torch.float64)

    def run(loss_fn):
        torch.manual_seed(1)
        emb = torch.nn.Embedding(vocab, hdim).double()
        proj = torch.nn.Linear(hdim, hdim).double()
        hidden = torch.tanh(proj(emb(ids))).reshape(-1, hdim)
        loss_fn(hidden, emb.weight, targets, tw).backward()
        return emb.weight.grad, proj.weight.grad

    ours = run(lambda h, w, t, tw: weighted_linear_cross_entropy(h, w, t, tw, memory_budget_bytes=10 * vocab * 8))
    ref = run(reference)
    for a, b in zip(ours, ref, strict=True):
        assert rel_err(a, b) <= 1e-6


def test_weight_grad_accumulates_into_existing_grad():
    h, w, _, t, tw = make_inputs()
    w = w.requires_grad_()
    weighted_linear_cross_entropy(h, w, t, tw).backward()
    first = w.grad.clone()
    weighted_linear_cross_entropy(h, w, t, tw).backward()
    assert rel_err(w.grad, 2 * first) <= 1e-12


def test_retain_graph_second_backward_recomputes():
    h, w, b, t, tw = make_inputs(bias=True)
    params = [x.requires_grad_() for x in (h, w, b)]
    loss = weighted_linear_cross_entropy(params[0], params[1], t, tw, bias=params[2], softcap=2.0)
    g1 = torch.autograd.grad(loss, params, retain_graph=True)
    g2 = torch.autograd.grad(3.0 * loss, params)
    for a, b_ in zip(g1, g2, strict=True):
        assert rel_err(b_, 3 * a) <= 1e-12


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(reduction):
    h, w, b, t, tw = make_inputs(n=6, hdim=4, vocab=7, bias=True, ignore_every=4, zero_every=5)
    params = tuple(x.requires_grad_() for x in (h, w, b))

    def fn(h_, w_, b_):
        return weighted_linear_cross_entropy(
            h_, w_, t, tw, bias=b_, reduction=reduction, softcap=2.5, logit_scale=0.8, memory_budget_bytes=2 * 7 * 8
        )

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_score_zero_weight_tokens_do_not_change_loss_or_grads():
    h, w, b, t, tw = make_inputs(bias=True)
    outs = []
    for score_all in (False, True):
        params = [x.detach().clone().requires_grad_() for x in (h, w, b)]
        loss = weighted_linear_cross_entropy(params[0], params[1], t, tw, bias=params[2],
                                             score_zero_weight_tokens=score_all)  # fmt: skip
        loss.backward()
        outs.append([loss.detach()] + [p.grad for p in params])
    for a, b_ in zip(*outs, strict=True):
        assert rel_err(a, b_) <= 1e-12


# --------------------------------------------------------------------------------------------- mixed precision


def test_autocast_bf16_cpu_close_to_fp32():
    h, w, b, t, tw = make_inputs(n=64, hdim=32, vocab=211, dtype=torch.float32, bias=True)
    params = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = weighted_linear_cross_entropy(params[0], params[1], t, tw, bias=params[2], memory_budget_bytes=20_000)
    assert loss.dtype == torch.float32
    loss.backward()
    ref_params = [x.double().requires_grad_() for x in (h, w, b)]
    ref = reference(ref_params[0], ref_params[1], t, tw.double(), bias=ref_params[2])
    ref_grads = torch.autograd.grad(ref, ref_params)
    assert rel_err(loss, ref) <= 2e-2
    for p, rg in zip(params, ref_grads, strict=True):
        assert p.grad.dtype == torch.float32
        assert rel_err(p.grad, rg) <= 2e-2


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_bf16_inputs_give_bf16_grads(reduction):
    h, w, b, t, tw = make_inputs(n=48, hdim=32, vocab=150, dtype=torch.float32, bias=True)
    params = [x.detach().to(torch.bfloat16).requires_grad_() for x in (h, w, b)]
    kw = {"reduction": reduction, "softcap": 4.0}
    out = weighted_linear_cross_entropy(params[0], params[1], t, tw, bias=params[2], memory_budget_bytes=30_000, **kw)
    assert out.dtype == torch.float32
    out.sum().backward()
    # reference on the same (bf16-rounded) values, in float64
    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref = reference(ref_params[0], ref_params[1], t, tw.double(), bias=ref_params[2], **kw)
    ref_grads = torch.autograd.grad(ref.sum(), ref_params)
    assert rel_err(out, ref) <= 2e-2
    for p, rg in zip(params, ref_grads, strict=True):
        assert p.grad.dtype == torch.bfloat16
        assert rel_err(p.grad, rg) <= 2e-2


def test_large_loss_does_not_underflow():
    # target logit ~120 below the max: p_target underflows fp32, the exact logsumexp fallback must kick in
    hdim, vocab = 4, 9
    h = torch.zeros(3, hdim)
    h[:, 0] = 1.0
    w = torch.zeros(vocab, hdim)
    w[0, 0] = 120.0
    t = torch.tensor([1, 2, 0])
    stats = weighted_linear_cross_entropy(h, w, t, reduction="none", return_token_stats=True)[1]
    ref = F.cross_entropy((h @ w.T).double(), t, reduction="none")
    assert torch.isfinite(stats.ce).all()
    assert rel_err(stats.ce, ref) <= 1e-6


# ------------------------------------------------------------------------------------------------ token stats


def test_token_stats():
    h, w, b, t, tw = make_inputs(bias=True)
    n = h.shape[0]
    # construct an exact tie for token 2: duplicate the target row of W and bias at another vocab entry
    t[2] = 10
    tw[2] = 1.0
    w[11] = w[10]
    b[11] = b[10]
    # and make token 3 an unambiguous argmax
    t[3] = 20
    tw[3] = 1.0
    b[20] = 1e3
    logits = h @ w.T + b
    ref_ce = F.cross_entropy(logits, t, ignore_index=IGNORE, reduction="none")
    valid = t != IGNORE
    masked = logits.clone()
    rows = torch.arange(n)[valid]
    masked[rows, t[valid]] = -float("inf")
    ref_argmax = torch.zeros(n, dtype=torch.bool)
    ref_argmax[valid] = logits[rows, t[valid]] > masked[rows].amax(1)

    for score_all in (False, True):
        loss, stats = weighted_linear_cross_entropy(
            h, w, t, tw, bias=b, return_token_stats=True, score_zero_weight_tokens=score_all,
            memory_budget_bytes=TINY_TILE,
        )  # fmt: skip
        assert isinstance(stats, TokenStats)
        expected_scored = valid if score_all else valid & (tw != 0)
        assert stats.scored.dtype == torch.bool and torch.equal(stats.scored, expected_scored)
        assert stats.ce.dtype == torch.float32 and not stats.ce.requires_grad
        assert torch.allclose(stats.ce.double(), torch.where(expected_scored, ref_ce, 0), rtol=1e-6, atol=1e-7)
        assert torch.equal(stats.is_argmax, ref_argmax & expected_scored)
        assert not stats.is_argmax[2] and stats.is_argmax[3]  # tie counts as wrong
        assert rel_err(loss, reference(h, w, t, tw, bias=b)) <= 1e-12


def test_token_stats_with_grad_and_none_reduction():
    h, w, _, t, tw = make_inputs()
    h = h.requires_grad_()
    out, stats = weighted_linear_cross_entropy(h, w, t, tw, reduction="none", return_token_stats=True, softcap=2.0)
    assert out.shape == (h.shape[0],) and out.requires_grad
    ref_ce = F.cross_entropy(2.0 * torch.tanh((h @ w.T) / 2.0), t, ignore_index=IGNORE, reduction="none")
    assert torch.allclose(stats.ce.double(), torch.where(stats.scored, ref_ce, 0).detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(out.detach() == 0, ~stats.scored | (stats.ce == 0))


# ---------------------------------------------------------------------------------------------------- errors


def _bad_cases():
    h, w, _, t, tw = make_inputs(dtype=torch.float32)
    big = t.clone()
    big[0] = 101
    nan_w = tw.clone()
    nan_w[2] = float("nan")
    neg_w = tw.clone()
    neg_w[2] = -1.0
    return [
        ((h.unsqueeze(0), w, t, tw), {}, ValueError, "hidden"),
        ((h, w[:, :5], t, tw), {}, ValueError, "weight"),
        ((h, w.T, t, tw), {}, ValueError, "weight"),
        ((h, w, t[:-1], tw), {}, ValueError, "targets"),
        ((h, w, t.float(), tw), {}, TypeError, "targets"),
        ((h, w, t, tw[:-1]), {}, ValueError, "token_weights"),
        ((h, w, t, tw > 0), {}, TypeError, "token_weights"),
        ((h, w, t, tw), {"bias": torch.zeros(5)}, ValueError, "bias"),
        ((h, w, t, tw), {"bias": torch.zeros(101, dtype=torch.long)}, TypeError, "bias"),
        ((h, w, t, tw.to("meta")), {}, ValueError, "token_weights is on meta"),
        ((h, w, big, tw), {}, ValueError, "targets must be in"),
        ((h, w, t, nan_w), {}, ValueError, "token_weights contains NaN"),
        ((h, w, t, neg_w), {}, ValueError, "allow_negative_weights"),
        ((h, w.double(), t, tw), {}, TypeError, "hidden .* and weight"),
        ((h, w, t, tw), {"reduction": "avg"}, ValueError, "reduction"),
        ((h, w, t, tw), {"reduction": "none", "normalizer": 2.0}, ValueError, "normalizer"),
        ((h, w, t, tw), {"normalizer": -1.0}, ValueError, "normalizer"),
        ((h, w, t, tw), {"normalizer": torch.tensor(float("nan"))}, ValueError, "normalizer"),
        ((h, w, t, tw), {"normalizer": torch.ones(2)}, ValueError, "normalizer"),
        ((h, w, t, tw), {"softcap": 0.0}, ValueError, "softcap"),
        ((h, w, t, tw), {"logit_scale": float("inf")}, ValueError, "logit_scale"),
        ((h, w, t, tw), {"memory_budget_bytes": 0}, ValueError, "memory_budget_bytes"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_raise(case):
    args, kw, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match=match):
        weighted_linear_cross_entropy(*args, **kw)


def test_validate_false_skips_value_checks():
    h, w, _, t, tw = make_inputs(dtype=torch.float32)
    tw[0] = -1.0
    loss = weighted_linear_cross_entropy(h, w, t, tw, reduction="sum", validate=False)
    assert torch.isfinite(loss)


def test_global_normalizer_over_micro_batches_equals_one_batch():
    # the trainer's pattern: each micro-batch uses reduction="sum" with the global sum(w) as normalizer
    h, w, b, t, tw = make_inputs(n=40, bias=True)
    denom = (tw * (t != IGNORE)).sum()
    whole = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    weighted_linear_cross_entropy(whole[0], whole[1], t, tw, bias=whole[2]).backward()
    parts = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    total = 0.0
    for sl in (slice(0, 13), slice(13, 40)):
        loss = weighted_linear_cross_entropy(
            parts[0][sl], parts[1], t[sl], tw[sl], bias=parts[2], reduction="sum", normalizer=denom
        )
        loss.backward()
        total += loss.item()
    ref = reference(h, w, t, tw, bias=b)
    assert abs(total - ref.item()) <= 1e-12 * abs(ref.item())
    for a, b_ in zip(parts, whole, strict=True):
        assert rel_err(a.grad, b_.grad) <= 1e-12


def test_signature_written_once_and_checks_split_by_concern():
    """The op's parameter list exists once: no function in trl_plw.ops takes it on (a forwarding layer would repeat
    at least half of it), the tuning knobs live only in KernelOptions, and each input check is a short function
    with few positional parameters (one concern each, not one long list of everything)."""
    import inspect

    import trl_plw.ops._eager
    import trl_plw.ops._fused

    public = inspect.signature(_OP).parameters
    math_names = {name for name, p in public.items() if p.kind is not p.VAR_KEYWORD}
    assert math_names.isdisjoint(OPTION_NAMES) and "options" in math_names
    for module in (wlc, trl_plw.ops._eager, trl_plw.ops._fused):
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            # dunder names: torch.compile's resume functions, injected into the module by the compile test
            if fn is _OP or fn.__module__ != module.__name__ or name.startswith("__"):
                continue
            shared = math_names & set(inspect.signature(fn).parameters)
            assert len(shared) < len(math_names) / 2, f"{module.__name__}.{name} repeats the op's signature: {shared}"
    checks = [fn for name, fn in inspect.getmembers(wlc, inspect.isfunction) if name.startswith("_check")]
    assert len(checks) >= 4
    for fn in checks:
        positional = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        assert len(positional) <= 5, f"{fn.__name__} takes {len(positional)} positional parameters"
        assert len(inspect.getsource(fn).splitlines()) <= 40, f"{fn.__name__} is longer than 40 lines"

"""The traffic model (benchmarks/roofline.py) on the meta device: passes over the tile, and the predicted ratio to the
3-GEMM floor. A change that adds a pass over ``[n, V]`` to the fused loop fails here, on a CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import roofline  # noqa: E402


@pytest.mark.parametrize("head,expected", [("plain", 6.0), ("softcap", 6.0), ("bias", 7.0)])
def test_fused_loop_moves_at_most_eight_tiles_of_traffic(monkeypatch, head, expected):
    """Fused loop, bf16, statistics on, two tiles: the logits GEMM writes each tile once, the epilogue reads it twice
    and writes it once, the two gradient GEMMs read it once each: 6 bf16 tile-sizes (the spec allows 8). Softcapping
    and logit scaling happen in the epilogue's registers; a head bias adds its gradient's GEMV, one more read."""
    import torch

    hdim, vocab, n = 64, 1000, 512
    real = roofline.weighted_linear_cross_entropy

    def with_head(h, w, t, tw, **kw):
        if head == "softcap":
            kw.update(softcap=30.0, logit_scale=0.5)
        if head == "bias":
            kw["bias"] = torch.empty(w.shape[0], dtype=w.dtype, device=w.device, requires_grad=True)
        return real(h, w, t, tw, **kw)

    monkeypatch.setattr(roofline, "weighted_linear_cross_entropy", with_head)
    trace, rows = roofline.trace_head(hdim, vocab, n, impl="fused", budget=300 * vocab * 2)
    assert rows == 300  # room for 300 rows: two balanced tiles of 256
    passes = roofline.tile_passes(trace, n, vocab)
    assert passes <= 8, roofline.Trace(trace.ops).by_kind()
    assert passes == pytest.approx(expected)


def test_eager_loop_is_seen_to_move_more():
    """The same count on the eager loop (fp32 tile, in-place softmax, a bf16 copy): the test can tell them apart."""
    trace, _ = roofline.trace_head(64, 1000, 512, impl="torch", budget=300 * 1000 * 6)
    assert roofline.tile_passes(trace, 512, 1000) > 8


def test_predicted_ratio_at_the_anchor_shapes():
    """The model's estimate for the fused loop on an H100 (989 TFLOP/s, 3.35 TB/s) at the 8k-token anchors stays within
    1.15x of the floor, and below the eager loop's; the 248k-vocabulary anchor is reported, not bounded."""
    for shape in ("h4096-v152k", "h4096-v128k"):
        fused = roofline.predict(shape, "H100", "fused", roofline.GEMM_EFFICIENCY, roofline.MEM_EFFICIENCY)
        eager = roofline.predict(shape, "H100", "torch", roofline.GEMM_EFFICIENCY, roofline.MEM_EFFICIENCY)
        assert fused["ratio"] <= 1.15, fused["ratio"]
        assert fused["tile_passes"] == pytest.approx(6.0)
        assert eager["ratio"] > fused["ratio"]
    wide = roofline.predict("h2048-v248k", "H200", "fused", roofline.GEMM_EFFICIENCY, roofline.MEM_EFFICIENCY)
    assert 1.0 < wide["ratio"] < 1.3


def test_floor_is_three_gemms():
    floor = roofline.trace_floor(64, 1000, 512)
    assert len(floor.ops) == 3 and all(op.flops == 2 * 64 * 1000 * 512 for op in floor.ops)

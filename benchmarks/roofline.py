#!/usr/bin/env python
"""A traffic model of the weighted head that runs anywhere: trace one call on the ``meta`` device, count FLOPs and
bytes per op, and predict its time on a GPU against the 3-GEMM floor. An estimate, not a measurement.

What is traced: one call of `trl_plw.ops.weighted_linear_cross_entropy` at an anchor shape (bf16 inputs, every
token scored, training statistics on), forward and backward, with the CUDA path's settings (the device's default
tile budget, fp32-output GEMMs as on torch >= 2.10, or the eager loop for ``--impl torch``); and the floor:
``F.linear`` forward and backward on the same tensors (the three GEMMs of any fwd+bwd at their real shapes).
Tensors on ``meta`` have shapes and dtypes but no values, so the trace sees every aten op with its operands; the one
host read of the call (the scored-token count) is answered with N, and the eager loop's underflow check with "none".

The model, per op: ``time = max(FLOPs / (peak_tflops * gemm_efficiency), bytes / (peak_tb_s * mem_efficiency))``,
with FLOPs = 2MNK for matrix products (0 elsewhere) and bytes = every tensor operand read plus every output written
(in-place ops read and write their target; views move nothing). The fused epilogue is one opaque op whose traffic
is its declared passes over the tile (`trl_plw.ops._epilogue.EPILOGUE_TILE_PASSES`: 2 reads, 1 write). Ops run one
after another (no overlap between a GEMM and the elementwise work around it), launch latency is ignored, and L2 hits
are not modelled: the prediction for small elementwise ops is pessimistic, for large tiles about right.

Usage::

    python benchmarks/roofline.py                      # anchor shapes on H100 and H200, fused and eager loops
    python benchmarks/roofline.py --device "B200:2250:8.0:192" --shapes h4096-v152k

Device constants: ``name:peak bf16 dense TFLOP/s:peak TB/s:memory GB`` (the memory sets the default tile budget).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import trl_plw.ops._gemm as gemm  # noqa: E402
import trl_plw.ops.weighted_linear_ce as wlc  # noqa: E402
from trl_plw.ops import KernelOptions, weighted_linear_cross_entropy  # noqa: E402
from trl_plw.ops._epilogue import EPILOGUE_TILE_PASSES  # noqa: E402
from trl_plw.ops._tiling import balanced_tiles  # noqa: E402

ANCHOR_SHAPES = {  # name: (H, V, N), as benchmarks/loss_head.py runs them on a GPU
    "h4096-v152k": (4096, 151_936, 8192),
    "h4096-v128k": (4096, 128_256, 8192),
    "h2048-v248k": (2048, 248_320, 16384),
}
DEVICES = {  # name: (bf16 dense TFLOP/s, TB/s, memory GB), from the vendors' data sheets (SXM parts)
    "H100": (989.0, 3.35, 80.0),
    "H200": (989.0, 4.8, 141.0),
}
GEMM_EFFICIENCY = 0.8
"""Fraction of peak a large bf16 GEMM reaches: cuBLAS on an H200 here, 788 TFLOP/s of 989 (device tool notes)."""
MEM_EFFICIENCY = 0.85
"""Fraction of peak bandwidth a streaming kernel reaches: a copy on an H200 here, 4.0-4.3 TB/s of 4.8."""

_VIEWS = {
    "view", "_unsafe_view", "t", "transpose", "permute", "slice", "select", "unsqueeze", "squeeze", "expand",
    "as_strided", "alias", "detach", "reshape", "_reshape_alias", "lift_fresh", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "_to_copy_noop",
}  # fmt: skip
_GEMMS = {"mm", "addmm", "bmm", "mv", "addmv", "dot", "linear"}
_INDEXING = {
    "index", "index_put", "index_put_", "_index_put_impl_", "gather", "scatter", "scatter_", "scatter_add",
    "scatter_add_", "index_select", "index_copy", "index_copy_",
}  # fmt: skip
"""Ops that touch only the indexed elements of their big operand: counted by the index's size, not the operand's."""


@dataclass
class OpCost:
    name: str
    flops: float
    bytes: float
    tile_bytes: float = 0.0  # traffic on tensors of at least a tile's size ([n, V])


@dataclass
class Trace:
    ops: list[OpCost] = field(default_factory=list)

    def time_s(self, tflops: float, tb_s: float, gemm_eff: float = GEMM_EFFICIENCY, mem_eff: float = MEM_EFFICIENCY):
        return sum(max(op.flops / (tflops * 1e12 * gemm_eff), op.bytes / (tb_s * 1e12 * mem_eff)) for op in self.ops)

    def by_kind(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for op in self.ops:
            row = out.setdefault(op.name, {"calls": 0, "flops": 0.0, "bytes": 0.0, "tile_bytes": 0.0})
            row["calls"] += 1
            row["flops"] += op.flops
            row["bytes"] += op.bytes
            row["tile_bytes"] += op.tile_bytes
        return out


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _tensors(x) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _gemm_flops(name: str, args, out) -> float:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name in ("mm", "addmm"):
        a, b = tensors[-2], tensors[-1]
        return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    if name in ("mv", "addmv"):
        a = tensors[-2]
        return 2.0 * a.shape[0] * a.shape[1]
    if name == "dot":
        return 2.0 * tensors[0].numel()
    return 0.0


class Recorder(TorchDispatchMode):
    """Records each aten op's FLOPs and bytes; answers host reads on meta tensors (which have no values).

    A flat buffer of whole ``V``-rows that the op allocates (``empty([k * V])``) is a tile buffer; traffic on any tensor
    over its storage (the ``[n, V]`` tile, its transpose) is also summed apart, so a test can pin the passes over tiles.
    """

    def __init__(self, vocab: int, reads: dict[str, int]):
        super().__init__()
        self.trace = Trace()
        self.vocab = vocab
        # storage addresses (the caller may see an output in another TensorImpl, never with another storage); the
        # tensors are kept alive so that no later allocation can reuse an address
        self.buffers: set[int] = set()
        self._alive: list[torch.Tensor] = []
        self.reads = reads

    def is_tile(self, t: torch.Tensor) -> bool:
        return t.untyped_storage()._cdata in self.buffers

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":  # a host read: meta tensors hold no value, so answer it
            return False if args[0].dtype == torch.bool else self.reads["scalar"]  # no underflow; N tokens scored
        out = func(*args, **kwargs)
        if name == "empty" and out.dim() == 1 and out.numel() > self.vocab and out.numel() % self.vocab == 0:
            self.buffers.add(out.untyped_storage()._cdata)
            self._alive.append(out)
        if name in _VIEWS:
            return out
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        outputs = [t for t in _tensors(out) if not any(t is i for i in inputs)]
        if name == "wce_epilogue":
            tile, want_grad = args[0], args[5]
            passes = EPILOGUE_TILE_PASSES["triton"] if want_grad else {"read": 1, "write": 0}
            tile_bytes = _nbytes(tile) * (passes["read"] + passes["write"])
            small = sum(_nbytes(t) for t in inputs[1:]) + sum(_nbytes(t) for t in _tensors(out))
            self.trace.ops.append(OpCost(name, 0.0, tile_bytes + small, tile_bytes))
            return out
        if name in _INDEXING:  # reads and writes as many elements as the index holds, of the big operand
            index = max((t.numel() for t in inputs if not t.is_floating_point() or t.numel() < inputs[0].numel()),
                        default=0)  # fmt: skip
            element = inputs[0].element_size() if inputs else 4
            moved = 2 * index * element + sum(_nbytes(t) for t in inputs[1:] if t.numel() < inputs[0].numel())
            self.trace.ops.append(OpCost(name, 0.0, float(moved), 0.0))
            return out
        written = [kwargs["out"]] if isinstance(kwargs.get("out"), torch.Tensor) else []
        read = [t for t in _tensors(args) if t.numel() > 0]  # an out= tensor is written, not read
        if name.endswith("_") and read:
            written.append(read[0])
        operands = read + [t for t in outputs if not any(t is w for w in written)] + written
        total = sum(_nbytes(t) for t in operands)
        tile = sum(_nbytes(t) for t in operands if self.is_tile(t))
        flops = _gemm_flops(name, args, out) if name in _GEMMS else 0.0
        self.trace.ops.append(OpCost(name, flops, float(total), float(tile)))
        return out


def cuda_budget(memory_gb: float) -> int:
    """The fused loop's default tile budget on a CUDA device of this memory (`default_memory_budget`)."""
    total = int(memory_gb * 1e9)
    return int(min(max(total // 64, 256 << 20), 4096 << 20))


@contextlib.contextmanager
def cuda_path_on_meta():
    """On meta, the GEMM probe answers as torch >= 2.10 on CUDA does, and `default_memory_budget` is not consulted
    (the caller passes the budget)."""
    saved = dict(gemm._SUPPORT_CACHE)
    gemm._SUPPORT_CACHE[(str(torch.device("meta")), torch.bfloat16)] = "addmm"
    try:
        yield
    finally:
        gemm._SUPPORT_CACHE.clear()
        gemm._SUPPORT_CACHE.update(saved)


def trace_head(hdim: int, vocab: int, n: int, *, impl: str, budget: int, stats: bool = True) -> tuple[Trace, int]:
    """One forward + backward of the weighted head on meta; returns the trace and the tile rows used."""
    h = torch.empty(n, hdim, dtype=torch.bfloat16, device="meta", requires_grad=True)
    w = torch.empty(vocab, hdim, dtype=torch.bfloat16, device="meta", requires_grad=True)
    t = torch.empty(n, dtype=torch.long, device="meta")
    tw = torch.empty(n, dtype=torch.float32, device="meta")
    epilogue = "triton" if impl == "fused" else None
    options = KernelOptions(impl=impl, memory_budget_bytes=budget, vocab_major=False if impl == "torch" else None,
                            epilogue=epilogue, validate=False)  # fmt: skip
    rows = []
    real_pass = wlc.IMPLEMENTATIONS[impl]

    def spy(h_, w_, b_, t_, coef, cfg, *needs):
        rows.append(cfg.rows)
        return real_pass(h_, w_, b_, t_, coef, cfg, *needs)

    with cuda_path_on_meta(), _patched(wlc.IMPLEMENTATIONS, impl, spy), _no_triton_check():
        with Recorder(vocab, {"scalar": n}) as rec:
            loss = weighted_linear_cross_entropy(h, w, t, tw, return_token_stats=stats, options=options)
            (loss[0] if stats else loss).backward()
    return rec.trace, rows[0]


def trace_floor(hdim: int, vocab: int, n: int) -> Trace:
    """``F.linear`` forward and backward with a given logits gradient: the 3 GEMMs, nothing else."""
    h = torch.empty(n, hdim, dtype=torch.bfloat16, device="meta", requires_grad=True)
    w = torch.empty(vocab, hdim, dtype=torch.bfloat16, device="meta", requires_grad=True)
    grad = torch.empty(n, vocab, dtype=torch.bfloat16, device="meta")
    with Recorder(vocab, {"scalar": n}) as rec:
        F.linear(h, w).backward(grad)
    rec.trace.ops = [op for op in rec.trace.ops if op.flops > 0]  # the GEMMs (autograd's bookkeeping aside)
    return rec.trace


@contextlib.contextmanager
def _patched(mapping, key, value):
    saved = mapping[key]
    mapping[key] = value
    try:
        yield
    finally:
        mapping[key] = saved


@contextlib.contextmanager
def _no_triton_check():
    """`_pick_impl` refuses the Triton epilogue off CUDA (it would need the interpreter); on meta nothing runs it."""
    import trl_plw.ops._epilogue as epi

    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield epi
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def tile_passes(trace: Trace, n_tokens: int, vocab: int) -> float:
    """Traffic on tile tensors, in units of one bf16 ``[N, V]`` (all tiles together, so a ragged last tile counts by its
    size): 6 for the fused loop (GEMM write, epilogue 2 reads + 1 write, 2 GEMM reads)."""
    return sum(op.tile_bytes for op in trace.ops) / (n_tokens * vocab * 2)


def predict(shape: str, device: str, impl: str, gemm_eff: float, mem_eff: float) -> dict:
    hdim, vocab, n = ANCHOR_SHAPES[shape]
    tflops, tb_s, memory_gb = DEVICES[device]
    trace, rows = trace_head(hdim, vocab, n, impl=impl, budget=cuda_budget(memory_gb))
    floor = trace_floor(hdim, vocab, n)
    ours_s = trace.time_s(tflops, tb_s, gemm_eff, mem_eff)
    floor_s = floor.time_s(tflops, tb_s, gemm_eff, mem_eff)
    if impl == "fused":
        bounds = balanced_tiles(n, rows)
        tiles, rows = len(bounds), max(end - start for start, end in bounds)
    else:
        tiles, rows = math.ceil(n / min(rows, n)), min(rows, n)
    return {
        "shape": shape, "device": device, "impl": impl, "rows_per_tile": rows, "tiles": tiles,
        "ours_ms": ours_s * 1e3, "floor_ms": floor_s * 1e3, "ratio": ours_s / floor_s,
        "tile_passes": tile_passes(trace, n, vocab),
        "by_op": trace.by_kind(),
    }  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(ANCHOR_SHAPES), help=f"comma list of {list(ANCHOR_SHAPES)}")
    p.add_argument("--device", action="append", default=None,
                   help="NAME or NAME:TFLOPS:TBS:GB (repeatable); default: H100 and H200")  # fmt: skip
    p.add_argument("--impl", default="fused,torch", help="tile loops to model: fused, torch (the eager loop)")
    p.add_argument("--gemm-efficiency", type=float, default=GEMM_EFFICIENCY)
    p.add_argument("--mem-efficiency", type=float, default=MEM_EFFICIENCY)
    p.add_argument("--json", default=None, help="write the predictions (with per-op totals) here")
    args = p.parse_args(argv)
    devices = []
    for spec in args.device or list(DEVICES):
        if ":" in spec:
            name, tflops, tbs, gb = spec.split(":")
            DEVICES[name] = (float(tflops), float(tbs), float(gb))
            spec = name
        if spec not in DEVICES:
            p.error(f"unknown device {spec!r}; give NAME:TFLOPS:TBS:GB")
        devices.append(spec)
    rows = []
    for shape in args.shapes.split(","):
        for device in devices:
            for impl in args.impl.split(","):
                rows.append(predict(shape, device, impl, args.gemm_efficiency, args.mem_efficiency))
    print(
        f"ESTIMATE (traffic model, meta-device trace; GEMMs at {args.gemm_efficiency:.0%} of peak, memory at "
        f"{args.mem_efficiency:.0%}; no overlap, no L2): fwd+bwd of the weighted head, bf16, statistics on.\n"
    )
    print("| shape | device | loop | tiles x rows | tile passes | predicted ms | floor ms | ratio to floor |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        loop = "fused (Triton epilogue)" if r["impl"] == "fused" else "eager (fp32 tile)"
        print(
            f"| {r['shape']} | {r['device']} | {loop} | {r['tiles']} x {r['rows_per_tile']} | "
            f"{r['tile_passes']:.1f} | {r['ours_ms']:.1f} | {r['floor_ms']:.1f} | **{r['ratio']:.3f}** |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The CPU kernel benchmark before and after the fused-epilogue change, in one run.

``ours_before`` is `trl_plw/ops/weighted_linear_ce.py` as of commit 26032e0 (the last one before the change), read
with ``git show`` and loaded as a module of its own, so both versions are timed in the same process, interleaved
repetition by repetition (benchmarks/loss_head.py rotates the method order every repetition, so background load
hits both alike). ``ours`` is today's default on CPU (the eager loop), ``ours_fused`` today's fused loop with its
PyTorch epilogue (what a CPU runs when ``impl="fused"`` is forced; Triton is for GPUs), ``matmul`` the bare
``h @ W.T`` (three of them: the floor the earlier CPU results used) and ``floor`` ``F.linear`` forward + backward.

Usage (from the repository root): ``python docs/results/loss-head-cpu-2026-12-04/before_after.py [loss_head.py args]``
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
BEFORE = "26032e0"
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "src"))

import loss_head  # noqa: E402

from trl_plw.ops import KernelOptions, weighted_linear_cross_entropy  # noqa: E402


def load_before():
    source = subprocess.run(
        ["git", "show", f"{BEFORE}:src/trl_plw/ops/weighted_linear_ce.py"], cwd=REPO, capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "wlce_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("wlce_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["wlce_before"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.weighted_linear_cross_entropy


before = load_before()
loss_head.METHODS["ours_before"] = lambda h, W, t, w, denom: before(h, W, t, w)
loss_head.METHODS["ours_fused"] = lambda h, W, t, w, denom: weighted_linear_cross_entropy(
    h, W, t, w, options=KernelOptions(impl="fused")
)

if __name__ == "__main__":
    args = sys.argv[1:] or []
    if "--methods" not in args:
        args += ["--methods", "ours,ours_before,ours_fused,floor,matmul"]
    loss_head.main(["--device", "cpu", "--dtype", "fp32", *args])

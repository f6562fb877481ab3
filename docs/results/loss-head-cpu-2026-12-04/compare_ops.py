#!/usr/bin/env python
"""Which ATen ops the CPU default (eager loop) and the pre-change kernel (26032e0) dispatch for one fwd+bwd.

A timing difference of a few percent on a shared 2-core machine can be noise or real work; this separates the two:
it records every op at the dispatcher (`TorchDispatchMode`) with its first two operand shapes, for both versions on
the SmolLM2 shape of the benchmark, and prints the ops whose counts differ.

Usage (from the repository root): ``python docs/results/loss-head-cpu-2026-12-04/compare_ops.py``
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import before_after  # noqa: E402  (loads the 26032e0 kernel)

from trl_plw.ops import weighted_linear_cross_entropy  # noqa: E402


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)][:2]
        self.counts[f"{func} {shapes}"] += 1
        return func(*args, **(kwargs or {}))


def count(fn, h, w, t, tw) -> collections.Counter:
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    counter = OpCounter()
    with counter:
        fn(h, w, t, tw).backward()
    return counter.counts


def main() -> None:
    torch.manual_seed(0)
    n, hidden, vocab = 3072, 576, 49152
    h, w = torch.randn(n, hidden), torch.randn(vocab, hidden) * 0.02
    t, tw = torch.randint(0, vocab, (n,)), torch.rand(n)
    now, before = count(weighted_linear_cross_entropy, h, w, t, tw), count(before_after.before, h, w, t, tw)
    print(f"ops dispatched: now {sum(now.values())}, before {sum(before.values())}")
    big = [k for k in now | before if "49152" in k]
    print(f"ops on a [*, V] operand: now {sum(now[k] for k in big)}, before {sum(before[k] for k in big)}")
    print("ops whose counts differ (now, before, op [first two operand shapes]):")
    for key in sorted(now | before):
        if now[key] != before[key]:
            print(f"  {now[key]:4d} {before[key]:4d}  {key}")


if __name__ == "__main__":
    main()

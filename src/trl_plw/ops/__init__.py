"""Fused kernels for the weighted LM head (no TRL imports here: the ops depend on torch only).

The public API is :func:`weighted_linear_cross_entropy`, its :class:`TokenStats` and its :class:`KernelOptions`.
Tiling helpers (``rows_per_tile``, ``default_memory_budget``) and the implementation registry (``IMPLEMENTATIONS``)
live in `trl_plw.ops.weighted_linear_ce` for benchmarks and tests.
"""

from .weighted_linear_ce import KernelOptions, TokenStats, weighted_linear_cross_entropy

__all__ = ["KernelOptions", "TokenStats", "weighted_linear_cross_entropy"]

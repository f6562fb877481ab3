"""Fused kernels for the weighted LM head (no TRL imports here: the ops depend on torch only)."""

from .weighted_linear_ce import TokenStats, default_memory_budget, rows_per_tile, weighted_linear_cross_entropy

__all__ = ["TokenStats", "default_memory_budget", "rows_per_tile", "weighted_linear_cross_entropy"]

"""How many tokens go into one ``[n, V]`` tile, and where the tiles start and end.

The tile is the only buffer of the op whose size the caller controls (``memory_budget_bytes``); everything else is
``[N, H]``, ``[V, H]`` or smaller. Two layouts need different byte counts per row:

* the eager reference (``impl="torch"``) keeps an fp32 (fp64) tile, plus a ``tanh^2`` buffer with softcapping and a
  low-precision copy when the matmuls run in bf16/fp16 (`rows_per_tile`);
* the fused path (``impl="fused"``) keeps one tile in the matmul dtype (bf16 under autocast, as ``nn.Linear``
  writes its logits) that the epilogue overwrites with the logits gradient; the PyTorch epilogue (used where Triton
  is not) also needs fp32 temporaries, which are counted so the budget stays a bound (`fused_rows_per_tile`).
"""

from __future__ import annotations

import math

import torch

_MiB = 1 << 20
_CPU_DEFAULT_BUDGET = 256 * _MiB
TILE_ROW_ALIGN = 128
"""Fused-path tiles hold a multiple of this many rows where they can (the GEMMs' M/K tile size on GPUs)."""
TORCH_EPILOGUE_TEMPORARIES = 3
"""fp32 ``[n, V]`` temporaries of the PyTorch epilogue (`trl_plw.ops._epilogue.epilogue_torch`): the logits in
the accumulation dtype, ``exp(z - lse)``, and ``tanh`` with softcapping."""


def default_memory_budget(device: torch.device, weight_grad_bytes: int | None = None) -> int:
    """Bytes the per-tile buffers may use when ``memory_budget_bytes`` is None.

    CPU: 1/8 of the fp32 weight-gradient buffer (``V * H * 4``, which any trainable head needs anyway), clamped to
    [16 MiB, 256 MiB]; so the tiles add at most ~12% to the gradient memory, and for large heads the tiles are big
    enough (>= 256 rows) that the ``grad_W += D.T @ h`` accumulation stays compute-bound. CUDA: 1/64 of the device
    memory, clamped to [256 MiB, 4 GiB] (1.25 GiB on an 80 GB GPU, 2.2 GiB on an H200): with bf16 tiles that is
    ~4,000 rows of a 152k vocabulary on an 80 GB GPU, so 8k tokens take two tiles and ``grad_W`` is read and
    written in fp32 once per tile, not once per few hundred rows.
    """
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return int(min(max(total // 64, 256 * _MiB), 4096 * _MiB))
    if weight_grad_bytes is None:
        return _CPU_DEFAULT_BUDGET
    return int(min(max(weight_grad_bytes // 8, 16 * _MiB), _CPU_DEFAULT_BUDGET))


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def rows_per_tile(
    vocab_size: int,
    memory_budget_bytes: int,
    *,
    acc_dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float32,
    softcap: bool = False,
) -> int:
    """Eager path: tokens per tile so that the tile buffers (``[n, V]`` accumulator tile, its low-precision copy when
    the matmuls run in bf16/fp16, the ``tanh^2`` buffer with softcapping) fit in ``memory_budget_bytes``."""
    per_row = vocab_size * _element_size(acc_dtype) * (2 if softcap else 1)
    if compute_dtype != acc_dtype:
        per_row += vocab_size * _element_size(compute_dtype)
    rows = max(1, int(memory_budget_bytes) // per_row)
    for step in (64, 16):  # matmul-friendly sizes
        if rows >= 2 * step:
            return rows - rows % step
    return rows


def fused_rows_per_tile(
    vocab_size: int,
    memory_budget_bytes: int,
    *,
    tile_dtype: torch.dtype,
    acc_dtype: torch.dtype,
    torch_epilogue: bool,
) -> int:
    """Fused path: the largest tile (in rows) whose buffers fit in ``memory_budget_bytes``.

    One ``[n, V]`` tile in ``tile_dtype`` (the matmul dtype); with the PyTorch epilogue also its fp32 temporaries
    (`TORCH_EPILOGUE_TEMPORARIES`). At least one row.
    """
    per_row = vocab_size * _element_size(tile_dtype)
    if torch_epilogue:
        per_row += vocab_size * _element_size(acc_dtype) * TORCH_EPILOGUE_TEMPORARIES
    return max(1, int(memory_budget_bytes) // per_row)


def balanced_tiles(m: int, max_rows: int, align: int = TILE_ROW_ALIGN) -> list[tuple[int, int]]:
    """Split ``m`` rows into as few tiles as ``max_rows`` allows, of (nearly) equal size.

    Equal tiles keep every GEMM's M (and the ``grad_W`` GEMM's K) large: 8,192 tokens with room for 7,000 rows give
    two tiles of 4,096, not 7,000 + 1,192. The common size is rounded up to a multiple of ``align`` when that still
    fits in ``max_rows``; the last tile takes the remainder.
    """
    if m <= 0:
        return []
    count = math.ceil(m / max_rows)
    rows = math.ceil(m / count)
    aligned = math.ceil(rows / align) * align
    if aligned <= max_rows:
        rows = aligned
    return [(start, min(start + rows, m)) for start in range(0, m, rows)]

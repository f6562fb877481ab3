"""Low-precision GEMMs with a float32 result, on whatever torch version is installed.

The head's gradients accumulate in fp32 while its matmuls run in bf16/fp16 (as under autocast). How a bf16 GEMM
can deliver an fp32 result depends on the torch version, and the op asks the installed torch, once per device and
dtype, with exactly the calls it will make (`gemm_support`):

=============  ==========================================  ===========================================
torch          ``mm(a, b, out_dtype=fp32)``                 ``addmm(c_fp32, a, b, out_dtype=fp32, out=c)``
=============  ==========================================  ===========================================
2.6-2.7        no such argument (TypeError)                 no such argument
2.8-2.9        works on CUDA                                rejected: "self and mat2 must have the same dtype"
>= 2.10        works on CUDA                                works on CUDA (pytorch#167931)
any, CPU       not implemented for CPU                      not implemented for CPU
=============  ==========================================  ===========================================

Each level gets a path that runs only low-precision GEMMs (never an fp32 GEMM over bf16 data, which is an SGEMM
on GPUs: ~15x slower without TF32):

* ``"addmm"``: fp32 out and fp32 accumulation straight from the GEMM.
* ``"mm"``: fp32 out for a first product; an accumulation goes through a low-precision scratch plus an fp32 ``add_``.
* ``"none"``: every product goes through a low-precision scratch, then ``copy_``/``add_`` into fp32.

The scratch route rounds each tile's product to bf16 once before the fp32 sum, which is what autocast's own
backward does for every micro-batch; with the usual 1-2 tiles per micro-batch the difference is immaterial.
"""

from __future__ import annotations

import torch

GEMM_SUPPORT_LEVELS = ("addmm", "mm", "none")
_SUPPORT_CACHE: dict[tuple[str, torch.dtype], str] = {}


def gemm_support(device: torch.device, dtype: torch.dtype) -> str:
    """Which fp32-output GEMM calls work for ``dtype`` inputs on ``device``: ``"addmm"``, ``"mm"`` or ``"none"``.

    Probed once per (device, dtype) with 2x2 tensors, by the same calls (and keyword forms) the tile loop makes.
    """
    key = (str(device), dtype)
    if key not in _SUPPORT_CACHE:
        a = torch.zeros(2, 2, dtype=dtype, device=device)
        acc = torch.zeros(2, 2, dtype=torch.float32, device=device)
        level = "none"
        try:
            torch.mm(a, a, out_dtype=torch.float32, out=acc)
            level = "mm"
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            level = "addmm"
        except (RuntimeError, TypeError):  # NotImplementedError is a RuntimeError
            pass
        _SUPPORT_CACHE[key] = level
    return _SUPPORT_CACHE[key]


def mm_into(
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    accumulate: bool,
    support: str,
    scratch: torch.Tensor | None = None,
) -> None:
    """``out (+)= a @ b`` with ``out`` in fp32/fp64 and ``a``, ``b`` in ``out``'s dtype or in bf16/fp16.

    ``support``: `gemm_support` for ``a``'s dtype. ``scratch``: an optional buffer of ``out``'s shape in ``a``'s dtype
    for the products that cannot be written in fp32 directly (a temporary otherwise).
    """
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    if support == "addmm" or (support == "mm" and not accumulate):
        if accumulate:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
        return
    prod = torch.mm(a, b, out=scratch) if scratch is not None else torch.mm(a, b)
    if accumulate:
        out.add_(prod)
    else:
        out.copy_(prod)

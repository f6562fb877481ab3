"""The fused per-tile epilogue: everything between the logits GEMM and the two gradient GEMMs, in one op.

Given a tile ``Y = h_tile @ W.T`` (``[n, V]``, in the matmul dtype, as ``nn.Linear`` writes it), the epilogue
computes, per row ``i`` with target ``t_i``::

    u   = fold * Y + bias              # fold = logit_scale (or logit_scale / softcap with softcapping)
    z   = softcap * tanh(u)  or  u     # the logits the loss sees
    lse = logsumexp(z)                 # ce = lse - z[t]: exact, also where p[t] underflows
    z_t = z[t]
    max_other = max over v != t of z   # only with want_argmax: is_argmax = z_t > max_other (ties are wrong)
    D   = (softmax(z) - onehot(t)) * (1 - tanh(u)^2 or 1)   # only with want_grad, written over Y in Y's dtype

``D`` is ``dLoss/dY`` up to the per-row coefficient, which the caller applies to the ``[n, H]`` operands of the
gradient GEMMs. Two implementations with one contract:

* ``"triton"`` (`trl_plw.ops._epilogue_triton`): one program per row, two passes over it (online max/sum-exp,
  target and runner-up logits; then ``D``): 2 reads and 1 write of the tile in its own dtype, fp32 arithmetic.
* ``"torch"`` (`epilogue_torch`): the specification, in plain PyTorch ops on any device, with fp32 temporaries.

The op is registered as ``trl_plw::wce_epilogue`` (a `torch.library.custom_op`) so that a ``meta``-device trace,
the profiler and ``torch.compile`` see one opaque op with known inputs and outputs (`benchmarks/roofline.py` reads
its traffic from `EPILOGUE_TILE_PASSES`).
"""

from __future__ import annotations

import functools

import torch

EPILOGUE_BACKENDS = ("triton", "torch")
EPILOGUE_TILE_PASSES = {"triton": {"read": 2, "write": 1}}
"""Passes over the ``[n, V]`` tile (in its own dtype) that the Triton epilogue makes with ``want_grad``; without it,
one read. The traffic model counts these; the kernel's two loops over the row are what they describe."""


def acc_dtype_for(tile_dtype: torch.dtype) -> torch.dtype:
    """The dtype the epilogue computes in: float64 for float64 tiles (exactness tests), float32 otherwise."""
    return torch.float64 if tile_dtype == torch.float64 else torch.float32


def epilogue_torch(
    tile: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    fold: float,
    softcap: float | None,
    want_grad: bool,
    want_argmax: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The epilogue in PyTorch ops (module doc): returns ``lse``, ``z_t`` and ``max_other`` (``[n]``, or ``[0]``
    without ``want_argmax``) in the accumulation dtype, and overwrites ``tile`` with ``D`` when ``want_grad``."""
    acc = acc_dtype_for(tile.dtype)
    u = tile.to(acc) * fold
    if bias is not None:
        u = u + bias
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(u)
        z = tanh * softcap
    else:
        z = u
    col = targets.unsqueeze(1)
    lse = torch.logsumexp(z, dim=1)
    z_t = z.gather(1, col).squeeze(1)
    if want_argmax:
        max_other = z.scatter(1, col, float("-inf")).amax(dim=1)
    else:
        max_other = z.new_empty(0)
    if want_grad:
        d = torch.exp(z - lse.unsqueeze(1))
        d.scatter_add_(1, col, torch.full_like(z_t, -1.0).unsqueeze(1))
        if tanh is not None:
            d.mul_(1 - tanh * tanh)
        tile.copy_(d)
    return lse, z_t, max_other


@functools.cache
def _triton_epilogue():
    from trl_plw.ops._epilogue_triton import epilogue_triton

    return epilogue_triton


@torch.library.custom_op("trl_plw::wce_epilogue", mutates_args=("tile",))
def wce_epilogue(
    tile: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    fold: float,
    softcap: float | None,
    want_grad: bool,
    want_argmax: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch to the ``backend``'s epilogue (``"triton"`` or ``"torch"``); see the module doc for the contract."""
    fn = _triton_epilogue() if backend == "triton" else epilogue_torch
    return fn(tile, targets, bias, fold, softcap, want_grad, want_argmax)


@wce_epilogue.register_fake
def _(tile, targets, bias, fold, softcap, want_grad, want_argmax, backend):
    acc = acc_dtype_for(tile.dtype)
    n = tile.shape[0]
    return (
        tile.new_empty(n, dtype=acc),
        tile.new_empty(n, dtype=acc),
        tile.new_empty(n if want_argmax else 0, dtype=acc),
    )


def triton_available(device: torch.device) -> bool:
    """Whether the Triton epilogue can run on ``device``: a CUDA device and an importable ``triton``."""
    if device.type != "cuda":
        return False
    try:
        _triton_epilogue()
    except ImportError:
        return False
    return True

"""Count the operations that would make a CUDA device wait for the host, while code runs on a CPU.

On a GPU these block the Python thread until every queued kernel has finished (a "host sync"): they cost most on
small models, and they break CUDA graphs and ``torch.compile``. A CPU run cannot time them, but it can see them:

* at the dispatcher (a ``TorchDispatchMode``): ``_local_scalar_dense`` (``.item()``, ``bool(t)``, ``int(t)``,
  ``float(t)``), ``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``,
  ``equal``, indexing with a boolean mask (which runs ``nonzero`` inside), and any copy of a tensor to the CPU;
* in Python: ``Tensor.tolist()`` and ``Tensor.numpy()``, which read CPU tensors without dispatching anything.

Used by tests/test_sync_audit.py to compare PLWTrainer with SFTTrainer and to prove the kernel's tile loop free of
them.
"""

from __future__ import annotations

import collections
import contextlib
import traceback
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALWAYS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
           "unique_dim", "equal"}  # fmt: skip


def _is_sync(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in _ALWAYS:
        return True
    if name == "repeat_interleave":  # tensor repeats: the output's length is their sum, unless given
        return func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else []
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or []))
    if name in ("_to_copy", "to", "copy_"):  # a device -> host copy (never seen on a CPU-only run, kept for GPUs)
        src = args[1] if name == "copy_" else args[0]
        dst = kwargs.get("device") if name != "copy_" else args[0].device
        return isinstance(src, torch.Tensor) and src.device.type != "cpu" and torch.device(dst or "cpu").type == "cpu"
    return False


class SyncAudit(TorchDispatchMode):
    """Records every would-be host sync with the innermost frame of our code (or the caller's) that made it."""

    def __init__(self, where: tuple[str, ...] = ("trl_plw", "trl/", "transformers/", "accelerate/")):
        super().__init__()
        self.where = where
        self.events: list[tuple[str, str]] = []

    def _origin(self) -> str:
        for frame in reversed(traceback.extract_stack()[:-3]):
            if any(w in frame.filename for w in self.where) and "sync_audit" not in frame.filename:
                return f"{frame.filename.split('site-packages/')[-1].split('src/')[-1]}:{frame.lineno} {frame.name}"
        return "?"

    def record(self, what: str) -> None:
        self.events.append((what, self._origin()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self.record(func.overloadpacket.__name__)
        return func(*args, **kwargs)

    def counts(self) -> collections.Counter:
        return collections.Counter(origin for _, origin in self.events)

    def __len__(self) -> int:
        return len(self.events)


@contextlib.contextmanager
def audit_syncs() -> Iterator[SyncAudit]:
    """``with audit_syncs() as audit: ...``: dispatcher-level syncs plus ``tolist()``/``numpy()`` reads."""
    audit = SyncAudit()
    real_tolist, real_numpy = torch.Tensor.tolist, torch.Tensor.numpy

    def tolist(self, *a, **k):
        audit.record("tolist")
        return real_tolist(self, *a, **k)

    def numpy(self, *a, **k):
        audit.record("numpy")
        return real_numpy(self, *a, **k)

    torch.Tensor.tolist, torch.Tensor.numpy = tolist, numpy
    try:
        with audit:
            yield audit
    finally:
        torch.Tensor.tolist, torch.Tensor.numpy = real_tolist, real_numpy

"""Attention backends for packed (padding-free) SFT batches, and a device-aware default.

Packed batches (our collator, or TRL's ``DataCollatorForLanguageModeling(padding_free=True)``) hold several documents
in one row: ``input_ids [1, T]``, ``position_ids [1, T]`` restarting at 0 for each document, ``cu_seq_lens_q ==
cu_seq_lens_k`` (int32, ``[n_docs + 1]``), ``max_length_q == max_length_k`` (a Python int) and no ``attention_mask``.
A backend must keep the documents from attending to each other. Four do:

``plw_varlen`` (defined here, registered by :func:`register_attention_backends`)
    PyTorch's own variable-length flash kernel, :func:`torch.nn.attention.varlen.varlen_attn`, fed with the
    collator's ``cu_seq_lens_*`` / ``max_length_*``. No extra package; CUDA only, compute capability >= 8.0,
    fp16/bf16.
``flash_attention_2``
    transformers' integration of the ``flash_attn`` package (``pip install trl-plw[flash]``). CUDA only.
``flex_attention``
    transformers builds a document mask from ``position_ids``. Runs anywhere torch's flex attention does.
``sdpa`` / ``eager``
    transformers builds a dense block-diagonal causal mask from ``position_ids``. Runs on CPU. Only when
    ``attention_mask is None`` and no cache is in use (``use_cache=False``): otherwise the documents of a row see each
    other. See :func:`packed_batch_issues`.

Nothing is registered by importing this module. :func:`register_attention_backends` registers ``plw_varlen`` with
transformers' ``AttentionInterface`` (the attention function) and ``AttentionMaskInterface`` (a mask function that
never builds a dense mask); call it (any number of times) before
``AutoModelForCausalLM.from_pretrained(..., attn_implementation="plw_varlen")`` or
``model.set_attn_implementation("plw_varlen")``. `trl_plw.PLWTrainer` and `trl_plw.experiments.offline_model.load_model` call it
themselves when they are given, or select, one of the backends defined here (:func:`ensure_registered`).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

VARLEN_ATTENTION = "plw_varlen"
"""Name under which :func:`plw_varlen_attention_forward` is registered in transformers' ``AttentionInterface``."""

FLASH_ATTENTION_2 = "flash_attention_2"
FLEX_ATTENTION = "flex_attention"
SDPA = "sdpa"
EAGER = "eager"
AUTO = "auto"

MIN_CUDA_CAPABILITY = (8, 0)
"""Flash kernels (``varlen_attn`` and ``flash_attn``) need Ampere or newer."""

FLASH_INSTALL_HINT = "pip install trl-plw[flash]"

try:  # torch builds without the module (older releases) simply lack the backend.
    from torch.nn.attention.varlen import varlen_attn as _TORCH_VARLEN_ATTN
except ImportError:  # pragma: no cover - depends on the torch build
    _TORCH_VARLEN_ATTN = None

varlen_attn: Callable[..., torch.Tensor] | None = _TORCH_VARLEN_ATTN
"""The kernel ``plw_varlen`` calls, looked up at call time. It is torch's ``varlen_attn`` unless replaced (tests swap
in a CPU reference). The CUDA/dtype checks only apply to torch's own kernel."""


class AttentionBackendError(ValueError):
    """An attention backend cannot run this model/batch/device; the message says what to use instead."""


# --------------------------------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------------------------------


def flash_attn_installed() -> bool:
    """Whether the ``flash_attn`` package is importable. Never imports it (importing it initialises CUDA)."""
    try:
        return importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError):
        return False


def _flex_attention_importable() -> bool:
    try:
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    except (ImportError, ValueError):
        return False


def _as_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device if isinstance(device, torch.device) else torch.device(device)


def _cuda_status(device: torch.device) -> tuple[bool, str]:
    """(ok, reason): is ``device`` a CUDA device with compute capability >= 8.0 here?"""
    if device.type != "cuda":
        return False, f"device {str(device)!r} is not a CUDA device"
    if not torch.cuda.is_available():
        return False, "CUDA is not available in this PyTorch build / on this machine"
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = tuple(torch.cuda.get_device_capability(index))
    if capability < MIN_CUDA_CAPABILITY:
        need = ".".join(map(str, MIN_CUDA_CAPABILITY))
        return (
            False,
            f"cuda:{index} has compute capability {capability[0]}.{capability[1]}; flash kernels need >= {need}",
        )
    return True, f"cuda:{index} has compute capability {capability[0]}.{capability[1]}"


def varlen_attn_status(device: str | torch.device | None = None) -> tuple[bool, str]:
    """(available, reason) for torch's ``varlen_attn`` on ``device`` (default: this machine's best device)."""
    if _TORCH_VARLEN_ATTN is None:
        return False, f"torch {torch.__version__} has no torch.nn.attention.varlen; upgrade PyTorch"
    return _cuda_status(_as_device(device))


def varlen_attn_available(device: str | torch.device | None = None) -> bool:
    """Whether ``plw_varlen`` can run with torch's kernel on ``device``."""
    return varlen_attn_status(device)[0]


def flash_attention_2_status(device: str | torch.device | None = None) -> tuple[bool, str]:
    """(available, reason) for transformers' ``flash_attention_2`` (the ``flash_attn`` package) on ``device``."""
    if not flash_attn_installed():
        return False, f"the flash_attn package is not installed ({FLASH_INSTALL_HINT})"
    return _cuda_status(_as_device(device))


def _cpu_alternative(name: str) -> str:
    return (
        f"On CPU (or GPUs older than compute capability 8.0) use attn_implementation='{SDPA}' (or '{EAGER}') instead "
        f"of '{name}': pass position_ids, no attention_mask, and use_cache=False, and transformers builds a "
        "block-diagonal causal mask so packed documents stay separate."
    )


# --------------------------------------------------------------------------------------------------------------------
# Sequence metadata
# --------------------------------------------------------------------------------------------------------------------

# One entry per kind of source tensor. Every layer of a forward receives the same ``position_ids`` / ``cu_seq_lens``
# object, so a derivation that needs a device-to-host sync (``.item()``, ``nonzero``) happens once per forward, not
# once per layer. Entries are keyed on the tensor object itself (weak reference) and its in-place version counter.
_METADATA_CACHE: dict[tuple, tuple[weakref.ref, int, Any]] = {}


def _cached(kind: tuple, source: torch.Tensor, compute: Callable[[], Any]) -> Any:
    try:
        version = source._version
    except RuntimeError:  # inference tensors have no version counter: do not cache
        return compute()
    entry = _METADATA_CACHE.get(kind)
    if entry is not None and entry[0]() is source and entry[1] == version:
        return entry[2]
    value = compute()
    _METADATA_CACHE[kind] = (weakref.ref(source), version, value)
    return value


def sequence_boundaries_from_position_ids(
    position_ids: torch.Tensor, batch_size: int | None = None
) -> tuple[torch.Tensor, int]:
    """``(cu_seq_lens int32 [n+1], max_length)`` of the documents in ``position_ids`` ([B, T], [1, T] or [T]).

    A document starts at the first token of each row and wherever the position does not increase by exactly 1 (the
    rule transformers' ``find_packed_sequence_indices`` uses for sdpa/eager/flex, so every backend sees the same
    documents). Rows are concatenated. This reads values back to the host (``nonzero`` and ``max``): a device sync.
    Our collator and TRL's padding-free collator provide ``cu_seq_lens_*`` computed on CPU, which avoids it.
    """
    pos = position_ids if position_ids.dim() == 2 else position_ids.reshape(1, -1)
    if batch_size is not None and pos.shape[0] != batch_size:
        pos = pos.expand(batch_size, -1)
    rows, length = pos.shape
    flat = pos.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    if flat.numel() > 1:
        starts[1:] = (flat[1:] - flat[:-1]) != 1
    starts[::length] = True
    cu = torch.cat([starts.nonzero().flatten(), flat.new_tensor([rows * length])]).to(torch.int32)
    return cu, int(cu.diff().max().item()) if cu.numel() > 1 else 0


def _max_length(cu: torch.Tensor) -> int:
    return _cached(("max", cu.device), cu, lambda: int(cu.diff().max().item()) if cu.numel() > 1 else 0)


def _as_int(value: Any) -> int:
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def _unpad_metadata(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Indices of the kept tokens, cu_seq_lens and max length of a 2D padding mask (each row one sequence)."""
    mask = mask.bool()
    seqlens = mask.sum(dim=-1, dtype=torch.int32)
    indices = mask.reshape(-1).nonzero().flatten()
    cu = torch.nn.functional.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    return indices, cu, int(seqlens.max().item())


# --------------------------------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------------------------------

_SOFTCAP_FIELDS = ("attn_logit_softcapping", "attention_logit_softcapping", "logit_softcapping", "softcap")


def _softcap_field(module: torch.nn.Module) -> str:
    config = getattr(module, "config", None)
    for name in _SOFTCAP_FIELDS:
        if config is not None and getattr(config, name, None) is not None:
            return f"config.{name}"
    return "the model config's attention softcapping field (e.g. config.attn_logit_softcapping)"


def varlen_window_size(is_causal: bool, sliding_window: int | None, max_length_k: int) -> tuple[int, int]:
    """``window_size`` for :func:`torch.nn.attention.varlen.varlen_attn`.

    varlen_attn (flash convention) lets query ``i`` see key ``j`` when ``i - left <= j <= i + right``, ``-1`` meaning
    unbounded; it runs its causal kernel only when ``window_size == (-1, 0)`` exactly (a tuple). transformers'
    ``sliding_window=W`` lets query ``i`` see keys with ``i - j < W`` (``W`` tokens including itself), hence
    ``(W - 1, 0)``. A window at least as long as the longest document changes nothing and stays plain causal.
    """
    if not is_causal:
        if sliding_window is not None:
            raise AttentionBackendError(
                f"'{VARLEN_ATTENTION}' does not implement bidirectional sliding-window attention "
                f"(sliding_window={sliding_window}); use attn_implementation='{SDPA}' or '{FLASH_ATTENTION_2}'."
            )
        return (-1, -1)
    if sliding_window is None or sliding_window >= max_length_k:
        return (-1, 0)
    if sliding_window < 1:
        raise AttentionBackendError(f"sliding_window must be >= 1, got {sliding_window}")
    return (int(sliding_window) - 1, 0)


@functools.cache
def _signature(fn: Callable) -> tuple[frozenset[str], bool]:
    """The keyword names ``fn`` accepts, read once per kernel function: ``inspect.signature`` costs tens of
    microseconds, and this is asked on every attention call of every layer."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: assume the current API
        return frozenset(), True
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return frozenset(params), var_kw


def _call_varlen(
    fn: Callable,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float | None,
    window_size: tuple[int, int],
) -> torch.Tensor:
    """Call ``fn`` with the keywords its signature supports (torch's varlen API grew ``scale``, ``window_size`` and
    ``enable_gqa`` over releases); fall back to repeating kv heads / pre-scaling the query when it lacks them."""
    names, var_kw = _signature(fn)
    has = lambda name: var_kw or name in names  # noqa: E731
    kwargs: dict[str, Any] = {}
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        if has("enable_gqa"):
            kwargs["enable_gqa"] = True
        else:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
    if scale is not None:
        if has("scale"):
            kwargs["scale"] = float(scale)
        else:
            default = 1.0 / math.sqrt(query.shape[-1])
            if not math.isclose(scale, default, rel_tol=1e-12):
                query = query * (scale / default)
    if has("window_size"):
        kwargs["window_size"] = (int(window_size[0]), int(window_size[1]))
    elif window_size in ((-1, 0), (-1, -1)) and has("is_causal"):
        kwargs["is_causal"] = window_size == (-1, 0)
    else:
        raise AttentionBackendError(
            f"this torch ({torch.__version__}) varlen_attn has no window_size argument, so '{VARLEN_ATTENTION}' cannot "
            f"run sliding-window attention (window_size={window_size}); upgrade PyTorch or use '{FLASH_ATTENTION_2}'."
        )
    return fn(query, key, value, cu_q, cu_k, max_q, max_k, **kwargs)


_KERNEL_OK_DEVICES: set[torch.device] = set()


def _check_real_kernel(query: torch.Tensor) -> torch.dtype | None:
    """Raise unless torch's kernel can run on ``query``; return the dtype to cast q/k/v to (fp32 under autocast)."""
    if query.device not in _KERNEL_OK_DEVICES:  # checked once per device, not once per layer call
        ok, reason = varlen_attn_status(query.device)
        if not ok:
            raise AttentionBackendError(
                f"attn_implementation='{VARLEN_ATTENTION}' runs torch.nn.attention.varlen.varlen_attn, which needs a CUDA "
                f"GPU with compute capability >= 8.0 ({reason}). {_cpu_alternative(VARLEN_ATTENTION)} "
                f"select_attn_implementation(device, packed=True) picks a backend that works on a device."
            )
        _KERNEL_OK_DEVICES.add(query.device)
    if query.dtype in (torch.float16, torch.bfloat16):
        return None
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    raise AttentionBackendError(
        f"'{VARLEN_ATTENTION}' (flash kernel) needs fp16/bf16 activations, got {query.dtype}. Load the model with "
        "dtype=torch.bfloat16, or train with bf16 mixed precision (autocast)."
    )


def plw_varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``AttentionInterface``) running :func:`varlen_attn` on packed batches.

    ``query`` is ``[B, H_q, T, D]``, ``key``/``value`` ``[B, H_kv, T, D]``; returns ``([B, T, H_q, D_v], None)``.
    Documents come, in this order, from: the ``cu_seq_lens_q/k`` + ``max_length_q/k`` kwargs (the padding-free
    collator's, no sync); a 2D padding mask (tokens are unpadded, each row one sequence; one sync per forward); the
    ``position_ids`` kwarg (one sync per forward, cached across layers); otherwise each row is one sequence.
    """
    if kwargs.get("output_attentions", False):
        logger.warning(
            "'%s' cannot return attention weights (output_attentions=True); returning None.", VARLEN_ATTENTION
        )
    if softcap is not None:
        raise AttentionBackendError(
            f"'{VARLEN_ATTENTION}' does not support attention logit softcapping (softcap={softcap}, from "
            f"{_softcap_field(module)}); use attn_implementation='{EAGER}' or '{FLASH_ATTENTION_2}' for this model."
        )
    if dropout:
        raise AttentionBackendError(
            f"'{VARLEN_ATTENTION}' does not support attention dropout (dropout={dropout}, from config.attention_dropout "
            "while training); set model.config.attention_dropout = 0.0, or use attn_implementation='sdpa'/'eager'."
        )
    if s_aux is not None:
        raise AttentionBackendError(
            f"'{VARLEN_ATTENTION}' does not support attention sinks (s_aux, e.g. gpt-oss `sinks`); use "
            f"attn_implementation='{EAGER}' or a flash kernel that supports them."
        )
    sliding_window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))

    batch, heads_q, len_q, head_dim = query.shape
    len_k = key.shape[2]
    if key.shape[1] == 0 or heads_q % key.shape[1]:
        raise AttentionBackendError(f"query heads ({heads_q}) must be a multiple of key/value heads ({key.shape[1]})")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise AttentionBackendError(
            f"'{VARLEN_ATTENTION}' accepts only a 2D padding mask, got a {attention_mask.dim()}D attention_mask "
            "(a custom/4D mask); use attn_implementation='sdpa' or 'eager' for custom masks."
        )
    if len_q != len_k:
        raise AttentionBackendError(
            f"'{VARLEN_ATTENTION}' is a training backend and does not support decoding with a KV cache (query length "
            f"{len_q} != key length {len_k}); call model.set_attn_implementation('sdpa') before generate()."
        )

    fn = varlen_attn
    if fn is None:
        raise AttentionBackendError(
            f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn; upgrade PyTorch. "
            + _cpu_alternative(VARLEN_ATTENTION)
        )
    cast_to = _check_real_kernel(query) if fn is _TORCH_VARLEN_ATTN else None

    device = query.device
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    indices = None
    if cu_q is not None or cu_k is not None:
        if attention_mask is not None:
            raise AttentionBackendError(
                "got both cu_seq_lens_* (a padding-free batch) and a padding attention_mask; a packed batch must not "
                "carry an attention_mask (use padding_free=True / DataCollatorForWeightedCompletionLM)."
            )
        cu_q = cu_q if cu_q is not None else cu_k
        cu_k = cu_k if cu_k is not None else cu_q
        cu_q = cu_q.to(device=device, dtype=torch.int32)
        cu_k = cu_k.to(device=device, dtype=torch.int32)
        max_q = kwargs.get("max_length_q")
        max_k = kwargs.get("max_length_k")
        max_q = _as_int(max_q) if max_q is not None else _max_length(cu_q)  # sync, once per forward
        max_k = _as_int(max_k) if max_k is not None else (max_q if cu_k is cu_q else _max_length(cu_k))
    elif attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, len_k):
            raise AttentionBackendError(
                f"padding attention_mask of shape {tuple(attention_mask.shape)} does not match the batch ({batch}, "
                f"{len_k}); '{VARLEN_ATTENTION}' needs one mask entry per token."
            )
        indices, cu_q, max_q = _cached(
            ("unpad", batch, len_k, device), attention_mask, lambda: _unpad_metadata(attention_mask)
        )
        cu_k, max_k = cu_q, max_q
    elif kwargs.get("position_ids") is not None:
        position_ids = kwargs["position_ids"]
        if position_ids.shape[-1] != len_q:
            raise AttentionBackendError(
                f"position_ids has {position_ids.shape[-1]} positions but the query has {len_q} tokens"
            )
        # Derived from position_ids: a device-to-host sync (once per forward, cached across layers). Batches from our
        # collator / TRL's padding-free collator carry cu_seq_lens_* computed on CPU and skip this.
        cu_q, max_q = _cached(
            ("pos", batch, device),
            position_ids,
            lambda: sequence_boundaries_from_position_ids(position_ids, batch),
        )
        cu_q = cu_q.to(device)
        cu_k, max_k = cu_q, max_q
    else:  # each row is one sequence: no sync
        cu_q = torch.arange(0, (batch + 1) * len_q, len_q, device=device, dtype=torch.int32)
        cu_k, max_q, max_k = cu_q, len_q, len_k

    window = varlen_window_size(causal, sliding_window, max_k)

    q = query.transpose(1, 2).reshape(batch * len_q, heads_q, head_dim)
    k = key.transpose(1, 2).reshape(batch * len_k, key.shape[1], key.shape[-1])
    v = value.transpose(1, 2).reshape(batch * len_k, value.shape[1], value.shape[-1])
    if indices is not None:
        q, k, v = (t.index_select(0, indices) for t in (q, k, v))
    v_dim = v.shape[-1]
    if v_dim != head_dim:  # flash kernels want one head dim (e.g. MLA): pad v, crop the output
        v = torch.nn.functional.pad(v, (0, head_dim - v_dim))
    out_dtype = q.dtype
    if cast_to is not None:
        q, k, v = q.to(cast_to), k.to(cast_to), v.to(cast_to)

    out = _call_varlen(fn, q, k, v, cu_q, cu_k, max_q, max_k, scaling, window)
    if isinstance(out, tuple):
        out = out[0]
    out = out[..., :v_dim].to(out_dtype)
    if indices is not None:
        full = out.new_zeros(batch * len_q, heads_q, v_dim)
        out = full.index_copy(0, indices, out)
    return out.reshape(batch, len_q, heads_q, v_dim), None


def varlen_attention_mask(
    batch_size: int,
    q_length: int | None = None,  # transformers >= 5.4 (5.0-5.3 pass ``cache_position``, which lands in kwargs)
    kv_length: int = 0,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers mask function (``AttentionMaskInterface``) for ``plw_varlen``: never builds a dense mask.

    Returns ``None`` (documents come from cu_seq_lens / position_ids, causality from the kernel) unless the 2D mask
    really pads, in which case the 2D boolean mask is passed through so the attention function can unpad it.
    Registering *some* mask function matters: for names without one, transformers drops the 2D mask altogether and
    padded tokens would silently be attended to.
    """
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:]
    if mask.shape[-1] == kv_length and bool(mask.all()):
        return None
    return mask


def register_attention_backends() -> str:
    """Register ``plw_varlen`` with transformers (attention + mask interfaces). Idempotent; returns the name.

    An explicit call rather than an import side effect, so that importing trl_plw never changes transformers' global
    registries (a process that only wants the collator or the kernel keeps transformers as it found it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, plw_varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_attention_mask)
    return VARLEN_ATTENTION


OWN_BACKENDS = (VARLEN_ATTENTION,)
"""The attention implementations this module defines (the ones :func:`register_attention_backends` registers)."""


def ensure_registered(attn_implementation: str | None) -> str | None:
    """Register our backends if ``attn_implementation`` is one of them (:data:`OWN_BACKENDS`); return it unchanged.

    For code that loads or trains a model with an implementation it was given or selected: a name of transformers'
    own (or None) registers nothing."""
    if attn_implementation in OWN_BACKENDS:
        register_attention_backends()
    return attn_implementation


# --------------------------------------------------------------------------------------------------------------------
# Selection and description
# --------------------------------------------------------------------------------------------------------------------

KNOWN_BACKENDS = (VARLEN_ATTENTION, FLASH_ATTENTION_2, FLEX_ATTENTION, SDPA, EAGER)


def check_attn_implementation(name: str, device: str | torch.device | None = None) -> None:
    """Raise :class:`AttentionBackendError` (with the fix) unless ``name`` can run on ``device``."""
    dev = _as_device(device)
    if name == VARLEN_ATTENTION:
        ok, reason = varlen_attn_status(dev)
        if not ok:
            raise AttentionBackendError(
                f"attn_implementation='{VARLEN_ATTENTION}' needs torch.nn.attention.varlen.varlen_attn on a CUDA GPU "
                f"with compute capability >= 8.0, but {reason}. {_cpu_alternative(VARLEN_ATTENTION)}"
            )
    elif name == FLASH_ATTENTION_2:
        if not flash_attn_installed():
            alternative = (
                f"or use attn_implementation='{VARLEN_ATTENTION}' (PyTorch's built-in varlen flash kernel, no extra "
                "package)"
                if varlen_attn_available(dev)
                else f"or use attn_implementation='{VARLEN_ATTENTION}' on a CUDA GPU with compute capability >= 8.0 "
                f"(no extra package), or '{SDPA}'"
            )
            raise AttentionBackendError(
                f"attn_implementation='{FLASH_ATTENTION_2}' needs the flash_attn package, which is not installed: "
                f"`{FLASH_INSTALL_HINT}`, {alternative}."
            )
        ok, reason = _cuda_status(dev)
        if not ok:
            raise AttentionBackendError(
                f"attn_implementation='{FLASH_ATTENTION_2}' needs a CUDA GPU with compute capability >= 8.0, but "
                f"{reason}. {_cpu_alternative(FLASH_ATTENTION_2)}"
            )
    elif name == FLEX_ATTENTION:
        if not _flex_attention_importable():
            raise AttentionBackendError(
                f"attn_implementation='{FLEX_ATTENTION}' needs torch.nn.attention.flex_attention (torch "
                f"{torch.__version__} lacks it); use '{SDPA}'."
            )
    elif name in (SDPA, EAGER):
        return
    else:
        from trl_plw._compat import attention_backend_registered

        if attention_backend_registered(name) or "/" in name:
            return  # another registered implementation or a Hub kernel: transformers checks it
        raise AttentionBackendError(
            f"unknown attn_implementation {name!r}; choose '{AUTO}' or one of {', '.join(KNOWN_BACKENDS)}."
        )


def select_attn_implementation(device: str | torch.device, packed: bool, requested: str | None = None) -> str:
    """The attention implementation to train with on ``device``.

    ``requested`` ``None``/``"auto"``: CUDA (capability >= 8.0) with packed batches -> ``flash_attention_2`` when
    ``flash_attn`` is installed, else ``plw_varlen``; everything else -> ``sdpa`` (packed batches then rely on the
    block-diagonal mask transformers builds from ``position_ids``; keep ``attention_mask`` absent and
    ``use_cache=False``). An explicit name is validated with :func:`check_attn_implementation` and returned.
    """
    dev = _as_device(device)
    if requested is not None and requested != AUTO:
        check_attn_implementation(requested, dev)
        return requested
    if dev.type == "cuda" and packed:
        if flash_attention_2_status(dev)[0]:
            return FLASH_ATTENTION_2
        if varlen_attn_available(dev):
            return VARLEN_ATTENTION
    return SDPA


def describe_attention_backends(device: str | torch.device | None = None) -> list[dict[str, Any]]:
    """One dict per backend for docs/CLI: name, needs, devices, how packing is handled, availability on ``device``
    (default: this machine's best device) and which test covers it where."""
    dev = _as_device(device)
    varlen_ok, varlen_reason = varlen_attn_status(dev)
    flash_ok, flash_reason = flash_attention_2_status(dev)
    flex_ok = _flex_attention_importable()
    rows = [
        {
            "name": VARLEN_ATTENTION,
            "needs": "torch.nn.attention.varlen (PyTorch), CUDA GPU with compute capability >= 8.0, fp16/bf16",
            "devices": "cuda",
            "packing": "cu_seq_lens_q/k + max_length_q/k from the collator (else derived from position_ids)",
            "available": varlen_ok,
            "reason": varlen_reason,
            "verified": "CPU: full model through the backend with a per-document sdpa stand-in for varlen_attn "
            "(tests/test_attention.py); GPU: real kernel in `pytest -m gpu`",
        },
        {
            "name": FLASH_ATTENTION_2,
            "needs": f"flash_attn package ({FLASH_INSTALL_HINT}), CUDA GPU with compute capability >= 8.0, fp16/bf16",
            "devices": "cuda",
            "packing": "cu_seq_lens_q/k + max_length_q/k (transformers' integration)",
            "available": flash_ok,
            "reason": flash_reason,
            "verified": "selection logic only (flash_attn is not installed in CI)",
        },
        {
            "name": FLEX_ATTENTION,
            "needs": "torch.nn.attention.flex_attention",
            "devices": "cpu, cuda",
            "packing": "document mask built by transformers from position_ids (attention_mask None, use_cache=False)",
            "available": flex_ok,
            "reason": "torch flex attention is importable" if flex_ok else "torch lacks flex attention",
            "verified": "CPU: packed == padded (tests/test_attention.py)",
        },
        {
            "name": SDPA,
            "needs": "nothing extra",
            "devices": "cpu, cuda",
            "packing": "dense block-diagonal causal mask built by transformers from position_ids "
            "(attention_mask None, use_cache=False)",
            "available": True,
            "reason": "always available",
            "verified": "CPU: packed == padded (tests/test_attention.py); GPU: padded reference in `pytest -m gpu`",
        },
        {
            "name": EAGER,
            "needs": "nothing extra",
            "devices": "cpu, cuda",
            "packing": "dense block-diagonal causal mask, like sdpa",
            "available": True,
            "reason": "always available",
            "verified": "CPU: packed == padded (tests/test_attention.py)",
        },
    ]
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Batch checks
# --------------------------------------------------------------------------------------------------------------------


def _is_packed(batch: Mapping[str, Any]) -> bool:
    if batch.get("cu_seq_lens_q") is not None:
        return True
    position_ids = batch.get("position_ids")
    if position_ids is None:
        return False
    cu, _ = sequence_boundaries_from_position_ids(position_ids)
    return int(cu.numel()) - 1 > int(position_ids.reshape(-1, position_ids.shape[-1]).shape[0])


def packed_batch_issues(model: torch.nn.Module, batch: Mapping[str, Any]) -> list[str]:
    """What would let the documents of a packed ``batch`` attend to each other (or fail) with ``model``'s attention.

    Returns human-readable problems; an empty list means the batch is fine. Reads ``position_ids`` on the host.
    """
    if not _is_packed(batch):
        return []
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or SDPA
    issues = []
    mask = batch.get("attention_mask")
    if mask is not None:
        issues.append(
            "the packed batch carries an attention_mask: sdpa/eager/flex then skip packed-sequence detection and the "
            "documents of a row attend to each other; drop it (padding_free=True / our collator)."
        )
    use_cache = batch.get("use_cache", getattr(config, "use_cache", False))
    if use_cache and impl in (SDPA, EAGER, FLEX_ATTENTION):
        issues.append(
            f"use_cache=True with attn_implementation='{impl}': transformers creates a KV cache and skips packed-"
            "sequence detection, so documents attend to each other; pass use_cache=False (TRL's trainer does)."
        )
    if impl in (VARLEN_ATTENTION, FLASH_ATTENTION_2):
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        if impl == VARLEN_ATTENTION and varlen_attn is _TORCH_VARLEN_ATTN and not varlen_attn_available(device):
            issues.append(f"'{impl}' cannot run on {device}: {varlen_attn_status(device)[1]}.")
        if impl == FLASH_ATTENTION_2 and not flash_attention_2_status(device)[0]:
            issues.append(f"'{impl}' cannot run on {device}: {flash_attention_2_status(device)[1]}.")
    return issues


__all__ = [
    "AUTO",
    "AttentionBackendError",
    "EAGER",
    "FLASH_ATTENTION_2",
    "FLEX_ATTENTION",
    "KNOWN_BACKENDS",
    "OWN_BACKENDS",
    "SDPA",
    "VARLEN_ATTENTION",
    "check_attn_implementation",
    "describe_attention_backends",
    "ensure_registered",
    "flash_attn_installed",
    "flash_attention_2_status",
    "packed_batch_issues",
    "plw_varlen_attention_forward",
    "register_attention_backends",
    "select_attn_implementation",
    "sequence_boundaries_from_position_ids",
    "varlen_attention_mask",
    "varlen_attn_available",
    "varlen_attn_status",
    "varlen_window_size",
]

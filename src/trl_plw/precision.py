"""Which precision to train in, decided by what the hardware does natively.

TRL's configs default to bf16 wherever *some* bf16 support exists, CPUs included. On a CPU without native bf16
(no AVX512-BF16 or AMX on x86, no BF16 extension on Arm) every bf16 matmul is emulated and about 3x slower than
fp32, so that default makes CPU training slower, not faster. These helpers decide once per process, from the CPU's
own feature flags, and log the decision so a run's speed can be explained from its log.
"""

from __future__ import annotations

import functools
import logging
import platform

import torch

logger = logging.getLogger(__name__)

# x86 flags (as /proc/cpuinfo names them) under which oneDNN runs bf16 matmuls natively.
_X86_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_flags() -> set[str]:
    """Feature flags of the first CPU in /proc/cpuinfo (Linux); empty where the file does not exist."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86 / Arm
                    return set(value.split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_native() -> bool:
    """True when this CPU computes bf16 matmuls in hardware (AVX512-BF16/AMX on x86, the BF16 extension on Arm).

    Decided from the CPU's feature flags rather than a timing probe: flags are exact and free, a probe is noisy on
    shared machines. Logged once per process.
    """
    flags = _cpu_flags()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        native = any(flag in flags for flag in _X86_NATIVE_BF16_FLAGS)
    elif machine in ("aarch64", "arm64"):
        native = "bf16" in flags
    else:
        native = False
    logger.info(
        "CPU bf16 is %s on this %s CPU (%s): %s on CPU.",
        "native" if native else "emulated",
        machine,
        ", ".join(sorted(f for f in flags if "bf16" in f)) or "no bf16 flags",
        "bf16 autocast" if native else "fp32",
    )
    return native


def accelerator_bf16_available() -> bool:
    """True when a CUDA/XPU/NPU/MPS-class accelerator with bf16 support is present (transformers' own check)."""
    from transformers.utils import is_torch_bf16_gpu_available

    return bool(is_torch_bf16_gpu_available())


def default_bf16(use_cpu: bool = False) -> bool:
    """The bf16 default for a run: bf16 on an accelerator that supports it; on CPU only where bf16 is native."""
    if not use_cpu and accelerator_bf16_available():
        return True
    return cpu_bf16_is_native()


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """Compute dtype for a model or benchmark on ``device``: bf16 where native (CUDA with bf16, native-bf16 CPUs)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_is_native() else torch.float32
    return torch.bfloat16 if accelerator_bf16_available() else torch.float32

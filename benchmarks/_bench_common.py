"""Helpers every benchmark in this folder shares: machine description, load, memory, device sync, JSON output.

Benchmarks are not part of the library (they stay out of the wheel), so their common code lives beside them; a
script run as ``python benchmarks/x.py`` finds this module on its own path. Only the standard library is imported at
module level, so a benchmark's ``--help`` stays fast; torch and the Hugging Face libraries are imported by the
functions that need them.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MiB = 1 << 20


def cpu_model() -> str | None:
    """The CPU's model name (``lscpu``, else ``/proc/cpuinfo``, else ``platform.processor()``), for reports."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages, or None where the OS has none: how busy the machine was during a run."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def format_loadavg(values: list[float] | None = None) -> str:
    """``"0.12 0.30 0.41"`` (the current load when ``values`` is None), ``"n/a"`` where unavailable."""
    values = loadavg() if values is None else values
    return " ".join(f"{x:.2f}" for x in values) if values else "n/a"


def now_iso() -> str:
    """Local time with its UTC offset, to the second: when a report was taken."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def sync(device: Any) -> None:
    """Wait for queued CUDA work on ``device`` (a ``torch.device``), so wall-clock timings cover the kernels."""
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize(device)


def device_name(device: Any) -> str:
    """``torch.cuda.get_device_name`` for a CUDA device, ``"CPU <model name>"`` otherwise (for report headers)."""
    if getattr(device, "type", device) == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model() or platform.processor() or ''}".rstrip()


def current_rss_bytes() -> int | None:
    """Resident set size of this process now (Linux ``/proc/self/statm``), or None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage``; Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed distribution versions (None where absent), read from metadata without importing anything."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info() -> dict[str, Any]:
    """Date, platform, CPU, versions of torch/transformers/TRL/trl-plw, thread count and GPU name: a run's header."""
    import torch
    import transformers
    import trl

    import trl_plw

    info = {
        "date": now_iso(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "trl_plw": trl_plw.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": loadavg(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> None:
    """Write ``obj`` as JSON to ``path``, atomically (a temporary file renamed over it).

    Benchmarks save after every case so that an interrupted or killed run keeps what it measured; the rename makes
    sure a kill during the write never leaves a truncated file behind.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent))
    os.replace(tmp, path)

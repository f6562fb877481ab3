"""``trl-plw bench``: the end-to-end throughput and memory benchmark (``benchmarks/throughput.py``).

The benchmark lives in the repository's ``benchmarks/`` folder, not in the package: it defines a full-logits
baseline trainer that the library deliberately does not ship. This module finds that file (next to ``src/`` in a
source checkout, or at ``$TRL_PLW_BENCHMARKS/throughput.py``), loads it, and hands it the sub-command's arguments.
Nothing heavy is imported until the command runs, so ``trl-plw --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

_MODULE_NAME = "trl_plw_bench_throughput"


def benchmark_script() -> Path:
    """Path of ``throughput.py``: ``$TRL_PLW_BENCHMARKS/throughput.py`` if set, else ``<checkout>/benchmarks/``."""
    override = os.environ.get("TRL_PLW_BENCHMARKS")
    candidates = [Path(override) / "throughput.py"] if override else []
    candidates.append(Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "trl-plw bench needs benchmarks/throughput.py from a source checkout of trl-plw (it is not part of the "
        f"installed package); looked in: {', '.join(str(p) for p in candidates)}. Install trl-plw from a checkout "
        "with `pip install -e .`, or point TRL_PLW_BENCHMARKS at the checkout's benchmarks/ folder."
    )


def load_benchmark() -> ModuleType:
    """Import ``benchmarks/throughput.py`` as a module (once)."""
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    path = benchmark_script()
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench``. Its options come from the benchmark script itself, so the two never drift apart."""
    parser = subparsers.add_parser(
        "bench",
        help="End-to-end training throughput and memory: PLWTrainer vs trl.SFTTrainer vs full logits.",
        description=(
            "Tokens/s, step time and peak memory of trl.SFTTrainer (padded, BFD packed), PLWTrainer (padded, packed) "
            "and a full-logits weighted loss on RACE-format data and an instruction mix (see docs/BENCHMARKS.md)."
        ),
    )
    try:
        module = load_benchmark()
    except FileNotFoundError as err:
        parser.set_defaults(func=lambda args, err=err: _missing(err))
        return parser
    module.add_arguments(parser)
    parser.set_defaults(func=module.run_from_args)
    return parser


def _missing(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2

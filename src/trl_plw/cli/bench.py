"""``trl-plw bench``: runs the end-to-end throughput benchmark, ``benchmarks/throughput.py`` of a source checkout.

The benchmarks are not part of the library and stay out of the wheel (like CCE's ``benchmark/`` or torchtune's
``recipes``): they pull in comparison code and machine probes a user of the trainer never needs. This command only
finds the script and runs it with the same interpreter and arguments; installed without a checkout, it says where
to get one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

BENCH_SCRIPT = Path("benchmarks") / "throughput.py"
ENV_VAR = "TRL_PLW_BENCHMARKS"
HOW_TO_GET = (
    "trl-plw bench runs benchmarks/throughput.py from a source checkout of trl-plw; the benchmarks are not in the "
    "installed package. Clone the repository and run `trl-plw bench` (or `python benchmarks/throughput.py`) inside "
    f"it, or point {ENV_VAR} at its benchmarks/ folder."
)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``bench``. Every argument goes to the script untouched: its own ``--help`` lists them."""
    parser = subparsers.add_parser(
        "bench",
        help="End-to-end training throughput and memory: PLWTrainer vs trl.SFTTrainer vs full logits.",
        add_help=False,
    )
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.set_defaults(func=run)


def find_benchmark(cwd: Path | None = None) -> Path | None:
    """``benchmarks/throughput.py``: from ``$TRL_PLW_BENCHMARKS``, else the first checkout found above the working
    directory or above this package (an editable install from a checkout), else None."""
    if os.environ.get(ENV_VAR):
        script = Path(os.environ[ENV_VAR]) / BENCH_SCRIPT.name
        return script if script.is_file() else None
    here = Path(__file__).resolve()
    for start in (Path.cwd() if cwd is None else cwd, here.parent):
        for folder in (start, *start.parents):
            if (folder / BENCH_SCRIPT).is_file():
                return folder / BENCH_SCRIPT
    return None


def run(args: argparse.Namespace) -> int:
    script = find_benchmark()
    if script is None:
        print(HOW_TO_GET, file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args.rest])

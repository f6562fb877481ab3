"""``trl-plw bench``: the end-to-end throughput and memory benchmark (``trl_plw.experiments.benchmarking.throughput``).

The benchmark ships inside the package, so the command works the same from a source checkout and from an
installed wheel. Its module imports only the standard library at import time (torch, transformers and TRL are
imported when a run starts), so registering its options keeps ``trl-plw --help`` fast.
"""

from __future__ import annotations

import argparse


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench``. Its options come from the benchmark module itself, so the two never drift apart."""
    from trl_plw.experiments.benchmarking import throughput

    parser = subparsers.add_parser(
        "bench",
        help="End-to-end training throughput and memory: PLWTrainer vs trl.SFTTrainer vs full logits.",
        description=(
            "Tokens/s, step time and peak memory of trl.SFTTrainer (padded, BFD packed), PLWTrainer (padded, packed) "
            "and a full-logits weighted loss on RACE-format data and an instruction mix (see docs/BENCHMARKS.md)."
        ),
    )
    throughput.add_arguments(parser)
    parser.set_defaults(func=throughput.run_from_args)
    return parser

"""``trl-plw race``: the article's RACE experiment as presets of the sweep (cpu-demo, cpu-long, paper; --dry-run)."""

from __future__ import annotations

import argparse

from trl_plw.cli.sweep import add_config_arguments, config_from_args, run_from_args
from trl_plw.experiments import race
from trl_plw.experiments.race import PRESETS, RacePreset, dry_run, load_race_splits


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "race",
        help="RACE prompt-loss-weight experiment (sweep or one weight).",
        description=race.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-demo")
    add_config_arguments(p, RacePreset)
    p.add_argument("--output-dir", default="runs/race")
    p.add_argument("--dry-run", action="store_true", help="Format, count and estimate; train nothing.")
    p.add_argument("--tokenizer", default=None, help="Dry run: tokenizer folder or id (default: the model's).")
    p.set_defaults(func=run)


def preset_from_args(args: argparse.Namespace) -> RacePreset:
    return config_from_args(PRESETS[args.preset], args)


def run(args: argparse.Namespace) -> int:
    preset = preset_from_args(args)
    if args.dry_run:
        dry_run(preset, args.tokenizer)
        return 0
    return run_from_args(preset, args, load_splits=load_race_splits, plot_name="race_sweep.png")

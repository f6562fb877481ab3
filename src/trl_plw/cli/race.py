"""``trl-plw race``: the article's RACE experiment as presets of the sweep (cpu-demo, cpu-long, paper; --dry-run).

The flags are ``trl-plw sweep``'s (`RaceArguments` with `PLWConfig`, parsed by ``trl.TrlParser``) with the chosen
preset's values as defaults; any flag overrides its preset value.
"""

from __future__ import annotations

import argparse

from trl_plw.cli.sweep import build_parser, parse_config, run_from_args

DEFAULT_PRESET = "cpu-demo"


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "race", help="RACE prompt-loss-weight experiment (sweep or one weight).", add_help=False
    )
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.set_defaults(func=run)


def _command_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The race parser for the preset named in ``argv`` (read first: its values become the defaults)."""
    from trl_plw.experiments import race
    from trl_plw.experiments.race import PRESETS, RaceArguments

    preset_parser = argparse.ArgumentParser(add_help=False)
    preset_parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    known, _ = preset_parser.parse_known_args(argv)
    parser = build_parser(RaceArguments, PRESETS[known.preset], "trl-plw race", race.__doc__, "runs/race")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET, help="Start from this preset.")
    parser.add_argument("--dry-run", action="store_true", help="Format, count and estimate; train nothing.")
    parser.add_argument("--tokenizer", default=None, help="Dry run: tokenizer folder or id (default: the model's).")
    return parser


def run(args: argparse.Namespace) -> int:
    from trl_plw.experiments.race import RacePreset, dry_run, load_race_splits

    argv = list(args.rest)
    preset, output_dir, switches = parse_config(_command_parser(argv), argv, RacePreset)
    if switches.dry_run:
        dry_run(preset, switches.tokenizer)
        return 0
    return run_from_args(preset, output_dir, switches, load_splits=load_race_splits, plot_name="race_sweep.png")

"""``trl-plw sweep``: the prompt-loss-weight sweep on any dataset, with the flags of ``trl-plw sft``.

The arguments are `SweepArguments` (what only a sweep has: weights, seeds, data, adapters, holdout) and `PLWConfig`
(every training setting, under its own name), parsed together by ``trl.TrlParser``: ``--per_device_train_batch_size
8 --learning_rate 2e-3`` mean the same here as in ``trl-plw sft`` and ``trl sft``, and ``--config sweep.yaml``
works. The sweep's own defaults for the training fields (batch 8, learning rate 1e-3, ...: `SweepConfig`) are the
parser's defaults, so ``--help`` shows them. ``trl-plw race`` is the same parser with a preset's values as defaults.
The experiment itself lives in `trl_plw.experiments.sweep`.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trl_plw.cli.flags import bool_fields, negate_bool_flags
from trl_plw.experiments.sweep import RENAMED_FIELDS

DEPRECATED_FLAGS = {
    **{f"--{old.replace('_', '-')}": f"--{new}" for old, new in RENAMED_FIELDS.items()},
    "--no-gradient-checkpointing": "--no-activation-checkpointing",
}
"""The sweep's flags before it took PLWConfig's names: still accepted for one release, with a FutureWarning."""

ALIASES = {"--plw": "--plws"}
"""Short spellings kept for good (``--plw 1 0.1 0``)."""


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="Prompt-loss-weight sweep on any dataset: stopping-rule table, findings, recommended weight.",
        add_help=False,
    )
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.set_defaults(func=run_cli)


def translate_flags(argv: Sequence[str], fields: set[str]) -> list[str]:
    """``argv`` with the aliases and deprecated flags renamed (a FutureWarning names the old ones) and ``--no-X``
    written as ``--X false`` for a boolean field X (`trl_plw.cli.flags`)."""
    old = [a.split("=", 1)[0] for a in argv if a.split("=", 1)[0] in DEPRECATED_FLAGS]
    if old:
        renamed = ", ".join(f"{a} -> {DEPRECATED_FLAGS[a]}" for a in dict.fromkeys(old))
        warnings.warn(
            f"trl-plw sweep/race: {renamed}. The sweep now takes PLWConfig's field names, like `trl-plw sft`; the "
            "old flags will be removed in the next release.",
            FutureWarning,
            stacklevel=3,
        )
    installed = _checkpointing_field()
    renamed_argv = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        name = ALIASES.get(name, DEPRECATED_FLAGS.get(name, name))
        # the sweep records `activation_checkpointing`; PLWConfig parses it under the installed transformers' name
        for spelling in ("activation_checkpointing", "activation-checkpointing"):
            name = name.replace(spelling, installed)
        renamed_argv.append(name + eq + value)
    return negate_bool_flags(renamed_argv, fields)


def _checkpointing_field() -> str:
    from trl_plw._compat import checkpointing_field

    return checkpointing_field()


def _parsed_name(field_name: str) -> str:
    """The PLWConfig attribute that holds the sweep's training field ``field_name`` on the installed transformers."""
    return _checkpointing_field() if field_name == "activation_checkpointing" else field_name


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default (TrlParser's own choice shows defaults too)."""


def build_parser(arguments_cls: type, base: Any, prog: str, description: str | None, output_dir: str):
    """TrlParser over ``(arguments_cls, PLWConfig)`` whose defaults are ``base``'s values (a SweepConfig or a preset),
    plus the command's two switches (``--no-plots``, ``--no-resume``), which are not part of the sweep's record."""
    from trl import TrlParser

    from trl_plw.trainer import PLWConfig

    parser = TrlParser(
        (arguments_cls, PLWConfig),
        prog=prog,
        description=description,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--no-plots", action="store_true", help="Write the numbers only (no matplotlib needed).")
    parser.add_argument("--no-resume", action="store_true", help="Retrain runs that already finished.")
    defaults = {_parsed_name(f.name): getattr(base, f.name) for f in dataclasses.fields(base) if f.name != "extra"}
    parser.set_defaults(
        **{k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}, output_dir=output_dir
    )
    return parser


def _plain(value: Any) -> Any:
    """A parsed PLWConfig value as the sweep records it (TrainingArguments turns some strings into enums)."""
    return value.value if isinstance(value, enum.Enum) else value


def parse_config(parser, argv: Sequence[str], config_cls: type) -> tuple[Any, str, argparse.Namespace]:
    """``(config, output_dir, switches)`` from ``argv`` (and its ``--config`` file).

    A training field takes the parsed PLWConfig's value where the user set it, else the sweep's default (not the
    value PLWConfig derives for the machine it is parsed on: ``bf16=None`` stays "the hardware's choice" in the
    record). Any other PLWConfig setting the user gave (``--optim``, ``--report_to``, ...) goes to ``extra``, so
    every flag of ``trl-plw sft`` reaches every run.
    """
    from trl_plw.experiments.sweep import TRAINING_FIELDS
    from trl_plw.trainer import PLWConfig

    argv = translate_flags(argv, bool_fields(parser))
    defaults = vars(parser.parse_known_args([])[0])
    arguments, training, *rest = parser.parse_args_and_config(argv)
    given = {k for k, v in vars(parser.parse_known_args(argv)[0]).items() if v != defaults.get(k)}  # + --config's
    switches = rest[0] if rest else argparse.Namespace(no_plots=False, no_resume=False)
    values = dataclasses.asdict(arguments)
    for name in TRAINING_FIELDS:
        parsed = _parsed_name(name)
        values[name] = _plain(getattr(training, parsed)) if parsed in given else defaults[parsed]
    own = {*TRAINING_FIELDS, *map(_parsed_name, TRAINING_FIELDS), "output_dir"}
    values["extra"] = {
        f.name: _plain(getattr(training, f.name))
        for f in dataclasses.fields(PLWConfig)
        if f.init and f.name in given and f.name not in own
    }
    return config_cls(**values), training.output_dir, switches


def run_cli(args: argparse.Namespace) -> int:
    from trl_plw.experiments import sweep
    from trl_plw.experiments.sweep import SweepArguments, SweepConfig

    parser = build_parser(SweepArguments, SweepConfig(), "trl-plw sweep", sweep.__doc__, "runs/sweep")
    config, output_dir, switches = parse_config(parser, args.rest, SweepConfig)
    if not config.dataset_name:
        parser.error("name the data to sweep on: --dataset_name PATH_OR_HUB_ID")
    return run_from_args(config, output_dir, switches)


def run_from_args(
    config: Any,
    output_dir: str,
    switches: argparse.Namespace,
    *,
    load_splits: Callable[[Any, int], tuple[Any, Any]] | None = None,
    plot_name: str = "sweep.png",
) -> int:
    """Run the sweep and print the report (sweep and race)."""
    from trl_plw.experiments.sweep import load_sweep_splits, run_sweep

    result = run_sweep(
        config,
        Path(output_dir),
        load_splits=load_splits or load_sweep_splits,
        plots=not switches.no_plots,
        plot_name=plot_name,
        resume=not switches.no_resume,
    )
    print(result["text"])
    files = "summary.md, summary.json, metrics.csv" + ("" if switches.no_plots else f", {plot_name}")
    print(f"\nWrote {files} in {output_dir}", file=sys.stdout)
    return 0

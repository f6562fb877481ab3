"""``trl-plw sweep``: the prompt-loss-weight sweep on any dataset (flags for every `SweepConfig` field).

The flags are generated from the config dataclass, so ``trl-plw race`` (whose presets are `RacePreset`s, a subclass)
shares them; the experiment itself lives in `trl_plw.experiments.sweep`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from trl_plw.experiments import sweep
from trl_plw.experiments.sweep import SweepConfig, load_sweep_splits, run_sweep


def _int_or_range(value: str) -> int | tuple[int, int]:
    """``3`` or ``1,3`` (a range)."""
    return tuple(int(x) for x in value.split(",")) if "," in value else int(value)  # type: ignore[return-value]


def _name_or_range(value: str) -> str | tuple[int, int]:
    """``short`` or ``20,40`` (a range)."""
    return tuple(int(x) for x in value.split(",")) if "," in value else value  # type: ignore[return-value]


def _arg_type(annotation: str) -> Callable[[str], Any]:
    """argparse type of a dataclass field from its (string) annotation: ``int | None`` -> int, ..."""
    if "tuple[int, int]" in annotation:
        return _name_or_range if annotation.startswith("str") else _int_or_range
    first = annotation.split("|")[0].strip()
    return {"int": int, "float": float}.get(first, str)


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type[SweepConfig]) -> None:
    """One ``--field-name`` flag per config field (default None: the preset's value stays), shared by race/sweep."""
    special = {"plws", "seeds", "extra", "bf16", "packing", "answer_tokens"}
    for f in fields(config_cls):
        flag = f"--{f.name.replace('_', '-')}"
        if f.name in special:
            continue
        if str(f.type).startswith("bool"):  # --x/--no-x, so a False can be given (a str "False" would be true)
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, dest=f.name, type=_arg_type(str(f.type)), default=None)
    parser.add_argument("--plw", type=float, nargs="+", dest="plws", help="Prompt loss weight(s) to sweep.")
    parser.add_argument("--seeds", type=int, nargs="+", help="Seeds; each weight is trained once per seed.")
    parser.add_argument("--answer-tokens", nargs="+", help="Single-token answers (e.g. A B C D): answer accuracy.")
    parser.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=None,
        help="bf16 autocast. Default: only where bf16 is native (GPU, AVX512-BF16/AMX CPUs), else fp32.",
    )  # fmt: skip
    parser.add_argument(
        "--packing", action=argparse.BooleanOptionalAction, default=None,
        help="Pack rows (BFD, padding-free). Default: the preset's (off on CPU).",
    )  # fmt: skip
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-resume", action="store_true", help="Retrain runs that already finished.")


def config_from_args(base: SweepConfig, args: argparse.Namespace) -> SweepConfig:
    """``base`` with every flag the user gave (a flag left at None keeps the preset's value)."""
    names = {f.name for f in fields(base)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    for key in ("plws", "seeds", "answer_tokens"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return replace(base, **overrides)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="Prompt-loss-weight sweep on any dataset: stopping-rule table, findings, recommended weight.",
        description=sweep.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, SweepConfig)
    p.add_argument("--output-dir", default="runs/sweep")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    config = config_from_args(SweepConfig(), args)
    if not config.dataset:
        raise SystemExit("trl-plw sweep: error: --dataset PATH_OR_ID is required")
    return run_from_args(config, args)


def run_from_args(
    config: SweepConfig,
    args: argparse.Namespace,
    *,
    load_splits: Callable[[SweepConfig, int], tuple[Any, Any]] = load_sweep_splits,
    plot_name: str = "sweep.png",
) -> int:
    """Run the sweep with the output flags of `add_config_arguments` and print the report (sweep and race)."""
    result = run_sweep(
        config,
        Path(args.output_dir),
        load_splits=load_splits,
        plots=not args.no_plots,
        plot_name=plot_name,
        resume=not args.no_resume,
    )
    print(result["text"])
    files = "summary.md, summary.json, metrics.csv" + ("" if args.no_plots else f", {plot_name}")
    print(f"\nWrote {files} in {args.output_dir}")
    return 0

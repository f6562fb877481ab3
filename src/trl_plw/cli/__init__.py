"""The ``trl-plw`` command line.

One module per command in this package (``race``, ``sweep``, ``sft``, ``gen_ratio``, ``bench``, ``model``), each with
``add_cli(subparsers)``; this file only dispatches. The experiments and the library they drive are imported when a
command runs, so ``trl-plw --help`` stays instant and never imports torch. Add a command: a module here with
``add_cli`` and a row in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module that defines `add_cli`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "race": (
        "trl_plw.cli.race",
        "The article's RACE experiment (presets of `sweep`): cpu-demo, cpu-long, paper (+ --dry-run).",
    ),
    "sweep": (
        "trl_plw.cli.sweep",
        "Prompt-loss-weight sweep on any dataset: stopping-rule table, findings, recommended weight.",
    ),
    "sft": ("trl_plw.cli.sft", "Weighted SFT on any dataset with PLWConfig (YAML or flags, like `trl sft`)."),
    "gen-ratio": (
        "trl_plw.cli.gen_ratio",
        "Generation ratio Rg = completion/prompt tokens of a dataset: stats and histograms.",
    ),
    "bench": (
        "trl_plw.cli.bench",
        "End-to-end training throughput and memory: PLWTrainer vs trl.SFTTrainer vs full logits.",
    ),
    "prepare-model": (
        "trl_plw.cli.model",
        "Convert the offline default model (SmolLM2-135M GGUF) into a cached HF folder.",
    ),
    "generate": ("trl_plw.cli.model", "Answer a prompt with a model (default: the offline SmolLM2-135M-Instruct)."),
}


def _overview_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-plw",
        description="Prompt-loss weighting for TRL SFT. Run `trl-plw COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = _overview_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from: {', '.join(COMMANDS)}")
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog="trl-plw")
    module.add_cli(parser.add_subparsers(dest="command"))
    args, unknown = parser.parse_known_args([name, *rest])
    if hasattr(args, "rest"):
        # A command that hands its arguments on untouched (`sft` -> TrlParser). argparse's REMAINDER does not capture
        # a leading option such as `--config recipe.yaml`, so the arguments are passed as given.
        args.rest = rest
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

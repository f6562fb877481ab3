"""The ``trl-plw`` command line.

Each sub-command lives in the module that owns its concept and registers itself through ``add_cli(subparsers)``;
this file only dispatches. Modules are imported when their command runs, so ``trl-plw --help`` stays instant and
never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module that defines `add_cli`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "race": ("trl_plw.race_experiment", "The article's RACE experiment (presets of `sweep`): cpu-demo, cpu-long, paper (+ --dry-run)."),
    "sweep": ("trl_plw.sweep", "Prompt-loss-weight sweep on any dataset: stopping-rule table, findings, recommended weight."),
    "sft": ("trl_plw.sft_cli", "Weighted SFT on any dataset with PLWConfig (YAML or flags, like `trl sft`)."),
    "gen-ratio": ("trl_plw.gen_ratio", "Generation ratio Rg = completion/prompt tokens of a dataset: stats and histograms."),
    "bench": ("trl_plw.bench_cli", "End-to-end training throughput and memory: PLWTrainer vs trl.SFTTrainer vs full logits."),
    "prepare-model": ("trl_plw.cli", "Convert the offline default model (SmolLM2-135M GGUF) into a cached HF folder."),
    "generate": ("trl_plw.cli", "Answer a prompt with a model (default: the offline SmolLM2-135M-Instruct)."),
}


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """The two small commands that belong to no other module."""
    prep = subparsers.add_parser("prepare-model", help=COMMANDS["prepare-model"][1])
    prep.add_argument("--force", action="store_true", help="Rebuild the cached folder even if it looks complete.")
    prep.set_defaults(func=_prepare_model)

    gen = subparsers.add_parser("generate", help=COMMANDS["generate"][1])
    gen.add_argument("prompt", help="User message to answer.")
    gen.add_argument("--model", default="smollm2-135m", help="Model alias, Hub id or local folder.")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.set_defaults(func=_generate)


def _prepare_model(args: argparse.Namespace) -> int:
    from trl_plw.models import ensure_default_model

    print(ensure_default_model(force=args.force))
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from trl_plw.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


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

"""``trl-plw gen-ratio``: generation ratio Rg = completion/prompt tokens of a dataset (`trl_plw.experiments.gen_ratio`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trl_plw.experiments.gen_ratio import compute_generation_ratios, plot_ratios, summarize_ratios


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``gen-ratio`` on an argparse sub-parser set (``trl-plw gen-ratio ...``)."""
    parser = subparsers.add_parser(
        "gen-ratio",
        help="Generation ratio Rg = completion/prompt tokens of a dataset: stats and histograms.",
        description=(
            "Per-example generation ratio Rg = completion tokens / prompt tokens, tokenized as the trainer does "
            "(chat template for conversational data). Prints mean, geometric mean, median, percentiles and the "
            "ratio of totals; optionally writes a JSON summary and a histogram PNG. RACE-schema data (article, "
            "question, options, answer) is formatted with the RACE prompt template first."
        ),
    )
    parser.add_argument(
        "dataset", help="Hub dataset id, local file (.jsonl/.json/.parquet/.csv) or folder, or 'race-synthetic'."
    )
    parser.add_argument("--config", default=None, help="Dataset config (Hub); for race-synthetic: all/middle/high.")
    parser.add_argument("--split", default="train", help="Split to read; 'all' concatenates every split.")
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--completion-column", default="completion")
    parser.add_argument(
        "--messages-column",
        default=None,
        help="One column of chat messages; the last assistant turn is the completion.",
    )
    parser.add_argument(
        "--tokenizer",
        default="smollm2-135m",
        help="Model alias, Hub id or local folder whose tokenizer counts tokens.",
    )
    parser.add_argument(
        "--max-examples", type=int, default=None, help="Random subset of this size (race-synthetic: rows to generate)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the subset (and of race-synthetic).")
    parser.add_argument(
        "--trim",
        type=float,
        default=0.0,
        help="Drop this fraction of each tail before the statistics (article: 0.0025).",
    )
    parser.add_argument("--plot", default=None, metavar="OUT.png", help="Write the two histograms here.")
    parser.add_argument("--json", default=None, metavar="OUT.json", help="Write the summary here.")
    parser.add_argument(
        "--no-chat-template", action="store_true", help="Count chat message contents as plain text (no template)."
    )
    parser.set_defaults(func=run_cli)
    return parser


_RACE_COLUMNS = ("article", "question", "options", "answer")


def _load_cli_dataset(args: argparse.Namespace) -> tuple[Any, str]:
    from trl_plw.experiments.data.race import (
        RACE_HUB_ID,
        SYNTHETIC_SOURCES,
        format_race_example,
        load_race,
        load_raw_dataset,
    )

    if args.dataset in SYNTHETIC_SOURCES:
        n = args.max_examples or 1000
        dataset = load_race("synthetic", config=args.config or "all", split=args.split, n=n, seed=args.seed)
        return dataset, f"synthetic RACE ({args.config or 'all'}, {args.split}, n={n}, seed={args.seed})"
    config = args.config if args.config is not None or args.dataset != RACE_HUB_ID else "all"
    raw = load_raw_dataset(args.dataset, config, args.split)
    description = f"{args.dataset} ({config or 'default'}, {args.split})" if config else args.dataset
    if args.max_examples is not None and args.max_examples < len(raw):
        raw = raw.shuffle(seed=args.seed).select(range(args.max_examples))
        description += f", random {args.max_examples} rows (seed {args.seed})"
    columns = raw.column_names
    plain_columns = args.prompt_column in columns or args.messages_column is not None or "messages" in columns
    if not plain_columns and all(c in columns for c in _RACE_COLUMNS):
        raw = raw.map(format_race_example, remove_columns=columns, desc="Formatting RACE")
        description += ", RACE schema formatted with RACE_PROMPT_TEMPLATE"
    return raw, description


def _format_summary(summary: Mapping[str, Any], header: str) -> str:
    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = [header]
    rows = [
        ("examples", f"{summary['n']} ({summary['n_used']} in per-example statistics)"),
        ("mean Rg (arithmetic)", f(summary["mean"])),
        ("geometric mean Rg", f"{f(summary['geometric_mean'])} (over {summary['n_geometric_mean']})"),
        ("median Rg", f(summary["median"])),
        ("p5 / p95", f"{f(summary['p5'])} / {f(summary['p95'])}"),
        ("min / max", f"{f(summary['min'])} / {f(summary['max'])}"),
        ("ratio of totals", f(summary["ratio_of_totals"])),
        (
            "tokens per example",
            f"prompt {f(summary['prompt_tokens_mean'])}, completion {f(summary['completion_tokens_mean'])}",
        ),
    ]
    lines += [f"  {name:<22} {value}" for name, value in rows]
    if summary["notes"]:
        lines.append("notes:")
        lines += [f"  - {note}" for note in summary["notes"]]
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    """Body of ``trl-plw gen-ratio``; returns the exit status (2 on a data or argument error)."""
    from trl_plw.experiments.offline_model import load_tokenizer

    try:
        dataset, description = _load_cli_dataset(args)
        tokenizer = load_tokenizer(args.tokenizer)
        ratios = compute_generation_ratios(
            dataset,
            tokenizer,
            prompt_column=args.prompt_column,
            completion_column=args.completion_column,
            messages_column=args.messages_column,
            use_chat_template=not args.no_chat_template,
        )
        summary = summarize_ratios(ratios, trim=args.trim)
    except (ValueError, KeyError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"trl-plw gen-ratio: error: {message}", file=sys.stderr)
        return 2
    template = "plain text" if args.no_chat_template else "chat template where conversational"
    header = f"Generation ratio Rg = completion / prompt tokens\n  data: {description}\n  tokenizer: {args.tokenizer} ({template})"
    print(_format_summary(summary, header))
    if args.json:
        record = {
            "dataset": args.dataset,
            "description": description,
            "tokenizer": args.tokenizer,
            "chat_template": not args.no_chat_template,
            **summary,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"summary written to {args.json}")
    if args.plot:
        plot_ratios(ratios, args.plot, title=f"Rg of {description}", summary=summary)
        print(f"histograms written to {args.plot}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trl_plw.experiments.gen_ratio DATASET ...`` (same options as ``trl-plw gen-ratio``)."""
    parser = argparse.ArgumentParser(prog="python -m trl_plw.experiments.gen_ratio")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["gen-ratio", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))

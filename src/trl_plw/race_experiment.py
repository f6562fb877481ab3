"""``trl-plw race``: the RACE prompt-loss-weight experiment, a sweep or a single weight.

For each prompt-loss weight, fine-tune (LoRA by default, as in the article) on RACE-format multiple-choice data
and evaluate on a schedule: prompt loss, completion loss, full-sequence loss and answer accuracy, all from the
fused pass. Every run writes ``metrics.jsonl``; the sweep writes ``metrics.csv`` (long format, one row per logged
event), ``summary.json``/``summary.md`` (accuracy at the minimum of each loss) and ``race_sweep.png``.

Two presets:
* ``cpu-demo`` (default): the offline SmolLM2-135M and offline synthetic RACE-format data, sized so the whole
  six-weight sweep finishes on 2 CPU cores in minutes.
* ``paper``: the article's setup for a GPU user with network: Llama-2-7b-chat-hf, ``ehovy/race`` (all),
  LoRA r=64/alpha=64/dropout 0.1 on all linear layers, lr 2e-4 constant with 5% warm-up, weight decay 0.001,
  grad clip 0.3, bf16, 2048-token rows packed with correct document boundaries, flash-attention varlen if present.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ARTICLE_SWEEP = (1.0, 0.5, 0.2, 0.1, 0.01, 0.0)


@dataclass
class RacePreset:
    """Knobs of one experiment; presets are instances, and every field can be overridden from the CLI."""

    model: str = "smollm2-135m"
    dataset: str = "synthetic"
    dataset_config: str = "all"
    # Article length (words) of the synthetic data; the CPU demo keeps passages short so six runs fit in minutes.
    synthetic_length: str | tuple[int, int] = (60, 90)
    train_examples: int | None = 80
    eval_examples: int | None = 48
    max_steps: int = -1
    num_train_epochs: float = 1.0
    eval_steps: int = 10
    batch_size: int = 4
    eval_batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.001
    max_grad_norm: float = 0.3
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    max_length: int = 1024
    # Padded on CPU: without a varlen kernel, sdpa computes a packed row's full T^2 attention under a block mask,
    # which costs more than the padding it saves (measured: an eval pass 6x slower packed). GPUs pack (see paper).
    packing: bool = False
    # bf16 autocast: ~2x faster than fp32 on CPUs with AVX512-BF16 (measured here); the loss accumulates in fp32.
    bf16: bool = True
    gradient_checkpointing: bool = False
    loss_normalization: str = "weights"
    seed: int = 0
    plws: tuple[float, ...] = ARTICLE_SWEEP
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, RacePreset] = {
    "cpu-demo": RacePreset(),
    "paper": RacePreset(
        model="meta-llama/Llama-2-7b-chat-hf",
        dataset="ehovy/race",
        train_examples=None,
        eval_examples=2000,
        max_steps=-1,
        num_train_epochs=10,
        eval_steps=20,
        batch_size=8,
        eval_batch_size=16,
        learning_rate=2e-4,
        lora_r=64,
        lora_alpha=64,
        lora_dropout=0.1,
        max_length=2048,
        packing=True,
        bf16=True,
        gradient_checkpointing=True,
    ),
}


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "race",
        help="RACE prompt-loss-weight experiment (sweep or one weight).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-demo")
    p.add_argument("--plw", type=float, nargs="+", dest="plws", help="Prompt loss weight(s); default: the article's sweep.")
    p.add_argument("--output-dir", default="runs/race")
    for name, kind in (
        ("model", str),
        ("dataset", str),
        ("dataset-config", str),
        ("train-examples", int),
        ("eval-examples", int),
        ("max-steps", int),
        ("eval-steps", int),
        ("batch-size", int),
        ("grad-accum", int),
        ("learning-rate", float),
        ("lora-r", int),
        ("max-length", int),
        ("loss-normalization", str),
        ("seed", int),
    ):
        p.add_argument(f"--{name}", type=kind, default=None)
    p.add_argument(
        "--synthetic-length", type=lambda v: tuple(int(x) for x in v.split(",")) if "," in v else v, default=None,
        help="Synthetic article length: short/medium/long/mixed or MIN,MAX words.",
    )
    p.add_argument(
        "--packing", action=argparse.BooleanOptionalAction, default=None,
        help="Pack rows (BFD, padding-free). Default: off in cpu-demo, on in paper.",
    )
    p.add_argument("--bf16", action="store_true", default=None)
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=run)


def preset_from_args(args: argparse.Namespace) -> RacePreset:
    preset = PRESETS[args.preset]
    overrides = {
        key: value
        for key, value in vars(args).items()
        if key in RacePreset.__dataclass_fields__ and value is not None
    }
    if "plws" in overrides:
        overrides["plws"] = tuple(overrides["plws"])
    return replace(preset, **overrides)


def run(args: argparse.Namespace) -> int:
    preset = preset_from_args(args)
    results = run_sweep(preset, Path(args.output_dir), plots=not args.no_plots)
    print(results["table_markdown"])
    print(f"\nWrote {args.output_dir}/summary.md, metrics.csv" + ("" if args.no_plots else ", race_sweep.png"))
    return 0


# ---------------------------------------------------------------------------------------------------------- runs
def build_config(preset: RacePreset, plw: float, output_dir: Path):
    import torch

    from trl_plw.trainer import PLWConfig

    return PLWConfig(
        output_dir=str(output_dir),
        prompt_loss_weight=plw,
        loss_normalization=preset.loss_normalization,
        max_steps=preset.max_steps,
        num_train_epochs=preset.num_train_epochs,
        per_device_train_batch_size=preset.batch_size,
        per_device_eval_batch_size=preset.eval_batch_size,
        gradient_accumulation_steps=preset.grad_accum,
        learning_rate=preset.learning_rate,
        lr_scheduler_type=preset.lr_scheduler_type,
        warmup_steps=preset.warmup_ratio,
        weight_decay=preset.weight_decay,
        max_grad_norm=preset.max_grad_norm,
        max_length=preset.max_length,
        packing=preset.packing,
        eval_strategy="steps",
        eval_steps=preset.eval_steps,
        eval_on_start=True,
        logging_steps=max(1, preset.eval_steps // 2),
        save_strategy="no",
        report_to="none",
        bf16=preset.bf16,
        gradient_checkpointing=preset.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(),
        seed=preset.seed,
        data_seed=preset.seed,
        answer_tokens=["A", "B", "C", "D"],
        dataloader_num_workers=0,
        **preset.extra,
    )


def _lora_config(preset: RacePreset):
    from peft import LoraConfig

    return LoraConfig(
        r=preset.lora_r,
        lora_alpha=preset.lora_alpha,
        lora_dropout=preset.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def run_one(preset: RacePreset, plw: float, output_dir: Path, datasets=None) -> list[dict[str, Any]]:
    """Train and evaluate one prompt-loss weight; returns the logged events (also written as JSONL)."""
    import torch
    from transformers import TrainerCallback

    from trl_plw.models import load_model, load_tokenizer
    from trl_plw.trainer import PLWTrainer

    output_dir.mkdir(parents=True, exist_ok=True)
    train, evaluation = datasets if datasets is not None else load_race_splits(preset)
    events: list[dict[str, Any]] = []
    log_path = output_dir / "metrics.jsonl"
    log_path.write_text("")

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            event = {"plw": plw, "step": state.global_step, **(logs or {})}
            events.append(event)
            with log_path.open("a") as f:
                f.write(json.dumps(event) + "\n")

    from trl_plw.attention import select_attn_implementation

    dtype = torch.bfloat16 if preset.bf16 else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    attention = select_attn_implementation(device, packed=preset.packing)
    model = load_model(preset.model, dtype=dtype, attn_implementation=attention)
    trainer = PLWTrainer(
        model,
        args=build_config(preset, plw, output_dir),
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=load_tokenizer(preset.model),
        peft_config=_lora_config(preset) if preset.lora_r > 0 else None,
        callbacks=[Recorder()],
    )
    start = time.perf_counter()
    trainer.train()
    events.append({"plw": plw, "step": trainer.state.global_step, "wall_seconds": time.perf_counter() - start})
    return events


def load_race_splits(preset: RacePreset):
    from trl_plw.data.race import load_race

    extra = {"length": preset.synthetic_length} if preset.dataset == "synthetic" else {}
    common = dict(config=preset.dataset_config, seed=preset.seed, **extra)
    train = load_race(preset.dataset, split="train", n=preset.train_examples, **common)
    evaluation = load_race(preset.dataset, split="validation", n=preset.eval_examples, **common)
    return train, evaluation


def run_sweep(preset: RacePreset, output_dir: Path, plots: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "preset.json").write_text(json.dumps(asdict(preset), indent=1))
    datasets = load_race_splits(preset)
    all_events: list[dict[str, Any]] = []
    for plw in tqdm(preset.plws, desc="PLW sweep", unit="run"):
        all_events += run_one(preset, plw, output_dir / f"plw_{plw:g}", datasets)
    write_csv(all_events, output_dir / "metrics.csv")
    summary = summarize(all_events, preset.plws)
    table = summary_markdown(summary)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (output_dir / "summary.md").write_text(table + "\n")
    if plots:
        plot_sweep(all_events, preset.plws, output_dir / "race_sweep.png")
    return {"summary": summary, "table_markdown": table, "events": all_events}


# ---------------------------------------------------------------------------------------------------------- reports
def write_csv(events: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for event in events:
        keys += [k for k in event if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(events)


def eval_events(events: list[dict[str, Any]], plw: float) -> list[dict[str, Any]]:
    return [e for e in events if e["plw"] == plw and "eval_completion_loss" in e]


def summarize(events: list[dict[str, Any]], plws: tuple[float, ...]) -> list[dict[str, Any]]:
    """Per PLW: answer accuracy at the step of minimum full-sequence loss and of minimum completion loss (the
    article's comparison of stopping rules), plus the final and best values."""
    rows = []
    for plw in plws:
        evals = eval_events(events, plw)
        if not evals:
            continue
        row: dict[str, Any] = {"plw": plw}
        for loss_key, label in (("eval_sequence_loss", "seq"), ("eval_completion_loss", "comp")):
            candidates = [e for e in evals if loss_key in e]
            if candidates:
                best = min(candidates, key=lambda e: e[loss_key])
                row[f"min_{label}_loss"] = best[loss_key]
                row[f"min_{label}_loss_step"] = best["step"]
                row[f"acc_at_min_{label}_loss"] = best.get("eval_answer_accuracy", math.nan)
        first, last = evals[0], evals[-1]
        row["initial_acc"] = first.get("eval_answer_accuracy", math.nan)
        row["final_acc"] = last.get("eval_answer_accuracy", math.nan)
        row["final_prompt_loss"] = last.get("eval_prompt_loss", math.nan)
        row["final_completion_loss"] = last.get("eval_completion_loss", math.nan)
        wall = [e["wall_seconds"] for e in events if e["plw"] == plw and "wall_seconds" in e]
        row["train_seconds"] = wall[-1] if wall else math.nan
        rows.append(row)
    return rows


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    header = (
        "| PLW | acc @ min seq loss (step) | acc @ min completion loss (step) | initial acc | final acc | "
        "final prompt loss | final completion loss | train s |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"| {r['plw']:g} | {r.get('acc_at_min_seq_loss', math.nan):.3f} ({r.get('min_seq_loss_step', '-')}) "
            f"| {r.get('acc_at_min_comp_loss', math.nan):.3f} ({r.get('min_comp_loss_step', '-')}) "
            f"| {r['initial_acc']:.3f} | {r['final_acc']:.3f} | {r['final_prompt_loss']:.3f} "
            f"| {r['final_completion_loss']:.4f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot_sweep(events: list[dict[str, Any]], plws: tuple[float, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("eval_prompt_loss", "validation prompt loss"),
        ("eval_completion_loss", "validation completion loss"),
        ("eval_sequence_loss", "validation full-sequence loss"),
        ("eval_answer_accuracy", "answer accuracy (A-D)"),
    )
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    colors = plt.cm.viridis([i / max(1, len(plws) - 1) for i in range(len(plws))])
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for plw, color in zip(plws, colors, strict=True):
            points = [(e["step"], e[key]) for e in eval_events(events, plw) if key in e]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", ms=3, color=color, label=f"PLW={plw:g}")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""``trl-plw race``: the article's RACE prompt-loss-weight experiment, as presets of ``trl-plw sweep``.

For each prompt-loss weight, fine-tune on RACE-format multiple-choice data and evaluate on a schedule: prompt loss,
completion loss, full-sequence loss and answer accuracy (with Wilson 95% intervals), all from the fused pass. The
outputs are those of `trl_plw.experiments.sweep` (the stopping-rule table, steps to the completion-loss minimum, best accuracy,
generation ratio and a recommended weight) plus ``race_sweep.png``.

Presets:
* ``cpu-demo`` (default, ``make demo``): the offline SmolLM2-135M on offline synthetic RACE-format data in the
  regime chosen by the exploration in docs/results/race-exploration (short passages the 135M model learns to
  read), three weights, 60 steps; measured time in the README (docs/results/race-cpu-demo).
* ``cpu-long``: the same regime at the article's six weights, 100 steps; measured 66.2 minutes on 2 CPU cores with
  native bf16 (docs/results/race-cpu-long).
* ``paper``: the article's setup for a GPU user with network: Llama-2-7b-chat-hf, ``ehovy/race`` (all), 2,000
  packed training rows and 500 packed validation rows of up to 2,048 tokens (subsampled with seed 1234, longer
  examples dropped), 10 epochs, batch 8, evaluation every 20 steps, LoRA r=64/alpha=64/dropout 0.1 on all linear
  layers, lr 2e-4 constant with 5% warm-up, weight decay 0.001, grad clip 0.3, bf16, packing with correct document
  boundaries. ``--dry-run`` checks it without a GPU: it formats RACE rows through the Llama-2 chat template and
  prints token counts, Rg, packed rows, optimizer steps and a memory estimate.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any

from trl_plw.experiments.sweep import ARTICLE_SWEEP, SweepArguments, SweepConfig, adapted_layer_count, help_field


@dataclass
class RaceArguments(SweepArguments):
    """`SweepArguments` of a sweep on RACE-format data; the synthetic fields apply to the offline generator only."""

    dataset_name: str = help_field("'synthetic' (offline RACE-format rows), a Hub id (ehovy/race) or a local file.",
                              default="synthetic")  # fmt: skip
    dataset_config: str | None = help_field("RACE configuration: all, middle or high.", default="all")
    synthetic_length: str = help_field(
        "Synthetic article length in words: a preset name (short, medium, long, mixed) or a range 'MIN,MAX' "
        "(see docs/DATA.md).",
        default="20,40",
    )
    synthetic_residents: str | None = help_field("People per synthetic article: N or a range 'MIN,MAX'.", default="1")
    system_prompt: str | None = help_field(
        "The system message of every example; None: the chat template's own (SmolLM2 inserts a 21-token default).",
        default=None,
    )
    # The article's subsampling: whole packed rows of `max_length` tokens, drawn with `subsample_seed` after
    # dropping examples longer than a row.
    train_packed_rows: int | None = help_field(
        "Train on the examples of this many packed rows (None: train_examples examples).", default=None
    )
    eval_packed_rows: int | None = help_field(
        "Evaluate on the examples of this many packed rows (None: eval_examples examples).", default=None
    )
    subsample_seed: int = help_field("Seed of the packed-row subsample.", default=1234)


@dataclass
class RacePreset(RaceArguments, SweepConfig):
    """A sweep on RACE-format data: `RaceArguments` plus the training fields of `SweepConfig`."""

    answer_tokens: tuple[str, ...] | None = ("A", "B", "C", "D")


def _int_range(value: str | None) -> int | tuple[int, int] | None:
    """``"3"`` -> 3, ``"1,3"`` -> (1, 3); a preset name passes through (`_load`)."""
    if value is None:
        return None
    parts = [int(x) for x in value.split(",")]
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


_CPU = dict(
    train_examples=400,
    eval_examples=200,
    per_device_train_batch_size=8,
    # Metrics are token sums, so the evaluation batch changes nothing but speed: 50 rows per batch were 1.3-1.5x
    # slower per evaluation than 8 in fp32 on 2 AVX2 cores (race-exploration, costs; matrix products on ~1,000-row
    # operands ran at 95-117 GFLOP/s there, on ~6,000-row ones at 73).
    per_device_eval_batch_size=8,
    learning_rate=2e-3,
    lora_r=32,
    lora_alpha=32,
    # Cost choices measured on 2 CPU cores (docs/results/race-exploration, #7-#8): LoRA dropout draws a Bernoulli
    # mask per adapted layer and input (210 per step), ~1/6-1/4 of a bf16 training step on CPU, and makes the onset
    # of the lookup depend on the dropout stream; eager attention is ~18% faster per training step than sdpa at ~130
    # tokens per row; an empty system message saves the 21-token default SmolLM2 inserts into every row.
    lora_dropout=0.0,
    attn_implementation="eager",
    system_prompt="",
    max_length=512,
)
"""The regime of docs/results/race-exploration (#5, then #7 for the cost choices)."""

PRESETS: dict[str, RacePreset] = {
    "cpu-demo": RacePreset(**_CPU, plws=(1.0, 0.1, 0.0), max_steps=60, eval_steps=30),
    "cpu-long": RacePreset(**_CPU, plws=ARTICLE_SWEEP, max_steps=100, eval_steps=25),
    "paper": RacePreset(
        model_name_or_path="meta-llama/Llama-2-7b-chat-hf",
        dataset_name="ehovy/race",
        synthetic_length="mixed",
        synthetic_residents=None,
        train_examples=None,
        eval_examples=None,
        train_packed_rows=2000,
        eval_packed_rows=500,
        num_train_epochs=10,
        eval_steps=20,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=2e-4,
        lora_r=64,
        lora_alpha=64,
        lora_dropout=0.1,
        max_length=2048,
        packing=True,
        activation_checkpointing=True,
    ),
}


# ---------------------------------------------------------------------------------------------------------- data
def _load(preset: RacePreset, split: str, n: int | None, seed: int):
    from trl_plw.experiments.data.race import load_race

    extra = (
        {
            "length": preset.synthetic_length
            if "," not in preset.synthetic_length
            else _int_range(preset.synthetic_length),
            "residents": _int_range(preset.synthetic_residents),
        }
        if preset.dataset_name in ("synthetic", "race-synthetic")
        else {}
    )
    return load_race(
        preset.dataset_name,
        config=preset.dataset_config or "all",
        split=split,
        n=n,
        seed=seed,
        system_prompt=preset.system_prompt,
        **extra,
    )


def select_packed_rows(dataset, tokenizer, max_length: int, n_rows: int, seed: int) -> tuple[Any, dict[str, Any]]:
    """The article's subsample: the examples of ``n_rows`` packed rows of ``max_length`` tokens.

    The article tokenizes, drops examples longer than a row, packs everything and keeps a random ``n_rows`` of the
    packed rows. Equivalent in distribution and far cheaper: shuffle the examples with ``seed`` and fill rows in
    that order (first fit over the open rows) until ``n_rows`` rows are full; only the examples needed are
    tokenized. Returns the selected examples and the counts (examples, dropped, rows, fill).
    """
    from trl_plw.experiments.gen_ratio import compute_token_lengths

    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    rows: list[int] = []  # tokens used per row
    chosen: list[int] = []
    dropped = seen = 0
    chunk = 512
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        prompt, completion = compute_token_lengths(dataset.select(idx), tokenizer)
        for i, length in zip(idx, (prompt + completion).tolist(), strict=True):
            seen += 1
            if length > max_length:
                dropped += 1
                continue
            slot = next((r for r, used in enumerate(rows) if used + length <= max_length), None)
            if slot is None:
                if len(rows) == n_rows:
                    break
                rows.append(0)
                slot = len(rows) - 1
            rows[slot] += length
            chosen.append(i)
        else:
            continue
        break
    stats = {
        "examples_read": seen,
        "examples_dropped_too_long": dropped,
        "examples": len(chosen),
        "packed_rows": len(rows),
        "fill": sum(rows) / (len(rows) * max_length) if rows else math.nan,
    }
    return dataset.select(chosen), stats


def load_race_splits(preset: RacePreset, seed: int = 0, tokenizer: Any | None = None):
    """Train and validation sets of a RACE preset: synthetic, Hub or local, subsampled as the preset says."""
    train = _load(preset, "train", preset.train_examples, seed)
    evaluation = _load(preset, "validation", preset.eval_examples, seed)
    if preset.train_packed_rows or preset.eval_packed_rows:
        if tokenizer is None:
            from trl_plw.experiments.offline_model import load_tokenizer

            tokenizer = load_tokenizer(preset.model_name_or_path)
        if preset.train_packed_rows:
            train, _ = select_packed_rows(train, tokenizer, preset.max_length, preset.train_packed_rows,
                                          preset.subsample_seed)  # fmt: skip
        if preset.eval_packed_rows:
            evaluation, _ = select_packed_rows(evaluation, tokenizer, preset.max_length, preset.eval_packed_rows,
                                               preset.subsample_seed)  # fmt: skip
    return train, evaluation


# ---------------------------------------------------------------------------------------------------------- dry run
LLAMA2_7B_CONFIG = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=32000,
)  # fmt: skip
"""meta-llama/Llama-2-7b-chat-hf's config.json sizes, for the memory estimate when the Hub is out of reach."""


def _model_sizes(model: str) -> tuple[dict[str, int], str]:
    try:
        from transformers import AutoConfig

        from trl_plw.experiments.offline_model import resolve_model_path

        cfg = AutoConfig.from_pretrained(resolve_model_path(model))
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        sizes = {k: int(getattr(cfg, k)) for k in keys}
        sizes["num_key_value_heads"] = int(getattr(cfg, "num_key_value_heads", None) or sizes["num_attention_heads"])
        return sizes, "model config"
    except Exception:  # noqa: BLE001 - any failure to reach the config falls back to the known sizes
        if "llama-2-7b" in model.lower():
            return dict(LLAMA2_7B_CONFIG), "Llama-2-7b sizes built in (config unreachable)"
        raise


def memory_estimate(sizes: dict[str, int], preset: RacePreset) -> dict[str, float]:
    """GiB per device for LoRA (or full) training with bf16 weights; an estimate, stated term by term.

    * weights: 2 bytes per parameter (bf16);
    * trainable parameters (LoRA adapters on every linear layer of the adapted layers, or all): fp32 value + grad +
      2 Adam moments, 16 B;
    * activations with gradient checkpointing: each layer's input kept (2 B x tokens x hidden) plus one layer's
      recomputed activations at a time (~34 x tokens x hidden bytes, Korthikanti et al. 2022, flash attention so no
      T^2 term); without checkpointing every adapted layer's (``lora_last_layers``: backward stops below them).
    * logits: the fused loss never builds [tokens, vocab]; shown is what a full-logits fp32 loss would add.
    """
    h, i, n_layers, v = (
        sizes["hidden_size"],
        sizes["intermediate_size"],
        sizes["num_hidden_layers"],
        sizes["vocab_size"],
    )
    kv = h * sizes["num_key_value_heads"] // sizes["num_attention_heads"]
    linear_shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    params = n_layers * (sum(a * b for a, b in linear_shapes) + 2 * h) + 2 * v * h + h
    lora = preset.lora_r > 0
    adapted = adapted_layer_count(preset.lora_last_layers, n_layers) if lora else n_layers
    trainable = adapted * sum(preset.lora_r * (a + b) for a, b in linear_shapes) if lora else params
    tokens = preset.per_device_train_batch_size * preset.max_length
    per_layer = 34 * tokens * h
    if preset.activation_checkpointing:
        # TRL makes the input embeddings require grad under checkpointing, so every layer's input is kept.
        activations = n_layers * 2 * tokens * h + per_layer
    else:
        # Autograd keeps activations only where backward goes: from the lowest adapted layer up.
        activations = adapted * per_layer
    gib = 1024**3
    out = {
        "parameters_billion": params / 1e9,
        "trainable_million": trainable / 1e6,
        "weights_gib": 2 * params / gib,
        "trainable_states_gib": 16 * trainable / gib,
        "activations_gib": activations / gib,
        "full_logits_fp32_gib_avoided": 4 * tokens * v / gib,
    }
    out["total_gib"] = out["weights_gib"] + out["trainable_states_gib"] + out["activations_gib"]
    return out


def _dry_run_tokenizer(preset: RacePreset, name: str | None) -> tuple[Any, str]:
    """The model's tokenizer; offline, the SmolLM2 tokenizer wearing the Llama-2 chat template (approximate)."""
    from trl_plw.experiments.offline_model import load_tokenizer

    try:
        return load_tokenizer(name or preset.model_name_or_path), name or preset.model_name_or_path
    except Exception as err:  # noqa: BLE001 - Hub unreachable, gated model, missing folder: all fall back
        if name is not None:
            raise
        from trl_plw.experiments.data.chat_templates import LLAMA2_CHAT_TEMPLATE

        tokenizer = load_tokenizer("smollm2-135m")
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
        note = (
            f"{preset.model_name_or_path} unreachable ({type(err).__name__}); token counts from the offline SmolLM2 tokenizer "
            "with the Llama-2 chat template set on it: the template is exact, the counts approximate"
        )
        return tokenizer, note


def _dry_run_data(preset: RacePreset) -> tuple[Any, Any, str]:
    try:
        train, evaluation = _load(preset, "train", preset.train_examples, 0), _load(preset, "validation", None, 0)
        return train, evaluation, preset.dataset_name
    except Exception as err:  # noqa: BLE001 - Hub unreachable: the synthetic rows follow the same schema
        synthetic = replace(preset, dataset_name="synthetic", synthetic_length="mixed", synthetic_residents=None)
        n_train = 12 * (preset.train_packed_rows or 100)  # enough rows to fill the packed rows of 2,048 tokens
        n_eval = 12 * (preset.eval_packed_rows or 100)
        note = f"{preset.dataset_name} unreachable ({type(err).__name__}); synthetic RACE rows in the same Hub schema"
        return _load(synthetic, "train", n_train, 0), _load(synthetic, "validation", n_eval, 0), note


def dry_run(preset: RacePreset, tokenizer_name: str | None = None, world_size: int = 1) -> dict[str, Any]:
    """Everything the preset would train on and what it would cost, without a model or a GPU. Prints a report."""
    import numpy as np

    from trl_plw.experiments.gen_ratio import compute_generation_ratios, summarize_ratios

    tokenizer, tok_note = _dry_run_tokenizer(preset, tokenizer_name)
    train, evaluation, data_note = _dry_run_data(preset)
    example = train[0]
    rendered = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
    report: dict[str, Any] = {"tokenizer": tok_note, "data": data_note, "example": rendered}
    splits = {}
    for name, data, n_rows, n_examples in (
        ("train", train, preset.train_packed_rows, preset.train_examples),
        ("eval", evaluation, preset.eval_packed_rows, preset.eval_examples),
    ):
        if n_rows:
            data, stats = select_packed_rows(data, tokenizer, preset.max_length, n_rows, preset.subsample_seed)
        else:
            data = data.select(range(min(len(data), n_examples or len(data))))
            stats = {"examples": len(data)}
        ratios = compute_generation_ratios(data, tokenizer)
        lengths = ratios.prompt_lengths + ratios.completion_lengths
        stats.update(
            prompt_tokens_mean=float(np.mean(ratios.prompt_lengths)),
            completion_tokens_mean=float(np.mean(ratios.completion_lengths)),
            tokens_max=int(lengths.max()),
            rg=summarize_ratios(ratios),
        )
        if not n_rows:
            stats["packed_rows"] = len(data) if not preset.packing else math.ceil(lengths.sum() / preset.max_length)
        splits[name] = stats
    report["splits"] = splits
    rows = splits["train"]["packed_rows"]
    steps_per_epoch = math.ceil(
        rows / (preset.per_device_train_batch_size * preset.gradient_accumulation_steps * world_size)
    )
    total = preset.max_steps if preset.max_steps > 0 else math.ceil(steps_per_epoch * preset.num_train_epochs)
    report["optimizer_steps"] = {"per_epoch": steps_per_epoch, "total": total,
                                 "evaluations": total // preset.eval_steps + 1}  # fmt: skip
    sizes, sizes_note = _model_sizes(preset.model_name_or_path)
    report["memory"] = {**memory_estimate(sizes, preset), "sizes": sizes_note}
    print(format_dry_run(preset, report))
    return report


def format_dry_run(preset: RacePreset, report: dict[str, Any]) -> str:
    m, s = report["memory"], report["optimizer_steps"]
    lines = [
        f"trl-plw race --dry-run: model {preset.model_name_or_path}, {len(preset.plws)} weights {list(preset.plws)}",
        f"  tokenizer: {report['tokenizer']}",
        f"  data: {report['data']}",
        "  one formatted row (chat template, article cut to 300 characters):",
    ]
    text = report["example"]
    start = text.find("Context:")
    shown = text if start < 0 else text[: start + 308] + " [...] " + text[text.find("\nQuestion:") :]
    lines += ["    | " + line for line in shown.splitlines()]
    for name, st in report["splits"].items():
        rg = st["rg"]
        line = (
            f"  {name}: {st['examples']} examples, prompt {st['prompt_tokens_mean']:.1f} tokens mean, completion "
            f"{st['completion_tokens_mean']:.1f}, longest {st['tokens_max']}; Rg mean {rg['mean']:.4g}, ratio of "
            f"totals {rg['ratio_of_totals']:.4g}; packed rows of {preset.max_length}: {st['packed_rows']}"
        )
        if "examples_dropped_too_long" in st:
            line += f" (fill {st['fill']:.1%}, {st['examples_dropped_too_long']} longer examples dropped)"
        lines.append(line)
    lines.append(
        f"  optimizer steps: {s['per_epoch']} per epoch (batch {preset.per_device_train_batch_size} x accumulation "
        f"{preset.gradient_accumulation_steps}), {s['total']} in total, {s['evaluations']} evaluations (every {preset.eval_steps})"
    )
    lines.append(
        f"  memory estimate per GPU ({m['sizes']}): {m['parameters_billion']:.2f}B parameters, weights "
        f"{m['weights_gib']:.1f} GiB + trainable {m['trainable_million']:.0f}M with grads and Adam "
        f"{m['trainable_states_gib']:.1f} GiB + activations {m['activations_gib']:.1f} GiB"
        f" = {m['total_gib']:.1f} GiB (+ framework overhead); full fp32 logits would add "
        f"{m['full_logits_fp32_gib_avoided']:.1f} GiB, which the fused loss never builds"
    )
    return "\n".join(lines)

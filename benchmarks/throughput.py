#!/usr/bin/env python
"""End-to-end training throughput and peak memory: PLWTrainer vs trl.SFTTrainer vs a full-logits weighted loss.

Five trainer configurations run on the same model and the same examples:

1. ``sft_padded``: ``trl.SFTTrainer``, padded batches, ``completion_only_loss=True``;
2. ``sft_packed``: ``trl.SFTTrainer``, BFD packing (``packing=True, packing_strategy="bfd"``, hence padding-free);
3. ``plw_padded``: ``trl_plw.PLWTrainer``, padded batches, ``prompt_loss_weight=0.1``;
4. ``plw_packed``: ``trl_plw.PLWTrainer``, BFD packing / padding-free, ``prompt_loss_weight=0.1``;
5. ``full_logits_padded``: `FullLogitsWeightedTrainer` (defined in this file, not in the library): PLWTrainer's data
   pipeline, but ``compute_loss`` runs the model's ordinary forward (the ``[batch, seq, vocab]`` logits are
   materialized), takes a per-token ``F.cross_entropy(logits.float(), reduction="none")`` and the weighted mean
   ``sum(w * ce) / sum(w)`` with the usual one-token shift: the loss of the prompt-loss-weight article's trainer.
   Padded batches only. The article packed its examples into rows *without* resetting positions or masking
   attention between documents; that lets documents attend to each other, which is incorrect, so it is not
   reproduced here.

on two datasets:

* ``race``: RACE-format rows from ``trl_plw.experiments.data.race.load_race("synthetic")``: long passage prompts, a one-letter
  answer (Rg = completion / prompt tokens ~ 0.01);
* ``instruct``: a deterministic instruction mix generated here (reverse / sort / number a list of words, continue a
  numbered list, rewrite a sentence in capitals) whose completions are about as long as their prompts (Rg ~ 1).

What is held equal. Every configuration trains on the same examples (same generator, seed and count) with the
same ``max_length``, dtype, optimizer (AdamW, constant learning rate), activation checkpointing setting, thread count
and seed, one micro-batch per optimizer step. The real-token budget of a step is held equal: a padded step takes E
examples, a packed step k rows of at most ``max_length`` tokens, with (E, k) chosen from the tokenized lengths
(BFD packing simulated with TRL's own ``pack_dataset``) so that both hold the same number of real tokens on average
(`match_step_sizes`; within 5% where integers allow). Real tokens per step are *measured* (non-padding tokens of
every batch, counted in ``compute_loss``) and reported next to the throughput. The two SFTTrainer runs and the two
PLWTrainer runs of a layout see identical batches (same tokenization, same packing, same sampler seed; checked from
the per-step token counts), so "PLW vs SFT step time" compares the same batches. What differs, by design: the
trainer, the layout (padded vs padding-free) and the loss (completion-only for SFTTrainer, prompt weight 0.1 for the
others, so those train on every token).

Measurement. Each configuration runs in a fresh Python subprocess (so that peak memories do not contaminate each
other) for ``--warmup + --steps`` optimizer steps. A `StepTimer` callback takes ``time.perf_counter()`` at every
``on_step_end`` (and ``on_step_begin``): the step time is the wall time between two consecutive step ends, so it
includes fetching and collating the batch, forward, backward and the optimizer step. Warm-up steps are excluded;
the median over the measured steps is reported (tokens/s = median of per-step real tokens / step time). Peak memory:
on CPU the peak resident set size of the worker process (``getrusage(RUSAGE_SELF).ru_maxrss``; the process also
holds the Python runtime, the model and the dataset, so the RSS just before ``train()`` is reported too); on CUDA
``torch.cuda.max_memory_allocated`` during ``train()``. ``--repeats R`` runs every configuration R times, interleaved,
and reports the median of the per-run medians with the min-max spread (the machine may be shared).

Usage (from a source checkout; the benchmarks are not in the wheel)::

    python benchmarks/throughput.py                   # CPU default: SmolLM2-135M, ~10-15 min on 2 cores
    python benchmarks/throughput.py --quick           # smoke run, ~1-2 min
    python benchmarks/throughput.py --bf16 --out throughput.json
    trl-plw bench --quick                             # the same: the command finds this file in the checkout

On CUDA the default run adds a Llama-3-shaped model built from its config (vocabulary 128,256, a few layers) at
``max_length`` 4096, with the attention implementation from ``trl_plw.attention.select_attn_implementation``.

Torch, transformers and TRL are imported inside functions, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run from a source checkout without installing: the checkout's src/ wins over any installed trl_plw.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _bench_common import MiB, current_rss_bytes, loadavg, machine_info, peak_rss_bytes  # noqa: E402

# name -> (label, trainer kind, packed)
TRAINERS: dict[str, tuple[str, str, bool]] = {
    "sft_padded": ("(1) SFTTrainer padded, completion-only", "sft", False),
    "sft_packed": ("(2) SFTTrainer BFD packed, completion-only", "sft", True),
    "plw_padded": ("(3) PLWTrainer padded, PLW", "plw", False),
    "plw_packed": ("(4) PLWTrainer BFD packed, PLW", "plw", True),
    "full_logits_padded": ("(5) full-logits weighted loss, padded, PLW", "full_logits", False),
}
DATASETS = ("race", "instruct")

# Model presets. "llama3-shape" is random-init from a config: the Llama-3-8B head (vocab 128,256, hidden 4096 with
# GQA 32/8 heads) over only a few layers, so the LM head is a large share of the step, as it is for 8B models.
MODELS = {
    "smollm2-135m": {"pretrained": "smollm2-135m"},
    "llama3-shape": {
        "config": dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=2,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        )
    },
    # Random-init presets that need no download (the GPU check runs them on a machine without the offline model):
    # SmolLM2-135M's own architecture, and a Llama-3.2-1B-shaped model (128k vocabulary, tied head).
    "smollm2-135m-config": {
        "config": dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        )
    },
    "llama3.2-1b-shape": {
        "config": dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            tie_word_embeddings=True,
        )
    },
}

# Per-device run settings. CPU: short rows and few steps (a SmolLM2 step of ~1.5k tokens takes ~10 s on 2 cores).
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": dict(
        models=["smollm2-135m"],
        datasets=list(DATASETS),
        max_length=512,
        tokens_per_step=1200,
        warmup=1,
        steps=4,
        race_length=(80, 240),
        instruct_words=(16, 90),
    ),
    "cpu-quick": dict(
        models=["smollm2-135m"],
        datasets=["race"],
        max_length=384,
        tokens_per_step=420,
        warmup=1,
        steps=2,
        race_length=(60, 90),
        instruct_words=(16, 90),
    ),
    "cuda": dict(
        models=["smollm2-135m", "llama3-shape"],
        datasets=list(DATASETS),
        max_length=4096,
        tokens_per_step=16384,
        warmup=3,
        steps=10,
        race_length="mixed",
        instruct_words=(40, 400),
    ),
    "cuda-quick": dict(
        models=["smollm2-135m"],
        datasets=["race"],
        max_length=2048,
        tokens_per_step=8192,
        warmup=2,
        steps=4,
        race_length="mixed",
        instruct_words=(40, 400),
    ),
}
"""Per-device defaults. ``race_length`` is the synthetic article length in words: (80, 240) keeps every CPU example
under 512 tokens (nothing truncated, so no example loses its answer) with a RACE-like spread of lengths.
``instruct_words`` sizes the instruction mix; (16, 90) gives Rg ~ 1.0. ``tokens_per_step`` is the real-token budget
of one optimizer step, split into examples (padded) and packed rows (see `match_step_sizes`)."""

EXPECTED_RATIOS = {
    # What the design should deliver (docs/BENCHMARKS.md reports each as MET/MISSED): ratios of tokens/s, step time
    # and peak memory between the configurations above, named by what they compare.
    "packed_vs_sft_packed": 0.95,  # (4) tokens/s >= 0.95 x (2)
    "packed_vs_full_logits": 1.5,  # (4) tokens/s >= 1.5 x (5), with lower peak memory
    "packed_vs_padded_race": 1.3,  # (4) tokens/s >= 1.3 x (3) on RACE-format data
    "plw_vs_sft_step_time": 0.05,  # PLWTrainer step time within 5% of SFTTrainer's on the same batches
}


# ----------------------------------------------------------------------------------------------------------------
# Instruction mix with Rg ~ 1 (deterministic)

_WORDS = (
    "apple river stone cloud garden window silver morning candle forest bridge letter orange pocket mirror "
    "harbor lantern meadow pencil rocket saddle thunder velvet walnut yellow anchor basket castle dragon engine "
    "feather ginger hammer island jacket kettle ladder magnet needle oyster parrot quilt ribbon shadow tiger "
    "umbrella violin wagon yogurt zebra blanket compass dolphin emerald falcon glacier helmet igloo jungle kayak "
    "lemon marble nutmeg olive pepper quartz raven sparrow tulip unicorn valley whistle cabin desert echo fossil "
    "granite honey ivory jasmine kitten lotus maple nectar orchid pebble puzzle rabbit salmon timber tunnel "
    "voyage wheat bamboo cactus donkey eagle fabric goblet hazel insect jigsaw koala lizard mango noodle otter "
    "panda quiver rhubarb spider tomato urchin vapor willow button cherry dinner elbow fiddle gravel hollow"
).split()
_SENTENCE_PARTS = (
    ("the old", "a quiet", "every young", "one clever", "the tired", "a friendly", "the brave", "some curious"),
    ("farmer", "teacher", "sailor", "painter", "baker", "student", "doctor", "traveller", "gardener", "pilot"),
    ("carried", "found", "painted", "sold", "borrowed", "repaired", "described", "forgot", "counted", "opened"),
    (
        "a wooden box",
        "the heavy door",
        "three small boats",
        "a bright lamp",
        "the long letter",
        "two green bottles",
        "an empty basket",
        "the broken clock",
        "a blue umbrella",
        "the last ticket",
    ),
    (
        "near the river",
        "before dinner",
        "after the storm",
        "in the market",
        "at the station",
        "under the bridge",
        "during the holiday",
        "behind the school",
        "on a cold morning",
        "without a word",
    ),
)
_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split()
)
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0 <= n < 1000 (``number_words(342) == "three hundred forty-two"``)."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words supports 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(part) for part in _SENTENCE_PARTS)


def instruction_mix_rows(n: int, seed: int = 0, words: tuple[int, int] = (12, 70)) -> list[dict[str, Any]]:
    """``n`` conversational prompt-completion examples whose completion is about as long as the prompt.

    Five tasks in rotation, each with a correct, deterministic answer: reverse a list of words, sort it, write it as a
    numbered list (completion longer than the prompt), continue a numbered list of number words, and rewrite
    sentences in capital letters. ``words`` is the range of list lengths (and scales the other tasks).
    """
    rng = random.Random(seed)
    rows = []
    lo, hi = words
    for i in range(n):
        k = rng.randint(lo, hi)
        task = i % 5
        if task == 0:
            items = [rng.choice(_WORDS) for _ in range(k)]
            prompt = "Reverse the order of these words. Answer with the words only, separated by spaces.\n" + " ".join(
                items
            )
            completion = " ".join(reversed(items))
        elif task == 1:
            items = [rng.choice(_WORDS) for _ in range(k)]
            prompt = "Sort these words alphabetically and separate them with commas.\n" + " ".join(items)
            completion = ", ".join(sorted(items))
        elif task == 2:
            items = [rng.choice(_WORDS) for _ in range(max(2, k // 2))]
            prompt = "Write each of these words on its own line, numbered from 1.\n" + " ".join(items)
            completion = "\n".join(f"{j + 1}. {w}" for j, w in enumerate(items))
        elif task == 3:
            shown = max(2, k // 6)
            more = shown + rng.randint(0, 2)
            start = rng.randint(1, 600)
            listed = "\n".join(f"{j + 1}. {number_words(start + j)}" for j in range(shown))
            prompt = f"Continue this numbered list with the next {more} items, in the same style.\n{listed}"
            completion = "\n".join(f"{j + 1}. {number_words(start + j)}" for j in range(shown, shown + more))
        else:
            sentences = [_sentence(rng) + "." for _ in range(max(1, k // 10))]
            prompt = "Rewrite the following text in capital letters.\n" + " ".join(s.capitalize() for s in sentences)
            completion = " ".join(s.upper() for s in sentences)
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": completion}],
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Data


def build_dataset(spec: dict[str, Any]):
    """The (deterministic) dataset of a run: RACE-format rows or the instruction mix."""
    from datasets import Dataset

    if spec["dataset"] == "race":
        from trl_plw.experiments.data.race import load_race

        length = spec["race_length"]
        return load_race(
            "synthetic",
            split="train",
            n=spec["n_examples"],
            seed=spec["seed"],
            length=tuple(length) if isinstance(length, (list, tuple)) else length,
        )
    if spec["dataset"] == "instruct":
        return Dataset.from_list(instruction_mix_rows(spec["n_examples"], spec["seed"], tuple(spec["instruct_words"])))
    raise ValueError(f"unknown dataset {spec['dataset']!r}; choose from {DATASETS}")


def dataset_stats(dataset, tokenizer, max_length: int) -> dict[str, Any]:
    """Token lengths (tokenized as PLWTrainer does), generation ratio Rg, and the mean length of BFD-packed rows."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    from trl_plw.experiments.gen_ratio import compute_generation_ratios, summarize_ratios
    from trl_plw.roles import tokenize_prompt_completion

    lengths = [
        min(len(tokenize_prompt_completion(tokenizer, ex["prompt"], ex["completion"])["input_ids"]), max_length)
        for ex in dataset
    ]
    ratios = compute_generation_ratios(dataset, tokenizer)
    summary = summarize_ratios(ratios)
    packed = pack_dataset(Dataset.from_dict({"input_ids": [[0] * n for n in lengths]}), max_length, "bfd")
    row_lengths = [sum(s) for s in packed["seq_lengths"]]
    return {
        "n_examples": len(lengths),
        "mean_tokens": statistics.fmean(lengths),
        "min_tokens": min(lengths),
        "max_tokens": max(lengths),
        "total_tokens": sum(lengths),
        "rg_mean": float(summary["mean"]),
        "rg_median": float(summary["median"]),
        "rg_ratio_of_totals": float(summary["ratio_of_totals"]),
        "packed_rows": len(row_lengths),
        "packed_row_mean_tokens": statistics.fmean(row_lengths),
    }


def packed_rows_per_step(examples_per_step: int, mean_tokens: float, packed_row_mean_tokens: float) -> int:
    """Packed rows per step holding as many real tokens, on average, as ``examples_per_step`` padded examples."""
    return max(1, round(examples_per_step * mean_tokens / packed_row_mean_tokens))


def match_step_sizes(mean_tokens: float, packed_row_mean_tokens: float, tokens_per_step: float) -> tuple[int, int]:
    """``(examples per padded step, packed rows per step)`` holding the same real tokens, near ``tokens_per_step``.

    Both are integers, so an exact match is rarely possible: among the pairs whose token counts differ by at most 5%,
    the one closest to the budget wins (the closest match if none is within 5%).
    """
    candidates = []
    for rows in range(1, 257):
        examples = max(1, round(rows * packed_row_mean_tokens / mean_tokens))
        packed, padded = rows * packed_row_mean_tokens, examples * mean_tokens
        mismatch = abs(packed - padded) / max(packed, padded)
        candidates.append((mismatch, abs(padded - tokens_per_step) / tokens_per_step, examples, rows))
        if padded > 4 * tokens_per_step:
            break
    close = [c for c in candidates if c[0] <= 0.05]
    best = min(close, key=lambda c: c[1]) if close else min(candidates)
    return best[2], best[3]


# ----------------------------------------------------------------------------------------------------------------
# Trainers


def _trainer_classes():
    """(SFT, PLW, full-logits) trainer classes with step metering; built lazily (they import torch and TRL)."""
    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    from trl_plw import PLWTrainer

    class _Metered:
        """Records, per micro-batch of training, the real (non-padding) tokens and the trained positions."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self._bench_batches.append(_batch_counts(inputs))
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            if model.training:
                loss = result[0] if return_outputs else result
                self._bench_losses.append(loss.detach())
            return result

    def _batch_counts(inputs) -> dict[str, torch.Tensor | int]:
        input_ids = inputs["input_ids"]
        if "attention_mask" in inputs:
            real = inputs["attention_mask"].sum()
            sequences = input_ids.shape[0]
        else:  # padding-free: one flattened row, documents restart their position ids (no padding: no multiple)
            real = torch.tensor(input_ids.numel())
            sequences = inputs["position_ids"].eq(0).sum()
        if "loss_weights" in inputs:
            trained = inputs["loss_weights"][:, 1:].ne(0).sum()
        else:
            trained = inputs["labels"][:, 1:].ne(-100).sum()
        return {
            "tokens": real,
            "positions": input_ids.numel(),
            "rows": input_ids.shape[0],
            "sequences": sequences,
            "trained_positions": trained,
        }

    class MeteredSFTTrainer(_Metered, SFTTrainer):
        pass

    class MeteredPLWTrainer(_Metered, PLWTrainer):
        pass

    class FullLogitsWeightedTrainer(_Metered, PLWTrainer):
        """The article-style weighted loss over full logits (baseline; not part of the library).

        PLWTrainer's data pipeline and collator provide ``loss_weights``; the loss is computed from the model's
        ordinary forward: the full ``[batch, seq, vocab]`` logits, upcast to float32, a per-token cross-entropy and
        the weighted mean ``sum(w * ce) / sum(w)`` over the micro-batch (with one micro-batch per step and one
        process, the same value as PLWTrainer's global denominator).
        """

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self._bench_batches.append(_batch_counts(inputs))
            inputs = dict(inputs)
            weights = inputs.pop("loss_weights").float()
            for key in ("prompt_mask", "completion_mask", "labels"):
                inputs.pop(key, None)
            outputs = model(**inputs, use_cache=False)  # no plw_* kwargs: the model's own forward, full logits
            logits = outputs.logits
            shift_logits = logits[:, :-1, :].float()
            shift_targets = inputs["input_ids"][:, 1:]
            shift_weights = weights[:, 1:]
            ce = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_targets.reshape(-1), reduction="none"
            )
            loss = (ce * shift_weights.reshape(-1)).sum() / shift_weights.sum().clamp(min=1e-12)
            if model.training:
                self._bench_losses.append(loss.detach())
            return (loss, outputs) if return_outputs else loss

    return MeteredSFTTrainer, MeteredPLWTrainer, FullLogitsWeightedTrainer


def _step_timer_class():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """perf_counter at train begin and at every optimizer step's begin and end (CUDA synchronized)."""

        def __init__(self, trainer_ref: list):
            self.trainer_ref = trainer_ref  # filled after the trainer exists
            self.train_begin = None
            self.steps: list[dict[str, Any]] = []
            self._begin = None

        def _now(self) -> float:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_begin = self._now()

        def on_step_begin(self, args, state, control, **kwargs):
            self._begin = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            end = self._now()
            trainer = self.trainer_ref[0]
            batches, trainer._bench_batches = trainer._bench_batches, []
            previous_end = self.steps[-1]["end"] if self.steps else self.train_begin
            record = {
                "step": state.global_step,
                "end": end,
                "step_s": end - previous_end,
                "compute_s": end - self._begin,
            }
            for key in ("tokens", "positions", "rows", "sequences", "trained_positions"):
                record[key] = int(sum(int(b[key]) for b in batches))
            record["micro_batches"] = len(batches)
            self.steps.append(record)

    return StepTimer


def build_model(spec: dict[str, Any], attn_implementation: str):
    import torch

    preset = MODELS.get(spec["model"])
    if preset is None or "pretrained" in preset:
        from trl_plw.experiments.offline_model import load_model

        name = spec["model"] if preset is None else preset["pretrained"]
        return load_model(name, dtype=torch.float32, attn_implementation=attn_implementation)
    from transformers import LlamaConfig, LlamaForCausalLM

    from trl_plw.attention import ensure_registered

    ensure_registered(attn_implementation)  # the random-init model is built from a config, not by load_model
    torch.manual_seed(spec["seed"])
    config = LlamaConfig(**preset["config"], pad_token_id=2, eos_token_id=2, bos_token_id=1)
    config._attn_implementation = attn_implementation
    # Initialise on the training device: a 1B-parameter random init takes far longer on the CPU than on a GPU
    with torch.device("cuda" if spec["device"] == "cuda" else "cpu"):
        return LlamaForCausalLM(config)


def choose_attention(spec: dict[str, Any]) -> str:
    from trl_plw.attention import select_attn_implementation

    kind, packed = TRAINERS[spec["trainer"]][1:]
    choice = select_attn_implementation(spec["device"], packed=packed, requested=spec.get("attn") or None)
    if spec["device"] == "cuda" and not spec["bf16"] and choice not in ("sdpa", "eager"):
        choice = "sdpa"  # varlen/flash kernels take only half-precision activations
    return choice


def training_args(spec: dict[str, Any], output_dir: str):
    """The PLWConfig / SFTConfig of a run: everything that is not the trainer's own is identical across trainers."""
    from trl import SFTConfig

    from trl_plw import PLWConfig
    from trl_plw._compat import checkpointing_kwargs

    kind, packed = TRAINERS[spec["trainer"]][1:]
    common = dict(
        output_dir=output_dir,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=spec["device"] == "cpu",
        bf16=spec["bf16"],  # SFTConfig turns bf16 on wherever supported (AVX512-BF16 CPUs too): set it for all
        **checkpointing_kwargs(spec["gradient_checkpointing"]),  # activation_checkpointing in transformers >= 5.23
        per_device_train_batch_size=spec["packed_rows_per_step"] if packed else spec["examples_per_step"],
        gradient_accumulation_steps=1,
        max_steps=-1 if spec["max_steps"] is None else spec["max_steps"],
        num_train_epochs=1,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        max_length=spec["max_length"],
        seed=spec["seed"],
        data_seed=spec["seed"],
    )
    if packed:
        common.update(packing=True, packing_strategy="bfd")
    if kind == "sft":
        return SFTConfig(**common, completion_only_loss=True)
    return PLWConfig(**common, prompt_loss_weight=spec["prompt_loss_weight"])


def make_spec(
    trainer: str,
    dataset: str,
    *,
    model: str = "smollm2-135m",
    device: str = "cpu",
    max_length: int = 512,
    examples_per_step: int = 4,
    packed_rows_per_step: int = 2,
    warmup: int = 1,
    steps: int = 3,
    n_examples: int = 64,
    bf16: bool = False,
    gradient_checkpointing: bool = False,
    prompt_loss_weight: float = 0.1,
    race_length: Any = "short",
    instruct_words: tuple[int, int] = (12, 70),
    attn: str | None = None,
    seed: int = 0,
    threads: int | None = None,
    epoch: bool = False,
    tokenizer: str = "smollm2-135m",
) -> dict[str, Any]:
    """A JSON-serializable description of one run. ``epoch=True`` trains one full epoch instead of warmup+steps."""
    if trainer not in TRAINERS:
        raise ValueError(f"unknown trainer {trainer!r}; choose from {list(TRAINERS)}")
    return {
        "trainer": trainer,
        "dataset": dataset,
        "model": model,
        "device": device,
        "max_length": max_length,
        "examples_per_step": examples_per_step,
        "packed_rows_per_step": packed_rows_per_step,
        "warmup": warmup,
        "steps": steps,
        "max_steps": None if epoch else warmup + steps,
        "n_examples": n_examples,
        "bf16": bf16,
        "gradient_checkpointing": gradient_checkpointing,
        "prompt_loss_weight": prompt_loss_weight,
        "race_length": race_length,
        "instruct_words": list(instruct_words),
        "attn": attn,
        "seed": seed,
        "threads": threads,
        "tokenizer": tokenizer,
    }


def run_config(
    spec: dict[str, Any], *, model=None, tokenizer=None, dataset=None, output_dir: str | None = None
) -> dict:
    """Train one configuration in this process and return its per-step measurements and summary.

    ``model``/``tokenizer``/``dataset`` default to the spec's (the real model, its tokenizer, the spec's data); tests
    pass a tiny model. The model is modified (trained, patched): pass a fresh one per call.
    """
    import torch
    from transformers import set_seed

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    set_seed(spec["seed"])
    if tokenizer is None:
        from trl_plw.experiments.offline_model import load_tokenizer

        tokenizer = load_tokenizer(spec.get("tokenizer", "smollm2-135m"))
    if dataset is None:
        dataset = build_dataset(spec)
    attn = choose_attention(spec)
    if model is None:
        model = build_model(spec, attn)
    sft_cls, plw_cls, full_cls = _trainer_classes()
    kind = TRAINERS[spec["trainer"]][1]
    cls = {"sft": sft_cls, "plw": plw_cls, "full_logits": full_cls}[kind]
    cuda = spec["device"] == "cuda"

    with tempfile.TemporaryDirectory() as tmp:
        args = training_args(spec, output_dir or tmp)
        timer_ref: list = []
        timer = _step_timer_class()(timer_ref)
        trainer = cls(model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
        trainer._bench_batches, trainer._bench_losses = [], []
        timer_ref.append(trainer)
        rss_before = current_rss_bytes()
        load_before = (loadavg() or [None])[0]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            allocated_before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        trainer.train()
        total_s = time.perf_counter() - start
        peak = {"peak_rss_bytes": peak_rss_bytes(), "rss_before_train_bytes": rss_before}
        # before/after train(): how busy the machine was
        peak["loadavg_1min"] = [load_before, (loadavg() or [None])[0]]
        if cuda:
            peak.update(
                cuda_peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                cuda_allocated_before_bytes=allocated_before,
            )
        losses = [float(x) for x in trainer._bench_losses]

    steps = timer.steps
    for record, loss in zip(steps, losses, strict=False):
        record["loss"] = loss
    return {
        "spec": spec,
        "attn_implementation": attn,
        "torch_threads": torch.get_num_threads(),
        "trainer_class": type(trainer).__name__,
        "train_rows": len(trainer.train_dataset),
        "steps": steps,
        "train_s": total_s,
        **peak,
        "summary": summarize_steps(steps, spec["warmup"] if spec["max_steps"] is not None else 0),
    }


def summarize_steps(steps: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Median step time and tokens/s over the steps after ``warmup`` (all steps if there are no more)."""
    measured = steps[warmup:] if len(steps) > warmup else steps
    if not measured:
        return {"measured_steps": 0}
    per_step_tps = [s["tokens"] / s["step_s"] for s in measured if s["step_s"] > 0]
    return {
        "measured_steps": len(measured),
        "step_s_median": statistics.median(s["step_s"] for s in measured),
        "compute_s_median": statistics.median(s["compute_s"] for s in measured),
        "tokens_per_s_median": statistics.median(per_step_tps) if per_step_tps else 0.0,
        "tokens_per_s_aggregate": sum(s["tokens"] for s in measured) / sum(s["step_s"] for s in measured),
        "tokens_per_step_mean": statistics.fmean(s["tokens"] for s in measured),
        "padding_fraction": 1 - sum(s["tokens"] for s in measured) / max(1, sum(s["positions"] for s in measured)),
        "sequences_per_step_mean": statistics.fmean(s["sequences"] for s in measured),
        "trained_positions_per_step_mean": statistics.fmean(s["trained_positions"] for s in measured),
        "tokens_total_all_steps": sum(s["tokens"] for s in steps),
    }


# ----------------------------------------------------------------------------------------------------------------
# Orchestration (parent process)


def _run_worker(spec: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; return its result (or an error record)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        # The worker must import this very trl_plw (a checkout's src/, or wherever this process found it), whatever
        # is on its default path: put the folder that holds the package first.
        import trl_plw

        package_root = str(Path(trl_plw.__file__).resolve().parents[1])
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            str(spec_path),
            "--worker-out",
            str(out_path),
        ]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"spec": spec, "error": f"timed out after {timeout} s"}
        if proc.returncode != 0 or not out_path.exists():
            return {"spec": spec, "error": f"worker exited with {proc.returncode}", "stderr_tail": proc.stderr[-4000:]}
        return json.loads(out_path.read_text())


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def aggregate(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """(model/dataset) -> trainer -> medians over repeats of the per-run medians, with min-max spreads."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    grouped: dict[tuple[str, str, str], list[dict]] = {}
    for r in results:
        if "error" in r:
            continue
        s = r["spec"]
        grouped.setdefault((s["model"], s["dataset"], s["trainer"]), []).append(r)
    for (model, dataset, trainer), runs in grouped.items():
        summaries = [r["summary"] for r in runs]
        entry = {
            "runs": len(runs),
            "tokens_per_s": _spread([x["tokens_per_s_median"] for x in summaries]),
            "step_s": _spread([x["step_s_median"] for x in summaries]),
            "compute_s": _spread([x["compute_s_median"] for x in summaries]),
            "tokens_per_step": statistics.fmean(x["tokens_per_step_mean"] for x in summaries),
            "padding_fraction": statistics.fmean(x["padding_fraction"] for x in summaries),
            "sequences_per_step": statistics.fmean(x["sequences_per_step_mean"] for x in summaries),
            "trained_positions_per_step": statistics.fmean(x["trained_positions_per_step_mean"] for x in summaries),
            "peak_mib": _spread([r["peak_rss_bytes"] / MiB for r in runs]),
            "rss_before_train_mib": _spread([(r["rss_before_train_bytes"] or 0) / MiB for r in runs]),
            "step_tokens": [[st["tokens"] for st in r["steps"]] for r in runs],
            "measured_step_s": [[st["step_s"] for st in r["steps"][r["spec"]["warmup"] :]] for r in runs],
            "attn_implementation": runs[0]["attn_implementation"],
        }
        if "cuda_peak_allocated_bytes" in runs[0]:
            entry["peak_mib"] = _spread([r["cuda_peak_allocated_bytes"] / MiB for r in runs])
            entry["peak_kind"] = "cuda_max_memory_allocated"
        else:
            entry["peak_kind"] = "peak_rss"
        table.setdefault(f"{model}/{dataset}", {})[trainer] = entry
    return table


def check_ratios(table: dict[str, dict[str, dict[str, Any]]], stat: str = "median") -> list[dict[str, Any]]:
    """`EXPECTED_RATIOS` checked per model/dataset, on tokens/s and peak memory.

    ``stat="median"``: the median over repeats of the per-run medians; ``stat="max"``: the best run of each
    configuration (on a shared machine, the run least disturbed by other jobs).
    """
    checks = []
    for key, rows in table.items():
        dataset = key.split("/", 1)[1]

        def tps(name, rows=rows):
            return rows[name]["tokens_per_s"][stat] if name in rows else None

        def add(name, description, value, target, met, extra=None, key=key):
            checks.append(
                {
                    "where": key,
                    "check": name,
                    "description": description,
                    "value": value,
                    "target": target,
                    "met": met,
                    **(extra or {}),
                }
            )

        if tps("plw_packed") and tps("sft_packed"):
            ratio = tps("plw_packed") / tps("sft_packed")
            add(
                "packed_vs_sft_packed",
                "(4) tokens/s / (2) tokens/s",
                ratio,
                f">= {EXPECTED_RATIOS['packed_vs_sft_packed']}",
                ratio >= EXPECTED_RATIOS["packed_vs_sft_packed"],
            )
        if tps("plw_packed") and tps("full_logits_padded"):
            ratio = tps("plw_packed") / tps("full_logits_padded")
            mem4, mem5 = rows["plw_packed"]["peak_mib"]["median"], rows["full_logits_padded"]["peak_mib"]["median"]
            add(
                "packed_vs_full_logits",
                "(4) tokens/s / (5) tokens/s, and peak memory (4) < (5)",
                ratio,
                f">= {EXPECTED_RATIOS['packed_vs_full_logits']} and lower peak",
                ratio >= EXPECTED_RATIOS["packed_vs_full_logits"] and mem4 < mem5,
                {"peak_mib_4": mem4, "peak_mib_5": mem5},
            )
        if tps("plw_padded") and tps("full_logits_padded"):
            ratio = tps("plw_padded") / tps("full_logits_padded")
            mem3, mem5 = rows["plw_padded"]["peak_mib"]["median"], rows["full_logits_padded"]["peak_mib"]["median"]
            add(
                "padded_vs_full_logits",
                "(3) tokens/s / (5) tokens/s (both padded: fused head vs full logits; info)",
                ratio,
                "info",
                None,
                {"peak_mib_3": mem3, "peak_mib_5": mem5},
            )
        if tps("plw_packed") and tps("plw_padded"):
            ratio = tps("plw_packed") / tps("plw_padded")
            target = EXPECTED_RATIOS["packed_vs_padded_race"]
            add(
                "packed_vs_padded",
                "(4) tokens/s / (3) tokens/s",
                ratio,
                f">= {target}" if dataset == "race" else "info",
                ratio >= target if dataset == "race" else None,
            )
        for plw, sft in (("plw_padded", "sft_padded"), ("plw_packed", "sft_packed")):
            if plw in rows and sft in rows:
                same = rows[plw]["step_tokens"][0] == rows[sft]["step_tokens"][0]
                # Same batches step by step: the median of the per-step ratios cancels the batch-size variation
                paired = [
                    a / b
                    for run_a, run_b in zip(rows[plw]["measured_step_s"], rows[sft]["measured_step_s"], strict=False)
                    for a, b in zip(run_a, run_b, strict=False)
                ]
                ratio = (
                    statistics.median(paired)
                    if same and paired
                    else rows[plw]["step_s"]["median"] / rows[sft]["step_s"]["median"]
                )
                add(
                    f"step_time_{plw}_vs_{sft}",
                    f"step time {TRAINERS[plw][0][:3]} / {TRAINERS[sft][0][:3]} (median of per-step ratios)",
                    ratio,
                    "<= 1.05",
                    ratio <= 1 + EXPECTED_RATIOS["plw_vs_sft_step_time"],
                    {
                        "same_batches": same,
                        "ratio_of_medians": rows[plw]["step_s"]["median"] / rows[sft]["step_s"]["median"],
                    },
                )
    return checks


def markdown_table(table: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = []
    for key, rows in table.items():
        ref_packed = rows.get("sft_packed", {}).get("tokens_per_s", {}).get("median")
        ref_full = rows.get("full_logits_padded", {}).get("tokens_per_s", {}).get("median")
        peak_kind = next(iter(rows.values()))["peak_kind"]
        peak_label = "peak RSS MiB" if peak_kind == "peak_rss" else "peak alloc MiB"
        lines.append(f"\n**{key}**\n")
        lines.append(
            f"| trainer | real tok/step | pad % | tokens/s (median, min-max) | step s | {peak_label} | "
            "RSS before train MiB | vs (2) | vs (5) |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for name in TRAINERS:
            if name not in rows:
                continue
            r = rows[name]
            t = r["tokens_per_s"]
            spread = f"{t['median']:.0f} ({t['min']:.0f}-{t['max']:.0f})" if t["n"] > 1 else f"{t['median']:.0f}"
            vs2 = f"{t['median'] / ref_packed:.2f}x" if ref_packed else "-"
            vs5 = f"{t['median'] / ref_full:.2f}x" if ref_full else "-"
            lines.append(
                f"| {TRAINERS[name][0]} | {r['tokens_per_step']:.0f} | {100 * r['padding_fraction']:.0f} | {spread} | "
                f"{r['step_s']['median']:.2f} | {r['peak_mib']['median']:.0f} | {r['rss_before_train_mib']['median']:.0f} | "
                f"{vs2} | {vs5} |"
            )
    return "\n".join(lines)


def format_checks(checks: list[dict[str, Any]]) -> str:
    lines = []
    for c in checks:
        verdict = "info" if c["met"] is None else ("MET" if c["met"] else "MISSED")
        extra = ""
        if "peak_mib_4" in c:
            extra = f" (peak {c['peak_mib_4']:.0f} vs {c['peak_mib_5']:.0f} MiB)"
        if "peak_mib_3" in c:
            extra = f" (peak {c['peak_mib_3']:.0f} vs {c['peak_mib_5']:.0f} MiB)"
        if "same_batches" in c:
            extra = f" (same batches: {c['same_batches']}; ratio of median step times {c['ratio_of_medians']:.3f})"
        lines.append(f"- [{verdict}] {c['where']}: {c['description']} = {c['value']:.3f}, target {c['target']}{extra}")
    return "\n".join(lines)


def plan(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The device and the run settings: the profile for the device, overridden by explicit flags."""
    device = args.device
    if device == "auto":
        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = "cpu"
    profile = dict(PROFILES[device + ("-quick" if args.quick else "")])
    for name in ("max_length", "tokens_per_step", "warmup", "steps"):
        if getattr(args, name) is not None:
            profile[name] = getattr(args, name)
    if args.models:
        profile["models"] = args.models.split(",")
    if args.datasets:
        profile["datasets"] = args.datasets.split(",")
    if args.race_length:
        preset = args.race_length
        profile["race_length"] = [int(v) for v in preset.split(",")] if "," in preset else preset
    return device, profile


def plan_dataset(dataset: str, profile: dict[str, Any], args: argparse.Namespace, tokenizer) -> dict[str, Any]:
    """Step sizes (examples per padded step, rows per packed step) and the dataset size for one dataset."""
    probe = make_spec(
        "sft_padded",
        dataset,
        n_examples=64,
        race_length=profile["race_length"],
        instruct_words=profile["instruct_words"],
        seed=args.seed,
    )
    stats = dataset_stats(build_dataset(probe), tokenizer, profile["max_length"])
    examples, rows = match_step_sizes(
        stats["mean_tokens"], stats["packed_row_mean_tokens"], profile["tokens_per_step"]
    )
    if args.examples_per_step:
        examples = args.examples_per_step
        rows = packed_rows_per_step(examples, stats["mean_tokens"], stats["packed_row_mean_tokens"])
    if args.packed_rows:
        rows = args.packed_rows
    total_steps = profile["warmup"] + profile["steps"]
    # enough examples for every step of both layouts, with a margin for the spread of lengths
    needed = max(examples, rows * stats["packed_row_mean_tokens"] / stats["mean_tokens"]) * total_steps
    n_examples = args.n_examples or int(needed * 1.3) + 4
    final = make_spec(
        "sft_padded",
        dataset,
        n_examples=n_examples,
        race_length=profile["race_length"],
        instruct_words=profile["instruct_words"],
        seed=args.seed,
    )
    stats = dataset_stats(build_dataset(final), tokenizer, profile["max_length"])
    stats.update(
        examples_per_step=examples,
        packed_rows_per_step=rows,
        n_examples=n_examples,
        race_length=profile["race_length"] if dataset == "race" else None,
        instruct_words=profile["instruct_words"] if dataset == "instruct" else None,
    )
    return stats


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from trl_plw.experiments.offline_model import load_tokenizer

    device, profile = plan(args)
    trainers = args.trainers.split(",") if args.trainers else list(TRAINERS)
    for name in trainers:
        if name not in TRAINERS:
            raise SystemExit(f"unknown trainer {name!r}; choose from {', '.join(TRAINERS)}")
    for name in profile["datasets"]:
        if name not in DATASETS:
            raise SystemExit(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    info = machine_info()
    print(f"# trl-plw throughput benchmark ({device}{', quick' if args.quick else ''})")
    print(
        f"machine: {info.get('gpu') or info['cpu_model']} ({info['cpu_count']} CPUs), torch {info['torch']}, "
        f"transformers {info['transformers']}, trl {info['trl']}, dtype {'bf16 autocast' if args.bf16 else 'fp32'}, "
        f"threads {args.threads or info['torch_threads']}"
    )
    tokenizer = load_tokenizer(args.tokenizer)
    specs, data_info = [], {}
    for dataset in profile["datasets"]:
        stats = plan_dataset(dataset, profile, args, tokenizer)
        data_info[dataset] = stats
        examples, rows = stats["examples_per_step"], stats["packed_rows_per_step"]
        print(
            f"data {dataset}: {stats['n_examples']} examples, {stats['mean_tokens']:.0f} tokens/example "
            f"({stats['min_tokens']}-{stats['max_tokens']}), Rg mean {stats['rg_mean']:.3f} / median "
            f"{stats['rg_median']:.3f} / ratio of totals {stats['rg_ratio_of_totals']:.3f}; padded step = "
            f"{examples} examples (~{examples * stats['mean_tokens']:.0f} tokens), packed step = {rows} rows of <= "
            f"{profile['max_length']} tokens (BFD rows average {stats['packed_row_mean_tokens']:.0f}, "
            f"~{rows * stats['packed_row_mean_tokens']:.0f} tokens)",
            flush=True,
        )
        for model in profile["models"]:
            for trainer in trainers:
                specs.append(
                    make_spec(
                        trainer,
                        dataset,
                        model=model,
                        device=device,
                        max_length=profile["max_length"],
                        examples_per_step=examples,
                        packed_rows_per_step=rows,
                        warmup=profile["warmup"],
                        steps=profile["steps"],
                        n_examples=stats["n_examples"],
                        bf16=args.bf16,
                        gradient_checkpointing=args.gradient_checkpointing,
                        prompt_loss_weight=args.prompt_loss_weight,
                        race_length=profile["race_length"],
                        instruct_words=profile["instruct_words"],
                        attn=args.attn,
                        seed=args.seed,
                        threads=args.threads,
                        tokenizer=args.tokenizer,
                    )
                )
    results = []
    started = time.perf_counter()
    for repeat in range(args.repeats):
        # rotate the order every repeat so that a burst of background load does not always hit the same trainer
        shift = repeat % len(specs)
        for spec in specs[shift:] + specs[:shift]:
            t0 = time.perf_counter()
            result = run_config(spec) if args.in_process else _run_worker(spec, args.timeout)
            result["repeat"] = repeat
            results.append(result)
            if args.out:  # saved after every run, so that an interrupted benchmark keeps what it measured
                partial = {"machine": info, "device": device, "datasets": data_info, "runs": results, "partial": True}
                Path(args.out).write_text(json.dumps(partial, indent=1))
            label = f"[{repeat + 1}/{args.repeats}] {spec['model']}/{spec['dataset']}/{spec['trainer']}"
            if "error" in result:
                print(f"{label}: ERROR {result['error']}\n{result.get('stderr_tail', '')}", flush=True)
                continue
            s = result["summary"]
            print(
                f"{label}: {s['tokens_per_s_median']:.0f} tok/s, step {s['step_s_median']:.2f} s, "
                f"{s['tokens_per_step_mean']:.0f} tok/step, peak {result['peak_rss_bytes'] / MiB:.0f} MiB RSS "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    table = aggregate(results)
    checks = check_ratios(table)
    checks_best = check_ratios(table, stat="max") if args.repeats > 1 else []
    info["loadavg_end"] = loadavg()
    report = {
        "machine": info,
        "device": device,
        "settings": {
            **profile,
            "threads": args.threads,
            "bf16": args.bf16,
            "gradient_checkpointing": args.gradient_checkpointing,
            "prompt_loss_weight": args.prompt_loss_weight,
            "repeats": args.repeats,
            "quick": args.quick,
        },
        "datasets": data_info,
        "table": table,
        "checks": checks,
        "checks_best_run": checks_best,
        "runs": results,
        "wall_s": time.perf_counter() - started,
    }
    print_report(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.out}")
    return report


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true", help="Smoke run (~1-2 min on CPU): shorter rows, fewer steps.")
    parser.add_argument("--out", help="Write the full report (settings, per-step records, table, checks) as JSON.")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast for every trainer (default: where native: CUDA with bf16, CPUs with AVX512-BF16/AMX; "
        "else fp32). The recorded CPU runs used --no-bf16.",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="Gradient checkpointing for every trainer (default: off for all; TRL's default is on).",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--trainers", help=f"Comma-separated subset of: {', '.join(TRAINERS)}.")
    parser.add_argument("--datasets", help=f"Comma-separated subset of: {', '.join(DATASETS)}.")
    parser.add_argument("--models", help=f"Comma-separated models (presets: {', '.join(MODELS)}; or a path/Hub id).")
    parser.add_argument(
        "--tokenizer",
        default="smollm2-135m",
        help="Tokenizer for every run: the offline default (smollm2-135m) or a folder/Hub id. A folder with SmolLM2's "
        "tokenizer files lets the random-init presets run where the offline model package is not installed.",
    )
    parser.add_argument("--max-length", type=int, help="Row length: truncation (padded) and packed row size.")
    parser.add_argument(
        "--tokens-per-step",
        type=int,
        help="Real-token budget of a step (default 1200 on CPU); sets examples and packed rows per step.",
    )
    parser.add_argument(
        "--examples-per-step", type=int, help="Examples per padded step (overrides --tokens-per-step)."
    )
    parser.add_argument(
        "--packed-rows", type=int, help="Packed rows per step (default: matched to the padded tokens)."
    )
    parser.add_argument("--warmup", type=int, help="Warm-up steps, excluded from the statistics.")
    parser.add_argument("--steps", type=int, help="Measured steps.")
    parser.add_argument("--repeats", type=int, default=1, help="Runs per configuration (fresh process each).")
    parser.add_argument("--n-examples", type=int, help="Dataset size (default: enough for warm-up + measured steps).")
    parser.add_argument(
        "--race-length",
        help="Synthetic RACE article length in words: a preset (short, medium, long, mixed) or MIN,MAX.",
    )
    parser.add_argument("--prompt-loss-weight", type=float, default=0.1)
    parser.add_argument("--attn", help="Attention implementation (default: select_attn_implementation's choice).")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in every worker (default: torch's).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds before a worker is killed.")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="Run every configuration in this process (debugging; peak memories then mix).",
    )
    parser.add_argument("--from-json", help="Re-print the table and checks of a saved --out report (no run).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    return parser


def print_report(report: dict[str, Any]) -> None:
    print(markdown_table(report["table"]))
    print("\nTargets (median over repeats):")
    print(format_checks(report["checks"]))
    if report.get("checks_best_run"):
        print("\nTargets (best run of each configuration):")
        print(format_checks(report["checks_best_run"]))


def rerender(path: str) -> dict[str, Any]:
    """Recompute the table and the checks of a saved report from its per-run records, and print them."""
    report = json.loads(Path(path).read_text())
    report["table"] = aggregate(report["runs"])
    report["checks"] = check_ratios(report["table"])
    repeats = max((r.get("repeat", 0) for r in report["runs"]), default=0) + 1
    report["checks_best_run"] = check_ratios(report["table"], stat="max") if repeats > 1 else []
    print_report(report)
    return report


def resolve_bf16(args: argparse.Namespace) -> None:
    """``--bf16``/``--no-bf16`` as given; unset, the project's rule: bf16 only where the hardware computes it
    natively (`trl_plw.precision`), so a CPU without AVX512-BF16/AMX is not benchmarked on emulated bf16."""
    if args.bf16 is None:
        import torch

        from trl_plw.precision import default_bf16

        on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
        args.bf16 = default_bf16(use_cpu=on_cpu)


def run_from_args(args: argparse.Namespace) -> int:
    resolve_bf16(args)
    if args.from_json:
        report = rerender(args.from_json)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
        return 0
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        result = run_config(spec)
        Path(args.worker_out).write_text(json.dumps(result))
        return 0
    report = run_benchmark(args)
    return 1 if any("error" in r for r in report["runs"]) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

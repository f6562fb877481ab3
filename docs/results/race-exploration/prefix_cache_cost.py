"""Measure the frozen-bottom-layer cache of race-exploration's "one lever left" (the estimate in the README).

    python docs/results/race-exploration/prefix_cache_cost.py [K] [REPS]   # K adapted top layers (default 15)

With LoRA on the top K layers only, the bottom layers are frozen and deterministic, so their output for a row can be
computed once and read back at every step, weight and seed. This script checks that reading it back gives the same
loss and LoRA gradients as the whole model (fp32, up to summation order), then times, interleaved so that machine
noise hits both alike: one training step (forward + backward, batch 8 of the preset's rows) and one evaluation
forward of a batch of 8, each with the whole model and with the top K layers on cached inputs, plus building the
cache for the preset's 400 + 200 rows. The loss here is the model's own cross-entropy over every token (PLW 1 with
full logits), the same in both variants; only the ratio is the point, as in step_cost.py.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import replace

import peft
import torch

from trl_plw.experiments.offline_model import load_model, load_tokenizer
from trl_plw.experiments.race import PRESETS, load_race_splits
from trl_plw.experiments.sweep import _lora_config


def rows_to_ids(tokenizer, dataset) -> list[list[int]]:
    out = []
    for row in dataset:
        messages = [*row["prompt"], *row["completion"]] if isinstance(row["prompt"], list) else None
        if messages is not None:
            out.append(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
        else:
            out.append(tokenizer(row["prompt"] + row["completion"])["input_ids"])
    return out


def pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad_id)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids, mask


def main(k: int, reps: int) -> None:
    preset = replace(PRESETS["cpu-demo"], lora_last_layers=k)
    tokenizer = load_tokenizer(preset.model)
    train, evaluation = load_race_splits(preset, 0)
    train_ids, eval_ids = rows_to_ids(tokenizer, train), rows_to_ids(tokenizer, evaluation)
    model = load_model(preset.model, dtype=torch.float32, attn_implementation="eager")
    model = peft.get_peft_model(model, _lora_config(preset, model))
    for name, param in model.named_parameters():  # LoRA's B starts at 0: give it values so gradients reach A
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    base = model.get_base_model()
    layers = base.model.layers
    bottom = len(layers) - k

    class _Stop(Exception):
        pass

    def cached_inputs(ids_rows: list[list[int]]) -> list[torch.Tensor]:
        """The input of layer `bottom` for each row, computing the bottom layers only (the forward stops there)."""
        captured: list[torch.Tensor] = []

        def capture(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured.append(hidden[0].detach().clone())
            raise _Stop

        handle = layers[bottom].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                for row in ids_rows:
                    try:
                        base.model(input_ids=torch.tensor([row]), use_cache=False)
                    except _Stop:
                        pass
        finally:
            handle.remove()
        return captured

    def run_whole(ids, mask, train_mode: bool):
        base.model.layers = layers
        labels = ids.masked_fill(mask == 0, -100)
        with torch.set_grad_enabled(train_mode):
            return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss

    def run_top(states: list[torch.Tensor], ids, mask, train_mode: bool):
        base.model.layers = layers[bottom:]
        embeds = torch.zeros(ids.shape[0], ids.shape[1], states[0].shape[-1])
        for i, state in enumerate(states):
            embeds[i, : state.shape[0]] = state
        labels = ids.masked_fill(mask == 0, -100)
        try:
            with torch.set_grad_enabled(train_mode):
                return base(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss
        finally:
            base.model.layers = layers

    batch_rows = train_ids[:8]
    ids, mask = pad(batch_rows, tokenizer.pad_token_id)
    states = cached_inputs(batch_rows)

    # Equality: the same loss and LoRA gradients (fp32: summation order only)
    model.train()
    grads = []
    for run in (lambda: run_whole(ids, mask, True), lambda: run_top(states, ids, mask, True)):
        model.zero_grad()
        loss = run()
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grad_a), (loss_b, grad_b) = grads
    assert grad_a.keys() == grad_b.keys() and grad_a, "the same LoRA parameters must get gradients"
    worst = max(((grad_a[n] - grad_b[n]).norm() / grad_a[n].norm().clamp_min(1e-30)).item() for n in grad_a)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def step(run):
        model.zero_grad()
        run().backward()

    times: dict[str, list[float]] = {"train_whole": [], "train_top": [], "eval_whole": [], "eval_top": []}
    eval_rows = eval_ids[:8]
    eval_batch = pad(eval_rows, tokenizer.pad_token_id)
    eval_states = cached_inputs(eval_rows)
    for rep in range(reps + 1):  # the first round warms up and is dropped
        model.train()
        t = {
            "train_whole": timed(lambda: step(lambda: run_whole(ids, mask, True))),
            "train_top": timed(lambda: step(lambda: run_top(states, ids, mask, True))),
        }
        model.eval()
        t["eval_whole"] = timed(lambda: run_whole(*eval_batch, False))
        t["eval_top"] = timed(lambda: run_top(eval_states, *eval_batch, False))
        if rep:
            for key, value in t.items():
                times[key].append(value)
    cache_seconds = timed(lambda: cached_inputs(train_ids + eval_ids))
    median = {key: round(statistics.median(v), 2) for key, v in times.items()}
    print(
        json.dumps(
            {
                "adapted_top_layers": k,
                "threads": torch.get_num_threads(),
                "tokens_per_train_batch": int(mask.sum()),
                "loss_whole_vs_top": [loss_a, loss_b],
                "worst_relative_lora_grad_difference": worst,
                "median_s": median,
                "train_step_ratio_top_over_whole": round(median["train_top"] / median["train_whole"], 3),
                "eval_ratio_top_over_whole": round(median["eval_top"] / median["eval_whole"], 3),
                "cache_build_s_for_rows": [round(cache_seconds, 1), len(train_ids) + len(eval_ids)],
            }
        )
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15, int(sys.argv[2]) if len(sys.argv) > 2 else 4)

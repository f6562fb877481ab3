"""Seconds per training step of the CPU RACE regime under cost overrides (no evaluation), for exploration #7-#8.

    python docs/results/race-exploration/step_cost.py '{"lora_dropout": 0.05, "system_prompt": null}' sdpa   # session 4 settings
    python docs/results/race-exploration/step_cost.py '{}' eager --profile   # the presets' settings + a profile of step 4
    python docs/results/race-exploration/step_cost.py '{"lora_last_layers": 15}' eager   # adapters on the top half only
    python docs/results/race-exploration/step_cost.py '{"plw": 0}' eager --eval 50 8   # PLW 0; time evaluations first

Prints the per-step wall times of 6 steps (PLW 1 unless the overrides give "plw") and their mean over steps 2-6 (step
1 warms up; a profiled step 4 is left out); with ``--eval B [B ...]``, first the wall time of one evaluation of the
preset's evaluation set at each batch size B. Run it alone on the CPU and compare variants inside one session: the
numbers are ratios, not constants of the code.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from transformers import TrainerCallback

from trl_plw.experiments.offline_model import load_model, load_tokenizer
from trl_plw.experiments.race import PRESETS, load_race_splits
from trl_plw.experiments.sweep import _lora_config, build_config, resolve_bf16, sort_by_length
from trl_plw.trainer import PLWTrainer


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def main(overrides: dict, attn: str, profile: bool, eval_batch_sizes: list[int]) -> None:
    plw = float(overrides.pop("plw", 1.0))
    preset = replace(PRESETS["cpu-demo"], max_steps=6, **overrides)
    train, evaluation = load_race_splits(preset, 0)
    dtype = torch.bfloat16 if resolve_bf16(preset) else torch.float32
    model = load_model(preset.model, dtype=dtype, attn_implementation=attn)
    timer = StepTimer()
    with TemporaryDirectory() as out:
        args = build_config(preset, plw, Path(out), 0, eval_on_start=False)
        args.eval_strategy, args.disable_tqdm = "no", True
        trainer = PLWTrainer(
            model,
            args=args,
            train_dataset=train,
            eval_dataset=sort_by_length(evaluation),
            processing_class=load_tokenizer(preset.model),
            peft_config=_lora_config(preset, model),
            callbacks=[timer],
        )
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            step, calls = trainer.training_step, [0]

            def profiled(*a, **k):
                calls[0] += 1
                if calls[0] != 4:
                    return step(*a, **k)
                with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                    result = step(*a, **k)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
                return result

            trainer.training_step = profiled
        eval_seconds = {}
        for batch_size in eval_batch_sizes:
            trainer.args.per_device_eval_batch_size = batch_size
            start = time.perf_counter()
            trainer.evaluate()
            eval_seconds[batch_size] = round(time.perf_counter() - start, 1)
        trainer.train()
    steps = [round(t, 2) for t in timer.times]
    timed = [t for i, t in enumerate(timer.times) if i > 0 and not (profile and i == 3)]  # warm-up, profiled step
    print(json.dumps({"overrides": overrides, "plw": plw, "attn": attn, "dtype": str(dtype), "steps_s": steps,
                      "mean_s_steps_2_6": round(sum(timed) / len(timed), 2),
                      "eval_s_by_batch_size": eval_seconds}))  # fmt: skip


if __name__ == "__main__":
    rest = sys.argv[3:]
    sizes = [int(x) for x in rest[rest.index("--eval") + 1 :] if x.isdigit()] if "--eval" in rest else []
    main(json.loads(sys.argv[1]), sys.argv[2], "--profile" in rest, sizes)

"""Regime exploration for the CPU RACE reproduction: one prompt-loss weight, many training regimes.

Each configuration is a set of `RacePreset` overrides; the script trains it with `trl_plw.experiments.race.run_one`,
records the answer-accuracy / completion-loss curve and the wall time, and appends one JSON line per configuration
to ``OUT/results.jsonl``. Configurations already in that file are skipped, so a killed exploration continues.

    python docs/results/race-exploration/explore.py OUT CONFIGS.json
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from trl_plw.experiments.race import PRESETS, load_race_splits
from trl_plw.experiments.sweep import resolve_bf16, run_one


def main(out: str, configs_path: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.jsonl"
    done = {json.loads(line)["name"] for line in results.read_text().splitlines()} if results.exists() else set()
    for config in json.loads(Path(configs_path).read_text()):
        name = config.pop("name")
        if name in done:
            continue
        plw = config.pop("plw", 0.1)
        for key in ("synthetic_length", "synthetic_residents"):
            if isinstance(config.get(key), list):
                config[key] = tuple(config[key])
        preset = replace(PRESETS["cpu-demo"], **config)
        start = time.perf_counter()
        events = run_one(preset, plw, out_dir / name, load_race_splits(preset, preset.seeds[0]), preset.seeds[0])
        wall = time.perf_counter() - start
        evals = [e for e in events if "eval_answer_accuracy" in e]
        record = {
            "name": name,
            "plw": plw,
            "overrides": config,
            "preset": {k: v for k, v in asdict(preset).items() if k != "extra"},
            "steps": [e["step"] for e in evals],
            "accuracy": [round(e["eval_answer_accuracy"], 4) for e in evals],
            "completion_loss": [round(e["eval_completion_loss"], 4) for e in evals],
            "prompt_loss": [round(e["eval_prompt_loss"], 4) for e in evals],
            "wall_seconds": round(wall, 1),
            "bf16": resolve_bf16(preset),
        }
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

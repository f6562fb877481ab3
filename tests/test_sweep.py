"""`trl-plw sweep` end to end on a small local JSONL (tiny random model, real tokenizer), resume, statistics."""

from __future__ import annotations

import json
import math

import pytest
from conftest import make_tiny_llama

from trl_plw.cli import main
from trl_plw.experiments.sweep import recommend, seed_curves, summarize, summary_markdown, wilson_interval


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-sweep-model")
    make_tiny_llama(vocab_size=len(smollm2_tokenizer), hidden_size=32, num_layers=2).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return str(folder)


def _write_jsonl(path, n=14):
    letters = "ABCD"
    with path.open("w") as f:
        for i in range(n):
            prompt = [{"role": "user", "content": f"Item {i}: which letter is number {i % 4 + 1}? A, B, C or D."}]
            f.write(json.dumps({"prompt": prompt, "completion": [{"role": "assistant", "content": letters[i % 4]}]}))
            f.write("\n")


def _eval_at(run_folder, step):
    events = [json.loads(x) for x in (run_folder / "metrics.jsonl").read_text().splitlines()]
    return next(e for e in events if e["step"] == step and "eval_completion_loss" in e)


def _last(run_folder):
    return [json.loads(x) for x in (run_folder / "metrics.jsonl").read_text().splitlines()][-1]


def _step0(run_folder):
    return _eval_at(run_folder, 0)


def test_sweep_cli_on_local_jsonl_end_to_end_and_resume(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    _write_jsonl(data)
    out = tmp_path / "out"
    common = [
        "sweep",
        "--dataset_name",
        str(data),
        "--model_name_or_path",
        tiny_model_dir,
        "--max_steps",
        "2",
        "--eval_steps",
        "2",
        "--eval_examples",
        "4",
        "--per_device_train_batch_size",
        "2",
        "--per_device_eval_batch_size",
        "4",
        "--lora_r",
        "4",
        "--max_length",
        "128",
        "--answer_tokens",
        "A",
        "B",
        "C",
        "D",
        "--no-bf16",
        "--output_dir",
        str(out),
    ]
    assert main([*common, "--plw", "1", "0"]) == 0
    for name in ("metrics.csv", "summary.json", "summary.md", "sweep.png", "config.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert [r["plw"] for r in rows] == [1.0, 0.0]
    for r in rows:
        assert r["n_eval"] == 4 and r["accuracy_metric"] == "eval_answer_accuracy"
        lo, hi = r["acc_at_min_comp_loss_ci"]
        assert 0 <= lo <= r["acc_at_min_comp_loss"] <= hi <= 1
        assert r["min_comp_loss_step"] in (0, 2) and r["best_acc"] >= r["initial_acc"]
    assert rows[0]["final_prompt_loss"] < rows[1]["final_prompt_loss"]  # PLW 1 trains the prompt, PLW 0 does not
    assert summary["recommendation"]["plw"] in (1.0, 0.0)
    assert summary["gen_ratio"]["completion_tokens_mean"] > 0 and 0 < summary["gen_ratio"]["ratio_of_totals"] < 1
    text = (out / "summary.md").read_text()
    assert "Recommended prompt-loss weight" in text and "Stopping rule" in text and "Wilson" in text
    evals = [json.loads(x) for x in (out / "plw_1" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if "eval_completion_loss" in e] == [0, 2]

    # The untrained model is evaluated once: PLW 0's step 0 is PLW 1's, and equals what PLW 0 computes itself.
    shared = _step0(out / "plw_0")
    assert shared["initial_eval_shared_from"] == 1.0 and "eval_loss" not in shared
    assert "initial_eval_shared_from" not in _step0(out / "plw_1")
    fresh_out = tmp_path / "fresh"
    assert main([*common[:-1], str(fresh_out), "--plw", "0", "--no-share-initial-eval"]) == 0
    fresh = _step0(fresh_out / "plw_0")
    assert "initial_eval_shared_from" not in fresh
    metrics = [k for k in fresh if k.startswith("eval_") and k not in ("eval_loss", "eval_runtime")
               and not k.endswith("per_second")]  # fmt: skip
    assert {"eval_prompt_loss", "eval_completion_loss", "eval_sequence_loss", "eval_answer_accuracy"} <= set(metrics)
    for key in metrics:
        # The same model on the same items: equal up to float32 summation order (a few ulps of a loss ~ 10).
        assert shared[key] == pytest.approx(fresh[key], rel=1e-6, abs=1e-7), key
    # ... and training does not depend on whether step 0 was evaluated (the eval's DataLoader draws from the
    # global RNG that LoRA dropout uses next): the same run trains to the same step-2 metrics either way.
    shared_end, fresh_end = _eval_at(out / "plw_0", 2), _eval_at(fresh_out / "plw_0", 2)
    for key in metrics:
        # Same ops, same order, same process: equal to rounding (a dropout mask drawn differently moves them ~1e-6).
        assert shared_end[key] == pytest.approx(fresh_end[key], rel=1e-10, abs=1e-12), key

    # Resume: the finished weights are read back, only the new one trains.
    before = (out / "plw_1" / "metrics.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*common, "--plw", "1", "0", "0.1"]) == 0
    assert (out / "plw_1" / "metrics.jsonl").stat().st_mtime_ns == before
    assert (out / "plw_0.1" / "done.json").is_file()
    assert [r["plw"] for r in json.loads((out / "summary.json").read_text())["rows"]] == [1.0, 0.0, 0.1]
    assert _last(out / "plw_0.1")["attn_implementation"] == "sdpa"  # the CPU default

    # Resuming with other settings would mix two sweeps in one table: refused, naming the field and the fix.
    with pytest.raises(ValueError, match=r"attn_implementation: None -> 'eager'.*--no-resume"):
        main([*common, "--plw", "1", "0", "--attn_implementation", "eager"])
    # The override reaches the model.
    eager_out = tmp_path / "eager"
    assert main([*common[:-1], str(eager_out), "--plw", "0", "--attn_implementation", "eager"]) == 0
    assert _last(eager_out / "plw_0")["attn_implementation"] == "eager"


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(50, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
    assert wilson_interval(0, 10)[0] == 0 and wilson_interval(10, 10)[1] == pytest.approx(1)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_summary_pools_seeds_and_reports_the_three_findings():
    def ev(seed, step, seq, comp, acc):
        return {
            "plw": 0.1,
            "seed": seed,
            "step": step,
            "eval_sequence_loss": seq,
            "eval_completion_loss": comp,
            "eval_answer_accuracy": acc,
            "eval_prompt_loss": seq,
        }

    events = [
        ev(0, 0, 3, 2, 0.25),
        ev(0, 10, 2, 1.0, 0.6),
        ev(0, 20, 1, 1.5, 0.5),
        ev(1, 0, 3, 2, 0.25),
        ev(1, 10, 2, 1.2, 0.7),
        ev(1, 20, 1.5, 1.1, 0.4),
    ]
    (row,) = summarize(events, (0.1,), n_eval=100)
    assert row["seeds"] == [0, 1]
    assert row["acc_at_min_seq_loss"] == pytest.approx(0.45) and row["min_seq_loss_step"] == 20
    assert row["acc_at_min_comp_loss"] == pytest.approx(0.5) and row["steps_to_min_comp_loss"] == 15
    assert row["best_acc"] == pytest.approx(0.65)
    lo, hi = row["best_acc_ci"]
    assert (lo, hi) == pytest.approx(wilson_interval(130, 200))
    assert "0.650 [" in summary_markdown([row]) and "pooled over seeds" in summary_markdown([row])
    rec = recommend([row], {"ratio_of_totals": 0.01, "mean": 0.012})
    assert rec["plw"] == 0.1 and "Rt = 0.01" in rec["text"] and rec["learned"] and "Weak evidence" not in rec["text"]
    flat = dict(row, initial_acc_ci=[0.55, 0.7])
    assert not recommend([flat], None)["learned"] and "Weak evidence" in recommend([flat], None)["text"]

    # The plot's thin per-seed lines: each seed's own curve, apart from the other seed and other weights.
    other_weight = dict(ev(0, 10, 9, 9, 0.0), plw=1.0)
    curves = seed_curves([*events, other_weight], 0.1, "eval_answer_accuracy")
    assert curves == {0: {0: 0.25, 10: 0.6, 20: 0.5}, 1: {0: 0.25, 10: 0.7, 20: 0.4}}


def test_sort_by_length_orders_rows_and_keeps_them():
    import datasets

    from trl_plw.experiments.sweep import sort_by_length

    rows = [
        {"prompt": [{"role": "user", "content": "x" * n}], "completion": [{"role": "assistant", "content": "A"}]}
        for n in (30, 5, 17, 5)
    ]
    ordered = sort_by_length(datasets.Dataset.from_list(rows))
    assert [len(r["prompt"][0]["content"]) for r in ordered] == [5, 5, 17, 30]
    text = sort_by_length(datasets.Dataset.from_list([{"text": "bb"}, {"text": "a"}]))
    assert text["text"] == ["a", "bb"]


def test_lora_last_layers_adapts_the_top_layers_and_backward_stops_below_them():
    import peft
    import torch

    from trl_plw.experiments.sweep import SweepConfig, _lora_config

    model = make_tiny_llama(hidden_size=32, num_layers=4)
    config = SweepConfig(lora_r=2, lora_alpha=2, lora_dropout=0.0, lora_last_layers=2)
    assert set(_lora_config(config, model).target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    peft_model = peft.get_peft_model(model, _lora_config(config, model))
    adapted = {int(n.split(".layers.")[1].split(".")[0]) for n, p in peft_model.named_parameters() if p.requires_grad}
    assert adapted == {2, 3}

    # The cost claim: with no adapter below layer 2, backpropagation never enters layers 0 and 1.
    reached: list[int] = []
    for i, layer in enumerate(model.model.layers):
        layer.register_full_backward_hook(lambda module, gin, gout, i=i: reached.append(i))
    ids = torch.randint(0, 128, (2, 6))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert sorted(set(reached)) == [2, 3]

    with pytest.raises(ValueError, match="lora_last_layers=5 must be between 1 and the model's 4"):
        _lora_config(SweepConfig(lora_last_layers=5), make_tiny_llama(num_layers=4))
    with pytest.raises(ValueError, match="lora_r=0 means full fine-tuning"):
        SweepConfig(lora_r=0, lora_last_layers=2)
    every = _lora_config(SweepConfig())
    assert every.target_modules == "all-linear" and every.layers_to_transform is None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sweep_config_sets_checkpointing_under_its_current_name(tmp_path, checkpointing):
    """transformers >= 5.23 renamed `gradient_checkpointing` to `activation_checkpointing` and warns on the old
    name (removed in v6): the sweep must pass the new one, and the choice must still reach the trainer."""
    from conftest import future_warnings_as_errors

    from trl_plw.experiments.sweep import SweepConfig, build_config

    with future_warnings_as_errors():
        args = build_config(SweepConfig(activation_checkpointing=checkpointing), 0.1, tmp_path)
    assert getattr(args, "activation_checkpointing", checkpointing) is checkpointing  # transformers >= 5.23
    assert args.gradient_checkpointing is checkpointing  # the old name mirrors the new one for readers

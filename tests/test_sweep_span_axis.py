"""`trl-plw sweep --sweep_weight <span rule>`: the sweep varies one span's weight the way it varies the prompt weight."""

from __future__ import annotations

import json

import pytest
from test_sweep import tiny_model_dir  # noqa: F401 - the fixture

from trl_plw.cli import main
from trl_plw.spans import SpanRule, resolve_span_rules, with_rule_weight


def test_with_rule_weight_sets_one_rule_and_round_trips():
    spec = with_rule_weight("hermes", "tool_call", 0.5)
    rules = resolve_span_rules(json.loads(json.dumps(spec)))  # JSON-able, read back to the same rules
    assert [(r.name, r.weight) for r in rules] == [("tool_call", 0.5), ("tool_response", 0.0)]
    assert resolve_span_rules(with_rule_weight(None, "think", 0.3)) == (SpanRule(r"(?s)<think>.*?</think>", 0.3,
                                                                                  name="think"),)  # fmt: skip
    named = {"(?s)<a>.*?</a>": {"weight": 1.0, "name": "answer"}}
    assert resolve_span_rules(with_rule_weight(named, "answer", 2.0))[0].weight == 2.0
    with pytest.raises(ValueError, match="No span rule is named 'answr'"):
        with_rule_weight(named, "answr", 1.0)


def _parse(argv):
    from trl_plw.cli import sweep
    from trl_plw.experiments.sweep import SweepArguments, SweepConfig

    parser = sweep.build_parser(SweepArguments, SweepConfig(), "trl-plw sweep", None, "runs/sweep")
    return sweep.parse_config(parser, argv, SweepConfig)[0]


def test_span_sweep_config_sets_the_rule_weight_and_keeps_the_prompt_weight(tmp_path):
    from trl_plw.experiments.sweep import build_config

    config = _parse(["--dataset_name", "d.jsonl", "--sweep_weight", "think", "--span_weights", "hermes",
                     "--prompt_loss_weight", "0.1", "--plw", "0", "0.5"])  # fmt: skip
    assert config.sweeps_span and config.plws == (0.0, 0.5)
    args = build_config(config, 0.5, tmp_path / "think_0.5")
    assert args.prompt_loss_weight == 0.1
    assert [(r.name, r.weight) for r in resolve_span_rules(args.span_weights)] == [
        ("tool_call", 2.0), ("tool_response", 0.0), ("think", 0.5)]  # fmt: skip
    with pytest.raises(ValueError, match="No span rule is named 'thinking'"):
        _parse(["--dataset_name", "d.jsonl", "--sweep_weight", "thinking"])
    with pytest.raises(ValueError, match="prompt_loss_weight cannot be set for a sweep"):  # the prompt sweep's axis
        _parse(["--dataset_name", "d.jsonl", "--prompt_loss_weight", "0.3"])


def test_span_weight_sweep_end_to_end(tiny_model_dir, tmp_path):  # noqa: F811 - the fixture
    data = tmp_path / "think.jsonl"
    with data.open("w") as f:
        for i in range(12):
            prompt = [{"role": "user", "content": f"Item {i}: which letter is number {i % 4 + 1}?"}]
            answer = f"<think>Number {i % 4 + 1} is the letter {'ABCD'[i % 4]}.</think>{'ABCD'[i % 4]}"
            f.write(json.dumps({"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]}) + "\n")
    out = tmp_path / "out"
    argv = ["sweep", "--dataset_name", str(data), "--model_name_or_path", tiny_model_dir, "--max_steps", "2",
            "--eval_steps", "2", "--eval_examples", "4", "--per_device_train_batch_size", "2",
            "--per_device_eval_batch_size", "4", "--lora_r", "4", "--max_length", "128", "--no-bf16",
            "--sweep_weight", "think", "--plw", "0", "1", "--prompt_loss_weight", "0", "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["swept"] == "think" and [r["plw"] for r in summary["rows"]] == [0.0, 1.0]
    text = (out / "summary.md").read_text()
    assert (
        "span rule `think`" in text
        and "| think weight |" in text
        and "Recommended weight of span rule `think`" in text
    )
    assert "PLW" not in text  # the prompt weight is fixed: no line may read as if it were swept
    assert "article's claims, tested" not in text and summary["gen_ratio"] is None
    evals = {}
    for weight in ("0", "1"):
        events = [json.loads(x) for x in (out / f"think_{weight}" / "metrics.jsonl").read_text().splitlines()]
        evals[weight] = {e["step"]: e for e in events if "eval_span_think_loss" in e}
        assert set(evals[weight]) == {0, 2}
    # the same untrained model at step 0; training with the think span at weight 0 vs 1 moves the model differently
    assert evals["0"][0]["eval_span_think_loss"] == pytest.approx(evals["1"][0]["eval_span_think_loss"], rel=1e-6)
    assert evals["0"][2]["eval_span_think_loss"] != evals["1"][2]["eval_span_think_loss"]


def test_a_span_sweep_recommends_the_measured_best_without_the_prompt_weight_prior():
    """On a tie the prompt sweep leans to 0.1 (the article's advice); nothing says that of a span, so the best wins."""
    from trl_plw.experiments.sweep import recommend

    def row(weight, acc):  # overlapping 95% intervals: a statistical tie
        return {"plw": weight, "acc_at_min_comp_loss": acc, "acc_at_min_comp_loss_ci": [0.5, 0.8],
                "min_comp_loss_step": 10, "initial_acc_ci": [0.1, 0.3]}  # fmt: skip

    rows = [row(0.1, 0.62), row(1.0, 0.66)]
    ratio = {"ratio_of_totals": 0.05, "mean": 0.05}
    prompt = recommend(rows, ratio)
    span = recommend(rows, ratio, span="think")
    assert prompt["plw"] == 0.1 and "Rt = 0.05" in prompt["text"] and "PLW 1" in prompt["text"]
    assert span["plw"] == 1.0 and span["tied"] == [0.1, 1.0]
    assert span["text"].startswith("Recommended weight of span rule `think`: **1**")
    assert "Rt =" not in span["text"] and "PLW" not in span["text"] and "think weight 0.1, 1" in span["text"]
    # not learned (the best interval overlaps the step-0 one): weak evidence, and still no prior for a span
    unlearned = [dict(r, initial_acc_ci=[0.55, 0.7]) for r in rows]
    assert "the article's prior" in recommend(unlearned, ratio)["text"]
    weak = recommend(unlearned, ratio, span="think")
    assert "Weak evidence" in weak["text"] and "prior, not a finding" not in weak["text"] and weak["plw"] == 1.0

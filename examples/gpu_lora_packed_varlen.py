"""GPU recipe: LoRA + BFD packing + ``plw_varlen`` attention + bf16, at PLW 0.1.

For: fine-tuning a 7B-class model on one GPU with prompt-loss weighting, packed rows whose documents never attend
to each other (true varlen attention through PyTorch's own flash kernel, no ``flash-attn`` build), and the fused
loss that never materializes the logits. On a CUDA GPU (e.g. the RACE setup of the prompt-loss-weight article)::

    python examples/gpu_lora_packed_varlen.py --model meta-llama/Llama-2-7b-chat-hf --max-length 2048 \\
        --batch-size 8 --lora-r 64 --max-steps 500 --gradient-checkpointing --output-dir runs/lora-plw

On a CPU it runs too (sdpa with a block-diagonal mask, fp32 unless ``--bf16``); the test suite runs it that way
with a tiny model. Data: the offline synthetic RACE set (``--dataset`` takes a Hub id or a json/jsonl/parquet file).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from _common import config_kwargs, parse
from peft import LoraConfig

from trl_plw import PLWConfig, PLWTrainer, load_model, load_tokenizer
from trl_plw._compat import checkpointing_kwargs
from trl_plw.cli.sft import load_any_dataset


def main(argv: Sequence[str] | None = None) -> PLWTrainer:
    def add(p):
        p.add_argument("--dataset", default="race-synthetic")
        p.add_argument("--num-examples", type=int, default=None, help="Use only the first N training examples.")
        p.add_argument("--max-length", type=int, default=2048)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--lora-r", type=int, default=64)
        p.add_argument("--prompt-loss-weight", type=float, default=0.1)
        p.add_argument("--attn", default=None, help="Attention backend (default: plw_varlen on CUDA, else sdpa).")
        p.add_argument("--gradient-checkpointing", action="store_true")

    args = parse(__doc__, argv, add)
    cuda = torch.cuda.is_available()
    attn = args.attn or ("plw_varlen" if cuda else "sdpa")
    if attn == "plw_varlen":
        from trl_plw.attention import register_attention_backends

        register_attention_backends()  # explicit: nothing registers itself by being imported
    bf16 = cuda if args.bf16 is None else args.bf16
    model = load_model(args.model, attn_implementation=attn, dtype=torch.bfloat16 if bf16 and cuda else None)
    tokenizer = load_tokenizer(args.model)
    train = load_any_dataset(args.dataset)
    if args.num_examples is not None:
        train = train.select(range(min(args.num_examples, len(train))))
    config = PLWConfig(
        **config_kwargs(args, learning_rate=2e-4, per_device_train_batch_size=args.batch_size, bf16=bf16),
        prompt_loss_weight=args.prompt_loss_weight,
        packing=True,
        packing_strategy="bfd",  # padding-free rows with document boundaries (position_ids + cu_seq_lens)
        max_length=args.max_length,
        **checkpointing_kwargs(args.gradient_checkpointing),  # activation_checkpointing in transformers >= 5.23
        warmup_steps=0.05,
        weight_decay=0.001,
        max_grad_norm=0.3,
    )
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_r, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = PLWTrainer(model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=lora)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()

"""``trl-plw prepare-model`` and ``trl-plw generate``: the offline default model (`trl_plw.experiments.offline_model`)."""

from __future__ import annotations

import argparse

from trl_plw.cli import COMMANDS


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """The two small commands that belong to no other module."""
    prep = subparsers.add_parser("prepare-model", help=COMMANDS["prepare-model"][1])
    prep.add_argument("--force", action="store_true", help="Rebuild the cached folder even if it looks complete.")
    prep.set_defaults(func=_prepare_model)

    gen = subparsers.add_parser("generate", help=COMMANDS["generate"][1])
    gen.add_argument("prompt", help="User message to answer.")
    gen.add_argument("--model", default="smollm2-135m", help="Model alias, Hub id or local folder.")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.set_defaults(func=_generate)


def _prepare_model(args: argparse.Namespace) -> int:
    from trl_plw.experiments.offline_model import ensure_default_model

    print(ensure_default_model(force=args.force))
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from trl_plw.experiments.offline_model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0

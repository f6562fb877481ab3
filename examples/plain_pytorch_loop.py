"""The collator and the fused weighted loss in a plain PyTorch loop: no Trainer, gradient accumulation done right.

For: custom training loops (research code, other frameworks) that want real-valued prompt-loss weights without
TRL. Two things matter:

* the loss never builds ``[tokens, vocab]`` logits: `weighted_linear_cross_entropy` consumes the backbone's hidden
  states and the LM head weight;
* with gradient accumulation the denominator is the weight sum of the WHOLE window, computed before the first
  micro-batch's forward, and every micro-batch's loss is ``sum(w * ce) / window_denominator``. Dividing each
  micro-batch by its own weight sum (a mean of means, the usual ``loss / accumulation_steps``) weights tokens of
  short micro-batches more, so the update would depend on how the window is split.

    python examples/plain_pytorch_loop.py --max-steps 20
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from _common import PAIRS, parse

from trl_plw import DataCollatorForWeightedCompletionLM, weighted_linear_cross_entropy
from trl_plw.experiments.offline_model import load_model, load_tokenizer
from trl_plw.roles import tokenize_prompt_completion


def tokenized_examples(tokenizer) -> list[dict[str, Any]]:
    """``input_ids`` + ``token_roles`` per example: roles travel with the data, weights are applied at collation."""
    return [
        tokenize_prompt_completion(tokenizer, [{"role": "user", "content": p}], [{"role": "assistant", "content": c}])
        for p, c in PAIRS
    ]


def window_denominator(micro_batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Sum of the weights of every predicted position (the first token predicts nothing) over the window."""
    return float(sum(b["loss_weights"][:, 1:].sum(dtype=torch.float64) for b in micro_batches))


def accumulate_window(model, micro_batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Forward and backward of one accumulation window; returns its loss. The gradients are exactly those of the
    window as one batch: each micro-batch is divided by the window's denominator, not its own."""
    denominator = window_denominator(micro_batches)
    head = model.get_output_embeddings().weight
    total = 0.0
    for batch in micro_batches:
        hidden = model.get_decoder()(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).last_hidden_state
        # Shift once, here: position t's weight is for predicting token t from the hidden state at t - 1.
        loss = weighted_linear_cross_entropy(
            hidden[:, :-1].reshape(-1, hidden.size(-1)),
            head,
            batch["labels"][:, 1:].reshape(-1),
            batch["loss_weights"][:, 1:].reshape(-1),
            reduction="sum",
            normalizer=denominator,
        )
        loss.backward()
        total += loss.item()
    return total


def main(argv: Sequence[str] | None = None) -> list[float]:
    def add(p):
        p.add_argument("--prompt-loss-weight", type=float, default=0.1)
        p.add_argument("--micro-batch-size", type=int, default=2)
        p.add_argument("--accumulation-steps", type=int, default=2)

    args = parse(__doc__, argv, add)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model).train()
    collator = DataCollatorForWeightedCompletionLM(
        tokenizer=tokenizer, prompt_loss_weight=args.prompt_loss_weight, loss_weights_applied=True
    )
    examples = tokenized_examples(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    window = args.micro_batch_size * args.accumulation_steps
    losses = []
    for step in range(args.max_steps):
        chosen = [examples[(step * window + i) % len(examples)] for i in range(window)]
        micro_batches = [
            collator(chosen[i : i + args.micro_batch_size]) for i in range(0, window, args.micro_batch_size)
        ]
        losses.append(accumulate_window(model, micro_batches))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step + 1}: loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()

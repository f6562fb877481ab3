"""Throughput of DataCollatorForWeightedCompletionLM on 2k-token rows, and its share of a training step.

Cases (each a batch of ``--batch`` rows of ``--seq-len`` tokens, collated padded and padding-free):

* ``completion_mask``: TRL's 0/1 prompt/completion mask (prompt weight 0.1);
* ``token_roles``: role codes (system/user/template/completion) with per-role weights and a scalar example weight;
* ``loss_weights``: explicit per-token float weights;
* ``template``: no per-token column; ChatML response/instruction templates matched in the ids (multi-turn rows);
* ``packed``: BFD-style packed rows (``seq_lengths``, ~``--docs-per-row`` documents each) with ``token_roles`` and a
  per-token example weight.

The rows are lists of Python ints, as a ``datasets`` dataset yields them, so the time includes list -> tensor
conversion. As a reference, TRL's ``DataCollatorForLanguageModeling`` collates the same ids with prebuilt labels.

``--with-model`` times one forward+backward step of the real SmolLM2-135M (``trl_plw.experiments.offline_model.load_model()``, fp32,
sdpa) at a smaller shape (``--model-batch`` x ``--model-seq-len``; CPU is slow), extrapolates it linearly per token to
the benchmark's batch shape, and prints the collator's share of a step: collate / (collate + step). Linear
extrapolation underestimates a 2k-token step (attention grows quadratically), so the share is an upper bound.

    python benchmarks/collator.py
    python benchmarks/collator.py --with-model --json collator.json
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from typing import Any

import torch
from _bench_common import write_json

from trl_plw.collator import DataCollatorForWeightedCompletionLM
from trl_plw.roles import Role

# SmolLM2 (ChatML) ids: <|im_start|>=1, <|im_end|>=2, "user"=4093, "ass"+"istant"=520, 9531, "\n"=198
IM_START, IM_END, NEWLINE = 1, 2, 198
USER_HEADER = [IM_START, 4093, NEWLINE]
ASSISTANT_HEADER = [IM_START, 520, 9531, NEWLINE]
VOCAB = 49152


def _random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(17, VOCAB) for _ in range(n)]  # no special tokens


def make_chat_document(rng: random.Random, length: int, turns: int) -> tuple[list[int], list[int]]:
    """A ChatML-shaped multi-turn document of exactly ``length`` tokens and its token roles."""
    ids: list[int] = []
    roles: list[int] = []
    budget = length
    per_turn = max(16, budget // max(1, turns))
    while len(ids) < length:
        user_len = max(1, int(per_turn * rng.uniform(0.3, 0.6)))
        asst_len = max(1, per_turn - user_len - 12)
        for header, body, role in ((USER_HEADER, user_len, Role.USER), (ASSISTANT_HEADER, asst_len, Role.COMPLETION)):
            ids += header
            roles += [Role.TEMPLATE] * len(header)
            ids += _random_tokens(rng, body) + [IM_END]
            roles += [role] * (body + 1)
            ids.append(NEWLINE)
            roles.append(Role.TEMPLATE)
    return ids[:length], [int(r) for r in roles[:length]]


def make_examples(
    case: str, batch: int, seq_len: int, docs_per_row: int, seed: int
) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """The batch for one case, and each row's completion mask (for the TRL reference)."""
    rng = random.Random(seed)
    examples, masks = [], []
    for _ in range(batch):
        if case == "packed":
            cuts = sorted(rng.sample(range(1, seq_len), docs_per_row - 1))
            lengths = [b - a for a, b in zip([0, *cuts], [*cuts, seq_len], strict=True)]
            ids, roles, weight = [], [], []
            for n in lengths:
                doc_ids, doc_roles = make_chat_document(rng, n, turns=1)
                ids += doc_ids
                roles += doc_roles
                weight += [rng.choice([0.5, 1.0, 2.0])] * n
            examples.append({"input_ids": ids, "token_roles": roles, "weight": weight, "seq_lengths": lengths})
            masks.append([int(r == Role.COMPLETION) for r in roles])
            continue
        ids, roles = make_chat_document(rng, seq_len, turns=4)
        masks.append([int(r == Role.COMPLETION) for r in roles])
        example: dict[str, Any] = {"input_ids": ids}
        if case == "completion_mask":
            example["completion_mask"] = [int(r == Role.COMPLETION) for r in roles]
        elif case == "token_roles":
            example["token_roles"] = roles
            example["weight"] = rng.choice([0.5, 1.0, 2.0])
        elif case == "loss_weights":
            example["loss_weights"] = [1.0 if r == Role.COMPLETION else 0.1 for r in roles]
        elif case != "template":
            raise ValueError(case)
        examples.append(example)
    return examples, masks


def make_collator(case: str, padding_free: bool, tokenizer) -> DataCollatorForWeightedCompletionLM:
    kwargs: dict[str, Any] = {
        "pad_token_id": IM_END,
        "prompt_loss_weight": 0.1,
        "padding_free": padding_free,
        "loss_weights_applied": True,
    }
    if case in ("token_roles", "packed"):
        kwargs["role_weights"] = {"template": 0.0, "user": 0.2}
    if case == "template":
        if tokenizer is not None:
            kwargs.update(
                tokenizer=tokenizer,
                response_template="<|im_start|>assistant\n",
                instruction_template="<|im_start|>user\n",
            )
        else:
            kwargs.update(response_template=ASSISTANT_HEADER, instruction_template=USER_HEADER)
    return DataCollatorForWeightedCompletionLM(**kwargs)


def time_call(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def trl_reference(
    examples: list[dict[str, Any]], masks: list[list[int]], padding_free: bool, repeats: int
) -> list[float]:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = []
    for ex, mask in zip(examples, masks, strict=True):
        rows.append(
            {
                "input_ids": ex["input_ids"],
                "labels": [t if m else -100 for t, m in zip(ex["input_ids"], mask, strict=True)],
            }
        )
    collator = DataCollatorForLanguageModeling(pad_token_id=IM_END, padding_free=padding_free)
    return time_call(lambda: collator(rows), repeats)


def model_step_seconds_per_token(batch: int, seq_len: int, repeats: int) -> dict[str, Any]:
    from trl_plw.experiments.offline_model import load_model

    model = load_model(dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    ids = torch.randint(17, model.config.vocab_size, (batch, seq_len))

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()

    times = time_call(step, repeats, warmup=1)
    median = statistics.median(times)
    return {"shape": [batch, seq_len], "step_s": median, "s_per_token": median / (batch * seq_len)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--docs-per-row", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--cases", nargs="+", default=["completion_mask", "token_roles", "loss_weights", "template", "packed"]
    )
    parser.add_argument("--no-tokenizer", action="store_true", help="give templates as token ids (no tokenizer load)")
    parser.add_argument("--with-model", action="store_true", help="compare with a 135M forward+backward step")
    parser.add_argument("--model-batch", type=int, default=1)
    parser.add_argument("--model-seq-len", type=int, default=512)
    parser.add_argument("--model-repeats", type=int, default=3)
    parser.add_argument(
        "--step-seconds",
        type=float,
        default=None,
        help="also report the share against a step time measured elsewhere (e.g. a GPU step at this batch shape)",
    )
    parser.add_argument("--json", type=str, default=None, help="write the results to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    tokenizer = None
    if "template" in args.cases and not args.no_tokenizer:
        from trl_plw.experiments.offline_model import load_tokenizer

        tokenizer = load_tokenizer()

    tokens = args.batch * args.seq_len
    results: list[dict[str, Any]] = []
    for case in args.cases:
        examples, masks = make_examples(case, args.batch, args.seq_len, args.docs_per_row, args.seed)
        for padding_free in (False, True):
            collator = make_collator(case, padding_free, tokenizer)
            times = time_call(lambda collator=collator, examples=examples: collator(examples), args.repeats)
            median = statistics.median(times)
            reference = statistics.median(trl_reference(examples, masks, padding_free, args.repeats))
            results.append(
                {
                    "case": case,
                    "mode": "padding_free" if padding_free else "padded",
                    "ms_per_batch": median * 1e3,
                    "examples_per_s": args.batch / median,
                    "tokens_per_s": tokens / median,
                    "trl_lm_collator_ms": reference * 1e3,
                }
            )

    model_info = None
    if args.with_model:
        model_info = model_step_seconds_per_token(args.model_batch, args.model_seq_len, args.model_repeats)
        model_info["extrapolated_step_s"] = model_info["s_per_token"] * tokens
        for row in results:
            collate = row["ms_per_batch"] / 1e3
            row["share_of_step"] = collate / (collate + model_info["extrapolated_step_s"])
    if args.step_seconds is not None:
        for row in results:
            collate = row["ms_per_batch"] / 1e3
            row["share_of_given_step"] = collate / (collate + args.step_seconds)

    header = f"{'case':<16} {'mode':<13} {'ms/batch':>9} {'examples/s':>11} {'Mtok/s':>8} {'TRL LM ms':>10}"
    if model_info:
        header += f" {'share':>8}"
    if args.step_seconds is not None:
        header += f" {'share@given':>11}"
    print(
        f"DataCollatorForWeightedCompletionLM, batch {args.batch} x {args.seq_len} tokens, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(header)
    print("-" * len(header))
    for row in results:
        line = (
            f"{row['case']:<16} {row['mode']:<13} {row['ms_per_batch']:>9.2f} {row['examples_per_s']:>11.0f} "
            f"{row['tokens_per_s'] / 1e6:>8.2f} {row['trl_lm_collator_ms']:>10.2f}"
        )
        if model_info:
            line += f" {100 * row['share_of_step']:>7.4f}%"
        if args.step_seconds is not None:
            line += f" {100 * row['share_of_given_step']:>10.2f}%"
        print(line)
    if model_info:
        b, t = model_info["shape"]
        print(
            f"\nSmolLM2-135M fp32 sdpa forward+backward at {b}x{t}: {model_info['step_s']:.2f} s "
            f"({model_info['s_per_token'] * 1e3:.3f} ms/token); linearly extrapolated to {args.batch}x{args.seq_len}: "
            f"{model_info['extrapolated_step_s']:.1f} s per step (an underestimate: attention is quadratic, so the "
            "shares above are upper bounds)."
        )
        print(
            f"Largest collator share of a step: {100 * max(r['share_of_step'] for r in results):.4f}% (target < 5%)."
        )
    if args.step_seconds is not None:
        worst = max(r["share_of_given_step"] for r in results)
        print(f"Largest share of the given {args.step_seconds:.3f} s step: {100 * worst:.2f}% (target < 5%).")

    report = {
        "batch": args.batch,
        "seq_len": args.seq_len,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "results": results,
        "model": model_info,
        "given_step_seconds": args.step_seconds,
    }
    if args.json:
        write_json(args.json, report, indent=1)
    return report


if __name__ == "__main__":
    main()

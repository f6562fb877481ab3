"""Span and message weights through PLWTrainer equal the explicit per-token `loss_weights` they stand for, in every
batch layout (padded, padding-free, BFD / bfd_split / wrapped packing), and a packed run reports per-span eval
losses equal to a float64 reference.

The explicit weights are written from the rules in tests/test_spans.py (literal searches in the rendered text, not
`trl_plw.spans`): role weight x message weight x span weights. All weights are powers of two (0.25, 0.5, 2), so their
float32 products are exact and the collated weights must be *equal*; losses and gradients are float64 (tiny model)
and agree to float64 rounding (conftest.F64_RTOL/F64_ATOL): the two runs sum the same terms.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import assert_exact
from datasets import Dataset
from test_spans import (
    QWEN_STYLE_TEMPLATE,
    expected_message_weights,
    expected_span_weights,
    overlapping,
    render,
    tool_conversation,
)
from test_trainer import assert_grads_close, common_args, first_rows, loss_and_grads, tiny

from trl_plw import DataCollatorForWeightedCompletionLM, PLWConfig, PLWTrainer
from trl_plw.roles import Role, tokenize_messages

PROMPT_WEIGHT = 0.25
SPANS = "hermes+think=0.5"
SPAN_WEIGHTS = {"tool_call": 2.0, "tool_response": 0.0, "think": 0.5}
N = 4


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = QWEN_STYLE_TEMPLATE
    return tokenizer


def explicit_rows(tok) -> list[dict]:
    rows = []
    for v in range(N):
        messages = tool_conversation(v)
        text, ids, offsets = render(tok, messages)
        roles = np.asarray(tokenize_messages(tok, messages)["token_roles"])
        weights = np.where(roles == int(Role.COMPLETION), 1.0, PROMPT_WEIGHT)
        weights = weights * expected_message_weights(tok, messages, text, offsets)
        weights = weights * expected_span_weights(tok, ids, text, offsets, SPAN_WEIGHTS)
        rows.append({"input_ids": ids, "loss_weights": weights.tolist()})
    return rows


MODES = {
    "padded": {},
    "padding_free": {"padding_free": True, "max_length": None},
    "bfd": {"packing": True, "max_length": 4096},
    "bfd_split": {"packing": True, "packing_strategy": "bfd_split", "max_length": 160},
    "wrapped": {"packing": True, "packing_strategy": "wrapped", "max_length": 160},
}


def trainer(model, tok, path, dataset, collator=None, **overrides):
    args = PLWConfig(**common_args(output_dir=str(path), shuffle_dataset=False, **overrides))
    return PLWTrainer(
        copy.deepcopy(model), args=args, train_dataset=dataset, processing_class=tok, data_collator=collator
    )


@pytest.mark.parametrize("mode", list(MODES))
def test_span_and_message_weights_equal_explicit_loss_weights(tok, tmp_path, mode):
    model = tiny(len(tok))
    chat = Dataset.from_list([{"messages": tool_conversation(v)} for v in range(N)])
    weighted = trainer(
        model, tok, tmp_path / "a", chat, prompt_loss_weight=PROMPT_WEIGHT, span_weights=SPANS, **MODES[mode]
    )
    explicit = trainer(model, tok, tmp_path / "b", Dataset.from_list(explicit_rows(tok)), **MODES[mode])
    n = len(weighted.train_dataset)  # every row in one batch: every factor is in it
    assert len(weighted.train_dataset) == len(explicit.train_dataset)
    batch_a = weighted.data_collator(first_rows(weighted.train_dataset, n))
    batch_b = explicit.data_collator(first_rows(explicit.train_dataset, n))
    assert torch.equal(batch_a["input_ids"], batch_b["input_ids"])
    assert torch.equal(batch_a["loss_weights"], batch_b["loss_weights"])
    # every factor shows up: 0.25*0.5 (weighted user turn), 0.25*2 (a tool call in the 0.25 answer), 0.5 (think)
    assert {0.0, 0.125, 0.25, 0.5, 1.0} <= set(torch.unique(batch_a["loss_weights"]).tolist())
    loss_a, grads_a = loss_and_grads(weighted, batch_a)
    loss_b, grads_b = loss_and_grads(explicit, batch_b)
    assert_exact(loss_a, loss_b)
    assert_grads_close(grads_a, grads_b)


def test_span_weights_stated_on_the_collator_drive_packed_preparation(tok, tmp_path):
    """A collator's span_weights is its policy: PLWTrainer prepares `token_spans` with it (so BFD packing carries
    them) and the weights equal the explicit ones."""
    model = tiny(len(tok))
    chat = Dataset.from_list([{"messages": tool_conversation(v)} for v in range(N)])
    collator = DataCollatorForWeightedCompletionLM(tokenizer=tok, prompt_loss_weight=PROMPT_WEIGHT, span_weights=SPANS)
    weighted = trainer(model, tok, tmp_path / "a", chat, collator=collator, **MODES["bfd"])
    assert weighted.args.span_weights == SPANS and "token_spans" in weighted.train_dataset.column_names
    explicit = trainer(model, tok, tmp_path / "b", Dataset.from_list(explicit_rows(tok)), **MODES["bfd"])
    batch_a = weighted.data_collator(list(weighted.train_dataset))
    batch_b = explicit.data_collator(list(explicit.train_dataset))
    assert torch.equal(batch_a["loss_weights"], batch_b["loss_weights"])


def test_packed_run_reports_per_span_eval_losses(tok, tmp_path):
    """Train two steps packed (BFD), evaluate packed: eval_span_<name>_loss for each named rule equals the mean
    float64 cross-entropy over the tokens the span covers, from an unpacked full-logits forward of the trained model.
    Tolerance: the fused loss reports each token's cross-entropy in float32 (`TokenStats.ce`), rounded to within 2^-24
    relative; a mean of positive values each so rounded is within 2^-24 too (2^-23 leaves room for the float64 sums).
    The role split is still reported."""
    model = tiny(len(tok))
    chat = Dataset.from_list([{"messages": tool_conversation(v)} for v in range(N)])
    run = PLWTrainer(
        model,
        args=PLWConfig(
            **common_args(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2),
            prompt_loss_weight=PROMPT_WEIGHT,
            span_weights=SPANS,
            packing=True,
            max_length=4096,
        ),
        train_dataset=chat,
        eval_dataset=chat,
        processing_class=tok,
    )
    assert len(run.eval_dataset) == 1 and len(run.eval_dataset[0]["seq_lengths"]) == N  # evaluated packed too
    run.train()
    metrics = run.evaluate()
    assert {"eval_prompt_loss", "eval_completion_loss"} <= set(metrics)

    sums = {name: 0.0 for name in SPAN_WEIGHTS}
    counts = dict.fromkeys(SPAN_WEIGHTS, 0)
    run.model.eval()
    for v in range(N):
        text, ids, offsets = render(tok, tool_conversation(v))
        with torch.no_grad():
            logits = run.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1].double()
        ce = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        for name, (opening, closing) in {
            "tool_call": ("<tool_call>", "</tool_call>"),
            "tool_response": ("<tool_response>", "</tool_response>"),
            "think": ("<think>", "</think>"),
        }.items():
            tokens: set[int] = set()
            cursor = 0
            while (pos := text.find(opening, cursor)) >= 0:
                cursor = text.index(closing, pos) + len(closing)
                tokens |= overlapping(offsets, pos, cursor, ids, tok)
            tokens.discard(0)
            sums[name] += float(ce[[t - 1 for t in sorted(tokens)]].sum())
            counts[name] += len(tokens)
    for name in SPAN_WEIGHTS:
        assert counts[name] > 0
        torch.testing.assert_close(
            metrics[f"eval_span_{name}_loss"],
            sums[name] / counts[name],
            rtol=2**-23,
            atol=0,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def test_a_stream_reads_message_weights_first_seen_after_its_first_example(tok, tmp_path):
    """An IterableDataset cannot be scanned ahead: a message weight that first appears in its second example still
    counts, and the prepared stream gives the loss weights of the same data prepared as a Dataset."""
    model = tiny(len(tok))
    unweighted = [{k: v for k, v in m.items() if k not in ("weight", "loss")} for m in tool_conversation(0)]
    rows = [{"messages": unweighted}] + [{"messages": tool_conversation(v)} for v in range(1, N)]
    table = trainer(model, tok, tmp_path / "a", Dataset.from_list(rows), prompt_loss_weight=PROMPT_WEIGHT)
    stream = trainer(
        model, tok, tmp_path / "b", Dataset.from_list(rows).to_iterable_dataset(), prompt_loss_weight=PROMPT_WEIGHT
    )
    streamed = list(stream.train_dataset)
    assert set(streamed[0]["message_weights"]) == {1.0} and 0.0 in streamed[1]["message_weights"]
    assert [r["message_weights"] for r in streamed] == table.train_dataset["message_weights"]
    batch_a = stream.data_collator(streamed)
    batch_b = table.data_collator(first_rows(table.train_dataset, N))
    assert torch.equal(batch_a["loss_weights"], batch_b["loss_weights"])

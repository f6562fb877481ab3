"""Tests of DataCollatorForWeightedCompletionLM: parity with TRL, padded / padding-free / packed equivalence, weight
sources, validation and the consumer guard."""

from __future__ import annotations

import doctest
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_exact
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from trl_plw import collator as collator_module
from trl_plw.collator import DataCollatorForWeightedCompletionLM as Collator
from trl_plw.roles import Role, tokenize_messages, tokenize_prompt_completion

PAD = 0
CHATML_ASSISTANT = "<|im_start|>assistant\n"
CHATML_USER = "<|im_start|>user\n"


def random_examples(lengths, vocab=100, seed=0, prompt_fraction=0.5):
    """Examples with random ids (never the pad id) and a prompt/completion split."""
    rng = random.Random(seed)
    examples = []
    for n in lengths:
        prompt_len = max(1, min(n - 1, int(n * prompt_fraction))) if n > 1 else 0
        examples.append(
            {
                "input_ids": [rng.randrange(1, vocab) for _ in range(n)],
                "completion_mask": [0] * prompt_len + [1] * (n - prompt_len),
            }
        )
    return examples


def pack(examples):
    """One packed row (TRL's BFD layout: concatenated per-token columns plus `seq_lengths`). A scalar example weight
    is spread over the example's tokens first, as the trainer does before packing."""
    examples = [
        {
            k: [float(v)] * len(ex["input_ids"]) if k == "weight" and not isinstance(v, list) else v
            for k, v in ex.items()
        }
        for ex in examples
    ]
    row = {key: sum((ex[key] for ex in examples), []) for key in examples[0] if isinstance(examples[0][key], list)}
    row["seq_lengths"] = [len(ex["input_ids"]) for ex in examples]
    return row


def trl_labels_from_mask(examples):
    """TRL's completion-only labels: -100 where completion_mask is 0 (its `build_labels`)."""
    return [
        {
            "input_ids": ex["input_ids"],
            "labels": [t if m else -100 for t, m in zip(ex["input_ids"], ex["completion_mask"], strict=True)],
        }
        for ex in examples
    ]


def unpad_rows(batch, key, lengths):
    return [batch[key][i, :n] for i, n in enumerate(lengths)]


# ------------------------------------------------------------------------------------------------------ TRL parity
@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_plw_one_matches_trl_language_modeling(pad_to_multiple_of):
    examples = random_examples([7, 3, 12, 1])
    ours = Collator(
        pad_token_id=PAD, prompt_loss_weight=1.0, completion_loss_weight=1.0, pad_to_multiple_of=pad_to_multiple_of
    )(examples)
    trl = DataCollatorForLanguageModeling(pad_token_id=PAD, pad_to_multiple_of=pad_to_multiple_of)(
        [{"input_ids": ex["input_ids"]} for ex in examples]
    )
    assert torch.equal(ours["input_ids"], trl["input_ids"])
    assert torch.equal(ours["attention_mask"], trl["attention_mask"])
    # Column 0 is never a target after the shift; ours marks it -100 explicitly (the sequence start), TRL does not.
    assert torch.equal(ours["labels"][:, 1:], trl["labels"][:, 1:])
    assert (ours["labels"][:, 0] == -100).all()
    expected = (trl["attention_mask"] == 1).float()
    expected[:, 0] = 0
    assert torch.equal(ours["loss_weights"], expected)

    ours_pf = Collator(pad_token_id=PAD, prompt_loss_weight=1.0, padding_free=True)(examples)
    trl_pf = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True)(
        [{"input_ids": ex["input_ids"]} for ex in examples]
    )
    # TRL < 1.15's padding-free batches carry position_ids only; ours always carry the varlen boundaries too.
    varlen = ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")
    for key in ("input_ids", "labels", "position_ids", *(k for k in varlen if k in trl_pf)):
        assert torch.equal(ours_pf[key], trl_pf[key]), key
        assert ours_pf[key].dtype == trl_pf[key].dtype, key
    if "max_length_q" in trl_pf:
        assert ours_pf["max_length_q"] == trl_pf["max_length_q"] and ours_pf["max_length_k"] == trl_pf["max_length_k"]
    assert all(k in ours_pf for k in varlen)
    assert "attention_mask" not in ours_pf
    assert torch.equal(ours_pf["loss_weights"], (trl_pf["labels"] != -100).float())


def test_plw_zero_matches_trl_completion_only():
    examples = random_examples([9, 4, 15, 2], prompt_fraction=0.6)
    trl_examples = trl_labels_from_mask(examples)
    ours = Collator(pad_token_id=PAD)(examples)
    trl = DataCollatorForLanguageModeling(pad_token_id=PAD)(trl_examples)
    assert torch.equal(ours["labels"][:, 1:], trl["labels"][:, 1:])
    assert torch.equal(ours["loss_weights"][:, 1:] > 0, trl["labels"][:, 1:] != -100)
    assert set(ours["loss_weights"].unique().tolist()) <= {0.0, 1.0}

    ours_pf = Collator(pad_token_id=PAD, padding_free=True)(examples)
    trl_pf = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True)(trl_examples)
    assert torch.equal(ours_pf["labels"], trl_pf["labels"])
    assert torch.equal(ours_pf["loss_weights"] > 0, trl_pf["labels"] != -100)


def test_output_keys_and_dtypes():
    examples = random_examples([5, 3])
    padded = Collator(pad_token_id=PAD, return_position_ids=True)(examples)
    assert set(padded) == {
        "input_ids",
        "labels",
        "loss_weights",
        "completion_mask",
        "prompt_mask",
        "attention_mask",
        "position_ids",
    }
    assert padded["input_ids"].dtype == padded["labels"].dtype == torch.int64
    assert padded["loss_weights"].dtype == torch.float32
    assert padded["completion_mask"].dtype == padded["prompt_mask"].dtype == torch.bool
    assert padded["attention_mask"].dtype == padded["position_ids"].dtype == torch.int64
    assert padded["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 0]]
    assert "position_ids" not in Collator(pad_token_id=PAD)(examples)

    free = Collator(pad_token_id=PAD, padding_free=True)(examples)
    assert set(free) == {
        "input_ids",
        "labels",
        "loss_weights",
        "completion_mask",
        "prompt_mask",
        "position_ids",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "seq_idx",
    }
    assert free["input_ids"].shape == (1, 8)
    assert free["cu_seq_lens_q"].dtype == torch.int32 and free["cu_seq_lens_q"].ndim == 1
    assert free["seq_idx"].dtype == torch.int32 and free["seq_idx"].tolist() == [[0] * 5 + [1] * 3]
    assert isinstance(free["max_length_q"], int) and free["max_length_q"] == 5


def test_masks_report_prompt_even_with_zero_prompt_weight():
    examples = [{"input_ids": [4, 5, 6, 7], "completion_mask": [0, 0, 1, 1], "labels": [4, 5, 6, -100]}]
    batch = Collator(pad_token_id=PAD)(examples)
    assert batch["prompt_mask"].tolist() == [[False, True, False, False]]
    assert batch["completion_mask"].tolist() == [[False, False, True, False]]  # -100 label -> IGNORE: neither
    assert batch["loss_weights"].tolist() == [[0.0, 0.0, 1.0, 0.0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, -100]]


# ----------------------------------------------------------------------------------- packed / padding-free equivalence
def _per_sequence(batch, lengths, key):
    """Per-sequence slices of a padding-free (one row) or padded batch."""
    row = batch[key]
    if row.shape[0] == 1 and sum(lengths) <= row.shape[1] and len(lengths) > 1:
        return list(row[0, : sum(lengths)].split(lengths))
    return unpad_rows(batch, key, lengths)


@pytest.mark.parametrize("prompt_loss_weight", [0.0, 0.3])
def test_packed_and_padding_free_reproduce_padded_weights(prompt_loss_weight):
    examples = random_examples([6, 1, 9, 4, 3], seed=3)
    for i, ex in enumerate(examples):  # add roles and example weights so every source is exercised
        ex["token_roles"] = [
            Role.TEMPLATE if m == 0 and j % 3 == 0 else m for j, m in enumerate(ex["completion_mask"])
        ]
        ex["weight"] = [1.0 + 0.5 * i] * len(ex["input_ids"])
    kwargs = {"pad_token_id": PAD, "prompt_loss_weight": prompt_loss_weight, "role_weights": {"template": 0.1}}
    kwargs["loss_weights_applied"] = True
    lengths = [len(ex["input_ids"]) for ex in examples]
    reference = Collator(**kwargs)(examples)
    ref_weights = unpad_rows(reference, "loss_weights", lengths)
    ref_labels = unpad_rows(reference, "labels", lengths)
    ref_completion = unpad_rows(reference, "completion_mask", lengths)
    ref_prompt = unpad_rows(reference, "prompt_mask", lengths)
    assert all(w[0] == 0 for w in ref_weights)

    padding_free = Collator(**kwargs, padding_free=True)(examples)
    packed_rows = [pack(examples[:3]), pack(examples[3:])]
    packed_padded = Collator(**kwargs)(packed_rows)
    packed_free = Collator(**kwargs, padding_free=True)(packed_rows)
    assert "attention_mask" not in packed_padded and "attention_mask" not in packed_free

    flat_from_packed = {
        key: torch.cat([packed_padded[key][0, : sum(lengths[:3])], packed_padded[key][1, : sum(lengths[3:])]])
        for key in ("loss_weights", "labels", "completion_mask", "prompt_mask", "position_ids")
    }
    for name, batch in (("padding_free", padding_free), ("packed_free", packed_free)):
        for key, ref in (
            ("loss_weights", ref_weights),
            ("labels", ref_labels),
            ("completion_mask", ref_completion),
            ("prompt_mask", ref_prompt),
        ):
            got = list(batch[key][0, : sum(lengths)].split(lengths))
            assert all(torch.equal(g, r) for g, r in zip(got, ref, strict=True)), (name, key)
        assert torch.equal(batch["position_ids"][0], torch.cat([torch.arange(n) for n in lengths]))
    for key, ref in (("loss_weights", ref_weights), ("labels", ref_labels), ("completion_mask", ref_completion)):
        got = list(flat_from_packed[key].split(lengths))
        assert all(torch.equal(g, r) for g, r in zip(got, ref, strict=True)), ("packed_padded", key)
    assert torch.equal(flat_from_packed["position_ids"], torch.cat([torch.arange(n) for n in lengths]))
    # Pads of a packed row get position 0 (their own one-token documents) and no weight.
    assert packed_padded["position_ids"][1, sum(lengths[3:]) :].eq(0).all()
    assert packed_free["cu_seq_lens_q"].tolist() == [0, 6, 7, 16, 20, 23]


def _weighted_loss(model, batch):
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_weights", "completion_mask", "prompt_mask")}
    logits = model(**inputs, use_cache=False).logits  # float64: the comparison is exact to rounding
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1), reduction="none"
    )
    weights = batch["loss_weights"][:, 1:].reshape(-1)
    return (weights * ce).sum() / weights.sum()


def test_tiny_model_weighted_loss_padding_free_equals_padded(tiny_llama):
    model = tiny_llama(vocab_size=128).double()
    examples = random_examples([11, 5, 17, 8], vocab=128, seed=7)
    for i, ex in enumerate(examples):
        ex["weight"] = 0.5 + i
    kwargs = {"pad_token_id": PAD, "prompt_loss_weight": 0.2, "loss_weights_applied": True}
    with torch.no_grad():
        padded = _weighted_loss(model, Collator(**kwargs)(examples))
        padding_free = _weighted_loss(model, Collator(**kwargs, padding_free=True, pad_to_multiple_of=16)(examples))
        packed = _weighted_loss(model, Collator(**kwargs)([pack(examples[:2]), pack(examples[2:])]))
    assert math.isfinite(padded.item())
    assert_exact(padding_free, padded)
    assert_exact(packed, padded)


# ------------------------------------------------------------------------------------- template vs mask sources (real)
CHAT_PAIRS = [
    {"prompt": [{"role": "user", "content": "What is 2+2?"}], "completion": [{"role": "assistant", "content": "4"}]},
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"},
        ],
        "completion": [{"role": "assistant", "content": "Green, like grass."}],
    },
]


def test_template_and_mask_sources_agree_on_chatml(smollm2_tokenizer):
    tok = smollm2_tokenizer
    tokenized = [tokenize_prompt_completion(tok, p["prompt"], p["completion"]) for p in CHAT_PAIRS]
    by_roles = [{"input_ids": t["input_ids"], "token_roles": t["token_roles"]} for t in tokenized]
    by_mask = [
        {"input_ids": t["input_ids"], "completion_mask": [int(r == Role.COMPLETION) for r in t["token_roles"]]}
        for t in tokenized
    ]
    by_template = [{"input_ids": t["input_ids"]} for t in tokenized]
    collate_roles = Collator(tokenizer=tok, prompt_loss_weight=0.1, loss_weights_applied=True)
    collate_template = Collator(
        tokenizer=tok, response_template=CHATML_ASSISTANT, prompt_loss_weight=0.1, loss_weights_applied=True
    )
    assert collate_roles.pad_token_id == tok.pad_token_id
    a, b, c = collate_roles(by_roles), collate_roles(by_mask), collate_template(by_template)
    for key in ("input_ids", "labels", "loss_weights", "completion_mask", "prompt_mask", "attention_mask"):
        assert torch.equal(a[key], b[key]), key
        assert torch.equal(a[key], c[key]), key
    assert (a["loss_weights"] == 0.1).any() and (a["loss_weights"] == 1.0).any()


def test_alpaca_template_in_context(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "Below is an instruction. ### Instruction: Add 2 and 3. ### Response: 5<|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    standalone = tok("### Response:", add_special_tokens=False)["input_ids"]
    assert not any(ids[i : i + len(standalone)] == standalone for i in range(len(ids)))  # the context changes the ids
    batch = Collator(tokenizer=tok, response_template="### Response:")([{"input_ids": ids}])
    trained = batch["input_ids"][batch["loss_weights"] > 0]
    assert tok.decode(trained) == " 5<|im_end|>"
    with pytest.raises(ValueError, match="response_template"):
        Collator(tokenizer=tok, response_template=standalone)([{"input_ids": ids}])  # raw ids: not found


def test_multi_turn_chatml_instruction_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "To get to the other side."},
    ]
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    collator = Collator(tokenizer=tok, response_template=CHATML_ASSISTANT, instruction_template=CHATML_USER)
    batch = collator([{"input_ids": ids}, {"input_ids": ids}])
    completion = batch["completion_mask"][0].tolist()
    spans, current = [], []
    for token, flag in zip(ids, completion, strict=True):
        if flag:
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    assert spans == [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
    assert torch.equal(batch["loss_weights"][0] > 0, batch["completion_mask"][0])
    # token_roles from the chat-template analysis train the same assistant spans (without the trailing newline).
    roles_batch = Collator(tokenizer=tok)([tokenize_messages(tok, messages)])
    assert (batch["completion_mask"][0] >= roles_batch["completion_mask"][0]).all()


def test_template_per_document_in_packed_rows(smollm2_tokenizer):
    tok = smollm2_tokenizer
    docs = [tok.apply_chat_template(p["prompt"] + p["completion"], return_dict=True)["input_ids"] for p in CHAT_PAIRS]
    reference = Collator(tokenizer=tok, response_template=CHATML_ASSISTANT)([{"input_ids": d} for d in docs])
    packed = Collator(tokenizer=tok, response_template=CHATML_ASSISTANT, padding_free=True)(
        [{"input_ids": docs[0] + docs[1], "seq_lengths": [len(docs[0]), len(docs[1])]}]
    )
    expected = torch.cat([reference["loss_weights"][i, : len(d)] for i, d in enumerate(docs)])
    assert torch.equal(packed["loss_weights"][0], expected)


# ------------------------------------------------------------------------------------------------- weight sources
def test_per_role_weights():
    roles = [
        Role.TEMPLATE,
        Role.SYSTEM,
        Role.TEMPLATE,
        Role.USER,
        Role.TOOL,
        Role.PROMPT,
        Role.COMPLETION,
        Role.IGNORE,
    ]
    example = {"input_ids": list(range(1, 9)), "token_roles": [int(r) for r in roles]}
    collator = Collator(
        pad_token_id=PAD,
        prompt_loss_weight=0.5,
        completion_loss_weight=2.0,
        role_weights={"system": 0.25, "user": 0.75, "template": 0.0},
        loss_weights_applied=True,
    )
    batch = collator([example])
    assert batch["loss_weights"].tolist() == [[0.0, 0.25, 0.0, 0.75, 0.5, 0.5, 2.0, 0.0]]
    assert batch["labels"].tolist() == [[-100, 2, -100, 4, 5, 6, 7, -100]]
    assert batch["prompt_mask"].tolist() == [[False, True, True, True, True, True, False, False]]
    assert batch["completion_mask"].tolist() == [[False] * 6 + [True, False]]
    with pytest.raises(ValueError, match=r"role_weights\['prompt'\]=0.2 conflicts with prompt_loss_weight=0.5"):
        Collator(pad_token_id=PAD, prompt_loss_weight=0.5, role_weights={"prompt": 0.2})
    with pytest.raises(ValueError, match="Unknown role weight key"):
        Collator(pad_token_id=PAD, role_weights={"humans": 0.2})


def test_source_preference_and_explicit_weights():
    example = {
        "input_ids": [1, 2, 3, 4],
        "loss_weights": [0.0, 0.3, 0.0, 2.0],
        "token_roles": [0, 0, 1, 1],
        "completion_mask": [1, 1, 1, 1],
        "weight": 2.0,
    }
    batch = Collator(pad_token_id=PAD, loss_weights_applied=True)([example])
    assert batch["loss_weights"][0].tolist() == pytest.approx([0.0, 0.6, 0.0, 4.0])  # explicit, times example weight
    assert batch["completion_mask"].tolist() == [[False, False, True, True]]  # roles still come from token_roles
    assert batch["labels"].tolist() == [[-100, 2, -100, 4]]
    # token_roles are preferred over completion_mask, which is preferred over assistant_masks
    b = Collator(pad_token_id=PAD)([{"input_ids": [1, 2, 3], "token_roles": [0, 0, 1], "completion_mask": [1, 1, 1]}])
    assert b["loss_weights"].tolist() == [[0.0, 0.0, 1.0]]
    b = Collator(pad_token_id=PAD)(
        [{"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1], "assistant_masks": [0, 0, 1]}]
    )
    assert b["loss_weights"].tolist() == [[0.0, 1.0, 1.0]]
    b = Collator(pad_token_id=PAD)([{"input_ids": [1, 2, 3], "assistant_masks": [0, 0, 1]}])
    assert b["loss_weights"].tolist() == [[0.0, 0.0, 1.0]]
    # explicit weights without roles: weighted tokens count as completion for the masks
    b = Collator(pad_token_id=PAD, loss_weights_applied=True)([{"input_ids": [1, 2, 3], "loss_weights": [1, 0, 0.5]}])
    assert b["completion_mask"].tolist() == [[False, False, True]] and b["prompt_mask"].tolist() == [
        [False, True, False]
    ]


@pytest.mark.parametrize("on_missing", ["raise", "ignore"])
def test_explicit_loss_weights_are_not_run_through_the_templates(on_missing):
    """Templates are for examples without a per-token source: an example that brings `loss_weights` is weighted as
    given even where the template is missing (before: "not found" raised, or "ignore" zeroed its weights)."""
    collator = Collator(
        pad_token_id=PAD, response_template=[99, 98], on_missing_template=on_missing, loss_weights_applied=True
    )
    batch = collator([{"input_ids": [11, 12, 13, 14, 15], "loss_weights": [0.0, 0.5, 0.5, 1.0, 1.0]}])
    assert batch["loss_weights"].tolist() == [[0.0, 0.5, 0.5, 1.0, 1.0]]
    assert batch["labels"].tolist() == [[-100, 12, 13, 14, 15]]
    # an example without weights in the same batch still goes through the template
    batch = collator([{"input_ids": [11, 12, 13], "loss_weights": [0.0, 1.0, 1.0]}, {"input_ids": [5, 99, 98, 7, 8]}])
    assert batch["completion_mask"][1].tolist() == [False, False, False, True, True]


def test_example_weight_scalar_and_per_token():
    examples = [
        {"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1], "w": 3.0},
        {"input_ids": [4, 5, 6], "completion_mask": [0, 1, 1], "w": [1.0, 0.5, 2.0]},
        {"input_ids": [7, 8], "completion_mask": [0, 1]},
        {"input_ids": [7, 8], "completion_mask": [0, 1], "w": torch.tensor(0.0)},
    ]
    batch = Collator(pad_token_id=PAD, example_weight_column="w", loss_weights_applied=True)(examples)
    assert batch["loss_weights"].tolist() == [[0.0, 3.0, 3.0], [0.0, 0.5, 2.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert batch["labels"][3].tolist() == [-100, -100, -100]


def test_pad_to_multiple_of_both_modes():
    examples = random_examples([5, 3])
    padded = Collator(pad_token_id=PAD, pad_to_multiple_of=8)(examples)
    assert padded["input_ids"].shape == (2, 8)
    assert padded["attention_mask"][:, 5:].eq(0).all() and padded["loss_weights"][:, 5:].eq(0).all()
    free = Collator(pad_token_id=PAD, padding_free=True, pad_to_multiple_of=16)(examples)
    assert free["input_ids"].shape == (1, 16)
    assert free["position_ids"][0, 8:].eq(0).all() and free["labels"][0, 8:].eq(-100).all()
    assert free["cu_seq_lens_q"].tolist() == [0, 5, 8, *range(9, 17)]  # each pad is its own one-token sequence
    assert free["seq_idx"].shape == (1, 16)
    exact = Collator(pad_token_id=PAD, pad_to_multiple_of=4)(random_examples([8]))
    assert exact["input_ids"].shape == (1, 8)


def test_all_zero_batch_is_allowed():
    batch = Collator(pad_token_id=PAD)([{"input_ids": [1, 2, 3], "completion_mask": [0, 0, 0]}])
    assert batch["loss_weights"].sum() == 0 and (batch["labels"] == -100).all()
    assert batch["prompt_mask"].tolist() == [[False, True, True]]


def test_token_roles_ignore_and_labels():
    example = {"input_ids": [1, 2, 3, 4], "token_roles": [0, 1, -1, 1], "labels": [-100, 2, 3, -100]}
    batch = Collator(pad_token_id=PAD, prompt_loss_weight=1.0)([example])
    assert batch["loss_weights"].tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert batch["completion_mask"].tolist() == [[False, True, False, False]]


# ----------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "column", ["token_roles", "completion_mask", "assistant_masks", "loss_weights", "labels", "weight"]
)
def test_length_mismatch_names_the_column(column):
    example = {"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1], column: [0, 1]}
    with pytest.raises(ValueError, match=rf"`{column}` has 2 entries but `input_ids` has 3"):
        Collator(pad_token_id=PAD, loss_weights_applied=True)([example])


@pytest.mark.parametrize("column", ["loss_weights", "weight"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weights_rejected(column, bad):
    example = {"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1], column: [1.0, bad, 1.0]}
    with pytest.raises(ValueError, match=rf"`{column}` contains a non-finite weight"):
        Collator(pad_token_id=PAD, loss_weights_applied=True)([example])
    example[column] = bad if column == "weight" else example[column]
    with pytest.raises(ValueError, match=rf"`{column}`"):
        Collator(pad_token_id=PAD, loss_weights_applied=True)([example])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"prompt_loss_weight": math.nan}, "prompt_loss_weight"),
        ({"completion_loss_weight": math.inf}, "completion_loss_weight"),
        ({"role_weights": {"user": math.nan}}, r"role_weights\['user'\]"),
        ({"prompt_loss_weight": -0.1}, "prompt_loss_weight"),
        ({"role_weights": {"template": -1.0}}, r"role_weights\['template'\]"),
    ],
)
def test_bad_weights_rejected_at_construction(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Collator(pad_token_id=PAD, **kwargs)


def test_negative_weights_need_opt_in():
    example = {"input_ids": [1, 2, 3], "loss_weights": [0.0, -0.5, 1.0]}
    with pytest.raises(ValueError, match="`loss_weights` contains a negative weight.*allow_negative_weights"):
        Collator(pad_token_id=PAD, loss_weights_applied=True)([example])
    with pytest.raises(ValueError, match="`weight`=-2.0 is negative"):
        Collator(pad_token_id=PAD)([{"input_ids": [1, 2], "completion_mask": [0, 1], "weight": -2.0}])
    batch = Collator(pad_token_id=PAD, allow_negative_weights=True, loss_weights_applied=True)([example])
    assert batch["loss_weights"].tolist() == [[0.0, -0.5, 1.0]] and batch["labels"].tolist() == [[-100, 2, 3]]
    collator = Collator(
        pad_token_id=PAD, prompt_loss_weight=-0.1, allow_negative_weights=True, loss_weights_applied=True
    )
    assert collator([{"input_ids": [1, 2, 3], "completion_mask": [0, 0, 1]}])["loss_weights"][
        0, 1
    ].item() == pytest.approx(-0.1)


def test_empty_example_and_bad_seq_lengths():
    with pytest.raises(ValueError, match=r"Example 1 is empty \(len\(input_ids\) == 0\)"):
        Collator(pad_token_id=PAD)(
            [{"input_ids": [1, 2], "completion_mask": [0, 1]}, {"input_ids": [], "completion_mask": []}]
        )
    with pytest.raises(
        ValueError, match=r"`seq_lengths` \[2, 2\] must be positive document lengths summing to len\(input_ids\)=5"
    ):
        Collator(pad_token_id=PAD)(
            [{"input_ids": [1, 2, 3, 4, 5], "completion_mask": [0, 1, 0, 1, 1], "seq_lengths": [2, 2]}]
        )
    with pytest.raises(ValueError, match="`seq_lengths`"):
        Collator(pad_token_id=PAD, padding_free=True)(
            [{"input_ids": [1, 2], "completion_mask": [0, 1], "seq_lengths": [2, 0]}]
        )
    with pytest.raises(ValueError, match="token_roles.*outside"):
        Collator(pad_token_id=PAD)([{"input_ids": [1, 2], "token_roles": [0, 9]}])


def test_missing_source_error_names_columns():
    with pytest.raises(
        ValueError, match=r"loss_weights.*token_roles.*completion_mask.*assistant_masks.*response_template"
    ):
        Collator(pad_token_id=PAD)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}])


def test_missing_template_raise_and_ignore():
    examples = [{"input_ids": [1, 9, 7, 3, 4]}, {"input_ids": [1, 2, 3, 4]}]
    with pytest.raises(ValueError, match=r"response_template=\[9, 7\] was not found in example 1"):
        Collator(pad_token_id=PAD, response_template=[9, 7])(examples)
    collator = Collator(pad_token_id=PAD, response_template=[9, 7], on_missing_template="ignore")
    with pytest.warns(UserWarning, match=r"1 sequence\(s\) without the template"):
        batch = collator(examples)
    assert batch["loss_weights"].tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0], [0.0] * 5]
    assert not batch["prompt_mask"][1].any() and not batch["completion_mask"][1].any()  # never trained on prompt
    with pytest.warns(UserWarning, match=r"2 sequence\(s\)"):
        collator(examples)
    assert collator.num_missing_template == 2
    with pytest.raises(ValueError, match="on_missing_template"):
        Collator(pad_token_id=PAD, on_missing_template="skip")
    with pytest.raises(ValueError, match="tokenizer"):
        Collator(pad_token_id=PAD, response_template="### Response:")
    with pytest.raises(ValueError, match="pad_token_id"):
        Collator()


# ---------------------------------------------------------------------------------------------------- consumer guard
def test_sfttrainer_consumer_guard():
    examples = [{"input_ids": [1, 2, 3, 4], "completion_mask": [0, 0, 1, 1]}]
    with pytest.raises(ValueError, match=r"trl.SFTTrainer.*trl_plw.PLWTrainer.*loss_weights_applied"):
        Collator(pad_token_id=PAD, prompt_loss_weight=0.1)(examples)
    with pytest.raises(ValueError, match="loss_weights_applied"):
        Collator(pad_token_id=PAD)([{**examples[0], "weight": 0.5}])
    # 0/1 weights are safe without a consumer: the labels carry them
    Collator(pad_token_id=PAD, prompt_loss_weight=1.0)(examples)
    Collator(pad_token_id=PAD)([{**examples[0], "weight": 1}])
    # A consumer (e.g. PLWTrainer, which sets it on its copy) unlocks real-valued weights
    collator = Collator(pad_token_id=PAD, prompt_loss_weight=0.1)
    collator.loss_weights_applied = True
    assert collator(examples)["loss_weights"][0, 1].item() == pytest.approx(0.1)


def test_deprecated_loss_weights_consumer_maps_to_the_typed_flag():
    """The string handshake still works for one release, with a FutureWarning, as the bool it now is."""
    examples = [{"input_ids": [1, 2, 3, 4], "completion_mask": [0, 0, 1, 1]}]
    with pytest.warns(FutureWarning, match="loss_weights_applied=True"):
        collator = Collator(pad_token_id=PAD, prompt_loss_weight=0.1, loss_weights_consumer="my_loop")
    assert collator.loss_weights_applied is True
    assert collator(examples)["loss_weights"][0, 1].item() == pytest.approx(0.1)
    with pytest.warns(FutureWarning):
        assert Collator(pad_token_id=PAD, loss_weights_consumer=None).loss_weights_applied is False
    collator = Collator(pad_token_id=PAD)
    with pytest.warns(FutureWarning):
        collator.loss_weights_consumer = "PLWTrainer"
    assert collator.loss_weights_applied is True
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="give one of them"):
        Collator(pad_token_id=PAD, loss_weights_consumer="x", loss_weights_applied=False)


def test_weights_follow_field_changes():
    collator = Collator(pad_token_id=PAD, prompt_loss_weight=0.1, loss_weights_applied=True)
    example = [{"input_ids": [1, 2, 3], "completion_mask": [0, 0, 1]}]
    assert collator(example)["loss_weights"][0, 1].item() == pytest.approx(0.1)
    collator.prompt_loss_weight = 0.7
    assert collator(example)["loss_weights"][0, 1].item() == pytest.approx(0.7)


def test_doctests():
    result = doctest.testmod(collator_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# ------------------------------------------------------------ the old DataCollatorForCompletionOnlyLM's inputs
ALPACA = ["### Instruction:\nSay hi.\n\n### Response:\nHi!", "### Instruction:\nAdd 2 and 3.\n\n### Response:\n5"]


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("padding_free", [False, True])
def test_old_collator_inputs_token_id_lists_and_padded_dicts(smollm2_tokenizer, padding_free):
    """Bare token-id lists and tokenizer outputs whose attention_mask marks padding give the batch of unpadded
    dicts: padding inside an example is removed (with every per-token column) and the batch re-padded."""
    collator = Collator(tokenizer=smollm2_tokenizer, response_template="### Response:\n", padding_free=padding_free)
    ids = [smollm2_tokenizer(t)["input_ids"] for t in ALPACA]
    expected = collator([{"input_ids": i} for i in ids])
    assert_batches_equal(collator.torch_call(ids), expected)
    assert_batches_equal(collator([torch.tensor(i) for i in ids]), expected)
    assert_batches_equal(collator([smollm2_tokenizer(t) for t in ALPACA]), expected)
    for side in ("right", "left"):
        smollm2_tokenizer.padding_side = side
        try:
            encoded = smollm2_tokenizer(ALPACA, padding="max_length", max_length=40)
        finally:
            smollm2_tokenizer.padding_side = "right"
        padded = [{k: encoded[k][i] for k in encoded} for i in range(len(ALPACA))]
        assert 0 in padded[0]["attention_mask"]
        assert_batches_equal(collator(padded), expected)
    with pytest.raises(ValueError, match="attention_mask` has 2 entries"):
        collator([{"input_ids": [1, 2, 3], "attention_mask": [1, 1]}])
    with pytest.raises(ValueError, match="packed row"):
        collator(
            [
                {
                    "input_ids": [1, 2, 3, 4],
                    "attention_mask": [1, 1, 1, 0],
                    "seq_lengths": [2, 2],
                    "completion_mask": [0, 1, 0, 1],
                }
            ]
        )


def test_old_collator_keyword_and_positional_arguments(smollm2_tokenizer):
    """DataCollatorForCompletionOnlyLM(response_template, instruction_template, mlm=False, ignore_index=-100, ...)
    keeps its meaning; what cannot be honoured is refused with the fix."""
    old_style = Collator("### Response:\n", tokenizer=smollm2_tokenizer, mlm=False, ignore_index=-100)
    assert old_style.response_template == "### Response:\n"
    assert old_style.pad_token_id == smollm2_tokenizer.pad_token_id
    new_style = Collator(tokenizer=smollm2_tokenizer, response_template="### Response:\n")
    ids = [smollm2_tokenizer(t)["input_ids"] for t in ALPACA]
    assert_batches_equal(old_style(ids), new_style(ids))
    token_ids = Collator([5, 6], tokenizer=smollm2_tokenizer)  # a token-id template, positionally
    assert token_ids.response_template == [5, 6] and token_ids.pad_token_id == smollm2_tokenizer.pad_token_id
    with pytest.raises(ValueError, match="mlm=True is not supported: masked language modeling"):
        Collator(tokenizer=smollm2_tokenizer, mlm=True)
    with pytest.raises(ValueError, match="ignore_index=-1 is not supported: labels always use -100"):
        Collator(tokenizer=smollm2_tokenizer, ignore_index=-1)
    with pytest.raises(ValueError, match="return_tensors='np' is not supported"):
        Collator(tokenizer=smollm2_tokenizer, return_tensors="np")
    with pytest.raises(ValueError, match="response_template=1.5 must be text or a list of token ids"):
        Collator(1.5, pad_token_id=PAD)
    with pytest.raises(TypeError, match="response_template"):  # given twice: plain Python, no special case
        Collator("### Response:\n", tokenizer=smollm2_tokenizer, response_template="### Answer:\n")
    batch = Collator(tokenizer=smollm2_tokenizer, response_template="### Response:\n", return_position_ids=True)(ids)
    assert batch["position_ids"][0, :3].tolist() == [0, 1, 2] and "attention_mask" in batch


def test_constructor_errors_name_the_argument(smollm2_tokenizer):
    """Bad constructor input names the argument and the fix; a numpy integer pad id is an int like any other."""
    import numpy as np

    assert Collator(pad_token_id=np.int64(3)).pad_token_id == 3
    with pytest.raises(ValueError, match="instruction_template='': The template is an empty string"):
        Collator(tokenizer=smollm2_tokenizer, response_template="### Response:", instruction_template="")
    with pytest.raises(ValueError, match=r"response_template=\[\]: The template token ids are empty"):
        Collator(pad_token_id=PAD, response_template=[])
    with pytest.raises(ValueError, match="given as response_template. Pass the tokenizer by keyword"):
        Collator(smollm2_tokenizer)


def test_fields_mean_what_they_say(smollm2_tokenizer):
    """Issue 26: response_template is the first field (TRL's call is the signature, not a special case), pad_token_id
    an int resolved from the tokenizer, and the refused legacy keywords are neither fields nor in the signature."""
    import dataclasses
    import inspect

    names = [f.name for f in dataclasses.fields(Collator)]
    assert names[:4] == ["response_template", "instruction_template", "tokenizer", "pad_token_id"]
    assert not {"mlm", "ignore_index", "return_tensors", "loss_weights_consumer"} & set(names)
    parameters = list(inspect.signature(Collator).parameters)
    assert parameters[0] == "response_template" and "mlm" not in parameters and "ignore_index" not in parameters
    collator = Collator("### Response:", tokenizer=smollm2_tokenizer)
    assert isinstance(collator.pad_token_id, int) and collator.pad_token_id == smollm2_tokenizer.pad_token_id
    assert not hasattr(collator, "mlm") and not hasattr(collator, "ignore_index")
    assert dataclasses.replace(collator, prompt_loss_weight=0.5).response_template == "### Response:"


def test_old_positional_pad_token_id_still_works_with_a_future_warning(smollm2_tokenizer):
    """Until this release the first field was pad_token_id and the second tokenizer: Collator(0, tok) keeps its
    meaning for one release."""
    with pytest.warns(FutureWarning, match="first positional argument is now response_template"):
        old = Collator(PAD, smollm2_tokenizer)
    assert old.pad_token_id == PAD and old.tokenizer is smollm2_tokenizer and old.response_template is None
    examples = [{"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1]}]
    assert_batches_equal(old(examples), Collator(pad_token_id=PAD, tokenizer=smollm2_tokenizer)(examples))
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="pad_token_id is given twice"):
        Collator(PAD, pad_token_id=PAD)


def test_non_integer_or_negative_token_ids_are_refused():
    """Float ids would be truncated (1.7 -> 1) and negative ids index nothing: both are refused by name."""
    with pytest.raises(ValueError, match=r"`input_ids` holds non-integer values \(\[1.7"):
        Collator(pad_token_id=PAD)([{"input_ids": [1.7, 2.0, 3.0], "completion_mask": [0, 1, 1]}])
    with pytest.raises(ValueError, match="`input_ids` has negative ids"):
        Collator(pad_token_id=PAD)([{"input_ids": [1, -100, 3], "completion_mask": [0, 1, 1]}])
    # integral floats (e.g. from a float array) are still token ids
    batch = Collator(pad_token_id=PAD)([{"input_ids": [1.0, 2.0, 3.0], "completion_mask": [0, 1, 1]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3]]

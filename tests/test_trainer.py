"""PLWTrainer: equivalence with TRL's SFTTrainer, packing, accumulation, metrics, schedules, bad input.

Tiny random Llama models (float64, CPU) with the real SmolLM2 tokenizer, so tokenization parity with TRL is tested too.
Equivalences are asserted to float64 rounding (conftest.F64_RTOL/F64_ATOL), so they hold on every CPU.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import F64_ATOL, F64_RTOL, assert_exact, make_tiny_llama, skip_without_sft_loss
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from trl_plw import PLWConfig, PLWTrainer

PAIRS = [
    ("What is the capital of France? Answer in one word.", "Paris"),
    ("Add two and three.", "Five, since 2 + 3 = 5."),
    ("Name a primary colour.", "Red"),
    ("Translate 'gato' from Spanish to English, please, with a short explanation.", "Cat: 'gato' is Spanish for cat."),
    ("Say hi.", "Hi!"),
    ("Which is larger, 7 or 9?", "9 is larger."),
    ("Spell 'dog' backwards.", "god"),
    ("What colour is the sky on a clear day?", "Blue."),
]


def prompt_completion_dataset(conversational: bool, n: int = 8) -> Dataset:
    rows = []
    for prompt, completion in PAIRS[:n]:
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": completion}],
                }
            )
        else:
            rows.append({"prompt": f"Question: {prompt}\nAnswer:", "completion": f" {completion}"})
    return Dataset.from_list(rows)


def common_args(**overrides):
    base = dict(
        output_dir="unused",
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=1,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        bf16=False,  # SFTConfig enables bf16 autocast wherever supported, CPUs with AVX512-BF16 included
    )
    base.update(overrides)
    return base


def tiny(vocab_size: int, **kwargs):
    """float64: equivalence tests then compare to rounding error, not to one CPU's float32 summation order."""
    return make_tiny_llama(vocab_size=vocab_size, hidden_size=32, num_layers=2, **kwargs).double()


def loss_and_grads(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_grads_close(a, b, rtol=F64_RTOL, atol=F64_ATOL):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=f"gradient of {name}")


def first_rows(dataset, n):
    return [dataset[i] for i in range(n)]


@pytest.mark.parametrize("conversational", [False, True])
@pytest.mark.parametrize("plw", [1.0, 0.0])
def test_matches_sft_trainer(smollm2_tokenizer, tmp_path, conversational, plw):
    """PLW=1 reproduces SFTTrainer's full-sequence loss; PLW=0 reproduces completion_only_loss=True."""
    data = prompt_completion_dataset(conversational)
    model = tiny(len(smollm2_tokenizer))
    sft = SFTTrainer(
        copy.deepcopy(model),
        args=SFTConfig(**common_args(output_dir=str(tmp_path / "sft"), completion_only_loss=plw == 0.0)),
        train_dataset=data,
        processing_class=smollm2_tokenizer,
    )
    ours = PLWTrainer(
        copy.deepcopy(model),
        args=PLWConfig(**common_args(output_dir=str(tmp_path / "plw"), prompt_loss_weight=plw)),
        train_dataset=data,
        processing_class=smollm2_tokenizer,
    )
    reference_model = copy.deepcopy(model).train()
    sft_rows, our_rows = first_rows(sft.train_dataset, 4), first_rows(ours.train_dataset, 4)
    assert [r["input_ids"] for r in sft_rows] == [r["input_ids"] for r in our_rows]  # same tokenization as TRL
    our_batch = ours.data_collator(our_rows)
    our_loss, our_grads = loss_and_grads(ours, our_batch)
    # Exact: against a float64 full-logits reference of the same definition (mean CE over the scored tokens).
    reference, _ = reference_weighted_loss(reference_model, our_batch, plw)
    reference.backward()
    assert_exact(our_loss, reference.detach())
    assert_grads_close(our_grads, {n: p.grad for n, p in reference_model.named_parameters() if p.grad is not None})
    skip_without_sft_loss()
    sft_loss, sft_grads = loss_and_grads(sft, sft.data_collator(sft_rows))
    # Parity with TRL: its chunked head computes in float32 whatever the model's dtype, so the comparison allows
    # float32 rounding of a log-sum-exp over the vocabulary: sqrt(V) * eps32, relative to each tensor's magnitude.
    assert sft_loss.dtype == torch.float32
    bound = math.sqrt(len(smollm2_tokenizer)) * torch.finfo(torch.float32).eps
    torch.testing.assert_close(our_loss, sft_loss.to(our_loss.dtype), rtol=bound, atol=bound * sft_loss.abs().item())
    assert our_grads.keys() == sft_grads.keys()
    for name, grad in sft_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(our_grads[name], grad, rtol=bound, atol=bound * scale, msg=f"gradient of {name}")


def reference_weighted_loss(model, batch, plw, normalization="weights"):
    """Full-logits reference on a padded batch: sum(w * ce) / denominator, with the shift done here."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1]  # the model's dtype: float64 in the exactness tests
    targets = batch["input_ids"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    ce = ce.view_as(targets)
    w = batch["loss_weights"][:, 1:].double()  # the float32 weights, summed in float64 like the trainer
    denominator = w.sum() if normalization == "weights" else (w != 0).sum()
    return (w * ce).sum() / denominator, ce


@pytest.mark.parametrize("normalization", ["weights", "nonzero_tokens"])
def test_fractional_plw_matches_full_logits_reference(smollm2_tokenizer, tmp_path, normalization):
    data = prompt_completion_dataset(conversational=True)
    model = tiny(len(smollm2_tokenizer))
    reference_model = copy.deepcopy(model).train()  # copied before the trainer patches the forward
    trainer = PLWTrainer(
        model,
        args=PLWConfig(
            **common_args(output_dir=str(tmp_path), prompt_loss_weight=0.1, loss_normalization=normalization)
        ),
        train_dataset=data,
        processing_class=smollm2_tokenizer,
    )
    batch = trainer.data_collator(first_rows(trainer.train_dataset, 4))
    weights = batch["loss_weights"]
    assert torch.unique(weights).tolist() == pytest.approx([0.0, 0.1, 1.0])
    loss, grads = loss_and_grads(trainer, batch)
    reference, _ = reference_weighted_loss(reference_model, batch, 0.1, normalization)
    reference.backward()
    assert_exact(loss, reference.detach())
    ref_grads = {n: p.grad for n, p in reference_model.named_parameters() if p.grad is not None}
    assert_grads_close(grads, ref_grads)


def test_padding_free_and_packed_equal_padded(smollm2_tokenizer, tmp_path):
    data = prompt_completion_dataset(conversational=True)
    model = tiny(len(smollm2_tokenizer))
    padded = PLWTrainer(
        copy.deepcopy(model),
        args=PLWConfig(**common_args(output_dir=str(tmp_path / "a"), prompt_loss_weight=0.2)),
        train_dataset=data,
        processing_class=smollm2_tokenizer,
    )
    padding_free = PLWTrainer(
        copy.deepcopy(model),
        args=PLWConfig(
            **common_args(output_dir=str(tmp_path / "b"), prompt_loss_weight=0.2, padding_free=True, max_length=None)
        ),
        train_dataset=data,
        processing_class=smollm2_tokenizer,
    )
    rows = first_rows(padded.train_dataset, 4)
    padded_batch = padded.data_collator(rows)
    free_batch = padding_free.data_collator(rows)
    assert "attention_mask" not in free_batch and free_batch["input_ids"].shape[0] == 1
    loss_a, grads_a = loss_and_grads(padded, padded_batch)
    loss_b, grads_b = loss_and_grads(padding_free, free_batch)
    assert_exact(loss_b, loss_a)
    assert_grads_close(grads_b, grads_a)

    # BFD-packed rows of the same examples (the trainer's own packing pipeline) give the same loss
    packed = PLWTrainer(
        copy.deepcopy(model),
        args=PLWConfig(
            **common_args(output_dir=str(tmp_path / "c"), prompt_loss_weight=0.2, packing=True, max_length=4096)
        ),
        train_dataset=data.select(range(4)),
        processing_class=smollm2_tokenizer,
    )
    packed_rows = list(packed.train_dataset)
    assert len(packed_rows) == 1 and len(packed_rows[0]["seq_lengths"]) == 4
    loss_c, grads_c = loss_and_grads(packed, packed.data_collator(packed_rows))
    assert_exact(loss_c, loss_a)
    assert_grads_close(grads_c, grads_a)


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_bfd_packing_truncates_before_dropping_examples_without_completion(
    smollm2_tokenizer, tmp_path, truncation_mode
):
    """BFD packing cuts long examples itself; the trainer must cut them first (honouring truncation_mode) so that an
    example whose completion was cut away is dropped instead of being packed as a prompt-only document."""
    long_prompt = "Question: " + "please read this long passage about nothing in particular " * 6 + "\nAnswer:"
    rows = [{"prompt": "Question: Say hi.\nAnswer:", "completion": " Hi!"}] * 3 + [
        {"prompt": long_prompt, "completion": " No."}
    ]
    max_length = 24
    assert len(smollm2_tokenizer(long_prompt)["input_ids"]) > max_length
    trainer = PLWTrainer(
        tiny(len(smollm2_tokenizer)),
        args=PLWConfig(
            **common_args(output_dir=str(tmp_path)),
            prompt_loss_weight=0.5,
            packing=True,
            max_length=max_length,
            truncation_mode=truncation_mode,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=smollm2_tokenizer,
    )
    documents = []
    for row in trainer.train_dataset:
        assert len(row["input_ids"]) == len(row["token_roles"]) <= max_length
        start = 0
        for length in row["seq_lengths"]:
            documents.append((row["input_ids"][start : start + length], row["token_roles"][start : start + length]))
            start += length
    assert all(1 in roles for _, roles in documents), "a packed document without completion tokens"
    if truncation_mode == "keep_start":  # the long example's answer lies beyond max_length: dropped
        assert len(documents) == 3
    else:  # keep_end keeps the answer and the end of the passage
        assert len(documents) == 4
        ids, roles = max(documents, key=lambda d: len(d[0]))
        assert len(ids) == max_length and "No." in smollm2_tokenizer.decode(
            [i for i, r in zip(ids, roles, strict=True) if r == 1]
        )


@pytest.mark.parametrize("strategy", ["bfd_split", "wrapped"])
def test_token_keeping_packing_strategies_keep_every_token_and_role(smollm2_tokenizer, tmp_path, strategy):
    """bfd_split and wrapped keep every token (no truncation before packing), with roles aligned to the ids."""
    data = prompt_completion_dataset(conversational=True)
    reference = PLWTrainer(
        tiny(len(smollm2_tokenizer)),
        args=PLWConfig(**common_args(output_dir=str(tmp_path / "ref")), max_length=None),
        train_dataset=data,
        processing_class=smollm2_tokenizer,
    )
    total = sum(len(row["input_ids"]) for row in reference.train_dataset)
    roles = {tuple(row["input_ids"]): row["token_roles"] for row in reference.train_dataset}
    trainer = PLWTrainer(
        tiny(len(smollm2_tokenizer)),
        args=PLWConfig(
            **common_args(output_dir=str(tmp_path / "p")),
            prompt_loss_weight=0.2,
            packing=True,
            max_length=16,
            packing_strategy=strategy,
            shuffle_dataset=False,
        ),
        train_dataset=data,
        processing_class=smollm2_tokenizer,
    )
    rows = list(trainer.train_dataset)
    assert sum(len(r["input_ids"]) for r in rows) == total
    assert all(len(r["input_ids"]) == len(r["token_roles"]) <= 16 for r in rows)
    if strategy == "wrapped":  # rows are consecutive cuts of the concatenated stream
        stream_ids = [i for r in rows for i in r["input_ids"]]
        stream_roles = [x for r in rows for x in r["token_roles"]]
        assert stream_roles == [x for ids in roles for x in roles[ids]] and len(stream_ids) == total
    batch = trainer.data_collator(rows[:4])
    assert math.isfinite(trainer.compute_loss(trainer.model, dict(batch)).item())


@pytest.mark.parametrize("normalization", ["weights", "nonzero_tokens"])
def test_gradient_accumulation_equals_big_batch(smollm2_tokenizer, tmp_path, normalization):
    """One SGD step: batch 4 x accumulation 1 == batch 1 x accumulation 4 (a global denominator, not a mean of
    per-micro-batch means; the examples have very different lengths, so a mean of means would differ)."""
    data = prompt_completion_dataset(conversational=True, n=4)
    model = tiny(len(smollm2_tokenizer))
    params = []
    for batch_size, accumulation in ((4, 1), (1, 4)):
        trainer = PLWTrainer(
            copy.deepcopy(model),
            args=PLWConfig(
                **common_args(
                    output_dir=str(tmp_path / f"{batch_size}"),
                    per_device_train_batch_size=batch_size,
                    gradient_accumulation_steps=accumulation,
                    prompt_loss_weight=0.1,
                    loss_normalization=normalization,
                )
            ),
            train_dataset=data,
            processing_class=smollm2_tokenizer,
        )
        trainer.train()
        params.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    moved = max((params[0][n] - model.state_dict()[n]).abs().max().item() for n in params[0])
    assert moved > 1e-4  # the step did something
    for name in params[0]:
        assert_exact(params[1][name], params[0][name], msg=name)


def test_eval_metrics_split_prompt_and_completion(smollm2_tokenizer, tmp_path):
    """Prompt loss is reported even at PLW=0; every metric matches a full-logits reference over the eval set."""
    data = prompt_completion_dataset(conversational=True)
    trainer = PLWTrainer(
        tiny(len(smollm2_tokenizer)),
        args=PLWConfig(
            **common_args(output_dir=str(tmp_path), prompt_loss_weight=0.0, per_device_eval_batch_size=3),
            answer_tokens=["Paris", "Red", "god"],
        ),
        train_dataset=data,
        eval_dataset=data,
        processing_class=smollm2_tokenizer,
    )
    metrics = trainer.evaluate()
    for key in (
        "eval_loss",
        "eval_prompt_loss",
        "eval_completion_loss",
        "eval_sequence_loss",
        "eval_completion_accuracy",
        "eval_answer_accuracy",
    ):
        assert key in metrics and math.isfinite(metrics[key]), key

    # Reference: full logits over the whole prepared eval set
    model = trainer.model.eval()
    collator = copy.copy(trainer.data_collator)
    batch = collator(list(trainer.eval_dataset))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    prompt, completion = batch["prompt_mask"][:, 1:], batch["completion_mask"][:, 1:]
    assert prompt.any() and completion.any()
    top = logits.max(-1)
    correct = (logits.gather(-1, targets[..., None])[..., 0] >= top.values) & (
        (logits == top.values[..., None]).sum(-1) == 1
    )
    assert metrics["eval_prompt_loss"] == pytest.approx(ce[prompt].mean().item(), rel=1e-5)
    assert metrics["eval_completion_loss"] == pytest.approx(ce[completion].mean().item(), rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(ce[completion].mean().item(), rel=1e-5)  # PLW=0
    both = prompt | completion
    assert metrics["eval_sequence_loss"] == pytest.approx(ce[both].mean().item(), rel=1e-5)
    assert metrics["eval_completion_accuracy"] == pytest.approx(correct[completion].float().mean().item(), abs=1e-6)


def _split_metrics_of(metrics: dict, prefix: str) -> dict:
    names = ("loss", "prompt_loss", "completion_loss", "sequence_loss", "completion_accuracy")
    return {name: metrics[f"{prefix}_{name}"] for name in names}


def test_eval_metrics_of_each_eval_set_and_of_predict_keep_their_own_prefix(smollm2_tokenizer, tmp_path):
    """A dict of eval sets reports each set's split metrics under ``eval_<name>_``, equal to evaluating that set
    alone; ``predict`` reports them under ``test_`` and leaves nothing behind for the next ``evaluate``."""
    first = prompt_completion_dataset(conversational=True, n=4)
    second = Dataset.from_list(prompt_completion_dataset(conversational=True).to_list()[4:])
    trainer = PLWTrainer(
        tiny(len(smollm2_tokenizer)),
        args=PLWConfig(**common_args(output_dir=str(tmp_path), prompt_loss_weight=0.1, per_device_eval_batch_size=3)),
        train_dataset=first,
        eval_dataset={"first": first, "second": second},
        processing_class=smollm2_tokenizer,
    )
    both = trainer.evaluate()
    alone = {
        name: trainer.evaluate(eval_dataset=name, metric_key_prefix=f"eval_{name}") for name in ("first", "second")
    }
    for name in ("first", "second"):
        expected = _split_metrics_of(alone[name], f"eval_{name}")
        assert _split_metrics_of(both, f"eval_{name}") == pytest.approx(expected, rel=1e-12)
    assert both["eval_first_prompt_loss"] != pytest.approx(both["eval_second_prompt_loss"])  # really two sets
    assert not any(key.startswith("eval_prompt") for key in both)  # nothing under the bare prefix

    predicted = trainer.predict(trainer.eval_dataset["first"]).metrics
    assert _split_metrics_of(predicted, "test") == pytest.approx(_split_metrics_of(alone["first"], "eval_first"))
    after = trainer.evaluate(eval_dataset="second", metric_key_prefix="eval_second")
    assert _split_metrics_of(after, "eval_second") == pytest.approx(
        _split_metrics_of(alone["second"], "eval_second"), rel=1e-12
    )


def test_schedule_moves_prompt_weight_and_resumes_exactly(smollm2_tokenizer, tmp_path):
    data = prompt_completion_dataset(conversational=True)
    args = dict(
        common_args(per_device_train_batch_size=2, max_steps=4, save_strategy="steps", save_steps=2),
        prompt_loss_weight=1.0,
        prompt_loss_weight_end=0.0,
        prompt_loss_weight_schedule="linear",
    )
    model = tiny(len(smollm2_tokenizer))
    full = PLWTrainer(
        copy.deepcopy(model),
        args=PLWConfig(**{**args, "output_dir": str(tmp_path / "full")}),
        train_dataset=data,
        processing_class=smollm2_tokenizer,
    )
    full.train()
    logged = [e["prompt_loss_weight"] for e in full.state.log_history if "prompt_loss_weight" in e]
    # Logged after each optimizer step, i.e. the weight in force for the next step
    assert logged == pytest.approx([0.75, 0.5, 0.25, 0.0])

    resumed_dir = str(tmp_path / "resumed")
    first = PLWTrainer(
        copy.deepcopy(model),
        args=PLWConfig(**{**args, "output_dir": resumed_dir, "max_steps": 4}),
        train_dataset=data,
        processing_class=smollm2_tokenizer,
    )
    first.train()  # writes checkpoint-2 and checkpoint-4
    second = PLWTrainer(
        copy.deepcopy(model),
        args=PLWConfig(**{**args, "output_dir": resumed_dir}),
        train_dataset=data,
        processing_class=smollm2_tokenizer,
    )
    second.train(resume_from_checkpoint=f"{resumed_dir}/checkpoint-2")
    resumed = [e["prompt_loss_weight"] for e in second.state.log_history if "prompt_loss_weight" in e]
    assert resumed[-2:] == pytest.approx([0.25, 0.0])
    for (name, p), q in zip(full.model.named_parameters(), second.model.parameters(), strict=True):
        assert_exact(q, p, msg=name)


def test_best_model_on_completion_loss_with_early_stopping(smollm2_tokenizer, tmp_path):
    from transformers import EarlyStoppingCallback

    data = prompt_completion_dataset(conversational=True)
    trainer = PLWTrainer(
        tiny(len(smollm2_tokenizer)),
        args=PLWConfig(
            **common_args(
                output_dir=str(tmp_path),
                max_steps=6,
                eval_strategy="steps",
                eval_steps=2,
                save_strategy="steps",
                save_steps=2,
                learning_rate=0.5,
            ),
            prompt_loss_weight=0.1,
            metric_for_best_model="completion_loss",
            load_best_model_at_end=True,
        ),
        train_dataset=data,
        eval_dataset=data,
        processing_class=smollm2_tokenizer,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=1)],
    )
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_completion_loss" in e]
    assert evals
    assert trainer.state.best_metric == pytest.approx(min(e["eval_completion_loss"] for e in evals))


def test_unsupported_combinations_raise(smollm2_tokenizer, tmp_path):
    data = prompt_completion_dataset(conversational=False)
    with pytest.raises(ValueError, match="compute_loss_func"):
        PLWTrainer(
            tiny(len(smollm2_tokenizer)),
            args=PLWConfig(**common_args(output_dir=str(tmp_path))),
            train_dataset=data,
            processing_class=smollm2_tokenizer,
            compute_loss_func=lambda *a, **k: 0,
        )
    with pytest.raises(ValueError, match="compute_metrics"):
        PLWTrainer(
            tiny(len(smollm2_tokenizer)),
            args=PLWConfig(**common_args(output_dir=str(tmp_path))),
            train_dataset=data,
            processing_class=smollm2_tokenizer,
            compute_metrics=lambda p: {},
        )
    with pytest.raises(ValueError, match="prompt_loss_weight_end"):
        PLWConfig(**common_args(output_dir=str(tmp_path)), prompt_loss_weight_schedule="cosine")
    with pytest.raises(ValueError, match="loss_normalization"):
        PLWConfig(**common_args(output_dir=str(tmp_path)), loss_normalization="mean")
    with pytest.raises(ValueError, match="prompt_loss_weight"):
        PLWConfig(**common_args(output_dir=str(tmp_path)), prompt_loss_weight=float("nan"))


def test_dataset_without_split_names_the_columns(smollm2_tokenizer, tmp_path):
    """Plain text has no prompt: left unset, every token is trained (as SFTTrainer does); a prompt weight that
    could only act on a prompt raises, naming the columns looked for and the fixes."""
    data = Dataset.from_list([{"text": "just some text without any structure"}] * 4)
    with pytest.raises(ValueError, match=r"'prompt'\+'completion'.*'messages'.*response_template.*leave prompt_loss"):
        PLWTrainer(
            tiny(len(smollm2_tokenizer)),
            args=PLWConfig(**common_args(output_dir=str(tmp_path)), prompt_loss_weight=0.3),
            train_dataset=data,
            processing_class=smollm2_tokenizer,
        )
    trainer = PLWTrainer(
        tiny(len(smollm2_tokenizer)),
        args=PLWConfig(**common_args(output_dir=str(tmp_path))),
        train_dataset=data,
        processing_class=smollm2_tokenizer,
    )
    batch = trainer.data_collator(first_rows(trainer.train_dataset, 1))
    assert bool((batch["loss_weights"][0, 1:] == 1).all())


def test_text_dataset_with_response_template(smollm2_tokenizer, tmp_path):
    rows = [{"text": f"### Instruction:\n{p}\n\n### Response:\n{c}"} for p, c in PAIRS]
    trainer = PLWTrainer(
        tiny(len(smollm2_tokenizer)),
        args=PLWConfig(
            **common_args(output_dir=str(tmp_path)), prompt_loss_weight=0.5, response_template="### Response:"
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=smollm2_tokenizer,
    )
    batch = trainer.data_collator(first_rows(trainer.train_dataset, 2))
    row = batch["input_ids"][0][batch["completion_mask"][0]]
    assert smollm2_tokenizer.decode(row).strip().startswith(PAIRS[0][1][:5])
    assert set(batch["loss_weights"][batch["prompt_mask"]].unique().tolist()) == {0.5}


def test_messages_and_pretokenized_datasets(smollm2_tokenizer, tmp_path):
    messages = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": p},
                    {"role": "assistant", "content": c},
                ]
            }
            for p, c in PAIRS
        ]
    )
    chat = PLWTrainer(
        tiny(len(smollm2_tokenizer)),
        args=PLWConfig(
            **common_args(output_dir=str(tmp_path / "m")), prompt_loss_weight=0.3, role_weights={"system": 0.0}
        ),
        train_dataset=messages,
        processing_class=smollm2_tokenizer,
    )
    batch = chat.data_collator(first_rows(chat.train_dataset, 2))
    completion_text = smollm2_tokenizer.decode(batch["input_ids"][0][batch["completion_mask"][0]])
    assert PAIRS[0][1] in completion_text and PAIRS[0][0] not in completion_text
    assert batch["loss_weights"].unique().tolist() == pytest.approx([0.0, 0.3, 1.0])  # system tokens: 0
    assert math.isfinite(chat.compute_loss(chat.model, dict(batch)).item())

    pretokenized = Dataset.from_list(
        [
            {"input_ids": [5, 6, 7, 8, 9], "loss_weights": [0.0, 0.2, 0.2, 1.0, 1.0]},
            {"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]},
        ][:1]
        * 4
    )
    trainer = PLWTrainer(
        tiny(len(smollm2_tokenizer)),
        args=PLWConfig(**common_args(output_dir=str(tmp_path / "p"))),
        train_dataset=pretokenized,
        processing_class=smollm2_tokenizer,
    )
    batch = trainer.data_collator(first_rows(trainer.train_dataset, 2))
    torch.testing.assert_close(batch["loss_weights"][0], torch.tensor([0.0, 0.2, 0.2, 1.0, 1.0]))


def test_model_name_passes_through_and_picks_attention(monkeypatch, tmp_path, smollm2_tokenizer):
    """A model given by name gets an attention backend chosen for the device; on CPU (also when packed) that is
    sdpa, which is transformers' own default, so it is left to the model class (GPT-OSS rejects sdpa and picks its
    own). The name goes to TRL unchanged: demo aliases are resolved by the CLI/examples, not by the trainer."""

    def fail_resolve(name):
        raise AssertionError(f"the trainer resolved the model name {name!r}")

    monkeypatch.setattr("trl_plw.experiments.offline_model.resolve_model_path", fail_resolve)
    args = PLWConfig(**common_args(output_dir=str(tmp_path)), packing=True, max_length=64)
    assert PLWTrainer._prepare_model_name("smollm2-135m", args) == "smollm2-135m"
    assert "attn_implementation" not in args.model_init_kwargs
    args = PLWConfig(**common_args(output_dir=str(tmp_path)), model_init_kwargs={"attn_implementation": "auto"})
    PLWTrainer._prepare_model_name("x", args)
    assert "attn_implementation" not in args.model_init_kwargs
    args = PLWConfig(**common_args(output_dir=str(tmp_path)), model_init_kwargs={"attn_implementation": "eager"})
    PLWTrainer._prepare_model_name("x", args)
    assert args.model_init_kwargs["attn_implementation"] == "eager"


# ---------------------------------------------------------------- the drop-in path (issue 13)
ALPACA_ROWS = [{"text": f"### Instruction:\n{p}\n\n### Response:\n{c}"} for p, c in PAIRS]
RESPONSE = "### Response:\n"


def alpaca_collator(tokenizer, **kwargs):
    from trl_plw import DataCollatorForWeightedCompletionLM

    return DataCollatorForWeightedCompletionLM(tokenizer=tokenizer, response_template=RESPONSE, **kwargs)


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
def test_collator_template_drives_packed_training(smollm2_tokenizer, tmp_path, strategy):
    """TRL 0.19's pattern: the template stated only on the collator, PLW 0.1, packed. PLWTrainer prepares the dataset
    with the collator's template and trains with the collator's weights: the packed loss equals a float64
    full-logits reference over the same documents weighted by the user's collator itself (packing only reorders
    the sums: 1e-10 bounds float64 rounding, far below any weighting difference)."""
    model = tiny(len(smollm2_tokenizer)).double()
    reference_model = copy.deepcopy(model).train()
    collator = alpaca_collator(smollm2_tokenizer, prompt_loss_weight=0.1)
    trainer = PLWTrainer(
        model,
        args=PLWConfig(
            **common_args(output_dir=str(tmp_path)),
            packing=True,
            max_length=4096,
            packing_strategy=strategy,
            shuffle_dataset=False,
        ),
        data_collator=collator,
        train_dataset=Dataset.from_list(ALPACA_ROWS),
        processing_class=smollm2_tokenizer,
    )
    assert trainer.args.response_template == RESPONSE and trainer.args.prompt_loss_weight == 0.1
    assert collator.loss_weights_applied is False  # the user's object is left as given
    rows = list(trainer.train_dataset)
    assert len(rows) == 1 and sum(len(r["input_ids"]) for r in rows) > 100
    batch = trainer.data_collator(rows)
    assert torch.unique(batch["loss_weights"]).tolist() == pytest.approx([0.0, 0.1, 1.0])
    loss = trainer.compute_loss(trainer.model, dict(batch))

    texts = [r["text"] + smollm2_tokenizer.eos_token for r in ALPACA_ROWS]
    examples = [smollm2_tokenizer(t)["input_ids"] for t in texts]
    reference_batch = alpaca_collator(smollm2_tokenizer, prompt_loss_weight=0.1, loss_weights_applied=True)(examples)
    if strategy == "wrapped":
        # One row without document boundaries (attention spans documents, by design of "wrapped"): the weights are
        # the collator's everywhere except at document starts, which only the unpacked reference masks.
        real = reference_batch["attention_mask"].bool()
        expected = reference_batch["loss_weights"][real]
        starts = torch.cumsum(real.sum(1), 0)[:-1]
        got = batch["loss_weights"][0].clone()
        got[starts] = 0.0
        assert torch.equal(got, expected)
        return
    torch.testing.assert_close(loss, float64_reference_loss(reference_model, reference_batch), rtol=1e-10, atol=0)


def float64_reference_loss(model, batch):
    """sum(w * ce) / sum(w) over a padded batch with full float64 logits (the weights' float32 values, widened)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1].double()
    targets = batch["input_ids"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    w = batch["loss_weights"][:, 1:].double().reshape(-1)
    return (w * ce).sum() / w.sum()


def test_collator_and_config_conflicts_name_both_values(smollm2_tokenizer, tmp_path):
    data = Dataset.from_list(ALPACA_ROWS)
    cases = [
        (
            {"prompt_loss_weight": 0.2},
            {"prompt_loss_weight": 0.1},
            r"prompt_loss_weight=0\.2.*prompt_loss_weight=0\.1",
        ),
        (
            {"response_template": "### Answer:"},
            {},
            r"response_template='### Answer:'.*response_template='### Response:\\n'",
        ),
        ({"example_weight_column": "w"}, {"example_weight_column": "v"}, r"example_weight_column='w'.*'v'"),
        ({"role_weights": {"system": 0.0}}, {"role_weights": {"user": 0.5}}, r"role_weights=\{'system': 0\.0\}"),
    ]
    for config_kwargs, collator_kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            PLWTrainer(
                tiny(len(smollm2_tokenizer)),
                args=PLWConfig(**common_args(output_dir=str(tmp_path)), **config_kwargs),
                data_collator=alpaca_collator(smollm2_tokenizer, **collator_kwargs),
                train_dataset=data,
                processing_class=smollm2_tokenizer,
            )
    # The same value stated twice is no conflict; a value stated only in PLWConfig reaches the collator.
    trainer = PLWTrainer(
        tiny(len(smollm2_tokenizer)),
        args=PLWConfig(**common_args(output_dir=str(tmp_path)), response_template=RESPONSE, prompt_loss_weight=0.25),
        data_collator=alpaca_collator(smollm2_tokenizer),
        train_dataset=data,
        processing_class=smollm2_tokenizer,
    )
    assert trainer.data_collator.prompt_loss_weight == 0.25


def test_collator_policy_on_chat_data_with_padding_free_and_example_weights(smollm2_tokenizer, tmp_path):
    """Role weights, prompt weight and example-weight column stated on the collator apply to chat data too, through
    BFD packing (the scalar example weight is spread over tokens before packing)."""
    from trl_plw import DataCollatorForWeightedCompletionLM

    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": p},
                {"role": "assistant", "content": c},
            ],
            "importance": 2.0 if i == 0 else 1.0,
        }
        for i, (p, c) in enumerate(PAIRS)
    ]
    collator = DataCollatorForWeightedCompletionLM(
        tokenizer=smollm2_tokenizer,
        prompt_loss_weight=0.3,
        role_weights={"system": 0.0, "template": 0.0},
        example_weight_column="importance",
    )
    trainer = PLWTrainer(
        tiny(len(smollm2_tokenizer)),
        args=PLWConfig(**common_args(output_dir=str(tmp_path)), packing=True, max_length=4096, shuffle_dataset=False),
        data_collator=collator,
        train_dataset=Dataset.from_list(rows),
        processing_class=smollm2_tokenizer,
    )
    assert trainer.data_collator.padding_free and not collator.padding_free
    assert trainer.args.example_weight_column == "importance"
    (row,) = list(trainer.train_dataset)
    batch = trainer.data_collator([row])
    start = 0
    for length in row["seq_lengths"]:  # BFD reorders documents; the first PAIR's has example weight 2
        doc = slice(start, start + length)
        expected = (
            [0.0, 0.6, 2.0] if PAIRS[0][0] in smollm2_tokenizer.decode(row["input_ids"][doc]) else [0.0, 0.3, 1.0]
        )
        assert batch["loss_weights"][0, doc].unique().tolist() == pytest.approx(expected)
        start += length
    user_tokens = batch["prompt_mask"] & (batch["loss_weights"] != 0)
    assert PAIRS[1][0] in smollm2_tokenizer.decode(batch["input_ids"][user_tokens])
    assert "Be brief." not in smollm2_tokenizer.decode(batch["input_ids"][user_tokens])


def test_collator_on_missing_template_ignore_drops_examples(smollm2_tokenizer, tmp_path):
    rows = [*ALPACA_ROWS[:3], {"text": "no template in this one"}]
    with pytest.raises(ValueError, match="on_missing_template='ignore'"):
        PLWTrainer(
            tiny(len(smollm2_tokenizer)),
            args=PLWConfig(**common_args(output_dir=str(tmp_path))),
            data_collator=alpaca_collator(smollm2_tokenizer),
            train_dataset=Dataset.from_list(rows),
            processing_class=smollm2_tokenizer,
        )
    trainer = PLWTrainer(
        tiny(len(smollm2_tokenizer)),
        args=PLWConfig(**common_args(output_dir=str(tmp_path))),
        data_collator=alpaca_collator(smollm2_tokenizer, on_missing_template="ignore"),
        train_dataset=Dataset.from_list(rows),
        processing_class=smollm2_tokenizer,
    )
    assert len(trainer.train_dataset) == 3


def chat_dataset() -> Dataset:
    return Dataset.from_list(
        [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in PAIRS]
    )


def test_trl_loss_switches_map_onto_weights_or_raise(smollm2_tokenizer, tmp_path):
    def build(data, collator=None, **config):
        return PLWTrainer(
            tiny(len(smollm2_tokenizer)),
            args=PLWConfig(**common_args(output_dir=str(tmp_path)), **config),
            data_collator=collator,
            train_dataset=data,
            processing_class=smollm2_tokenizer,
        )

    # assistant_only_loss=True on chat data: only assistant turns are weighted (TRL would refuse SmolLM2's template)
    trainer = build(chat_dataset(), assistant_only_loss=True)
    assert trainer.args.assistant_only_loss is True
    batch = trainer.data_collator(first_rows(trainer.train_dataset, 2))
    trained = smollm2_tokenizer.decode(batch["input_ids"][0][batch["loss_weights"][0] != 0])
    assert trained == PAIRS[0][1] + "<|im_end|>"
    assert torch.unique(batch["loss_weights"]).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="not conversational"):
        build(Dataset.from_list(ALPACA_ROWS), alpaca_collator(smollm2_tokenizer), assistant_only_loss=True)
    # contradictions with a non-zero prompt weight, from PLWConfig or from the collator, raise
    for switch in ("assistant_only_loss", "completion_only_loss"):
        with pytest.raises(ValueError, match=rf"{switch}=True trains only.*prompt_loss_weight=0\.1"):
            build(chat_dataset(), prompt_loss_weight=0.1, **{switch: True})
        with pytest.raises(ValueError, match=rf"{switch}=True.*'user': 0\.5"):
            build(chat_dataset(), role_weights={"user": 0.5}, **{switch: True})
    with pytest.raises(ValueError, match=r"completion_only_loss=True.*prompt_loss_weight=0\.1"):
        build(
            Dataset.from_list(ALPACA_ROWS),
            alpaca_collator(smollm2_tokenizer, prompt_loss_weight=0.1),
            completion_only_loss=True,
        )
    # completion_only_loss=True with weight 0 is what PLW 0 does already
    assert build(chat_dataset(), completion_only_loss=True).data_collator.prompt_loss_weight == 0.0
    # completion_only_loss=False is TRL's full-sequence loss: a prompt weight left at 0 becomes 1 ...
    trainer = build(chat_dataset(), completion_only_loss=False)
    assert trainer.args.prompt_loss_weight == 1.0 and trainer.data_collator.prompt_loss_weight == 1.0
    # ... an explicit non-zero one is kept, and plain text without templates trains on every token
    assert build(chat_dataset(), completion_only_loss=False, prompt_loss_weight=0.1).args.prompt_loss_weight == 0.1
    trainer = build(Dataset.from_list([{"text": "plain text"}] * 4), completion_only_loss=False)
    batch = trainer.data_collator(first_rows(trainer.train_dataset, 1))
    assert bool((batch["loss_weights"][0, 1:] == 1).all())

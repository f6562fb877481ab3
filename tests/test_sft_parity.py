"""The drop-in promise: with nothing set, PLWTrainer trains exactly the tokens SFTTrainer trains, with the same loss,
on every dataset type TRL documents and with TRL's loss switches.

Each case builds both trainers on the same tiny float64 model and data, checks that the prepared rows tokenize
identically, and compares the trained-target count (SFTTrainer: labels != -100; PLWTrainer: non-zero weights) and
the loss of the first batch. TRL's head computes its log-sum-exp in float32 whatever the model's dtype, so the loss
bound is float32 rounding of a log-sum-exp over the vocabulary, sqrt(V) * eps32 relative (the same bound as
tests/test_trainer.py's parity test); the token counts are exact.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from conftest import skip_without_sft_loss
from datasets import Dataset
from test_trainer import PAIRS, common_args, first_rows, tiny
from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer

from trl_plw import PLWConfig, PLWTrainer
from trl_plw._compat import trl_at_least

ROWS = 4


def text_data() -> Dataset:
    return Dataset.from_list([{"text": f"Question: {p}\nAnswer: {c}"} for p, c in PAIRS])


def tokenized_data(tokenizer) -> Dataset:
    return Dataset.from_list([{"input_ids": tokenizer(f"{p} {c}")["input_ids"]} for p, c in PAIRS])


def messages_data() -> Dataset:
    return Dataset.from_list(
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


def prompt_completion_data() -> Dataset:
    return Dataset.from_list([{"prompt": f"Question: {p}\nAnswer:", "completion": f" {c}"} for p, c in PAIRS])


def conversational_prompt_completion_data() -> Dataset:
    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
            for p, c in PAIRS
        ]
    )


DATASETS = {
    "text": lambda tok: text_data(),
    "input_ids": tokenized_data,
    "messages": lambda tok: messages_data(),
    "prompt_completion": lambda tok: prompt_completion_data(),
    "conversational_prompt_completion": lambda tok: conversational_prompt_completion_data(),
}

# (data type, TRL flags): every combination whose meaning SFTTrainer defines on that data. assistant_only_loss is
# left out: TRL needs a template with {% generation %} markers, which SmolLM2's lacks (SFTTrainer raises).
CASES = [
    ("text", {}),
    ("text", {"completion_only_loss": False}),
    ("input_ids", {}),
    ("messages", {}),
    ("messages", {"completion_only_loss": False}),
    ("prompt_completion", {}),
    ("prompt_completion", {"completion_only_loss": True}),
    ("prompt_completion", {"completion_only_loss": False}),
    ("conversational_prompt_completion", {}),
    ("conversational_prompt_completion", {"completion_only_loss": False}),
]


def sft_and_plw(tokenizer, tmp_path, data, plw_args=None, model=None, **flags):
    model = tiny(len(tokenizer)) if model is None else model
    sft = SFTTrainer(
        copy.deepcopy(model),
        args=SFTConfig(**common_args(output_dir=str(tmp_path / "sft"), **flags)),
        train_dataset=data,
        processing_class=tokenizer,
    )
    plw = PLWTrainer(
        copy.deepcopy(model),
        args=plw_args if plw_args is not None else PLWConfig(**common_args(output_dir=str(tmp_path / "plw"), **flags)),
        train_dataset=data,
        processing_class=tokenizer,
    )
    return sft, plw


def first_batch_loss(trainer, batch):
    trainer.model.train()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, dict(batch)).double()


def assert_same_training(sft, plw, vocab_size):
    sft_rows, plw_rows = first_rows(sft.train_dataset, ROWS), first_rows(plw.train_dataset, ROWS)
    assert [r["input_ids"] for r in sft_rows] == [r["input_ids"] for r in plw_rows]  # same tokenization
    sft_batch, plw_batch = sft.data_collator(sft_rows), plw.data_collator(plw_rows)
    sft_trained = int((sft_batch["labels"][:, 1:] != -100).sum())
    plw_trained = int((plw_batch["loss_weights"][:, 1:] != 0).sum())
    assert plw_trained == sft_trained
    assert torch.unique(plw_batch["loss_weights"]).tolist() in ([0.0, 1.0], [1.0])  # SFTTrainer's 0/1 loss
    skip_without_sft_loss()
    sft_loss, plw_loss = first_batch_loss(sft, sft_batch), first_batch_loss(plw, plw_batch)
    bound = math.sqrt(vocab_size) * torch.finfo(torch.float32).eps
    torch.testing.assert_close(plw_loss, sft_loss, rtol=bound, atol=bound * sft_loss.abs().item())
    return sft_trained


@pytest.mark.parametrize(("kind", "flags"), CASES, ids=[f"{k}-{f or 'default'}" for k, f in CASES])
def test_default_plw_trainer_is_sft_trainer(smollm2_tokenizer, tmp_path, kind, flags):
    data = DATASETS[kind](smollm2_tokenizer)
    sft, plw = sft_and_plw(smollm2_tokenizer, tmp_path, data, **flags)
    trained = assert_same_training(sft, plw, len(smollm2_tokenizer))
    total = sum(len(r["input_ids"]) - 1 for r in first_rows(plw.train_dataset, ROWS))
    everything = kind in ("text", "input_ids", "messages") or flags.get("completion_only_loss") is False
    assert (trained == total) == everything  # the case trains what its name says, not only what SFTTrainer does


def test_policy_in_force_is_logged_once_in_one_line(smollm2_tokenizer, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="trl_plw.trainer"):
        sft_and_plw(smollm2_tokenizer, tmp_path, messages_data())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("PLWTrainer policy:")]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert (
        "conversational language modeling data" in lines[0]
        and "prompt_loss_weight=1.0 (default: every token" in (lines[0])
    )


def test_setting_a_weight_switches_weighting_on(smollm2_tokenizer, tmp_path):
    """The same chat data with prompt_loss_weight set: the prompt side is weighted, the assistant turns are not."""
    args = PLWConfig(**common_args(output_dir=str(tmp_path / "plw")), prompt_loss_weight=0.25)
    _, plw = sft_and_plw(smollm2_tokenizer, tmp_path, messages_data(), plw_args=args)
    batch = plw.data_collator(first_rows(plw.train_dataset, ROWS))
    assert torch.unique(batch["loss_weights"]).tolist() == [0.0, 0.25, 1.0]
    assert bool((batch["loss_weights"][batch["completion_mask"]] == 1).all())


def test_training_arguments_and_sft_config_are_converted(smollm2_tokenizer, tmp_path):
    """SFTTrainer accepts a transformers.TrainingArguments (and of course an SFTConfig): so does PLWTrainer, with
    the default policy, and the caller's object is left as it was."""
    base = common_args(output_dir=str(tmp_path / "plw"))
    for args in (TrainingArguments(**base), SFTConfig(**base)):
        sft, plw = sft_and_plw(smollm2_tokenizer, tmp_path, prompt_completion_data(), plw_args=args)
        assert isinstance(plw.args, PLWConfig) and plw.args.learning_rate == base["learning_rate"]
        assert_same_training(sft, plw, len(smollm2_tokenizer))
    args = PLWConfig(**base)
    _, plw = sft_and_plw(smollm2_tokenizer, tmp_path, messages_data(), plw_args=args)
    assert args.prompt_loss_weight is None and plw.args.prompt_loss_weight == 1.0  # resolved on the trainer's copy


@pytest.mark.skipif(not trl_at_least("1.4"), reason="TRL < 1.4 has no loss_type='chunked_nll'")
def test_chunked_nll_is_weighted_like_nll(smollm2_tokenizer, tmp_path):
    """TRL 1.10-1.15 default to loss_type='chunked_nll' (the same loss by a chunked head; an alias in 1.16)."""
    flags = {"loss_type": "chunked_nll"}
    sft, plw = sft_and_plw(smollm2_tokenizer, tmp_path, prompt_completion_data(), **flags)
    assert plw.args.loss_type == "nll"
    assert_same_training(sft, plw, len(smollm2_tokenizer))


def test_mean_token_accuracy_under_trls_name(smollm2_tokenizer, tmp_path):
    """TRL logs mean_token_accuracy (argmax hits over the trained targets); PLWTrainer reports it under that name
    from its fused pass, equal to SFTTrainer's on the same batch (the same ratio of counts, which TRL divides in
    float32: one float32 rounding apart; float64 logits have no ties). The head is set so that the batch's most frequent target wins wherever the hidden state leans
    towards the batch mean, so the accuracy is neither 0 nor 1."""
    model = tiny(len(smollm2_tokenizer))
    data = messages_data()
    ids = torch.tensor(
        SFTTrainer(
            copy.deepcopy(model),
            args=SFTConfig(**common_args(output_dir=str(tmp_path / "probe"))),
            train_dataset=data,
            processing_class=smollm2_tokenizer,
        ).train_dataset[0]["input_ids"]
    )
    with torch.no_grad():
        hidden = model.model(input_ids=ids[None]).last_hidden_state[0]
        frequent = torch.mode(ids[1:]).values
        model.lm_head.weight[frequent] = 100 * hidden.mean(0)
    sft, plw = sft_and_plw(smollm2_tokenizer, tmp_path, data, model=model)
    skip_without_sft_loss()
    sft_batch = sft.data_collator(first_rows(sft.train_dataset, ROWS))
    plw_batch = plw.data_collator(first_rows(plw.train_dataset, ROWS))
    first_batch_loss(sft, sft_batch)
    first_batch_loss(plw, plw_batch)
    expected = sft._metrics["train"]["mean_token_accuracy"][-1]
    assert 0 < expected < 1
    ours = plw._split_metrics["train"].compute()["mean_token_accuracy"]
    assert ours == pytest.approx(expected, rel=torch.finfo(torch.float32).eps, abs=0)


def test_per_example_chat_template_kwargs_are_honoured(smollm2_tokenizer, tmp_path):
    """A `chat_template_kwargs` column (TRL reads it per example) reaches the template: PLWTrainer renders what
    SFTTrainer renders, and trains the same tokens with the same loss."""
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = "{% if greeting %}{{ greeting }}\n{% endif %}" + smollm2_tokenizer.chat_template
    rows = [dict(row, chat_template_kwargs={"greeting": f"Hello {i}"}) for i, row in enumerate(messages_data())]
    sft, plw = sft_and_plw(tokenizer, tmp_path, Dataset.from_list(rows))
    assert_same_training(sft, plw, len(tokenizer))
    assert tokenizer.decode(plw.train_dataset[1]["input_ids"]).startswith("Hello 1\n")


def test_assistant_only_loss_masks_a_user_turn_inside_the_completion(smollm2_tokenizer, tmp_path):
    """TRL's assistant_only_loss trains the completion's assistant tokens only (completion mask AND assistant mask),
    so a user turn inside a conversational completion is not trained; neither is it here. (SFTTrainer itself
    refuses SmolLM2's template for assistant_only_loss, so the tokens are checked by text.)"""
    row = {
        "prompt": [{"role": "user", "content": "Count to two."}],
        "completion": [
            {"role": "assistant", "content": "One."},
            {"role": "user", "content": "Go on."},
            {"role": "assistant", "content": "Two."},
        ],
    }
    args = PLWConfig(**common_args(output_dir=str(tmp_path)), assistant_only_loss=True)
    plw = PLWTrainer(
        tiny(len(smollm2_tokenizer)),
        args=args,
        train_dataset=Dataset.from_list([row] * 2),
        processing_class=smollm2_tokenizer,
    )
    batch = plw.data_collator(first_rows(plw.train_dataset, 1))
    trained = smollm2_tokenizer.decode(batch["input_ids"][0][batch["loss_weights"][0] != 0])
    assert trained == "One.<|im_end|>Two.<|im_end|>"


def test_a_model_class_that_rejects_sdpa_loads_with_its_own_attention(smollm2_tokenizer, tmp_path):
    """GPT-OSS refuses sdpa. Given by name, PLWTrainer leaves the automatic choice (sdpa on CPU) to the model class,
    as SFTTrainer does, so the model loads with its own default and trains the same tokens with the same loss."""
    import transformers as tf

    config = tf.GptOssConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_local_experts=2,
        num_experts_per_tok=1,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    path = tmp_path / "gpt-oss"
    tf.GptOssForCausalLM(config).save_pretrained(path)
    with pytest.raises(ValueError, match="does not support"):
        tf.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    data = prompt_completion_data()
    sft = SFTTrainer(
        str(path),
        args=SFTConfig(**common_args(output_dir=str(tmp_path / "sft"))),
        train_dataset=data,
        processing_class=smollm2_tokenizer,
    )
    plw = PLWTrainer(
        str(path),
        args=PLWConfig(**common_args(output_dir=str(tmp_path / "plw"))),
        train_dataset=data,
        processing_class=smollm2_tokenizer,
    )
    assert plw.model.config._attn_implementation == sft.model.config._attn_implementation != "sdpa"
    assert_same_training(sft, plw, len(smollm2_tokenizer))


def _qwen3_tokenizer(smollm2_tokenizer):
    """SmolLM2's tokenizer (ChatML tokens) with Qwen3's chat template, as TRL ships it: TRL swaps in its Qwen3
    training template (with {% generation %} markers) for assistant_only_loss."""
    import pathlib

    import trl

    path = pathlib.Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja"
    if not path.exists():
        pytest.skip(f"TRL {trl.__version__} ships no Qwen3 template")
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = path.read_text()
    return tokenizer


@pytest.mark.parametrize("kind", ["messages", "conversational_prompt_completion"])
def test_assistant_only_loss_uses_trls_assistant_mask(smollm2_tokenizer, tmp_path, kind):
    """Where TRL has a training template, assistant_only_loss trains exactly TRL's assistant mask: on Qwen3's that
    includes the newline after each end-of-turn token."""
    tokenizer = _qwen3_tokenizer(smollm2_tokenizer)
    sft, plw = sft_and_plw(tokenizer, tmp_path, DATASETS[kind](tokenizer), assistant_only_loss=True)
    assert_same_training(sft, plw, len(tokenizer))
    batch = plw.data_collator(first_rows(plw.train_dataset, 1))
    assert tokenizer.decode(batch["input_ids"][0][batch["loss_weights"][0] != 0]).endswith("<|im_end|>\n")

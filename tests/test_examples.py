"""Every script in examples/ runs, at tiny size, and does what its docstring claims.

Each example's ``main(argv)`` is called with a tiny random Llama saved next to the real SmolLM2 tokenizer (so the
examples' own loading code runs) and two steps; ``--no-bf16`` keeps the runs in fp32 on any CPU.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from trl_plw.schedules import prompt_weight_at

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))  # the scripts import their shared `_common` module
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    path = tmp_path_factory.mktemp("tiny-smollm2")
    make_tiny_llama(vocab_size=len(smollm2_tokenizer)).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return str(path)


def run_args(model_dir, tmp_path, *extra):
    return ["--model", model_dir, "--max-steps", "2", "--output-dir", str(tmp_path), "--no-bf16", *extra]


def test_every_example_has_a_test_and_a_docstring():
    tested = set(re.findall(r'load_example\("(\w+)"\)', Path(__file__).read_text()))
    scripts = {p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_")}
    assert len(scripts) == 4 and scripts <= tested, f"untested examples: {scripts - tested}"
    assert (EXAMPLES / "sft_recipe.yaml").is_file()
    for name in scripts:
        assert "For:" in load_example(name).__doc__, f"{name}: the docstring should say who it is for"


def test_migrate_completion_only_collator(tiny_model_dir, tmp_path):
    example = load_example("migrate_completion_only_collator")
    trainer = example.main(run_args(tiny_model_dir, tmp_path, "--prompt-loss-weight", "0.1"))
    assert trainer.state.global_step == 2 and trainer.padding_free  # trained, packed (BFD, padding-free)
    rows = list(trainer.train_dataset)
    assert all("seq_lengths" in r and len(r["seq_lengths"]) > 1 for r in rows[:1])
    batch = trainer.data_collator(rows[:1])
    assert torch.unique(batch["loss_weights"]).tolist() == pytest.approx([0.0, 0.1, 1.0])  # the collator's weights
    completion = trainer.processing_class.decode(batch["input_ids"][batch["completion_mask"]])
    assert "### Response" not in completion and "Instruction" not in completion


def test_chat_role_weights_schedule(tiny_model_dir, tmp_path):
    example = load_example("chat_role_weights_schedule")
    trainer = example.main(run_args(tiny_model_dir, tmp_path))
    logged = [e["prompt_loss_weight"] for e in trainer.state.log_history if "prompt_loss_weight" in e]
    expected = [prompt_weight_at(s, 2, example.PLW_START, example.PLW_END, "cosine") for s in (1, 2)]
    assert logged == pytest.approx(expected)
    trainer.state.global_step = 0  # the weights in force at step 0: system and template 0, user 0.1
    batch = trainer.data_collator([trainer.train_dataset[0]])
    weights, ids = trainer._effective_weights(batch)[0], batch["input_ids"][0]
    assert weights.unique().tolist() == pytest.approx([0.0, example.PLW_START, 1.0])
    user = trainer.processing_class.decode(ids[(weights - example.PLW_START).abs() < 1e-6])
    assert user in {pair[0] for pair in example.PAIRS}  # user content only: no system prompt, no <|im_start|>
    assistant = trainer.processing_class.decode(ids[weights == 1])
    assert assistant.endswith("<|im_end|>") and assistant[: -len("<|im_end|>")] in {pair[1] for pair in example.PAIRS}


def test_plain_pytorch_loop_accumulates_with_a_global_denominator(tiny_model_dir, tmp_path, smollm2_tokenizer):
    example = load_example("plain_pytorch_loop")
    losses = example.main(run_args(tiny_model_dir, tmp_path))
    assert len(losses) == 2 and all(loss > 0 for loss in losses)

    # The claim: accumulating micro-batches gives the gradient of the window as one batch (float64, 1e-10: only
    # summation order differs), and a mean of per-micro-batch means does not.
    from trl_plw import DataCollatorForWeightedCompletionLM

    model = make_tiny_llama(vocab_size=len(smollm2_tokenizer)).double().train()
    collator = DataCollatorForWeightedCompletionLM(
        tokenizer=smollm2_tokenizer, prompt_loss_weight=0.1, loss_weights_applied=True
    )
    examples = example.tokenized_examples(smollm2_tokenizer)[:4]

    def grads(micro_batches):
        model.zero_grad()
        example.accumulate_window(model, micro_batches)
        return [p.grad.clone() for p in model.parameters()]

    whole = grads([collator(examples)])
    accumulated = grads([collator(examples[:1]), collator(examples[1:])])
    for a, b in zip(accumulated, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    model.zero_grad()
    for micro in ([collator(examples[:1])], [collator(examples[1:])]):  # mean of means: each its own denominator
        example.accumulate_window(model, micro)
    assert not torch.allclose(model.lm_head.weight.grad / 2, whole[-1], rtol=1e-3)


def test_sft_recipe_yaml(tiny_model_dir, tmp_path, monkeypatch):
    from trl_plw import cli
    from trl_plw.trainer import PLWTrainer

    seen = {}
    original_train = PLWTrainer.train

    def train(self, *args, **kwargs):
        seen["trainer"] = self
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(PLWTrainer, "train", train)
    code = cli.main(
        [
            "sft",
            "--config",
            str(EXAMPLES / "sft_recipe.yaml"),
            "--model_name_or_path",
            tiny_model_dir,
            "--dataset_name",
            str(EXAMPLES / "data" / "chat_sample.jsonl"),
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "2",
            "--no-bf16",
            "--use_cpu",
            "true",
        ]
    )
    assert code == 0
    trainer = seen["trainer"]
    assert trainer.args.prompt_loss_weight == 0.1 and trainer.args.role_weights == {"system": 0.0, "template": 0.0}
    assert trainer.args.packing and trainer.padding_free and trainer.state.global_step == 2
    batch = trainer.data_collator(list(trainer.train_dataset)[:1])
    assert torch.unique(batch["loss_weights"]).tolist() == pytest.approx([0.0, 0.1, 1.0])
    assert (tmp_path / "model.safetensors").exists()


def test_gpu_lora_packed_varlen_recipe(tiny_model_dir, tmp_path):
    from accelerate.utils import is_peft_model

    example = load_example("gpu_lora_packed_varlen")
    argv = run_args(
        tiny_model_dir, tmp_path, "--num-examples", "8", "--max-length", "512", "--batch-size", "2", "--lora-r", "4"
    )
    trainer = example.main(argv)
    model = trainer.model
    assert is_peft_model(model) and trainer.padding_free and trainer.state.global_step == 2
    assert "seq_lengths" in trainer.train_dataset.column_names
    expected = "plw_varlen" if torch.cuda.is_available() else "sdpa"
    assert model.get_base_model().config._attn_implementation == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

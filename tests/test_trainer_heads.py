"""PLWTrainer with the heads users train: MoE (router aux loss), LoRA on lm_head, and the CPU precision default.

The head itself is proven equal to the model's own loss in test_head_matrix.py; these tests check that the trainer
wires it up: the aux loss enters the optimized loss with the model's coefficient and is logged as its own metric, a
``peft_config`` that adapts ``lm_head`` trains the adapter, and ``PLWConfig()`` picks bf16 only where it is native.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from conftest import assert_exact
from datasets import Dataset

from trl_plw import PLWConfig, PLWTrainer, precision
from trl_plw._compat import moe_aux_loss_coef

PAIRS = [
    ("Name a primary colour.", "Red"),
    ("Say hi.", "Hi!"),
    ("Which is larger, 7 or 9?", "9 is larger."),
    ("Spell 'dog' backwards.", "god"),
]


def chat_data() -> Dataset:
    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
            for p, c in PAIRS
        ]
    )


def args(tmp_path, **overrides) -> PLWConfig:
    base = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=0.1,
        optim="sgd",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return PLWConfig(**{**base, **overrides})


def tiny_mixtral(vocab_size: int, coef: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=coef,
        experts_implementation="eager",  # grouped_mm has no float64 kernel
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    return tf.MixtralForCausalLM(config).double()


def trl_minor() -> tuple[int, int]:
    import trl
    from packaging.version import Version

    return Version(trl.__version__).release[:2]


def reference_loss(model, batch, with_aux: bool) -> torch.Tensor:
    """float64 full-logits reference: weighted CE / sum of weights (+ coef * the model's own aux loss)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logp = torch.log_softmax(out.logits[:, :-1], dim=-1)
    ce = -logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    w = batch["loss_weights"][:, 1:].double()
    loss = (w * ce).sum() / w.sum()
    if with_aux:
        loss = loss + model.config.router_aux_loss_coef * out.aux_loss
    return loss


def test_moe_router_aux_loss_enters_the_loss_and_the_logs(smollm2_tokenizer, tmp_path):
    model = tiny_mixtral(len(smollm2_tokenizer))
    reference_model = copy.deepcopy(model).train()
    trainer = PLWTrainer(
        model,
        args=args(tmp_path, prompt_loss_weight=0.3),
        train_dataset=chat_data(),
        processing_class=smollm2_tokenizer,
    )
    # SFTTrainer's coefficient with nothing set: the model config's (0.5 here), except TRL 1.7-1.13, whose
    # SFTConfig.router_aux_loss_coef defaults to 0.001 and is written into the model config
    expected = 0.5 if not (1, 7) <= trl_minor() < (1, 14) else trainer.args.router_aux_loss_coef
    assert trainer.aux_loss_enabled and moe_aux_loss_coef(trainer) == expected
    reference_model.config.router_aux_loss_coef = expected
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    reference = reference_loss(reference_model, batch, with_aux=True)
    reference.backward()
    assert_exact(loss, reference)
    gate = "model.layers.0.mlp.gate.weight"
    ours = dict(trainer.model.named_parameters())[gate].grad
    assert ours is not None and ours.abs().sum() > 0  # the router is trained by the aux loss
    assert_exact(ours, dict(reference_model.named_parameters())[gate].grad)
    # Without the aux term the loss is different: the test would catch a head that drops it.
    without = reference_loss(reference_model, batch, with_aux=False)
    # 1e-3 at the config's 0.5 (the bound before TRL 1.7's default), scaled with the coefficient: 2e-6 at 0.001 is
    # still far above assert_exact's float64 tolerance
    assert abs(without.item() - reference.item()) > 2e-3 * expected

    trainer.train()
    logged = [e for e in trainer.state.log_history if "aux_loss" in e]
    assert len(logged) == 2 and all(e["aux_loss"] > 0 for e in logged)


@pytest.mark.skipif(
    not hasattr(PLWConfig, "router_aux_loss_coef"),
    reason="SFTConfig.router_aux_loss_coef arrived in TRL 1.7",
)
def test_router_aux_loss_coef_zero_turns_it_off(smollm2_tokenizer, tmp_path):
    model = tiny_mixtral(len(smollm2_tokenizer))
    reference_model = copy.deepcopy(model).train()
    trainer = PLWTrainer(
        model,
        args=args(tmp_path, prompt_loss_weight=0.3, router_aux_loss_coef=0.0),
        train_dataset=chat_data(),
        processing_class=smollm2_tokenizer,
    )
    assert not trainer.aux_loss_enabled
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    assert_exact(
        trainer.compute_loss(trainer.model, dict(batch)), reference_loss(reference_model, batch, with_aux=False)
    )


def test_peft_lora_on_lm_head_trains_the_adapter_exactly(smollm2_tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    from conftest import make_tiny_llama

    model = make_tiny_llama(vocab_size=len(smollm2_tokenizer)).double()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False
    )
    reference_model = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))  # forward: the model's own
    trainer = PLWTrainer(
        model,
        args=args(tmp_path, prompt_loss_weight=0.1),
        train_dataset=chat_data(),
        processing_class=smollm2_tokenizer,
        peft_config=config,
    )
    reference_model.load_state_dict(trainer.model.state_dict())  # the same adapter values
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train(), reference_model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    reference = reference_loss(reference_model, batch, with_aux=False)
    reference.backward()
    assert_exact(loss, reference)
    head_grads = {n: p.grad for n, p in trainer.model.named_parameters() if "lm_head.lora" in n}
    assert len(head_grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in head_grads.values())
    ref_params = dict(reference_model.named_parameters())
    for name, grad in head_grads.items():
        assert_exact(grad, ref_params[name].grad)


@pytest.mark.parametrize("method", ["PromptTuningConfig", "PromptEncoderConfig"])
def test_prompt_learning_peft_methods_are_refused_naming_peft_config(smollm2_tokenizer, tmp_path, method):
    """Prompt tuning and P-tuning add positions that carry no token, role or weight: refused, by name."""
    peft = pytest.importorskip("peft")
    from conftest import make_tiny_llama

    extra = {"encoder_hidden_size": 8} if method == "PromptEncoderConfig" else {}
    config = getattr(peft, method)(task_type="CAUSAL_LM", num_virtual_tokens=4, **extra)
    with pytest.raises(ValueError, match=f"peft_config .*{method}.*prompt-learning.*PrefixTuningConfig"):
        PLWTrainer(
            make_tiny_llama(vocab_size=len(smollm2_tokenizer)).double(),
            args=args(tmp_path, prompt_loss_weight=0.1),
            train_dataset=chat_data(),
            processing_class=smollm2_tokenizer,
            peft_config=config,
        )


def test_prefix_tuning_trains_exactly_sft_trainers_loss(smollm2_tokenizer, tmp_path):
    """Prefix tuning adds prefix keys/values, no position: the weighted head sees the real tokens only, so
    PLWTrainer with nothing set gives SFTTrainer's loss and the same prefix-encoder gradients. Both run float64
    here; the bound is TRL's float32 head (sqrt(V) * eps32, relative), as in tests/test_sft_parity.py."""
    import math

    peft = pytest.importorskip("peft")
    from conftest import make_tiny_llama, skip_without_sft_loss
    from trl import SFTConfig, SFTTrainer

    base = make_tiny_llama(vocab_size=len(smollm2_tokenizer)).double()
    torch.manual_seed(0)
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    try:
        model(input_ids=torch.tensor([[5, 6]]), attention_mask=torch.ones(1, 2, dtype=torch.long))
    except AttributeError as err:  # peft 0.17's prefix cache predates transformers 5's Cache API
        pytest.skip(f"peft {peft.__version__} cannot run prefix tuning with this transformers: {err}")
    common = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=4)
    trainers = [
        SFTTrainer(
            copy.deepcopy(model),
            args=SFTConfig(**common),
            train_dataset=chat_data(),
            processing_class=smollm2_tokenizer,
        ),
        PLWTrainer(
            copy.deepcopy(model),
            args=PLWConfig(**common),
            train_dataset=chat_data(),
            processing_class=smollm2_tokenizer,
        ),
    ]
    skip_without_sft_loss()
    results = []
    for trainer in trainers:
        trainer.model.train()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((loss.detach().double(), grads))
    (sft_loss, sft_grads), (plw_loss, plw_grads) = results
    bound = math.sqrt(len(smollm2_tokenizer)) * torch.finfo(torch.float32).eps
    torch.testing.assert_close(plw_loss, sft_loss, rtol=bound, atol=bound * sft_loss.abs().item())
    assert plw_grads.keys() == sft_grads.keys() and any("prompt_encoder" in n for n in plw_grads)
    for name, grad in sft_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(plw_grads[name], grad, rtol=bound, atol=bound * scale, msg=name)


def test_several_gpus_in_one_process_are_refused(smollm2_tokenizer, tmp_path, monkeypatch):
    """n_gpu > 1 in one process means torch.nn.DataParallel, whose replicas would not carry the patched weighted head
    and whose loss is a mean of per-GPU means. SFTTrainer refuses it (TRL 1.16); this pins that PLWTrainer does too."""
    from conftest import make_tiny_llama

    monkeypatch.setattr(PLWConfig, "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match="PLWTrainer does not support `nn.DataParallel`.*accelerate launch"):
        PLWTrainer(
            make_tiny_llama(vocab_size=len(smollm2_tokenizer)).double(),
            args=args(tmp_path, prompt_loss_weight=0.1),
            train_dataset=chat_data(),
            processing_class=smollm2_tokenizer,
        )


@pytest.mark.parametrize("native", [False, True])
def test_default_precision_follows_native_cpu_bf16(tmp_path, monkeypatch, native):
    """``PLWConfig(out)`` constructs on any CPU: bf16 autocast where the CPU has native bf16, else fp32."""
    monkeypatch.setattr(precision, "cpu_bf16_is_native", lambda: native)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    config = PLWConfig(str(tmp_path), report_to="none")
    assert config.bf16 is native
    assert config.use_cpu is native  # transformers requires use_cpu for CPU autocast; nothing else changes on CPU
    explicit = PLWConfig(str(tmp_path), report_to="none", bf16=False, use_cpu=True)
    assert explicit.bf16 is False  # an explicit choice is kept


@pytest.mark.parametrize(
    ("machine", "flags", "native"),
    [
        ("x86_64", {"avx2", "avx512f"}, False),
        ("x86_64", {"avx512f", "avx512_bf16"}, True),
        ("x86_64", {"amx_bf16", "amx_tile"}, True),
        ("aarch64", {"asimd", "bf16"}, True),
        ("aarch64", {"asimd"}, False),
    ],
)
def test_cpu_bf16_detection_reads_the_feature_flags(monkeypatch, machine, flags, native):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(precision.platform, "machine", lambda: machine)
    precision.cpu_bf16_is_native.cache_clear()
    try:
        assert precision.cpu_bf16_is_native() is native
        assert precision.default_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    finally:
        precision.cpu_bf16_is_native.cache_clear()

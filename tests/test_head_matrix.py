"""The weighted head equals the model's own head: every architecture family x every way users change the head.

For each tiny random-init model (float64) and head configuration, the weighted head at PLW=1 must give the same loss
and the same gradient for every trainable parameter as a reference built from the model's **own** forward: its full
logits, in float64, with a float64 cross-entropy written here (transformers' loss upcasts logits to float32, so it
cannot serve as a float64 reference), plus the router's load-balancing loss times the model's coefficient for MoE
models. In float64 the two paths differ only by summation order, ~1e-15 relative; the tolerance, 1e-10, leaves five
orders of magnitude for that and still catches any real difference (a missing LoRA term, a skipped aux loss, a wrong
softcap are all > 1e-3).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import transformers as tf

from trl_plw.weighted_head import add_weighted_lm_head, check_head_supported

RTOL = ATOL = 1e-10
VOCAB = 96
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(num_experts_per_tok=2, output_router_logits=True, experts_implementation="eager")  # grouped_mm: no fp64

# family -> (config class, model class, extra config, MoE?)
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}, False),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}, False),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 4}, False),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}, False),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 4, "final_logit_softcapping": 3.0}, False),
    "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"head_dim": 4, "final_logit_softcapping": 3.0}, False),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}, False),
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, {"logit_scale": 0.5}, False),
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, {"logits_scaling": 4.0}, False),
    "mixtral": (
        tf.MixtralConfig,
        tf.MixtralForCausalLM,
        {**MOE, "num_local_experts": 4, "router_aux_loss_coef": 0.5},
        True,
    ),
    "qwen3_moe": (
        tf.Qwen3MoeConfig,
        tf.Qwen3MoeForCausalLM,
        {**MOE, "num_experts": 4, "moe_intermediate_size": 8, "head_dim": 4, "router_aux_loss_coef": 0.3},
        True,
    ),
    "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM, {**MOE, "num_experts": 4, "router_aux_loss_coef": 0.2}, True),
}


def make_model(family: str, tie: bool = False, seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls, extra, _ = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**BASE, **extra, "tie_word_embeddings": tie})
    config._attn_implementation = "eager"
    return model_cls(config).double()


def make_vlm(kind: str) -> torch.nn.Module:
    """Multimodal wrappers (``*ForConditionalGeneration``) on text-only batches: their backbone is not a plain
    ``base_model`` decoder, and Gemma-3 caps its logits through the text config."""
    torch.manual_seed(0)
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
    )
    if kind == "llava":
        text = tf.LlamaConfig(**BASE)
        config = tf.LlavaConfig(
            text_config=text, vision_config=tf.CLIPVisionConfig(**vision), image_token_index=VOCAB - 1
        )
        model = tf.LlavaForConditionalGeneration(config)
    else:
        text = tf.Gemma3TextConfig(**{**BASE, "head_dim": 4, "final_logit_softcapping": 3.0})
        config = tf.Gemma3Config(
            text_config=text,
            vision_config=tf.SiglipVisionConfig(**vision),
            image_token_index=VOCAB - 1,
            mm_tokens_per_image=4,
        )
        model = tf.Gemma3ForConditionalGeneration(config)
    model.config._attn_implementation = "eager"
    model.config.get_text_config()._attn_implementation = "eager"
    return model.double()


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Two rows of different lengths (right padding): the head must skip padding exactly like the reference."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 2, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 8:], mask[1, 8:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def aux_coef(model) -> float:
    config = model.config.get_text_config()
    return (
        float(getattr(config, "router_aux_loss_coef", 0.0)) if getattr(config, "output_router_logits", False) else 0.0
    )


def reference_loss(model, inputs) -> torch.Tensor:
    """Full-sequence loss from the model's own logits: float64 mean CE over non-padding targets + coef * aux."""
    out = model(**inputs, use_cache=False)
    logits = out.logits
    assert logits.dtype == torch.float64, "the model's own forward must keep float64 for a float64 reference"
    targets = inputs["input_ids"][:, 1:]
    keep = inputs["attention_mask"][:, 1:].bool()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    ce = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    loss = ce[keep].sum() / keep.sum()
    if aux_coef(model):
        loss = loss + aux_coef(model) * out.aux_loss
    return loss


def weighted_loss(model, inputs, inner=None) -> torch.Tensor:
    """The weighted head at PLW=1: weight 1 on every real token, the shift done inside the head."""
    inner = model if inner is None else inner
    add_weighted_lm_head(inner)
    weights = inputs["attention_mask"].double()
    targets = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    kwargs = {"output_router_logits": True} if aux_coef(inner) else {}
    out = model(**inputs, plw_weights=weights, plw_targets=targets, **kwargs)
    loss = out.loss
    if aux_coef(inner):
        assert out.aux_loss is not None, "an MoE model's aux loss must come back from the weighted head"
        loss = loss + aux_coef(inner) * out.aux_loss
    return loss


def assert_same_loss_and_grads(reference_model, model, inputs, inner=None, seed: int = 0) -> None:
    torch.manual_seed(seed)  # the same dropout masks in both passes (only LoRA dropout draws random numbers)
    ref = reference_loss(reference_model, inputs)
    ref.backward()
    torch.manual_seed(seed)
    ours = weighted_loss(model, inputs, inner)
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=ATOL)
    ref_params, our_params = trainable(reference_model), trainable(model)
    assert ref_params.keys() == our_params.keys()
    for name, p in ref_params.items():
        q = our_params[name]
        if p.grad is None:  # e.g. an embedding row never used; both sides must agree
            assert q.grad is None or not q.grad.any(), name
            continue
        assert q.grad is not None, f"{name} got no gradient through the weighted head"
        torch.testing.assert_close(q.grad, p.grad, rtol=RTOL, atol=ATOL, msg=f"gradient of {name}")


# ------------------------------------------------------------------------------------------ plain heads, full FT


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_finetuning_matches_model_loss(family, tie):
    model = make_model(family, tie=tie).train()
    assert_same_loss_and_grads(copy.deepcopy(model), model, batch())


def test_head_bias_matches_model_loss():
    model = make_model("llama")
    head = torch.nn.Linear(16, VOCAB, bias=True, dtype=torch.float64)
    head.weight.data.copy_(model.lm_head.weight)
    torch.nn.init.normal_(head.bias, std=0.5)
    model.lm_head = head
    assert_same_loss_and_grads(copy.deepcopy(model), model, batch())


@pytest.mark.parametrize("kind", ["llava", "gemma3"])
def test_multimodal_wrapper_matches_model_loss(kind):
    model = make_vlm(kind).train()
    inputs = batch()
    if kind == "gemma3":  # text-only rows: Gemma3 requires token_type_ids when training in transformers 5.0 (5.4 too)
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    assert_same_loss_and_grads(copy.deepcopy(model), model, inputs)


# ------------------------------------------------------------------------------------------ PEFT heads

peft = pytest.importorskip("peft")

PEFT_HEADS = {
    "lora_lm_head": dict(target_modules=["q_proj", "v_proj", "lm_head"]),
    "lora_lm_head_dropout": dict(target_modules=["q_proj", "lm_head"], lora_dropout=0.3),
    "dora_lm_head": dict(target_modules=["q_proj", "lm_head"], use_dora=True),
    "dora_lm_head_dropout": dict(target_modules=["lm_head"], use_dora=True, lora_dropout=0.3),
    "modules_to_save_lm_head": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "lora_backbone_only": dict(target_modules=["q_proj", "v_proj"]),
}
# MoE families name their attention projections like Llama; Phi-3 fuses them
PEFT_FAMILIES = ["llama", "qwen3", "gemma2", "cohere", "granite", "mixtral", "qwen3_moe", "olmoe"]


def peft_pair(family: str, head: str, tie: bool = False, **overrides):
    base = make_model(family, tie=tie)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **{**PEFT_HEADS.get(head, {}), **overrides})
    models = []
    for _ in range(2):  # the same seed twice: identical random A and B (init_lora_weights=False, so B != 0 matters)
        torch.manual_seed(1)
        models.append(peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config)).train())
    return models[0], models[1]


@pytest.mark.parametrize("head", list(PEFT_HEADS))
@pytest.mark.parametrize("family", PEFT_FAMILIES)
def test_peft_head_matches_model_loss(family, head):
    reference, ours = peft_pair(family, head)
    assert_same_loss_and_grads(reference, ours, batch(), inner=ours.get_base_model())
    if head.startswith(("lora_lm", "dora_lm")):
        grads = {n: p.grad for n, p in ours.named_parameters() if "lm_head" in n and p.requires_grad}
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), sorted(grads)


@pytest.mark.parametrize("ensure_weight_tying", [False, True])
def test_lora_on_tied_embeddings_matches_model_loss(ensure_weight_tying):
    """LoRA on ``embed_tokens`` of a tied model; with ``ensure_weight_tying`` (peft >= 0.18) PEFT adapts the tied
    head too."""
    tying = {}
    if ensure_weight_tying:
        if "ensure_weight_tying" not in {f.name for f in dataclasses.fields(peft.LoraConfig)}:
            pytest.skip(f"peft {peft.__version__} has no ensure_weight_tying")
        tying = {"ensure_weight_tying": True}
    reference, ours = peft_pair("llama", "", tie=True, target_modules=["embed_tokens", "q_proj"], **tying)
    assert_same_loss_and_grads(reference, ours, batch(), inner=ours.get_base_model())


def test_eval_mode_dora_and_disabled_adapters_match():
    reference, ours = peft_pair("llama", "dora_lm_head_dropout")
    reference.eval(), ours.eval()
    assert_same_loss_and_grads(reference, ours, batch(), inner=ours.get_base_model())
    with reference.disable_adapter(), ours.disable_adapter():
        reference.zero_grad(), ours.zero_grad()
        torch.testing.assert_close(
            weighted_loss(ours, batch(), ours.get_base_model()),
            reference_loss(reference, batch()),
            rtol=RTOL,
            atol=ATOL,
        )


# ------------------------------------------------------------------------------------------ refusals


def test_unsupported_heads_are_refused_naming_the_reason():
    model = make_model("llama")
    config = peft.LoraConfig(r=4, target_modules=["lm_head"], lora_bias=True)
    with pytest.raises(ValueError, match="lora_bias"):
        check_head_supported(peft.get_peft_model(copy.deepcopy(model), config).get_base_model())
    ia3 = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(target_modules=["lm_head"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="IA3|tuner"):
        check_head_supported(ia3.get_base_model())

    class ScaledHead(torch.nn.Linear):  # a head whose forward is not hidden @ W.T + b
        def forward(self, x):
            return 2 * super().forward(x)

    odd = copy.deepcopy(model)
    odd.lm_head = ScaledHead(16, VOCAB, bias=False, dtype=torch.float64)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        check_head_supported(odd)


def test_trainable_token_indices_on_a_tied_head_are_refused_naming_the_field():
    """PEFT's TrainableTokensWrapper swaps trained rows into the tied head inside its own forward; the weighted head
    reads the weight directly and would score the frozen rows, so it is refused with the field to change."""
    model = make_model("llama", tie=True)
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 4])
    wrapped = peft.get_peft_model(model, config).get_base_model()
    assert type(wrapped.get_output_embeddings()).__name__ == "TrainableTokensWrapper"
    with pytest.raises(ValueError, match="trainable_token_indices.*modules_to_save"):
        check_head_supported(wrapped)

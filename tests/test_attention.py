"""Attention backends for packed batches: registration, device-aware selection, and exactness on CPU.

``plw_varlen`` needs CUDA, so the CPU tests swap torch's ``varlen_attn`` for a reference built from per-document
``scaled_dot_product_attention`` with the flash window convention, and run whole models through the backend. The
real kernel is exercised by the ``gpu`` tests at the end (``pytest -m gpu``).
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import F64_ATOL, F64_RTOL, subprocess_env
from conftest import make_tiny_llama as _make_tiny_llama

import trl_plw.attention as attention
from trl_plw.attention import (
    VARLEN_ATTENTION,
    AttentionBackendError,
    describe_attention_backends,
    packed_batch_issues,
    plw_varlen_attention_forward,
    register_attention_backends,
    select_attn_implementation,
    sequence_boundaries_from_position_ids,
    varlen_window_size,
)

DOC_LENGTHS = [5, 9, 3, 7, 1, 6]
# Layouts and backends are compared on float64 models, so they agree to rounding (conftest.F64_*) on any CPU; the GPU
# tests cast to bf16 themselves.
ATOL = F64_ATOL
RTOL = F64_RTOL


def make_tiny_llama(**kwargs):
    return _make_tiny_llama(**kwargs).double()


# --------------------------------------------------------------------------------------------------------------------
# A CPU stand-in for torch.nn.attention.varlen.varlen_attn
# --------------------------------------------------------------------------------------------------------------------


class ReferenceVarlen:
    """Same signature and window convention as ``varlen_attn`` (flash: query i sees keys i-left..i+right, -1 means
    unbounded, bottom-right aligned), computed per document with sdpa. Records the arguments of every call and checks
    the contracts of the real kernel (int32 cu_seq_lens on the query's device, Python-int max lengths, tuple window)."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(
        self,
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        *,
        return_aux=None,
        scale=None,
        window_size=(-1, -1),
        enable_gqa=False,
        seqused_k=None,
        block_table=None,
        num_splits=None,
    ):
        assert query.dim() == key.dim() == value.dim() == 3
        assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32
        assert cu_seq_q.device == query.device and cu_seq_q.dim() == 1
        assert isinstance(max_q, int) and isinstance(max_k, int)
        assert isinstance(window_size, tuple), "varlen_attn only takes its causal path for the tuple (-1, 0)"
        assert query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        assert int(cu_seq_q[-1]) == query.shape[0] and int(cu_seq_k[-1]) == key.shape[0]
        assert max_q == int(cu_seq_q.diff().max()) and max_k == int(cu_seq_k.diff().max())
        heads_q, heads_k = query.shape[1], key.shape[1]
        if heads_q != heads_k:
            assert enable_gqa, "GQA inputs need enable_gqa=True"
            key = key.repeat_interleave(heads_q // heads_k, dim=1)
            value = value.repeat_interleave(heads_q // heads_k, dim=1)
        self.calls.append(
            dict(
                q_shape=tuple(query.shape),
                heads_k=heads_k,
                cu_seq_q=cu_seq_q.clone(),
                cu_seq_k=cu_seq_k.clone(),
                max_q=max_q,
                max_k=max_k,
                scale=scale,
                window_size=window_size,
                enable_gqa=enable_gqa,
            )
        )
        left, right = window_size
        outs = []
        for i in range(cu_seq_q.numel() - 1):
            sq, eq, sk, ek = (int(x) for x in (cu_seq_q[i], cu_seq_q[i + 1], cu_seq_k[i], cu_seq_k[i + 1]))
            q, k, v = (t.transpose(0, 1) for t in (query[sq:eq], key[sk:ek], value[sk:ek]))
            qi = torch.arange(eq - sq)[:, None] + (ek - sk) - (eq - sq)
            kj = torch.arange(ek - sk)[None, :]
            allowed = torch.ones(eq - sq, ek - sk, dtype=torch.bool)
            if left >= 0:
                allowed &= kj >= qi - left
            if right >= 0:
                allowed &= kj <= qi + right
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale).transpose(0, 1))
        return torch.cat(outs, dim=0)


@pytest.fixture
def fake_varlen(monkeypatch):
    ref = ReferenceVarlen()
    monkeypatch.setattr(attention, "varlen_attn", ref)
    return ref


# --------------------------------------------------------------------------------------------------------------------
# Batches and runs
# --------------------------------------------------------------------------------------------------------------------


def make_docs(lengths=DOC_LENGTHS, vocab_size=128, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen) for n in lengths]


def packed_batch(docs, with_cu=True):
    """What our collator / TRL's padding-free collator produce."""
    input_ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = input_ids.clone()
    labels[position_ids == 0] = -100
    batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    if with_cu:
        cu = torch.tensor([0] + [len(d) for d in docs]).cumsum(0).to(torch.int32)
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(map(len, docs)))
        batch["max_length_k"] = batch["max_length_q"]
    return batch


def padded_batch(docs, pad_id=0):
    """The same documents, one per row, right-padded."""
    width = max(map(len, docs))
    input_ids = torch.full((len(docs), width), pad_id)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    for row, doc in enumerate(docs):
        input_ids[row, : len(doc)] = doc
        mask[row, : len(doc)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def run(model, batch, impl, **extra):
    """Forward + backward; returns (logits of real tokens in document order [N, V], loss, grads)."""
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    kwargs = {"use_cache": False, **extra}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, **kwargs)
    # The loss is computed here in the logits' dtype (float64): transformers' own loss upcasts to float32 only.
    shifted = out.logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    loss.backward()
    logits = out.logits
    if "attention_mask" in batch:
        logits = logits[batch["attention_mask"].bool()]
    else:
        logits = logits.reshape(-1, logits.shape[-1])
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


def assert_runs_close_float32(a, b, ulps: float = 64):
    """For comparisons with eager attention, whose softmax runs in float32 whatever the model's dtype (and whose
    float64 masks turn into -inf there, so its padded rows are NaN in float64): each tensor may differ by ``ulps``
    float32 rounding steps of its largest magnitude."""
    eps = torch.finfo(torch.float32).eps * ulps
    for x, y, what in ((a[0], b[0], "logits"), (a[1], b[1], "loss")):
        torch.testing.assert_close(x, y, rtol=eps, atol=eps * y.abs().max().item(), msg=lambda m, w=what: f"{w}: {m}")
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        y = b[2][name]
        torch.testing.assert_close(
            a[2][name], y, rtol=eps, atol=eps * y.abs().max().item(), msg=lambda m, n=name: f"{n}: {m}"
        )


def assert_runs_close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(a[1], b[1], atol=atol, rtol=rtol)
    assert a[2].keys() == b[2].keys() and a[2]
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def make_tiny_mistral(sliding_window=3, num_heads=4, num_kv_heads=2, seed=0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        sliding_window=sliding_window,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config._attn_implementation = "sdpa"
    return MistralForCausalLM(config).double().eval()


# --------------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _registered():
    """The models of this module are built with ``plw_varlen`` by name: register it, as a user must."""
    register_attention_backends()


def test_import_registers_nothing_and_ensure_registered_only_ours():
    """Importing the module leaves transformers' registries alone; ``ensure_registered`` registers only our names."""
    code = (
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "before = (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping))\n"
        "import trl_plw.attention as att\n"
        "after = lambda: (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping))\n"
        "assert after() == before, after()\n"
        "assert att.ensure_registered('sdpa') == 'sdpa' and att.ensure_registered(None) is None\n"
        "assert after() == before, after()\n"
        "assert att.ensure_registered('plw_varlen') == 'plw_varlen'\n"
        "assert after() == (before[0] | {'plw_varlen'}, before[1] | {'plw_varlen'}), after()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env())


def test_backend_is_registered_and_idempotent():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert VARLEN_ATTENTION == "plw_varlen"
    for _ in range(2):
        assert register_attention_backends() == VARLEN_ATTENTION
    assert VARLEN_ATTENTION in ALL_ATTENTION_FUNCTIONS.valid_keys()
    assert ALL_ATTENTION_FUNCTIONS[VARLEN_ATTENTION] is plw_varlen_attention_forward
    assert AttentionInterface._global_mapping[VARLEN_ATTENTION] is plw_varlen_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[VARLEN_ATTENTION] is attention.varlen_attention_mask
    assert list(AttentionMaskInterface._global_mapping).count(VARLEN_ATTENTION) == 1


def test_loadable_by_name(tmp_path):
    from transformers import AutoModelForCausalLM

    make_tiny_llama().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=VARLEN_ATTENTION)
    assert model.config._attn_implementation == VARLEN_ATTENTION
    model.set_attn_implementation("sdpa")
    model.set_attn_implementation(VARLEN_ATTENTION)
    assert model.config._attn_implementation == VARLEN_ATTENTION


def test_mask_function_never_builds_a_dense_mask():
    mask_fn = attention.varlen_attention_mask
    assert mask_fn(batch_size=1, q_length=8, kv_length=8, attention_mask=None) is None
    assert mask_fn(batch_size=2, q_length=8, kv_length=8, attention_mask=torch.ones(2, 8, dtype=torch.bool)) is None
    padded = torch.ones(2, 8, dtype=torch.bool)
    padded[1, 5:] = False
    assert torch.equal(mask_fn(batch_size=2, q_length=8, kv_length=8, attention_mask=padded), padded)


# --------------------------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------------------------


def fake_cuda(monkeypatch, capability=(9, 0), flash_attn=False):
    """Pretend this machine has a CUDA GPU of ``capability`` and (maybe) the flash_attn package."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    real_find_spec = importlib.util.find_spec

    def find_spec(name, package=None):
        if name == "flash_attn":
            return importlib.machinery.ModuleSpec("flash_attn", None) if flash_attn else None
        return real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_select_on_cpu():
    for packed in (True, False):
        assert select_attn_implementation("cpu", packed) == "sdpa"
        assert select_attn_implementation(torch.device("cpu"), packed, "auto") == "sdpa"
    for name in ("sdpa", "eager", "flex_attention"):
        assert select_attn_implementation("cpu", True, name) == name
    with pytest.raises(AttentionBackendError, match="unknown attn_implementation"):
        select_attn_implementation("cpu", True, "flash_attn_9000")


def test_plw_varlen_on_cpu_is_a_clear_error():
    with pytest.raises(AttentionBackendError) as err:
        select_attn_implementation("cpu", packed=True, requested=VARLEN_ATTENTION)
    message = str(err.value)
    assert "CUDA" in message and "'sdpa'" in message and "position_ids" in message and "use_cache=False" in message


def test_plw_varlen_forward_on_cpu_is_a_clear_error():
    """With torch's real kernel (not the stand-in), a CPU forward fails before reaching it, saying what to use."""
    assert attention.varlen_attn is attention._TORCH_VARLEN_ATTN
    model = make_tiny_llama(attn_implementation=VARLEN_ATTENTION)
    with pytest.raises(AttentionBackendError, match="attn_implementation='sdpa'"):
        model(**packed_batch(make_docs()), use_cache=False)


def test_select_with_mocked_cuda(monkeypatch):
    fake_cuda(monkeypatch, capability=(9, 0), flash_attn=False)
    assert select_attn_implementation("cuda", packed=True) == VARLEN_ATTENTION
    assert select_attn_implementation("cuda:0", packed=True, requested="auto") == VARLEN_ATTENTION
    assert select_attn_implementation("cuda", packed=False) == "sdpa"
    assert select_attn_implementation("cpu", packed=True) == "sdpa"
    assert select_attn_implementation("cuda", True, VARLEN_ATTENTION) == VARLEN_ATTENTION
    with pytest.raises(AttentionBackendError) as err:
        select_attn_implementation("cuda", True, "flash_attention_2")
    assert "pip install trl-plw[flash]" in str(err.value) and VARLEN_ATTENTION in str(err.value)

    fake_cuda(monkeypatch, capability=(9, 0), flash_attn=True)
    assert attention.flash_attn_installed()
    assert select_attn_implementation("cuda", packed=True) == "flash_attention_2"
    assert select_attn_implementation("cuda", True, "flash_attention_2") == "flash_attention_2"
    assert select_attn_implementation("cuda", True, VARLEN_ATTENTION) == VARLEN_ATTENTION
    with pytest.raises(AttentionBackendError, match="CUDA"):
        select_attn_implementation("cpu", True, "flash_attention_2")

    fake_cuda(monkeypatch, capability=(7, 5), flash_attn=True)  # Turing: no flash kernels
    assert select_attn_implementation("cuda", packed=True) == "sdpa"
    with pytest.raises(AttentionBackendError, match="compute capability 7.5"):
        select_attn_implementation("cuda", True, VARLEN_ATTENTION)


def test_flash_attn_check_never_imports_it(monkeypatch):
    import sys

    fake_cuda(monkeypatch, flash_attn=True)
    assert select_attn_implementation("cuda", packed=True) == "flash_attention_2"
    assert "flash_attn" not in sys.modules


def test_describe_attention_backends():
    rows = describe_attention_backends("cpu")
    assert [r["name"] for r in rows] == [VARLEN_ATTENTION, "flash_attention_2", "flex_attention", "sdpa", "eager"]
    for row in rows:
        assert {"name", "needs", "devices", "packing", "available", "reason", "verified"} <= row.keys()
    by_name = {r["name"]: r for r in rows}
    assert by_name[VARLEN_ATTENTION]["available"] is False
    assert by_name["sdpa"]["available"] is True


# --------------------------------------------------------------------------------------------------------------------
# What reaches varlen_attn
# --------------------------------------------------------------------------------------------------------------------


def test_sequence_boundaries_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    cu, max_len = sequence_boundaries_from_position_ids(pos)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 10] and max_len == 4
    # unpacked [B, T] rows, position_ids broadcast from [1, T] as the model makes them: one sequence per row
    cu, max_len = sequence_boundaries_from_position_ids(torch.arange(4)[None], batch_size=3)
    assert cu.tolist() == [0, 4, 8, 12] and max_len == 4


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_kwargs_passed_to_varlen(fake_varlen, num_kv_heads):
    docs = make_docs()
    model = make_tiny_llama(num_heads=4, num_kv_heads=num_kv_heads)
    batch = packed_batch(docs)
    run(model, batch, VARLEN_ATTENTION)
    assert len(fake_varlen.calls) == model.config.num_hidden_layers
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for call in fake_varlen.calls:
        assert call["q_shape"] == (sum(DOC_LENGTHS), 4, head_dim)
        assert call["heads_k"] == num_kv_heads
        assert torch.equal(call["cu_seq_q"], batch["cu_seq_lens_q"]) and torch.equal(
            call["cu_seq_k"], batch["cu_seq_lens_k"]
        )
        assert call["max_q"] == call["max_k"] == max(DOC_LENGTHS)
        assert call["window_size"] == (-1, 0)
        assert call["enable_gqa"] is (num_kv_heads < 4)
        assert math.isclose(call["scale"], head_dim**-0.5)


def test_position_ids_only_are_derived_once_per_forward(fake_varlen, monkeypatch):
    calls = []
    real = attention.sequence_boundaries_from_position_ids

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "sequence_boundaries_from_position_ids", counting)
    docs = make_docs()
    model = make_tiny_llama(num_layers=3)
    with_cu = run(model, packed_batch(docs), VARLEN_ATTENTION)
    assert calls == []  # collator-provided cu_seq_lens: nothing derived
    derived = run(model, packed_batch(docs, with_cu=False), VARLEN_ATTENTION)
    assert len(calls) == 1  # three layers, one derivation (one host sync)
    expected = packed_batch(docs)["cu_seq_lens_q"]
    assert all(torch.equal(c["cu_seq_q"], expected) for c in fake_varlen.calls)
    assert_runs_close(with_cu, derived, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Exactness: packed through plw_varlen == padded sdpa (fp32)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (4, 2), (4, 1)])
def test_packed_varlen_matches_padded_sdpa(fake_varlen, num_heads, num_kv_heads):
    docs = make_docs()
    model = make_tiny_llama(num_heads=num_heads, num_kv_heads=num_kv_heads)
    reference = run(model, padded_batch(docs), "sdpa")
    assert_runs_close(run(model, packed_batch(docs), VARLEN_ATTENTION), reference)
    assert_runs_close(run(model, packed_batch(docs, with_cu=False), VARLEN_ATTENTION), reference)


def test_sliding_window_matches_eager_and_sdpa(fake_varlen):
    window = 3
    docs = make_docs([7, 5, 9, 2, 4])
    model = make_tiny_mistral(sliding_window=window).float()  # eager computes in float32 (see the helper)
    eager = run(model, padded_batch(docs), "eager")
    sdpa = run(model, padded_batch(docs), "sdpa")
    varlen = run(model, packed_batch(docs), VARLEN_ATTENTION)
    assert_runs_close_float32(eager, sdpa)
    assert_runs_close_float32(varlen, eager)
    # transformers' window W (i - j < W) is flash's (W - 1, 0): W tokens including the query itself
    assert {c["window_size"] for c in fake_varlen.calls} == {(window - 1, 0)}
    # ... and the window is really in effect: without it the logits differ
    model.config.sliding_window = None
    full = run(model, padded_batch(docs), "sdpa")
    assert not torch.allclose(full[0], varlen[0], atol=1e-3)


def test_sliding_window_off_by_one_is_caught(fake_varlen, monkeypatch):
    """Guard for the test above: passing the window as (W, 0) would be visibly wrong."""
    docs = make_docs([7, 9])
    model = make_tiny_mistral(sliding_window=3)
    eager = run(model, padded_batch(docs), "eager")
    monkeypatch.setattr(attention, "varlen_window_size", lambda causal, sw, max_k: (sw, 0))
    wrong = run(model, packed_batch(docs), VARLEN_ATTENTION)
    assert not torch.allclose(wrong[0], eager[0], atol=1e-3)


def test_window_longer_than_documents_stays_causal():
    assert varlen_window_size(True, None, 10) == (-1, 0)
    assert varlen_window_size(True, 10, 10) == (-1, 0)
    assert varlen_window_size(True, 4, 10) == (3, 0)
    assert varlen_window_size(True, 1, 10) == (0, 0)
    assert varlen_window_size(False, None, 10) == (-1, -1)
    with pytest.raises(AttentionBackendError):
        varlen_window_size(False, 4, 10)


def test_per_layer_sliding_window_qwen2(fake_varlen):
    """Qwen2 alternates full and sliding layers: each layer gets its own window."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        layer_types=["full_attention", "sliding_attention"],
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).float().eval()  # the reference is eager: float32 softmax
    docs = make_docs([8, 6, 10])
    reference = run(model, padded_batch(docs), "eager")
    varlen = run(model, packed_batch(docs), VARLEN_ATTENTION)
    assert_runs_close_float32(varlen, reference)
    assert [c["window_size"] for c in fake_varlen.calls] == [(-1, 0), (3, 0)]


def test_unpacked_rows_and_padding_mask(fake_varlen):
    docs = make_docs([6, 6, 6])
    model = make_tiny_llama()
    rows = {"input_ids": torch.stack(docs), "labels": torch.stack(docs)}
    # [B, T] rows without padding: each row is one sequence
    assert_runs_close(run(model, rows, VARLEN_ATTENTION), run(model, rows, "sdpa"))
    assert fake_varlen.calls[-1]["cu_seq_q"].tolist() == [0, 6, 12, 18]
    # an all-ones mask is dropped by the mask function: same thing
    ones = {**rows, "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    assert_runs_close(run(model, ones, VARLEN_ATTENTION), run(model, ones, "sdpa"))
    # a real padding mask is unpadded
    padded = padded_batch(make_docs())
    assert_runs_close(run(model, padded, VARLEN_ATTENTION), run(model, padded, "sdpa"))
    assert fake_varlen.calls[-1]["cu_seq_q"].tolist() == [0, *torch.tensor(DOC_LENGTHS).cumsum(0).tolist()]


def test_old_varlen_signature(monkeypatch):
    """An older varlen_attn without scale/window_size/enable_gqa: kv heads are repeated and the query pre-scaled."""
    ref = ReferenceVarlen()
    seen = []

    def old_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        seen.append((key.shape[1], is_causal))
        return ref(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=(-1, 0) if is_causal else (-1, -1))

    monkeypatch.setattr(attention, "varlen_attn", old_varlen)
    docs = make_docs()
    model = make_tiny_llama(num_heads=4, num_kv_heads=2)
    for layer in model.model.layers:
        layer.self_attn.scaling = 0.3  # not head_dim ** -0.5: exercises the pre-scaled query
    assert_runs_close(run(model, packed_batch(docs), VARLEN_ATTENTION), run(model, padded_batch(docs), "sdpa"))
    assert set(seen) == {(4, True)}
    with pytest.raises(AttentionBackendError, match="window_size"):
        run(make_tiny_mistral(sliding_window=3), packed_batch(make_docs([7, 5])), VARLEN_ATTENTION)


# --------------------------------------------------------------------------------------------------------------------
# Unsupported features fail loudly
# --------------------------------------------------------------------------------------------------------------------


def test_unsupported_features_raise(fake_varlen):
    model = make_tiny_llama(attention_dropout=0.1)
    batch = packed_batch(make_docs())
    model.train()
    with pytest.raises(AttentionBackendError, match="config.attention_dropout"):
        run(model, batch, VARLEN_ATTENTION)
    model.eval()  # dropout only applies in training
    run(model, batch, VARLEN_ATTENTION)

    module = model.model.layers[0].self_attn
    module.config.attn_logit_softcapping = 50.0
    q = torch.randn(1, 4, 5, 8)
    kv = torch.randn(1, 2, 5, 8)
    with pytest.raises(AttentionBackendError, match="config.attn_logit_softcapping"):
        plw_varlen_attention_forward(module, q, kv, kv, None, softcap=50.0)
    with pytest.raises(AttentionBackendError, match="KV cache"):
        plw_varlen_attention_forward(module, q[:, :, :1], kv, kv, None)
    with pytest.raises(AttentionBackendError, match="4D"):
        plw_varlen_attention_forward(module, q, kv, kv, torch.ones(1, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(AttentionBackendError, match="padding_free"):
        cu = torch.tensor([0, 5], dtype=torch.int32)
        plw_varlen_attention_forward(module, q, kv, kv, torch.ones(1, 5, dtype=torch.bool), cu_seq_lens_q=cu)


# --------------------------------------------------------------------------------------------------------------------
# Packing with transformers' own backends (CPU)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_equals_padded_builtin_backends(impl):
    docs = make_docs()
    model = make_tiny_llama() if impl == "sdpa" else _make_tiny_llama()  # eager: float32 softmax (see the helper)
    reference = run(model, padded_batch(docs), "sdpa")
    close = assert_runs_close if impl == "sdpa" else assert_runs_close_float32
    # these backends read position_ids (the block-diagonal mask); cu_seq_lens are ignored by them
    close(run(model, packed_batch(docs, with_cu=False), impl), reference)
    close(run(model, packed_batch(docs), impl), reference)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_packed_equals_padded_flex_attention(monkeypatch):
    """flex_attention: forward only on CPU (torch's CPU flex attention has no backward). What is checked is the document
    mask transformers builds from position_ids, so flex and its block mask run uncompiled (compiling them costs ~40 s
    cold on 2 cores)."""
    import torch.nn.attention.flex_attention as torch_flex
    import transformers.integrations.flex_attention as hf_flex
    import transformers.masking_utils as masking

    monkeypatch.setattr(hf_flex.WrappedFlexAttention, "__call__", lambda self: torch_flex.flex_attention)
    real_create_block_mask = masking.create_block_mask
    monkeypatch.setattr(
        masking, "create_block_mask", lambda *a, **k: real_create_block_mask(*a, **{**k, "_compile": False})
    )
    docs = make_docs()
    model = make_tiny_llama()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        padded = padded_batch(docs)
        ref = model(**padded, use_cache=False)
        try:
            model.set_attn_implementation("flex_attention")
            out = model(**packed_batch(docs, with_cu=False), use_cache=False)
        except Exception as exc:
            pytest.skip(f"flex_attention does not run on this CPU setup: {type(exc).__name__}: {exc}"[:300])
    torch.testing.assert_close(out.logits[0], ref.logits[padded["attention_mask"].bool()], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=RTOL)


def test_use_cache_pitfall():
    """With use_cache=True transformers makes a KV cache and skips packed detection: sdpa leaks across documents."""
    docs = make_docs()
    model = make_tiny_llama()
    batch = packed_batch(docs, with_cu=False)
    reference = run(model, padded_batch(docs), "sdpa")
    leaky = run(model, batch, "sdpa", use_cache=True)
    assert not torch.allclose(leaky[0], reference[0], atol=1e-3)
    model.set_attn_implementation("sdpa")
    assert any("use_cache" in issue for issue in packed_batch_issues(model, {**batch, "use_cache": True}))
    assert packed_batch_issues(model, {**batch, "use_cache": False}) == []
    with_mask = {**batch, "attention_mask": torch.ones_like(batch["input_ids"]), "use_cache": False}
    assert any("attention_mask" in issue for issue in packed_batch_issues(model, with_mask))


def test_plw_varlen_is_immune_to_the_packing_pitfall(fake_varlen):
    docs = make_docs()
    model = make_tiny_llama()
    reference = run(model, padded_batch(docs), "sdpa")
    assert_runs_close(run(model, packed_batch(docs), VARLEN_ATTENTION, use_cache=True), reference)
    for with_cu in (True, False):  # an all-ones mask does not merge the documents either
        batch = packed_batch(docs, with_cu=with_cu)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        assert_runs_close(run(model, batch, VARLEN_ATTENTION, use_cache=True), reference)


# --------------------------------------------------------------------------------------------------------------------
# GPU: the real kernel (pytest -m gpu)
# --------------------------------------------------------------------------------------------------------------------

# Tolerance for the bf16 GPU tests. bf16 keeps 8 significant bits (eps = 2**-8 ~ 0.4%), and the flash kernel and
# padded sdpa accumulate in different orders, so neither bf16 run equals the other or the fp32 truth exactly. The
# check is therefore relative to the fp32 run of the same model (padded sdpa): for the loss, the logits of the real
# tokens and every gradient tensor, plw_varlen's relative error (Frobenius norm for tensors) must be at most
# max(2 x the padded-bf16-sdpa error, BF16_REL_ERR). BF16_REL_ERR = 5% covers near-zero gradient tensors, where
# relative error is dominated by rounding; the loss gets 1%.
BF16_REL_ERR = 5e-2
BF16_LOSS_REL_ERR = 1e-2

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rel_err(a, b):
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _gpu_compare(model, docs):
    def cuda(batch):
        return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    model = model.to("cuda", torch.float32)
    truth = run(model, cuda(padded_batch(docs)), "sdpa")  # fp32 reference
    model.to(torch.bfloat16)
    padded = run(model, cuda(padded_batch(docs)), "sdpa")
    varlen = run(model, cuda(packed_batch(docs)), VARLEN_ATTENTION)

    def check(what, got, ref_bf16, ref_fp32, floor):
        err, ref_err = _rel_err(got, ref_fp32), _rel_err(ref_bf16, ref_fp32)
        if not math.isfinite(ref_err):
            # Padded bf16 sdpa is no yardstick here: on an H200 (torch 2.11) its sliding-window run gave a NaN
            # embedding gradient (rows of padding whose window holds no key). The bound falls back to the floor.
            ref_err = 0.0
        assert math.isfinite(err) and err <= max(2 * ref_err, floor), (
            f"{what}: plw_varlen err {err:.2e} vs padded sdpa bf16 err {ref_err:.2e}"
        )

    check("loss", varlen[1], padded[1], truth[1], BF16_LOSS_REL_ERR)
    check("logits", varlen[0], padded[0], truth[0], BF16_REL_ERR)
    assert varlen[2].keys() == truth[2].keys()
    for name in truth[2]:
        check(name, varlen[2][name], padded[2][name], truth[2][name], BF16_REL_ERR)


@gpu
@needs_cuda
def test_gpu_real_varlen_llama_bf16():
    if not attention.varlen_attn_available("cuda"):
        pytest.skip(attention.varlen_attn_status("cuda")[1])
    model = make_tiny_llama(
        vocab_size=512, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, attn_implementation="sdpa"
    )
    _gpu_compare(model, make_docs([100, 37, 250, 64, 5, 180], vocab_size=512))


@gpu
@needs_cuda
def test_gpu_real_varlen_sliding_window_bf16():
    if not attention.varlen_attn_available("cuda"):
        pytest.skip(attention.varlen_attn_status("cuda")[1])
    model = make_tiny_mistral(sliding_window=16)
    _gpu_compare(model, make_docs([40, 17, 64, 9]))

"""Shared fixtures: the real SmolLM2 tokenizer and model (offline default) and tiny random-init Llama models.

Unit tests use tiny models built from a config (milliseconds per step); tests marked ``slow`` use the real 135M
model. Everything runs offline: the Hub is never contacted.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest
import torch

# Exactness tests run their tiny models in float64: two correct computations then differ only by summation order,
# ~1e-15 relative, on any CPU. These tolerances leave room for that (and for magnitudes summed over a 49k
# vocabulary) and nothing else; float32 would make them depend on one CPU's SIMD width and accumulation order.
F64_RTOL = 1e-10
F64_ATOL = 1e-12


def skip_without_sft_loss() -> None:
    """Skip a parity test where SFTTrainer cannot compute the reference loss: TRL 1.15's head runs a Triton kernel
    only (trl/kernels/chunked_logprob.py), which needs a GPU, so on a CPU-only machine SFTTrainer has no loss at all.
    Call it after the checks that need no loss (tokenization, trained-token counts)."""
    import trl
    from packaging.version import Version

    version = Version(trl.__version__)
    if (version.major, version.minor) == (1, 15) and not torch.cuda.is_available():
        pytest.skip(f"TRL {trl.__version__}'s SFTTrainer computes its loss with a GPU-only Triton kernel")


@contextlib.contextmanager
def future_warnings_as_errors():
    """FutureWarnings raised as errors (a deprecated name of ours must not warn), except TRL 1.6's announcement that
    its default ``loss_type`` changes in 1.7: SFTConfig warns it whenever ``loss_type`` is unset, and PLWTrainer
    weights ``nll`` and ``chunked_nll`` alike."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.filterwarnings("ignore", message="The default `loss_type` will change", category=FutureWarning)
        yield


def subprocess_env() -> dict[str, str]:
    """This process's environment with its ``sys.path`` as PYTHONPATH, so that a child ``python -c`` imports the
    same trl_plw (the source tree under test, not another install)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def assert_exact(actual, expected, msg: str | None = None) -> None:
    """``actual == expected`` up to float64 rounding (see F64_RTOL/F64_ATOL)."""
    torch.testing.assert_close(actual, expected, rtol=F64_RTOL, atol=F64_ATOL, msg=msg)


def make_tiny_llama(
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    **config_kwargs,
):
    """A random-init LlamaForCausalLM small enough for exactness tests (float32; ``.double()`` it for exactness)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        **config_kwargs,
    )
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config)
    return model.float().eval()


@pytest.fixture
def tiny_llama():
    """Factory fixture: ``tiny_llama(vocab_size=..., ...)`` returns a fresh random-init model."""
    return make_tiny_llama


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (ChatML chat template, 49,152 tokens), from the offline cache."""
    from trl_plw.experiments.offline_model import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def smollm2_model_path():
    """Folder of the converted real model (converted once per cache)."""
    from trl_plw.experiments.offline_model import ensure_default_model

    return str(ensure_default_model())


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield

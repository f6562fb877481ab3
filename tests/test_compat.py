"""Every private or version-dependent name trl-plw relies on exists, with the expected signature, in the installed
TRL/transformers/peft (`trl_plw._compat`), and nothing outside that module touches them.

A TRL release that renames one fails here, naming it, instead of deep inside a training step."""

from __future__ import annotations

import ast
import pathlib
import warnings

import pytest
from conftest import make_tiny_llama
from datasets import Dataset

from trl_plw import _compat

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "trl_plw"


@pytest.fixture(scope="module")
def sft_trainer(tmp_path_factory):
    """A real SFTTrainer on a tiny model: the attributes TRL sets in ``__init__`` are checked on an instance."""
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    tokenizer = _tiny_tokenizer(PreTrainedTokenizerFast)
    args = SFTConfig(
        str(tmp_path_factory.mktemp("sft")), report_to="none", use_cpu=True, bf16=False, max_steps=1, max_length=16
    )
    data = Dataset.from_list([{"text": "a b c"}] * 2)
    return SFTTrainer(make_tiny_llama(vocab_size=16), args=args, train_dataset=data, processing_class=tokenizer)


def _tiny_tokenizer(cls):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "a": 3, "b": 4, "c": 5}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return cls(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


@pytest.mark.parametrize(("owner", "name", "versions"), _compat.PRIVATE_NAMES, ids=lambda v: str(v))
def test_private_name_exists(owner, name, versions, sft_trainer):
    if owner.startswith("instance:"):
        obj, where = sft_trainer, f"an instance of {owner.removeprefix('instance:')}"
    else:
        try:
            obj = _compat.resolve_owner(owner)
        except (ImportError, AttributeError) as err:
            pytest.fail(f"{owner} (needed for {name}, served for {versions}) cannot be imported: {err}")
        where = owner
    assert hasattr(obj, name), (
        f"{where} has no attribute {name!r}, which trl_plw._compat relies on ({versions}); the installed release "
        "moved it: update trl_plw/_compat.py."
    )


@pytest.mark.parametrize(("owner", "name", "params"), _compat.PRIVATE_METHODS, ids=lambda v: str(v))
def test_private_method_signature(owner, name, params):
    cls = _compat.resolve_owner(owner)
    method = getattr(cls, name, None)
    assert method is not None, f"{owner}.{name} is gone: PLWTrainer overrides or calls it (trl_plw/_compat.py)."
    assert _compat.parameter_names(method) == params, (
        f"{owner}.{name} takes {_compat.parameter_names(method)}, PLWTrainer expects {params}: update "
        "trl_plw/_compat.py and the override."
    )


def test_peft_types_resolve():
    for entry in (
        _compat.PEFT_LORA_LAYER,
        _compat.PEFT_TUNER_LAYER,
        _compat.PEFT_MODULES_TO_SAVE,
        _compat.PEFT_TRAINABLE_TOKENS,
    ):
        assert _compat.peft_type(*entry) is not None, f"peft has no {'.'.join(entry)}"
    assert _compat.peft_type("peft.tuners.lora", "NoSuchLayer") is None


def test_trl_helpers_work_on_a_real_trainer(sft_trainer):
    """The accessors read and write what SFTTrainer's own ``log`` and checkpoints use."""
    _compat.record_metric(sft_trainer, "train", "plw_probe", 2.0)
    assert sft_trainer._metrics["train"]["plw_probe"] == [2.0]
    before = sft_trainer._total_train_tokens
    assert _compat.add_train_tokens(sft_trainer, 5) == before + 5
    _compat.set_metric(sft_trainer, "train", "num_tokens", 7)
    assert sft_trainer._metrics["train"]["num_tokens"] == [7]
    assert _compat.tensor_parallel_size(sft_trainer) == getattr(sft_trainer, "_tp_size", 1)
    assert _compat.moe_aux_loss_coef(sft_trainer) >= 0.0
    with _compat.lm_head_gather_context(sft_trainer.model.lm_head.weight):
        pass


def test_lm_head_adapter_check_is_restored():
    from trl.trainer import sft_trainer

    before = getattr(sft_trainer, "BaseTunerLayer", None)
    with _compat.lm_head_adapter_check_disabled():
        if before is not None:
            assert sft_trainer.BaseTunerLayer is not before
    assert getattr(sft_trainer, "BaseTunerLayer", None) is before


def test_chunked_nll_is_nll():
    from types import SimpleNamespace

    for value in (None, "chunked_nll", "nll"):
        args = SimpleNamespace(loss_type=value)
        _compat.normalize_loss_type(args)
        assert args.loss_type == "nll"
    args = SimpleNamespace(loss_type="dft")
    _compat.normalize_loss_type(args)
    assert args.loss_type == "dft"  # refused later by PLWTrainer, naming it


def test_untested_versions_warn_once(monkeypatch):
    from packaging.version import Version

    monkeypatch.setattr(_compat, "_warned_untested", False)
    monkeypatch.setattr(_compat, "installed_version", lambda p: Version("9.0.0") if p == "trl" else Version("5.0.1"))
    assert _compat.untested_versions() == {"trl": "9.0.0"}
    with pytest.warns(UserWarning, match=r"tested with trl 1\.0\.0-1\.16\.0.*this environment has trl 9\.0\.0"):
        _compat.warn_if_untested()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _compat.warn_if_untested()  # once per process
    monkeypatch.setattr(_compat, "installed_version", lambda p: Version(_compat.TESTED_RANGES[p][1]))
    assert _compat.untested_versions() == {}


def test_installed_versions_are_the_tested_range():
    """The range in TESTED_RANGES is where this suite runs: an environment outside it is a new measurement."""
    assert _compat.untested_versions() == {}, "update TESTED_RANGES and docs/COMPATIBILITY.md after measuring"


# Names of these libraries' private API may appear only in _compat.py.
_PRIVATE_ATTRIBUTES = {
    "_global_mapping",
    "_metrics",
    "_total_train_tokens",
    "_tp_size",
    "_tokenizer",
    "BaseTunerLayer",
    "maybe_gather_lm_head_ctx",
    "ModulesToSaveWrapper",
    "TrainableTokensWrapper",
    "LoraLayer",
    "router_aux_loss_coef",
}


def test_no_private_name_outside_compat():
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.alias):
                name = node.name.rsplit(".", 1)[-1]
            if name in _PRIVATE_ATTRIBUTES:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {name}")
    assert not offenders, f"private TRL/transformers/peft names outside trl_plw/_compat.py: {offenders}"


def test_assistant_mask_template_follows_trl(smollm2_tokenizer):
    """SmolLM2's template has no generation markers and TRL cannot patch it: None (trl-plw's own analysis). A
    template with markers is used as it is."""
    import copy

    assert _compat.assistant_mask_template(smollm2_tokenizer) is None
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    )
    assert _compat.assistant_mask_template(tokenizer) == tokenizer.chat_template


def test_checkpointing_switch_has_the_installed_name():
    import dataclasses

    from transformers import TrainingArguments

    (name,) = _compat.checkpointing_kwargs(True)
    assert name in {f.name for f in dataclasses.fields(TrainingArguments)}

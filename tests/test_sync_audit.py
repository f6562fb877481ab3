"""Host syncs, counted on a CPU at the dispatcher (tests/sync_audit.py): none per tile in the kernel, one per call,
and PLWTrainer with the CUDA path's settings adds at most 2 per optimizer step to what TRL's SFTTrainer makes."""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import make_tiny_llama, skip_without_sft_loss
from sync_audit import audit_syncs

import trl_plw.ops.weighted_linear_ce as wlc
from trl_plw.ops import KernelOptions, weighted_linear_cross_entropy


def _call(impl, tiles, validate=True, stats=True):
    g = torch.Generator().manual_seed(0)
    n, hdim, vocab = 96, 16, 211
    h = torch.randn(n, hdim, generator=g, requires_grad=True)
    w = torch.randn(vocab, hdim, generator=g, requires_grad=True)
    t = torch.randint(0, vocab, (n,), generator=g)
    t[::5] = -100
    tw = torch.rand(n, generator=g)
    rows = -(-int((t != -100).sum()) // tiles)
    per_row = vocab * (2 * 4 if impl == "torch" else 4 + 4 * 3)  # the loops' tile bytes per row (fp32 inputs)
    options = KernelOptions(impl=impl, memory_budget_bytes=rows * per_row, validate=validate)
    with audit_syncs() as audit:
        out = weighted_linear_cross_entropy(h, w, t, tw, normalizer=torch.tensor(40.0), reduction="sum",
                                            return_token_stats=stats, options=options)  # fmt: skip
        (out[0] if stats else out).backward()
    return audit


@pytest.mark.parametrize("validate", [True, False])
def test_fused_call_reads_the_host_once_whatever_the_tile_count(validate):
    one, many = _call("fused", 1, validate), _call("fused", 9, validate)
    assert len(one) == len(many) == 1, (one.events, many.events)
    assert one.events[0][1].endswith("_count_and_check")


def test_eager_call_reads_the_host_three_times_whatever_the_tile_count():
    """The eager loop (CPU's default) adds its underflow flag and, in the backward, whether the incoming gradient is 1:
    one read each per call, not per tile."""
    one, many = _call("torch", 1), _call("torch", 9)
    assert len(one) == len(many) == 3, (one.events, many.events)
    assert [o.rsplit(" ", 1)[1] for _, o in many.events] == ["_count_and_check", "eager_pass", "_is_unit"]


def test_audit_sees_the_syncs_it_claims_to():
    x = torch.tensor([1.0, 0.0, 2.0])
    with audit_syncs() as audit:
        x.sum().item()
        bool(x.any())
        x.nonzero()
        x[x > 0]
        x.tolist()
        torch.repeat_interleave(torch.tensor([1, 2]))
        x.clone().mul_(2)  # not a sync
        x[1:]  # not a sync
    assert [what for what, _ in audit.events] == [
        "_local_scalar_dense", "_local_scalar_dense", "nonzero", "index", "tolist", "repeat_interleave",
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------- trainers


def _syncs_per_optimizer_step(kind, tokenizer, tmp_path):
    """Syncs during the second optimizer step (2 packed micro-batches): forward, loss, backward, the token count the
    trainer normalizes by and the logging. The data loader and collator are left out: they work on CPU tensors that
    never were on the device, so their reads are not syncs on a GPU either."""
    from datasets import concatenate_datasets
    from test_trainer import common_args, prompt_completion_dataset
    from trl import SFTConfig, SFTTrainer

    from trl_plw import PLWConfig, PLWTrainer

    data = concatenate_datasets([prompt_completion_dataset(False, 8)] * 4)
    model = make_tiny_llama(vocab_size=len(tokenizer), hidden_size=32, num_layers=2)
    args = common_args(output_dir=str(tmp_path / kind), max_steps=2, per_device_train_batch_size=2)
    args.update(gradient_accumulation_steps=2, packing=True, padding_free=True, max_length=48)
    if kind == "sft":
        skip_without_sft_loss()
        trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=data, processing_class=tokenizer)
    else:
        config = PLWConfig(prompt_loss_weight=0.1, **args)
        trainer = PLWTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    audits, calls = [], collections.Counter()
    for name in ("training_step", "_get_num_items_in_batch", "_maybe_log_save_evaluate"):
        real = getattr(trainer, name)

        def audited(*a, _real=real, _name=name, **k):
            if trainer.state.global_step != 1:
                return _real(*a, **k)
            calls[_name] += 1
            with audit_syncs() as audit:
                out = _real(*a, **k)
            audits.append(audit)
            return out

        setattr(trainer, name, audited)
    trainer.train()
    assert calls == {"training_step": 2, "_get_num_items_in_batch": 1, "_maybe_log_save_evaluate": 1}, calls
    events = [e for a in audits for e in a.events]
    return events


def test_plw_trainer_adds_at_most_two_syncs_per_step_to_sft_trainer(smollm2_tokenizer, tmp_path, monkeypatch):
    """Same data, packed, 2 micro-batches per optimizer step, the fused loop as on CUDA."""
    real_pick = wlc._pick_impl
    monkeypatch.setattr(wlc, "_pick_impl", lambda options, device: ("fused", real_pick(options, device)[1]))
    sft = _syncs_per_optimizer_step("sft", smollm2_tokenizer, tmp_path)
    plw = _syncs_per_optimizer_step("plw", smollm2_tokenizer, tmp_path)
    detail = (
        f"PLWTrainer {collections.Counter(o for _, o in plw)}\nSFTTrainer {collections.Counter(o for _, o in sft)}"
    )
    assert len(plw) <= len(sft) + 2, detail
    kernel = [o for _, o in plw if "trl_plw/ops/" in o]
    assert len(kernel) == 2, detail  # one per micro-batch, none per tile

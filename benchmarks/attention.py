"""Throughput of attention backends on packed SFT rows: forward + backward of a small Llama-family model.

Each case trains on the same documents (variable lengths, filling one packed row of ``--row-tokens`` tokens) laid out
two ways:

* packed: one row ``[1, T]`` with ``position_ids`` restarting per document (and ``cu_seq_lens_*`` / ``max_length_*``
  as our collator emits them), no ``attention_mask``;
* padded: one document per row, right-padded to the longest, with an ``attention_mask``.

Backends: ``plw_varlen`` (packed), ``sdpa`` (packed: transformers' block-diagonal mask from position_ids), ``sdpa``
(padded), and ``flash_attention_2`` (packed) when ``flash_attn`` is installed. On CPU only a tiny configuration of
sdpa packed / sdpa padded / eager packed runs: ``plw_varlen`` needs CUDA.

tokens/s counts real (document) tokens only, so padding waste shows up as lower throughput. The ``loss`` column is a
sanity check: every layout/backend must agree (bf16 noise aside).

    python benchmarks/attention.py --out attention.json                 # CUDA: 4 layers, hidden 1024, 16/4 heads
    python benchmarks/attention.py --device cpu --out attention-cpu.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from typing import Any

import torch
from _bench_common import sync, write_json

from trl_plw.attention import (
    VARLEN_ATTENTION,
    flash_attention_2_status,
    register_attention_backends,
    varlen_attn_status,
)

GPU_CONFIG = dict(num_layers=4, hidden_size=1024, intermediate_size=2816, num_heads=16, num_kv_heads=4, vocab=32000)
CPU_CONFIG = dict(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, vocab=256)


def build_model(cfg: dict[str, int], device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=cfg["num_heads"],
        num_key_value_heads=cfg["num_kv_heads"],
        max_position_embeddings=16384,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).train()


def sample_documents(row_tokens: int, vocab: int, seed: int, min_len: int = 16) -> list[torch.Tensor]:
    """Documents with log-uniform lengths in [min_len, row_tokens / 2] filling exactly one row of row_tokens."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = torch.log(torch.tensor(float(min_len))), torch.log(torch.tensor(row_tokens / 2))
    docs, used = [], 0
    while used < row_tokens:
        length = int(torch.exp(lo + (hi - lo) * torch.rand((), generator=gen)))
        length = max(1, min(length, row_tokens - used))
        docs.append(torch.randint(3, vocab, (length,), generator=gen))
        used += length
    return docs


def packed_batch(docs: list[torch.Tensor], device: torch.device, with_cu: bool) -> dict[str, Any]:
    input_ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = input_ids.clone()
    labels[position_ids == 0] = -100
    batch: dict[str, Any] = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    if with_cu:
        cu = torch.tensor([0] + [len(d) for d in docs]).cumsum(0).to(torch.int32)
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(map(len, docs)))
        batch["max_length_k"] = batch["max_length_q"]
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def padded_batch(docs: list[torch.Tensor], device: torch.device) -> dict[str, Any]:
    width = max(map(len, docs))
    input_ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    for row, doc in enumerate(docs):
        input_ids[row, : len(doc)] = doc
        mask[row, : len(doc)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def time_case(model, batch, impl: str, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    model.set_attn_implementation(impl)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], float("nan")
    for i in range(warmup + steps):
        model.zero_grad(set_to_none=True)
        sync(device)
        start = time.perf_counter()
        out = model(**batch, use_cache=False)
        out.loss.backward()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        loss = float(out.loss.detach())
        del out
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"ms_per_step": 1e3 * statistics.median(times), "loss": loss, "peak_mem_gib": peak}


def cases_for(device: torch.device) -> list[tuple[str, str]]:
    """(attn_implementation, layout) pairs to run on ``device``; layout is packed, packed_posids or padded."""
    if device.type != "cuda":
        return [("sdpa", "packed_posids"), ("sdpa", "padded"), ("eager", "packed_posids")]
    cases = []
    ok, reason = varlen_attn_status(device)
    if ok:
        cases.append((VARLEN_ATTENTION, "packed"))
    else:
        print(f"skipping {VARLEN_ATTENTION}: {reason}", file=sys.stderr)
    cases += [("sdpa", "packed_posids"), ("sdpa", "padded")]
    ok, reason = flash_attention_2_status(device)
    if ok:
        cases.append(("flash_attention_2", "packed"))
    else:
        print(f"skipping flash_attention_2: {reason}", file=sys.stderr)
    return cases


def markdown_table(results: list[dict[str, Any]]) -> str:
    head = "| row tokens | docs | backend | layout | tokens/s | ms/step | tokens computed | peak GiB | loss |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            lines.append(
                f"| {r['row_tokens']} | {r['docs']} | {r['backend']} | {r['layout']} | error: {r['error'][:60]} "
                "| | | | |"
            )
            continue
        peak = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        lines.append(
            f"| {r['row_tokens']} | {r['docs']} | {r['backend']} | {r['layout']} | {r['tokens_per_s']:,.0f} "
            f"| {r['ms_per_step']:.1f} | {r['tokens_computed']} | {peak} | {r['loss']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    parser.add_argument("--row-tokens", type=int, nargs="+", default=None, help="packed row lengths to try")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    on_gpu = device.type == "cuda"
    cfg = GPU_CONFIG if on_gpu else CPU_CONFIG
    row_tokens = args.row_tokens or ([2048, 4096, 8192] if on_gpu else [256, 512])
    steps = args.steps or (10 if on_gpu else 3)
    dtype_name = args.dtype or ("bf16" if on_gpu else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    register_attention_backends()
    if not on_gpu:
        print(
            f"{device}: tiny configuration, sdpa/eager only; {VARLEN_ATTENTION} and flash_attention_2 need a CUDA "
            "GPU (compute capability >= 8.0).",
            file=sys.stderr,
        )

    model = build_model(cfg, device, dtype, args.seed)
    # One untimed pass over every case first: lazy initialisation (kernels, allocator, thread pools) otherwise lands in
    # the first case's timings.
    cases = cases_for(device)
    warm_docs = sample_documents(min(row_tokens), cfg["vocab"], args.seed)
    for impl, layout in cases:
        batch = padded_batch(warm_docs, device) if layout == "padded" else packed_batch(warm_docs, device, True)
        try:
            time_case(model, batch, impl, device, warmup=0, steps=2)
        except Exception:  # reported properly below
            pass
    results = []
    for tokens in row_tokens:
        docs = sample_documents(tokens, cfg["vocab"], args.seed + tokens)
        real = sum(map(len, docs))
        for impl, layout in cases:
            if layout == "padded":
                batch = padded_batch(docs, device)
            else:
                batch = packed_batch(docs, device, with_cu=layout == "packed")
            row = {"row_tokens": tokens, "docs": len(docs), "backend": impl, "layout": layout}
            row["tokens_computed"] = int(batch["input_ids"].numel())
            try:
                row.update(time_case(model, batch, impl, device, args.warmup, steps))
                row["tokens_per_s"] = real / (row["ms_per_step"] / 1e3)
            except Exception as exc:  # e.g. out of memory for the padded layout: report and go on
                row["error"] = f"{type(exc).__name__}: {exc}"
                if on_gpu:
                    torch.cuda.empty_cache()
            results.append(row)
            print(row, file=sys.stderr)

    report = {
        "device": torch.cuda.get_device_name(device) if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "dtype": dtype_name,
        "model": cfg,
        "steps": steps,
        "warmup": args.warmup,
        "results": results,
    }
    print(markdown_table(results))
    if args.out:
        write_json(args.out, report, indent=2)
    return report


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The fused epilogue alone on a GPU: time and achieved bandwidth per launch configuration, against a plain copy.

The epilogue (`trl_plw.ops._epilogue`) reads a ``[n, V]`` bf16 tile twice and writes it once, so its floor is the
time to move ``3 * n * V * 2`` bytes. This script times the Triton kernel for each ``(BLOCK_V, num_warps)`` in
``--configs`` (training setting: gradient and argmax on), the PyTorch epilogue once, and ``tile.copy_(other)`` (one
read + one write: the device's practical bandwidth), so `block_config`'s choice can be checked on each GPU.

Usage: ``python benchmarks/epilogue.py [--vocab 151936,248320] [--rows 4096] [--out epilogue.json]`` (CUDA only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from _bench_common import device_name, write_json  # noqa: E402

DEFAULT_CONFIGS = "2048x4,4096x8,8192x8,8192x16,16384x16,16384x32"


def cuda_ms(fn, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs, CUDA events around each, after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench_vocab(vocab: int, n: int, configs: list[str], reps: int) -> dict:
    """One vocabulary size: a copy, each Triton launch configuration, and the PyTorch epilogue on 1,024 rows."""
    from trl_plw.ops._epilogue import epilogue_torch
    from trl_plw.ops._epilogue_triton import block_config, epilogue_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    source = (torch.randn(n, vocab, device="cuda", generator=g) * 3).to(torch.bfloat16)
    tile = torch.empty_like(source)
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    gbytes = 3 * n * vocab * 2 / 1e9
    case = {"V": vocab, "default": list(block_config(vocab, 2)), "configs": {}}
    copy_ms = cuda_ms(lambda: tile.copy_(source), reps)
    case["copy_ms"] = copy_ms
    case["copy_tb_s"] = 2 * n * vocab * 2 / copy_ms / 1e9

    def run(block, warps):
        tile.copy_(source)  # the epilogue overwrites its tile: refill it, and subtract the copy's time below
        epilogue_triton(tile, targets, None, 1.0, None, True, True, block_v=block, num_warps=warps)

    for spec in configs:
        block, warps = (int(x) for x in spec.split("x"))
        try:
            ms = cuda_ms(lambda b=block, w=warps: run(b, w), reps) - copy_ms
            case["configs"][spec] = {"ms": ms, "tb_s": gbytes / ms}
        except Exception as e:  # noqa: BLE001 - a configuration the compiler refuses is a result, not a crash
            case["configs"][spec] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(f"V={vocab} {spec}: {case['configs'][spec]}", flush=True)
    small = tile[: min(n, 1024)]
    try:
        ms = cuda_ms(lambda: epilogue_torch(small, targets[: small.shape[0]], None, 1.0, None, True, True), 3)
        case["torch_epilogue_ms_per_1024_rows"] = ms
    except Exception as e:  # noqa: BLE001
        case["torch_epilogue_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    print(f"V={vocab}: copy {copy_ms:.3f} ms ({case['copy_tb_s']:.2f} TB/s r+w)", flush=True)
    return case


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", default="151936,248320", help="comma list of vocabulary sizes")
    p.add_argument("--rows", type=int, default=4096, help="tile rows")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list of BLOCK_VxNUM_WARPS")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("epilogue.py needs a CUDA device", file=sys.stderr)
        return 2
    results = {"device": device_name(torch.device("cuda")), "torch": torch.__version__, "rows": args.rows, "cases": []}
    for vocab in (int(v) for v in args.vocab.split(",")):
        results["cases"].append(bench_vocab(vocab, args.rows, args.configs.split(","), args.reps))
        torch.cuda.empty_cache()
        if args.out:
            write_json(args.out, results, indent=1)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

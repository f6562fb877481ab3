#!/usr/bin/env python
"""Side-by-side benchmark of LM-head + weighted cross-entropy implementations (fwd+bwd time, peak extra memory).

Every method gets the same tensors (hidden ``[N, H]``, head weight ``[V, H]``, targets, per-token weights) and
computes the same loss, ``sum(w * ce) / sum(w)``, then its gradients for hidden and weight:

- ``ours``: ``trl_plw.ops.weighted_linear_cross_entropy`` with the device's default tile loop (the fused epilogue,
  Triton, on CUDA; the eager loop on CPU); gradients formed in the forward, 3 matmuls.
- ``ours_stats``: the same with ``return_token_stats=True`` (the trainer's setting: per-token ce and argmax).
- ``ours_eager``: ``impl="torch"``, the eager fp32-tile loop (on CPU the same as ``ours``; on CUDA the path before the
  fused epilogue).
- ``floor``: ``F.linear`` forward + backward on the same tensors with a given ``[N, V]`` gradient: the three GEMMs of
  any fwd+bwd, at their real shapes (the logits, ``grad_h = G @ W``, ``grad_W = G.T @ h``) and nothing else.
- ``full_lce``: ``F.linear_cross_entropy(..., reduction="none", options=None)`` (full logits), weighted.
- ``hf_ce``: HF-style ``F.cross_entropy(F.linear(h, W).float(), reduction="none")``, weighted.
- ``torch_chunked``: ``F.linear_cross_entropy(..., reduction="none", options=torch.nn.LinearCrossEntropyOptions())``
  (chunked; per-token loss, so its backward recomputes the logits), weighted.
- ``trl_head``: TRL's ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` (log-probs, recomputed in backward),
  weighted, called the way TRL's fused head calls it on this device.
- GPU only, when importable: Liger ``LigerFusedLinearCrossEntropyLoss`` with ``reduction="none"`` x weights
  (``liger``) and with ``reduction="mean"`` (``liger_mean``: its published setting, an unweighted mean, so a different
  loss); cut-cross-entropy likewise (``cce``, ``cce_mean``).
- ``matmul``: the bare forward ``hidden @ weight.T``; three of them were the floor before ``floor``, kept so CPU
  results compare with earlier runs.

Each method runs on its own: an exception or out-of-memory error is recorded against that method and the others
go on (``torch.cuda.empty_cache()`` between methods), and with ``--jsonl`` every record is appended as it is made
(a "start" line before each method, its result or error after), so a run that is killed or crashes keeps everything
measured before (`benchmarks/gpu_check.py` restarts a crashed shape without the method that was running).

Timing: median over ``--reps`` repetitions after one warm-up run per method. On CPU the repetitions are interleaved
(method order rotated every repetition, so background load hits all methods alike); on CUDA each method is timed
right after its warm-up, so its record is complete before the next method starts. Memory: peak extra bytes allocated during one
fwd+bwd (includes the gradient tensors themselves). On CUDA ``torch.cuda.max_memory_allocated``; on CPU the
``torch.profiler`` allocation events of PyTorch's CPU allocator (``total_allocated`` high-water mark during the run;
buffers that MKL/oneDNN allocate internally are not seen).

Usage: ``python benchmarks/loss_head.py [--quick] [--shapes smollm2,llama2,llama3] [--n-tokens 4096] [--out f.json]``

GPU anchor shapes (bf16; run by ``benchmarks/gpu_check.py``): ``--device cuda --shapes h4096-v128k,h4096-v152k,h2048-v248k
--plw0-shape none`` (8k, 8k and 16k tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from _bench_common import MiB, cpu_model, device_name, format_loadavg, sync, write_json  # noqa: E402

from trl_plw.ops import KernelOptions, weighted_linear_cross_entropy  # noqa: E402

SHAPES = {  # name: (hidden size, vocab size)
    "smollm2": (576, 49152),
    "llama2": (4096, 32000),
    "llama3": (4096, 128256),
    "tiny": (64, 1000),
    # The published GPU anchor shapes (bf16), run by benchmarks/gpu_check.py: Llama-3-8B and Qwen3-8B heads at 8k
    # tokens, and a 2k-hidden model with a 248k vocabulary (Qwen3.5-class) at 16k tokens.
    "h4096-v128k": (4096, 128256),
    "h4096-v152k": (4096, 151936),
    "h2048-v248k": (2048, 248320),
}
ANCHOR_SHAPES = ("h4096-v128k", "h4096-v152k", "h2048-v248k")
# Tokens per shape: sized so that the default CPU run (3 shapes + PLW=0 case) stays under ~8 min on 2 cores
DEFAULT_TOKENS_CPU = {
    "smollm2": 3072,
    "llama2": 768,
    "llama3": 256,
    "tiny": 256,
    "h4096-v128k": 256,
    "h4096-v152k": 256,
    "h2048-v248k": 256,
}
DEFAULT_TOKENS_GPU = {
    "smollm2": 32768,
    "llama2": 16384,
    "llama3": 16384,
    "tiny": 4096,
    "h4096-v128k": 8192,
    "h4096-v152k": 8192,
    "h2048-v248k": 16384,
}
LIGER_MIN_VERSION = (0, 8, 2)
"""Liger's ``reduction="none"`` returns wrong per-token gradients before 0.8.2, so older versions are skipped."""
PLW0_FRACTION = 0.02


# ----------------------------------------------------------------------------------------------------- methods


def _weighted(per_token_ce: torch.Tensor, w: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    return (w * per_token_ce.float()).sum() / denom


def m_ours(h, W, t, w, denom):
    return weighted_linear_cross_entropy(h, W, t, w)


def m_ours_stats(h, W, t, w, denom):
    return weighted_linear_cross_entropy(h, W, t, w, return_token_stats=True)[0]


def m_ours_eager(h, W, t, w, denom):
    return weighted_linear_cross_entropy(h, W, t, w, options=KernelOptions(impl="torch"))


_FLOOR_GRAD: dict[str, torch.Tensor] = {}
"""The ``[N, V]`` logits gradient the floor's backward takes (made once per case, outside the timings)."""


def m_floor(h, W, t, w, denom):
    logits = F.linear(h, W)
    return logits, _FLOOR_GRAD["grad"]  # run_once runs logits.backward(grad)


def m_full_lce(h, W, t, w, denom):
    return _weighted(F.linear_cross_entropy(h, W, t, reduction="none", options=None), w, denom)


def m_hf_ce(h, W, t, w, denom):
    logits = F.linear(h, W)
    return _weighted(F.cross_entropy(logits.float(), t, reduction="none"), w, denom)


def m_torch_chunked(h, W, t, w, denom):
    opts = torch.nn.LinearCrossEntropyOptions()
    return _weighted(F.linear_cross_entropy(h, W, t, reduction="none", options=opts), w, denom)


def m_trl_head(h, W, t, w, denom):
    # As `trl.trainer.utils.add_fused_lm_head` calls it: only valid positions on Triton devices, all elsewhere
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    mask = t != -100
    if _use_triton(h.device):
        logp = ChunkedLogProbFunction.apply(h[mask], W, None, t[mask], 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ())
        return -(w[mask] * logp[0]).sum() / denom
    logp = ChunkedLogProbFunction.apply(h, W, None, t.clamp(min=0), 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ())
    return -(w * logp[0].masked_fill(~mask, 0)).sum() / denom


def m_liger(h, W, t, w, denom):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return _weighted(LigerFusedLinearCrossEntropyLoss(reduction="none")(W, h, t), w, denom)


def m_liger_mean(h, W, t, w, denom):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="mean")(W, h, t)


def m_cce(h, W, t, w, denom):
    from cut_cross_entropy import linear_cross_entropy

    return _weighted(linear_cross_entropy(h, W, t, reduction="none"), w, denom)


def m_cce_mean(h, W, t, w, denom):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(h, W, t, reduction="mean")


def m_matmul(h, W, t, w, denom):
    return h.detach() @ W.detach().T


def m_fake_error(h, W, t, w, denom):
    raise RuntimeError("injected failure (--inject-failures): this method always raises")


def m_fake_crash(h, W, t, w, denom):
    sys.stdout.flush()
    os._exit(139)  # what a segfault or a CUDA illegal-memory-access abort looks like from outside


INJECTED = {"fake_error": m_fake_error, "fake_crash": m_fake_crash}
"""Methods that fail on purpose, added by ``--inject-failures`` only: the dry run of benchmarks/gpu_check.py uses them
to prove that one method's exception or crash does not cost the other methods' records."""


METHODS: dict[str, Callable] = {
    "ours": m_ours,
    "floor": m_floor,
    "ours_stats": m_ours_stats,
    "ours_eager": m_ours_eager,
    "full_lce": m_full_lce,
    "hf_ce": m_hf_ce,
    "torch_chunked": m_torch_chunked,
    "trl_head": m_trl_head,
    "liger": m_liger,
    "liger_mean": m_liger_mean,
    "cce": m_cce,
    "cce_mean": m_cce_mean,
    "matmul": m_matmul,
}
"""In run order: ours and the floor first, so that a later method's failure cannot cost their figures."""
OTHER_LOSS = {"liger_mean", "cce_mean"}
"""Methods that compute a different loss (an unweighted mean): left out of the consistency check."""
GPU_ONLY = {"liger": "liger_kernel.transformers", "liger_mean": "liger_kernel.transformers",
            "cce": "cut_cross_entropy", "cce_mean": "cut_cross_entropy"}  # fmt: skip


def available_methods(device: torch.device) -> tuple[list[str], dict[str, str]]:
    names, skipped = [], {}
    for name in METHODS:
        if name in GPU_ONLY:
            if device.type != "cuda":
                skipped[name] = "GPU only"
                continue
            try:
                __import__(GPU_ONLY[name])
            except Exception as e:  # noqa: BLE001
                skipped[name] = f"not importable ({type(e).__name__})"
                continue
            if name.startswith("liger") and _liger_too_old():
                skipped[name] = f"liger-kernel {_liger_too_old()} < 0.8.2 (wrong per-token gradients)"
                continue
        if name in ("full_lce", "torch_chunked") and not hasattr(F, "linear_cross_entropy"):
            skipped[name] = f"F.linear_cross_entropy not in torch {torch.__version__}"
            continue
        if name == "torch_chunked" and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            skipped[name] = f"torch.nn.LinearCrossEntropyOptions not in torch {torch.__version__}"
            continue
        if name == "trl_head":
            try:
                import trl.kernels.chunked_logprob  # noqa: F401
            except Exception as e:  # noqa: BLE001
                skipped[name] = f"not importable ({type(e).__name__})"
                continue
        names.append(name)
    return names, skipped


def _liger_too_old() -> str | None:
    """The installed liger-kernel version if it is older than `LIGER_MIN_VERSION`, else None."""
    import importlib.metadata
    import re

    try:
        version = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = tuple(int(x) for x in re.findall(r"\d+", version)[:3])
    return version if parts < LIGER_MIN_VERSION else None


# ---------------------------------------------------------------------------------------------------- harness


def make_case(hdim, vocab, n, dtype, device, plw0, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # filled in place: no [V, H] temporaries that would distort the memory baseline
    h = torch.empty(n, hdim, dtype=torch.float32).normal_(generator=g)
    W = torch.empty(vocab, hdim, dtype=torch.float32).normal_(std=0.02, generator=g)
    t = torch.randint(0, vocab, (n,), generator=g)
    if plw0:
        w = (torch.rand(n, generator=g) < PLW0_FRACTION).float()
        t = t.masked_fill(w == 0, -100)  # completion-only: the baselines skip prompt tokens via ignore_index
    else:
        w = torch.rand(n, generator=g) + 0.5
    h, W = h.to(device=device, dtype=dtype), W.to(device=device, dtype=dtype)
    t, w = t.to(device), w.to(device)
    return h.requires_grad_(), W.requires_grad_(), t, w, w.sum()


def run_once(fn, h, W, t, w, denom):
    """One forward (+ backward where there is a graph). A method may return ``(output, grad)`` to have its backward
    run with that gradient (the floor); its output is then not a loss."""
    h.grad = None
    W.grad = None
    out = fn(h, W, t, w, denom)
    if isinstance(out, tuple):
        out, grad = out
        out.backward(grad)
        return out.detach().float().mean().fill_(float("nan"))  # not a loss: nothing to compare
    if out.requires_grad:
        out.backward()
    return out


def _system_busy_seconds() -> float | None:
    """CPU seconds all processes spent busy so far (Linux /proc/stat), or None where unavailable."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def timed(fn, args, device, max_other=1.0, retries=0, stats=None) -> float:
    """Wall time of one fwd+bwd. On CPU, a sample during which *other* processes kept more than ``max_other`` of the
    machine's cores busy (system busy time minus this process's CPU time, from /proc/stat) is discarded and retried
    after a pause, so the numbers compare the methods rather than the neighbours' load."""
    ncpu = os.cpu_count() or 1
    for attempt in range(retries + 1):
        sync(device)
        busy0, start, cpu0 = _system_busy_seconds(), time.perf_counter(), time.process_time()
        out = run_once(fn, *args)
        sync(device)
        elapsed, cpu, busy1 = time.perf_counter() - start, time.process_time() - cpu0, _system_busy_seconds()
        del out
        other = 0.0
        # /proc/stat counts in clock ticks (10 ms): a sample shorter than ~25 ticks cannot be judged, so it is kept
        judgeable = elapsed * os.sysconf("SC_CLK_TCK") >= 25
        if device.type == "cpu" and judgeable and busy0 is not None and busy1 is not None:
            other = max(0.0, (busy1 - busy0) - cpu) / (elapsed * ncpu)
        if other <= max_other:
            break
        if stats is not None:
            stats["discarded"] += 1
        if attempt < retries:
            print(f"    sample discarded: other processes used {other:.0%} of the CPUs; waiting", file=sys.stderr)
            time.sleep(10)
    else:
        if stats is not None:
            stats["kept_contended"] += 1
    return elapsed


def peak_extra_bytes(fn, args, device) -> tuple[int, float | None, tuple | None]:
    """Peak bytes allocated above the starting level during one fwd+bwd (this run is also the warm-up), and the
    loss and gradient norms of that run (for the consistency check)."""
    h, W = args[0], args[1]
    h.grad = W.grad = None  # free old gradients before the baseline is taken
    gc.collect()

    def run_and_record():
        out = run_once(fn, *args)
        if h.grad is None or W.grad is None or out.isnan().item():
            return None, None
        return float(out.detach().float()), (float(h.grad.float().norm()), float(W.grad.float().norm()))

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, norms = run_and_record()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        h.grad = W.grad = None
        return int(peak), loss, norms
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, norms = run_and_record()
    h.grad = W.grad = None
    events = []

    def walk(nodes):
        for e in nodes:
            if e.tag == _EventType.Allocation:
                events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.total_allocated))
            walk(e.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    if not events:
        return 0, loss, norms
    events.sort()
    base = events[0][2] - events[0][1]  # allocator level just before the first event
    return int(max(e[2] for e in events) - base), loss, norms


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints start/stop lines on fd 2; keep the benchmark output readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _release(device) -> None:
    """Free what a method left behind before the next one is measured (its memory baseline and its time)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def bench_case(
    label, hdim, vocab, n, dtype, device, methods, reps, plw0, max_other=1.0, retries=0, record=None, sequential=None
):
    """Time and measure each method on one shape; a method that raises is recorded and skipped, not fatal.

    ``record(dict)``, when given, receives a ``{"event": "start"}`` line before each method and its result or error
    right after. ``sequential`` (default: on CUDA) times each method right after its warm-up, so its record is
    written before the next method starts; otherwise the timings are interleaved rounds after all warm-ups (CPU).
    """
    record = record or (lambda _line: None)
    args = make_case(hdim, vocab, n, dtype, device, plw0)
    h, W = args[0], args[1]
    result = {"case": label, "H": hdim, "V": vocab, "N": n, "dtype": str(dtype).replace("torch.", ""), "plw0": plw0}
    result["weighted_tokens"] = int((args[3] != 0).sum())
    head = {k: result[k] for k in ("case", "H", "V", "N", "dtype", "plw0")}
    record({**head, "event": "plan", "methods": list(methods)})
    if "floor" in methods:
        _FLOOR_GRAD["grad"] = torch.randn(n, vocab, dtype=dtype, device=device) * 1e-3
    losses, grad_norms, mem, times, errors = {}, {}, {}, {m: [] for m in methods}, {}
    contention = {"discarded": 0, "kept_contended": 0}
    sequential = device.type == "cuda" if sequential is None else sequential

    def measure(m, warmup):
        try:
            if warmup:  # warm-up + memory + the loss/gradients used for the consistency check
                mem[m], loss, norms = peak_extra_bytes(METHODS[m], args, device)
                if loss is not None:
                    losses[m], grad_norms[m] = loss, norms
            if sequential or not warmup:
                for _ in range(reps if sequential else 1):
                    times[m].append(timed(METHODS[m], args, device, max_other, retries, contention))
                    h.grad = W.grad = None
        except Exception as e:  # noqa: BLE001 - one method's failure (OOM, missing kernel) must not cost the others
            errors[m] = _error_text(e)
            h.grad = W.grad = None
            record({**head, "method": m, "event": "error", "error": errors[m]})
        finally:
            _release(device)

    def method_record(m):
        return {
            "time_s": statistics.median(times[m]),
            "times_s": times[m],
            "peak_extra_mib": mem[m] / MiB,
            "loss": losses.get(m),
            "grad_norm_hidden": grad_norms.get(m, (None, None))[0],
            "grad_norm_weight": grad_norms.get(m, (None, None))[1],
        }

    for m in methods:
        record({**head, "method": m, "event": "start"})
        measure(m, warmup=True)
        if sequential and m not in errors:
            record({**head, "method": m, "event": "result", **method_record(m)})
    if not sequential:
        for r in range(reps):
            ok = [m for m in methods if m not in errors]
            for m in ok[r % max(len(ok), 1) :] + ok[: r % max(len(ok), 1)]:
                measure(m, warmup=False)
        for m in methods:
            if m not in errors:
                record({**head, "method": m, "event": "result", **method_record(m)})
    _FLOOR_GRAD.clear()
    result["methods"] = {m: method_record(m) for m in methods if m not in errors}
    result["errors"] = errors
    result["contention"] = contention
    result.update(consistency(result["methods"]))
    return result


def consistency(methods: dict) -> dict:
    """Largest relative difference of loss and gradient norms from ``ours`` over the methods that compute the same
    loss (empty when ``ours`` has no record)."""
    same = {m: v for m, v in methods.items() if m not in OTHER_LOSS and v.get("loss") is not None}
    if "ours" not in same:
        return {}
    ref = same["ours"]
    norms = ("grad_norm_hidden", "grad_norm_weight")
    return {
        "max_loss_rel_diff_vs_ours": max(abs(v["loss"] - ref["loss"]) / abs(ref["loss"]) for v in same.values()),
        "max_grad_norm_rel_diff_vs_ours": max(
            abs(v[k] - ref[k]) / max(ref[k], 1e-30) for v in same.values() for k in norms
        ),
    }


def results_from_jsonl(lines: list[dict]) -> list[dict]:
    """Rebuild per-case results from `bench_case`'s records (in order; several runs of one case merge), so a run that
    crashed or was killed still yields every method measured before it stopped."""
    cases: dict[str, dict] = {}
    for line in lines:
        case = cases.setdefault(
            line["case"],
            {k: line[k] for k in ("case", "H", "V", "N", "dtype") if k in line}
            | {"plw0": line.get("plw0", False), "methods": {}, "errors": {}, "contention": {}},
        )
        if line.get("event") == "result":
            keys = ("time_s", "times_s", "peak_extra_mib", "loss", "grad_norm_hidden", "grad_norm_weight")
            case["methods"][line["method"]] = {k: line.get(k) for k in keys}
        elif line.get("event") == "error":
            case["errors"][line["method"]] = line["error"]
    for case in cases.values():
        case.update(consistency(case["methods"]))
    return list(cases.values())


def ratios(res):
    ms = res["methods"]
    t = {m: v["time_s"] for m, v in ms.items()}
    mem = {m: v["peak_extra_mib"] for m, v in ms.items()}
    out = {}
    if "ours" not in t:
        return out
    if "floor" in t:
        out["ours_vs_floor"] = t["ours"] / t["floor"]
        if "ours_stats" in t:
            out["ours_stats_vs_floor"] = t["ours_stats"] / t["floor"]
        if "ours_eager" in t:
            out["ours_eager_vs_floor"] = t["ours_eager"] / t["floor"]
    if "matmul" in t:
        out["ours_vs_3x_matmul"] = t["ours"] / (3 * t["matmul"])
    full = [t[m] for m in ("full_lce", "hf_ce") if m in t]
    if full:  # against the faster of the two full-logits baselines, so a win is not against a straw man
        out["ours_vs_full_logits"] = t["ours"] / min(full)
    if "torch_chunked" in t:
        out["torch_chunked_speedup"] = t["torch_chunked"] / t["ours"]
        out["mem_vs_torch_chunked"] = mem["ours"] / mem["torch_chunked"]
    if "trl_head" in t:
        out["trl_head_speedup"] = t["trl_head"] / t["ours"]
    return out


METHOD_LABELS = {
    "matmul": "matmul (`h @ W.T`, fwd only)",
    "floor": "floor (`F.linear` fwd+bwd: 3 GEMMs)",
    "liger_mean": "liger_mean (unweighted mean)",
    "cce_mean": "cce_mean (unweighted mean)",
}


def markdown(results, env) -> str:
    lines = [
        f"Device: {env['device']} | torch {env['torch']} | trl {env.get('trl')} | threads {env['threads']} | "
        f"{env['date']} | load avg before/after: {env['loadavg_before']} / {env['loadavg_after']}",
        "",
        f"Time: median of {env['reps']} fwd+bwd runs after one warm-up"
        + (" (interleaved across methods)" if env["device"].startswith("CPU") else "")
        + (
            f"; CPU samples during which other processes used > {env['max_other_load']:.0%} of the machine's CPU "
            "time are discarded and retried"
            if env["device"].startswith("CPU") and env["max_other_load"] < 1
            else ""
        )
        + ".",
        "",
        "Peak memory: " + env["memory_method"],
        "",
    ]
    for res in results:
        r = ratios(res)
        title = f"{res['case']} (H={res['H']}, V={res['V']}, N={res['N']}, {res['dtype']}"
        if res["plw0"]:
            title += f", PLW=0: {res['weighted_tokens']}/{res['N']} tokens weighted"
        lines += [f"**{title})**", ""]
        lines.append("| method | fwd+bwd (s, median) | vs ours | peak extra (MiB) | loss |")
        lines.append("|---|---:|---:|---:|---:|")
        t_ours = res["methods"].get("ours", {}).get("time_s")
        for m, v in res["methods"].items():
            loss = "" if v["loss"] is None else f"{v['loss']:.6f}"
            label = METHOD_LABELS.get(m, m)
            vs = f"{v['time_s'] / t_ours:.2f}x" if t_ours else "n/a"
            lines.append(f"| {label} | {v['time_s']:.4f} | {vs} | {v['peak_extra_mib']:.0f} | {loss} |")
        for m, err in res.get("errors", {}).items():
            lines.append(f"| {METHOD_LABELS.get(m, m)} | error: {err} | | | |")
        parts = []
        if "ours_vs_floor" in r:
            parts.append(f"ours / floor = **{r['ours_vs_floor']:.3f}**")
        for key, name in (("ours_stats_vs_floor", "ours with stats"), ("ours_eager_vs_floor", "eager loop")):
            if key in r:
                parts.append(f"{name} / floor = {r[key]:.3f}")
        if "ours_vs_3x_matmul" in r:
            parts.append(f"ours / 3x matmul = **{r['ours_vs_3x_matmul']:.3f}**")
        if "ours_vs_full_logits" in r:
            parts.append(f"ours / faster full logits = **{r['ours_vs_full_logits']:.3f}**")
        if "torch_chunked_speedup" in r:
            parts.append(f"speedup vs torch chunked = **{r['torch_chunked_speedup']:.2f}x**")
        if "trl_head_speedup" in r:
            parts.append(f"speedup vs TRL head = **{r['trl_head_speedup']:.2f}x**")
        if "mem_vs_torch_chunked" in r:
            parts.append(f"peak mem ours / torch chunked = **{r['mem_vs_torch_chunked']:.2f}**")
        if "max_loss_rel_diff_vs_ours" in res:
            parts.append(
                f"max rel. diff vs ours: loss {res['max_loss_rel_diff_vs_ours']:.1e}, "
                f"grad norms {res['max_grad_norm_rel_diff_vs_ours']:.1e}"
            )
        c = res.get("contention", {})
        if c.get("discarded") or c.get("kept_contended"):
            parts.append(f"contended samples discarded: {c['discarded']}, kept: {c['kept_contended']}")
        lines += ["", "; ".join(parts), ""]
    if env["skipped"]:
        lines.append("Skipped: " + ", ".join(f"{k} ({v})" for k, v in env["skipped"].items()))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    p.add_argument("--shapes", default=None, help=f"comma list from {sorted(SHAPES)}")
    p.add_argument("--n-tokens", type=int, default=None, help="tokens per case (default: per shape and device)")
    p.add_argument("--plw0-shape", default=None, help="shape for the PLW=0 case ('none' to skip)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per method (default 3)")
    p.add_argument("--methods", default=None, help="comma list (default: all available)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="auto: bf16 where native (CUDA, CPUs with AVX512-BF16/AMX), else fp32; recorded CPU runs: fp32",
    )
    p.add_argument("--max-other-load", type=float, default=0.15,
                   help="CPU: discard (and retry) timing samples during which other processes used more than this "
                   "fraction of the machine's CPU time; 1 disables")  # fmt: skip
    p.add_argument("--retries", type=int, default=30, help="retries per contended sample (10 s apart)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--jsonl", default=None, help="append one JSON line per method start/result/error here")
    p.add_argument("--inject-failures", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--order",
        choices=["auto", "sequential", "interleaved"],
        default="auto",
        help="sequential: time each method right after its warm-up (records complete one by one; CUDA's default); "
        "interleaved: rotate methods across repetitions (CPU's default, fair under background load)",
    )
    p.add_argument("--render", default=None, help="only print the markdown table of a saved --out JSON")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        saved["env"].setdefault("loadavg_after", "n/a")
        print(markdown(saved["results"], saved["env"]))
        return

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.dtype == "auto":  # the project's precision rule: bf16 where native (CUDA, AVX512-BF16/AMX CPUs)
        from trl_plw.precision import default_dtype

        dtype = default_dtype(device)
    else:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.quick:
        shapes, plw0_shape, reps = ["tiny"], "tiny", args.reps or 2
    else:
        shapes = ["smollm2", "llama2", "llama3"]
        plw0_shape, reps = "smollm2", args.reps or 3
    if args.shapes:
        shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if args.plw0_shape:
        plw0_shape = None if args.plw0_shape == "none" else args.plw0_shape
    for s in shapes + ([plw0_shape] if plw0_shape else []):
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}; choose from {sorted(SHAPES)}")
    if args.inject_failures:
        METHODS.update(INJECTED)
    methods, skipped = available_methods(device)
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",")]
        methods = [m for m in wanted if m in methods]  # in the order given; a resumed run may leave out ours
    default_n = DEFAULT_TOKENS_GPU if device.type == "cuda" else DEFAULT_TOKENS_CPU

    from _bench_common import package_versions

    env = {
        "device": device_name(device),
        "cpu_model": cpu_model() or "",
        "torch": torch.__version__,
        "trl": package_versions(["trl"])["trl"],
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "loadavg_before": format_loadavg(),
        "memory_method": (
            "torch.cuda.max_memory_allocated() - memory_allocated() before the run"
            if device.type == "cuda"
            else "torch.profiler allocation events (PyTorch CPU allocator high-water mark during one fwd+bwd, "
            "gradients included; MKL-internal scratch not seen)"
        ),
        "reps": reps,
        "max_other_load": args.max_other_load,
        "skipped": skipped,
    }
    cases = [(s, False) for s in shapes] + ([(plw0_shape, True)] if plw0_shape else [])
    results = []
    for shape, plw0 in cases:
        hdim, vocab = SHAPES[shape]
        n = args.n_tokens or default_n[shape]
        label = f"{shape}{' PLW=0' if plw0 else ''}"
        print(f"[{time.strftime('%H:%M:%S')}] {label}: H={hdim} V={vocab} N={n} ...", file=sys.stderr, flush=True)
        results.append(
            bench_case(
                label, hdim, vocab, n, dtype, device, methods, reps, plw0, args.max_other_load, args.retries,
                record=_jsonl_writer(args.jsonl), sequential=None if args.order == "auto" else args.order == "sequential",
            )
        )  # fmt: skip
        gc.collect()
        if args.out:  # partial results survive an interrupted run
            _write_json(args.out, env, results)
    env["loadavg_after"] = format_loadavg()
    table = markdown(results, env)
    print(table)
    if args.out:
        _write_json(args.out, env, results)


def _jsonl_writer(path):
    """A ``record`` callback appending one flushed JSON line per call to ``path`` (None: records nothing)."""
    if path is None:
        return None

    def record(line):
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")

    return record


def _write_json(path, env, results):
    write_json(path, {"env": env, "results": results, "ratios": [ratios(r) for r in results]}, indent=2)


if __name__ == "__main__":
    main()

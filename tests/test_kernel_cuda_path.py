"""The CUDA path, proven as far as a CPU can: the Triton epilogue in Triton's interpreter and compiled for Hopper and
Ampere, every torch version's GEMM behaviour emulated, and no Python-scalar writes into tensors in the hot path.

What needs the GPU itself (timings, cuBLAS, sync debug mode) is in test_kernel_gpu.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import subprocess_env

import trl_plw.ops._gemm as gemm
from trl_plw.ops import KernelOptions, weighted_linear_cross_entropy

REPO = Path(__file__).resolve().parents[1]
OPS = REPO / "src" / "trl_plw" / "ops"
IGNORE = -100


# ------------------------------------------------------------------------------------------- Triton, on a CPU


def test_triton_epilogue_runs_every_kernel_test():
    """test_weighted_linear_ce.py again, in a child with TRITON_INTERPRET=1: there its tile loop is the fused one with
    the Triton epilogue, so every exactness, gradient, statistics and error test runs through the kernel's code."""
    pytest.importorskip("triton")
    env = {**subprocess_env(), "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_weighted_linear_ce.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 70 and "failed" not in proc.stdout, tail


def _ast_source(fn, signature, constants):
    """Triton's ahead-of-time source, told (as the JIT infers for every torch allocation) that the pointers are 16-byte
    aligned. Triton >= 3.4 takes ``constexprs=`` and plain attributes; 3.2-3.3 (torch 2.6-2.7) ``constants=`` and an
    ``AttrsDescriptor``."""
    import inspect

    from triton.compiler import ASTSource

    pointers = [i for i, ty in enumerate(signature.values()) if ty.startswith("*")]
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        return ASTSource(
            fn, signature, constexprs=constants, attrs={(i,): [["tt.divisibility", 16]] for i in pointers}
        )
    try:
        from triton.backends.compiler import AttrsDescriptor
    except ImportError:  # pragma: no cover - where 3.x kept it
        from triton.compiler.compiler import AttrsDescriptor
    attrs = AttrsDescriptor.from_dict(
        {"arg_properties": {"tt.divisibility": pointers}, "cls": AttrsDescriptor.__name__}
    )
    return ASTSource(fn, signature, constants=constants, attrs=attrs)


# Every compile-time variant the trainer or a user can reach: dtype of the tile x bias x softcap x gradient x argmax
_VARIANTS = [
    ("*bf16", True, True, True, True),
    ("*bf16", False, False, True, False),
    ("*bf16", False, False, False, True),
    ("*fp16", False, True, True, True),
    ("*fp32", True, False, True, True),
]


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("variant", _VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_triton_epilogue_compiles_for_the_gpu(arch, variant):
    """The kernel goes through Triton's whole compiler to a cubin for sm_90 (H100/H200) and sm_80 (A100) here, without
    a GPU: the interpreter does not type-check, the compiler does (loop-carried types, constexpr branches)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from trl_plw.ops._epilogue_triton import _TL_ACC, _wce_epilogue_kernel, block_config

    tile_ty, has_bias, softcap, want_grad, want_argmax = variant
    element = {"*bf16": 2, "*fp16": 2, "*fp32": 4}[tile_ty]
    vocab = 151_936
    block, warps = block_config(vocab, element)
    signature = {
        "tile_ptr": tile_ty, "targets_ptr": "*i64", "bias_ptr": "*fp32", "lse_ptr": "*fp32",
        "z_t_ptr": "*fp32", "max_other_ptr": "*fp32", "fold": "fp32", "softcap": "fp32",
        "V": "constexpr", "HAS_BIAS": "constexpr", "SOFTCAP": "constexpr", "WANT_GRAD": "constexpr",
        "WANT_ARGMAX": "constexpr", "ACC": "constexpr", "BLOCK_V": "constexpr",
    }  # fmt: skip
    constants = {
        "V": vocab, "HAS_BIAS": has_bias, "SOFTCAP": softcap, "WANT_GRAD": want_grad, "WANT_ARGMAX": want_argmax,
        "ACC": _TL_ACC[torch.float32], "BLOCK_V": block,
    }  # fmt: skip
    try:
        kernel = triton.compile(
            _ast_source(_wce_epilogue_kernel, signature, constants),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": warps},
        )
    except FileNotFoundError as e:  # ptxas ships inside triton's wheel; a stripped install may lack it
        pytest.skip(f"no ptxas for an AOT compile: {e}")
    ptx = kernel.asm["ptx"]
    assert kernel.asm["cubin"] and f"sm_{arch}" in ptx
    # the tile is read in 16-byte vectors (rows are aligned: row * V with V a multiple of 8), and written back the
    # same way only when the gradient is wanted (the stats alone store [n] fp32 scalars)
    assert "ld.global.v4.b32" in ptx
    assert ("st.global.v4.b32" in ptx) == want_grad


# ------------------------------------------------------------------------------- torch versions, emulated


def _emulate(version: tuple[int, int]):
    """``torch.mm``/``torch.addmm`` as a CUDA build of ``version`` treats ``out_dtype`` (gemm.py's table):
    < 2.8 has no such argument; 2.8-2.9 accept it in ``mm`` but reject an fp32 ``self`` in ``addmm``; >= 2.10 accept
    both. Accepted calls compute like a bf16 GEMM with fp32 accumulation and output: the product of the (already
    low-precision) inputs in fp32. ``calls`` records the ``out_dtype`` calls, ``operands`` every call's operand dtypes."""
    real_mm, real_addmm = torch.mm, torch.addmm
    calls, operands = [], []

    def mm(a, b, *, out_dtype=None, out=None):
        operands.append((a.dtype, b.dtype))
        if out_dtype is None:
            return real_mm(a, b, out=out) if out is not None else real_mm(a, b)
        if version < (2, 8):
            raise TypeError("mm() received an invalid combination of arguments - got an unexpected 'out_dtype'")
        calls.append(("mm", a.dtype, out_dtype))
        result = real_mm(a.to(out_dtype), b.to(out_dtype))
        return out.copy_(result) if out is not None else result

    def addmm(self, a, b, *, beta=1, alpha=1, out_dtype=None, out=None):
        operands.append((a.dtype, b.dtype))
        if out_dtype is None:
            kw = {"beta": beta, "alpha": alpha}
            return real_addmm(self, a, b, out=out, **kw) if out is not None else real_addmm(self, a, b, **kw)
        if version < (2, 8):
            raise TypeError("addmm() received an invalid combination of arguments - got an unexpected 'out_dtype'")
        if version < (2, 10) and self.dtype != a.dtype:
            raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")
        calls.append(("addmm", a.dtype, out_dtype))
        result = beta * self + alpha * real_mm(a.to(out_dtype), b.to(out_dtype))
        return out.copy_(result) if out is not None else result

    return mm, addmm, calls, operands


@pytest.fixture
def torch_version(monkeypatch):
    """Emulate a torch version's GEMMs for the duration of a test (the probe cache reset before and after)."""

    def use(version):
        mm, addmm, calls, operands = _emulate(version)
        monkeypatch.setattr(torch, "mm", mm)
        monkeypatch.setattr(torch, "addmm", addmm)
        monkeypatch.setattr(gemm, "_SUPPORT_CACHE", {})
        use.operands = operands
        return calls

    yield use
    gemm._SUPPORT_CACHE.clear()


@pytest.mark.parametrize(
    "version,level", [((2, 6), "none"), ((2, 7), "none"), ((2, 8), "mm"), ((2, 9), "mm"), ((2, 10), "addmm")]
)
def test_probe_finds_each_versions_level(torch_version, version, level):
    torch_version(version)
    assert gemm.gemm_support(torch.device("cpu"), torch.bfloat16) == level


@pytest.mark.parametrize("version", [(2, 6), (2, 8), (2, 10)])
@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("softcap,bias", [(None, False), (3.0, True)])
def test_each_versions_path_matches_float64(torch_version, version, impl, softcap, bias):
    """bf16 matmuls, several tiles (so grad_W accumulates across tiles): every version's branch gives the float64
    reference's loss and gradients to bf16 accuracy, and only bf16 GEMMs feed fp32 results (never an fp32 GEMM
    over the bf16 tile on the fused path)."""
    calls = torch_version(version)
    g = torch.Generator().manual_seed(0)
    n, hdim, vocab = 96, 32, 301
    h = torch.randn(n, hdim, generator=g)
    w = torch.randn(vocab, hdim, generator=g) * 0.3
    b = torch.randn(vocab, generator=g) if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    t[::9] = IGNORE
    tw = torch.rand(n, generator=g) + 0.2
    leaves = [x.to(torch.bfloat16).requires_grad_() for x in (h, w) + ((b,) if bias else ())]
    options = KernelOptions(impl=impl, memory_budget_bytes=20 * vocab * 4)  # tiles of 20 rows (fp32) or more
    loss = weighted_linear_cross_entropy(
        leaves[0], leaves[1], t, tw, bias=leaves[2] if bias else None, softcap=softcap, options=options
    )
    loss.backward()

    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    logits = ref_leaves[0] @ ref_leaves[1].T + (ref_leaves[2] if bias else 0)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ce = F.cross_entropy(logits, t, ignore_index=IGNORE, reduction="none")
    wv = tw.double() * (t != IGNORE)
    ref = (wv * ce).sum() / wv.sum()
    ref.backward()
    # bf16 rounds the logits' inputs and the logits gradient to 8 bits: 2e-2 relative, as the other bf16 tests
    assert abs(loss.item() - ref.item()) <= 2e-2 * abs(ref.item())
    for leaf, r in zip(leaves, ref_leaves, strict=True):
        err = (leaf.grad.double() - r.grad).abs().max() / r.grad.abs().max()
        assert err <= 2e-2, (leaf.shape, err)
    kinds = {kind for kind, _, _ in calls}
    if version >= (2, 10):
        assert "addmm" in kinds or impl == "torch"  # grad_W accumulated by the fp32-output GEMM
    elif version >= (2, 8):
        assert "addmm" not in kinds and ("mm" in kinds)
    else:
        assert not calls
    assert all(a == torch.bfloat16 and o == torch.float32 for _, a, o in calls)


def test_fused_path_never_runs_an_fp32_gemm_over_low_precision_data(torch_version):
    """On every version, each matmul the fused loop asks torch for takes bf16 operands (an fp32 GEMM over the bf16
    tile would be an SGEMM on a GPU, ~15x slower), however its result reaches fp32."""
    for version in ((2, 6), (2, 8), (2, 10)):
        torch_version(version)
        h = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(97, 16, dtype=torch.bfloat16, requires_grad=True)
        t = torch.randint(0, 97, (40,))
        options = KernelOptions(impl="fused", memory_budget_bytes=10 * 97 * 2)
        weighted_linear_cross_entropy(h, w, t, options=options).backward()
        operands = torch_version.operands
        assert len(operands) >= 9  # 4 tiles x (logits + grad_h + grad_W), at least
        assert set(operands) == {(torch.bfloat16, torch.bfloat16)}, (version, set(operands))


# ----------------------------------------------------------------------------------------------- hot-path hygiene

_SCALAR_SETITEM = re.compile(r"\w\[[^\]]+\]\s*=\s*(-?\s*(math\.inf|float\(|\d)|True\b|False\b|None\b)")


def test_no_python_scalar_is_written_into_a_tensor_in_ops():
    """``tensor[idx] = 0.0`` becomes an index_put of a 0-dim CPU tensor: on CUDA a blocking copy per call, invisible to
    a dispatch-level audit (the copy happens before dispatch). Scalars go through fill_/scatter_/masked_fill_."""
    offenders = []
    for path in sorted(OPS.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if _SCALAR_SETITEM.search(code):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_scalar_setitem_pattern_catches_what_it_should():
    for bad in ("tile[at] = -math.inf", "x[0] = 1.5", "ce[idx] = float('nan')", "m[i, j] = True"):
        assert _SCALAR_SETITEM.search(bad), bad
    for ok in ("lse[start:end] = tile_lse", "ce[idx] = torch.logsumexp(z, 1)", "tile[at] = p_t - 1", "d = x[0]"):
        assert not _SCALAR_SETITEM.search(ok), ok


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the parent run covers it")
def test_triton_is_not_imported_on_cpu():
    """The eager default on CPU never imports triton (a CPU install need not have it)."""
    code = (
        "import sys, torch; from trl_plw.ops import weighted_linear_cross_entropy as f; "
        "f(torch.randn(4, 3), torch.randn(7, 3), torch.randint(0, 7, (4,))); "
        "print('triton' in sys.modules, 'trl_plw.ops._epilogue_triton' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False"


@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_runs_inside_torch_compile(impl):
    """A model compiled with ``torch.compile`` (``TrainingArguments(torch_compile=True)``) calls the op from compiled
    code: dynamo breaks the graph at the op's one host read and runs it eagerly; loss and gradients are unchanged.
    ``aot_eager`` exercises dynamo and AOTAutograd without inductor's C++ compile."""
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(24, 8, generator=g), torch.randn(50, 8, generator=g)
    t, tw = torch.randint(0, 50, (24,), generator=g), torch.rand(24, generator=g)

    def step(h, w):
        return weighted_linear_cross_entropy(torch.tanh(h) * 2, w, t, tw, options=KernelOptions(impl=impl))

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager")):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)

"""The compiled kernels (csrc/) against the reference (actpass/_reference.py), and how they are loaded.

Each check is written once as ``_check_*(device)`` and run as a CPU test and a CUDA test (skipped without CUDA).
The compiled tests need the extension: the first one triggers the one-time JIT build (about a minute on 2 cores,
cached under TORCH_EXTENSIONS_DIR) and they skip, naming the reason, if it cannot be built.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

import actpass.ops  # noqa: F401  (defines torch.ops.actpass)
from actpass import _extension
from actpass import _reference as ref

ROOT = Path(__file__).resolve().parent.parent
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = [8, 4, 2]
# (shape, gend, groups): awkward sizes on purpose (odd last dims, sizes that are multiples of no block or chunk).
CASES = [
    ((2, 3, 5, 7), 2, -1),  # per (batch, head)
    ((2, 3, 5, 7), 2, 3),  # per head, shared by the batch
    ((6, 5, 9), 1, 3),  # folded bmm view [B*H, N, D], gend=1 groups=H
    ((4, 9, 13), 3, 13),  # channel groups, gend = ndim
    ((4, 9, 13), 3, -1),  # one element per group
    ((5, 3, 8), 3, 24),  # channel groups over an 8-aligned last dim
    ((6, 10), 2, 4),  # one group per element, folded: groups wrap around within a line
    ((6, 16), 2, 12),  # the same over an 8-aligned last dim
    ((11, 17), 1, -1),  # per row
    ((37,), 0, 1),  # per tensor, 1-d
    ((3, 1, 1), 3, 1),  # 1-element runs
    ((2, 1), 2, -1),  # 1-element groups
    ((3, 2, 1025), 2, -1),  # runs longer than a 1024 chunk
    ((6, 3, 701), 1, 3),  # long odd rows, folded
    ((130, 40), 2, 40),  # channel groups, many rows
    ((4, 2, 33, 8), 2, -1),  # 8-aligned last dim (the vectorised CUDA path)
    ((3, 4096 + 5), 1, -1),  # long rows (the CPU stats pass splits inside runs)
    # CPU columns path (short runs, expanded per-element parameters) and runs paths:
    ((40, 8, 4), 2, 8),  # channel sharing [rows, C/k, k], k = 4 (flat packing at every width)
    ((37, 16, 2), 2, 16),  # k = 2: flat at 8/4 bits, padded lines at 2 bits
    ((9, 5, 3), 2, 5),  # k = 3: padded lines at 4 and 2 bits
    ((3, 5, 2, 70), 3, 2),  # 70-element runs folded into 2 groups, short period: columns path with long runs
    ((2, 70001), 1, -1),  # runs longer than the one-visit limit (two passes, statistics split inside runs)
    ((5, 3, 33), 2, -1),  # one visit per run, 99 elements: vector body plus a scalar tail
]


def _kernels(device: str) -> None:
    """Skip unless the compiled kernel for ``device`` is registered (builds the extension on first use)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _extension.load_once()
    if not _extension.has_kernel(device):
        pytest.skip(f"no compiled {device} kernel: {_extension.status()['reason']}")


def _same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-exact (NaN equals NaN, -0.0 equals 0.0), same dtype and shape."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def _kernel_quantize(x, bits, gend, groups, stochastic=False, running=None, decay=0.9):
    return torch.ops.actpass.quantize(x, bits, gend, groups, stochastic, running, decay)


def _compare(x, bits, gend, groups, running=None, decay=0.9) -> None:
    """Kernel == reference for quantize (codes, scale, lo, running update) and dequantize (of the same codes)."""
    r_kernel = None if running is None else running.clone()
    r_ref = None if running is None else running.clone()
    got = _kernel_quantize(x, bits, gend, groups, False, r_kernel, decay)
    want = ref.quantize(x, bits, gend, groups, False, r_ref, decay)
    for a, b in zip(got, want, strict=True):
        _same(a, b)
    if running is not None:
        _same(r_kernel, r_ref)
    q, s, lo = want
    for dtype in {x.dtype, torch.float32}:
        _same(
            torch.ops.actpass.dequantize(q, s, lo, bits, gend, x.shape[-1], dtype),
            ref.dequantize(q, s, lo, bits, gend, x.shape[-1], dtype),
        )


# ---------------------------------------------------------------------------------------------------------------------
# Kernel == reference, bit for bit (nearest rounding).


def _check_matches_reference(device: str) -> None:
    _kernels(device)
    gen = torch.Generator().manual_seed(0)
    for shape, gend, groups in CASES:
        base = torch.randn(shape, generator=gen) * 3 + 1
        for dtype in DTYPES:
            x = base.to(device=device, dtype=dtype)
            for bits in BITS:
                _compare(x, bits, gend, groups)


def _check_non_contiguous(device: str) -> None:
    _kernels(device)
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(6, 10, 9, generator=gen).to(device)
    views = [
        (base.transpose(1, 2), 2, -1),  # [6, 9, 10] transposed
        (base[:, ::2, 1:8], 1, 3),  # strided slice, odd last dim
        (base.permute(2, 0, 1), 3, 10),  # channel groups over a permuted view
        (base.expand(2, 6, 10, 9), 2, 6),  # expanded (zero stride)
    ]
    for x, gend, groups in views:
        assert not x.is_contiguous()
        for dtype in DTYPES:
            for bits in BITS:
                _compare(x.to(dtype), bits, gend, groups)


def _check_running(device: str) -> None:
    _kernels(device)
    gen = torch.Generator().manual_seed(2)
    for shape, gend, groups in [((4, 3, 5, 7), 2, 3), ((8, 6, 13), 3, 13), ((3, 11), 1, -1)]:
        g = ref.num_groups(shape, gend, groups)
        for dtype in DTYPES:
            for bits in BITS:
                running = torch.full((2, g), float("nan"), device=device)
                running[:, : g // 2] = torch.tensor([[-1.0], [1.0]], device=device)  # some groups seen, some not
                for step in range(3):
                    x = (torch.randn(shape, generator=gen) * (step + 1)).to(device=device, dtype=dtype)
                    if step > 0:  # a non-finite group must not be folded into the running range
                        x.view(-1)[step] = float("nan") if step == 1 else float("-inf")
                    r_ref = running.clone()
                    _compare(x, bits, gend, groups, running, decay=0.8)
                    ref.quantize(x, bits, gend, groups, False, r_ref, 0.8)
                    running = r_ref  # continue from the reference's state
    # A non-contiguous running buffer (a transposed view) is updated in place like the reference's.
    x = torch.randn(4, 6, 5, generator=gen).to(device)
    buf_k = torch.full((6, 2), float("nan"), device=device)
    buf_r = buf_k.clone()
    got = _kernel_quantize(x, 8, 2, 6, False, buf_k.t(), 0.9)
    want = ref.quantize(x, 8, 2, 6, False, buf_r.t(), 0.9)
    for a, b in zip(got, want, strict=True):
        _same(a, b)
    _same(buf_k, buf_r)
    assert not torch.isnan(buf_k).any()


def _check_special_values(device: str) -> None:
    _kernels(device)
    nan, inf = float("nan"), float("inf")
    rows = torch.tensor(
        [
            [0.5, nan, 1.0, 2.0, -3.0, 4.0, 5.0, 6.0, 7.0],  # NaN group
            [0.5, inf, 1.0, 2.0, -3.0, 4.0, 5.0, 6.0, 7.0],  # +Inf
            [0.5, -inf, 1.0, 2.0, -3.0, 4.0, 5.0, 6.0, 7.0],  # -Inf
            [-inf, inf, 1.0, 2.0, -3.0, 4.0, 5.0, 6.0, 7.0],  # both
            [nan] * 9,  # all NaN
            [inf] * 9,  # all +Inf (scale NaN)
            [2.5] * 9,  # constant
            [0.0, -0.0, 0.0, -0.0, 0.0, 0.0, -0.0, 0.0, 0.0],  # signed zeros
            [1e-39, 2e-39, -1e-39, 0.0, 3e-39, 1e-40, -2e-39, 5e-39, 4e-39],  # fp32 subnormals
            [3e38, -3e38, 1.0, 0.0, 2e38, -1e38, 5.0, 3e38, -3e38],  # hi - lo overflows to Inf
            [1e-8, 1.00000001e-8, 1e-8, 1e-8, 1e-8, 1e-8, 1e-8, 1e-8, 1e-8],  # scale underflows
            [6e4, -6e4, 1.0, 0.0, 65504.0, -65504.0, 0.5, 0.25, 3.0],  # fp16 range edge
        ]
    )
    for dtype in DTYPES:
        x = rows.to(device=device, dtype=dtype)
        for bits in BITS:
            _compare(x, bits, 1, -1)  # one group per row
            _compare(x, bits, 2, -1)  # one group per element
            _compare(x.t().contiguous(), bits, 2, rows.shape[0])  # the same groups as channel groups
            _compare(x.t().contiguous().view(9, 6, 2), bits, 2, 6)  # channel sharing: 2 channels per group
            running = torch.full((2, rows.shape[0]), float("nan"), device=device)
            _compare(x, bits, 1, -1, running)


def _check_empty(device: str) -> None:
    _kernels(device)
    for shape, gend, groups in [((0, 5), 1, -1), ((3, 0), 1, -1), ((2, 0, 4), 2, -1), ((0,), 0, -1), ((4, 0), 2, 3)]:
        for dtype in DTYPES:
            for bits in BITS:
                x = torch.empty(shape, device=device, dtype=dtype)
                g = ref.num_groups(shape, gend, groups)
                running = torch.full((2, g), 1.5, device=device)
                _compare(x, bits, gend, groups, running)
                _kernel_quantize(x, bits, gend, groups, False, running)
                assert (running == 1.5).all()  # nothing seen: the running range is left alone


def _check_errors(device: str) -> None:
    _kernels(device)
    x = torch.randn(4, 6, device=device)
    q, s, lo = _kernel_quantize(x, 4, 1, -1)
    bad_quantize = [
        ((x, 3, 1, -1), "bits must be one of"),
        ((x.double(), 8, 1, -1), "unsupported dtype"),
        ((x, 8, 3, -1), "gend=3 out of range"),
        ((x[0, 0], 8, 0, 1), "0-d"),
        ((x, 8, 1, 0), "groups must be -1 or positive"),
        ((x, 8, 1, 3), "multiple"),  # 4 runs cannot fold into 3 groups
    ]
    for args, match in bad_quantize:
        with pytest.raises(RuntimeError, match=match):
            _kernel_quantize(*args)
    with pytest.raises(RuntimeError, match="running must have shape"):
        _kernel_quantize(x, 8, 1, -1, False, torch.zeros(2, 3, device=device))
    with pytest.raises(RuntimeError, match="running must be float32"):
        _kernel_quantize(x, 8, 1, -1, False, torch.zeros(2, 4, device=device, dtype=torch.float64))
    bad_dequantize = [
        ((q.float(), s, lo, 4, 1, 6, torch.float32), "q must be uint8"),
        ((q, s[:2], lo, 4, 1, 6, torch.float32), "groups but lo has"),
        ((q, s, lo, 4, 1, 9, torch.float32), "last_dim=9 does not match"),
        ((q, s, lo, 4, 1, 6, torch.int32), "unsupported output dtype"),
    ]
    for args, match in bad_dequantize:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.actpass.dequantize(*args)


# ---------------------------------------------------------------------------------------------------------------------
# Stochastic rounding: unbiased, reproducible under torch.manual_seed, independent of the thread count.


def _check_stochastic_unbiased(device: str) -> None:
    _kernels(device)
    n = 200_000
    for bits in BITS:
        levels = 2**bits - 1
        for frac in (0.3, 0.75):
            target = min(levels - 1, 2) + frac  # a code value between two levels
            x = torch.full((1, n), target, device=device)
            x[0, 0], x[0, 1] = 0.0, float(levels)  # fixes the range: scale 1, lo 0, so v == x
            for dtype in (torch.float32, torch.bfloat16):
                xd = x.to(dtype)
                v = float(xd[0, 2])
                q, s, lo = _kernel_quantize(xd, bits, 1, -1, stochastic=True)
                assert float(s) == 1.0 and float(lo) == 0.0
                y = torch.ops.actpass.dequantize(q, s, lo, bits, 1, n, torch.float32)[0, 2:]
                assert set(y.unique().tolist()) <= {float(int(v)), float(int(v) + 1)}
                # Bernoulli(frac) per element: standard error sqrt(frac (1 - frac) / n) <= 0.0012; allow 5 of them.
                assert abs(y.mean().item() - v) < 5 * (frac * (1 - frac) / n) ** 0.5, (bits, frac, dtype)


def _check_stochastic_reproducible(device: str) -> None:
    _kernels(device)
    x = torch.randn(3, 5, 1001, device=device)
    for bits in BITS:
        torch.manual_seed(7)
        a = _kernel_quantize(x, bits, 2, -1, stochastic=True)[0]
        b = _kernel_quantize(x, bits, 2, -1, stochastic=True)[0]
        torch.manual_seed(7)
        c = _kernel_quantize(x, bits, 2, -1, stochastic=True)[0]
        assert torch.equal(a, c)
        assert not torch.equal(a, b)  # the generator advanced
        nearest = _kernel_quantize(x, bits, 2, -1)[0]
        assert not torch.equal(a, nearest)


def _check_opcheck(device: str) -> None:
    _kernels(device)
    x = torch.randn(2, 3, 5, 7, device=device)
    for bits in BITS:
        torch.library.opcheck(torch.ops.actpass.quantize.default, (x, bits, 2, -1, False, None, 0.9))
        running = torch.zeros(2, 3, device=device)
        torch.library.opcheck(torch.ops.actpass.quantize.default, (x.bfloat16(), bits, 2, 3, False, running, 0.9))
        q, s, lo = torch.ops.actpass.quantize(x, bits, 2, -1, False, None, 0.9)
        for dtype in DTYPES:
            torch.library.opcheck(torch.ops.actpass.dequantize.default, (q, s, lo, bits, 2, 7, dtype))


CHECKS = [
    _check_matches_reference,
    _check_non_contiguous,
    _check_running,
    _check_special_values,
    _check_empty,
    _check_errors,
    _check_stochastic_unbiased,
    _check_stochastic_reproducible,
    _check_opcheck,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__.removeprefix("_check_"))
def test_cpu(check):
    check("cpu")


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__.removeprefix("_check_"))
def test_cuda(check):
    check("cuda")


# ---------------------------------------------------------------------------------------------------------------------
# CPU specifics: both compiled copies (baseline ISA and AVX2+F16C), thread-count independence.


@pytest.mark.parametrize("check", [_check_matches_reference, _check_special_values, _check_running])
def test_cpu_baseline_isa_copy(check, monkeypatch):
    monkeypatch.setenv("ACTPASS_CPU_ISA", "default")  # read on every call by the CPU kernels
    check("cpu")


def test_cpu_stochastic_independent_of_thread_count():
    _kernels("cpu")
    x = torch.randn(64, 3, 257)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            torch.manual_seed(11)
            results.append(_kernel_quantize(x, 4, 2, -1, stochastic=True)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_kernel_is_what_the_op_dispatches_to():
    _kernels("cpu")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("actpass::quantize", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("actpass::dequantize", "CPU")
    status = _extension.status()
    assert status["loaded"] and status["source"] in ("prebuilt", "jit") and "cpu" in status["devices"]
    assert _extension.has_kernel("cpu") and not _extension.has_kernel("meta")


# ---------------------------------------------------------------------------------------------------------------------
# Loading: lean import, fallbacks.


def _run_python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )


def test_import_is_lean(tmp_path):
    """Importing actpass never initialises CUDA, never builds, never loads the extension."""
    code = (
        "import sys, os, actpass, actpass.ops, torch\n"
        "from actpass import _extension\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert not _extension.status()['attempted']\n"
        "assert 'actpass._C' not in sys.modules\n"
        "d = os.environ['TORCH_EXTENSIONS_DIR']\n"
        "assert not os.path.exists(d) or not os.listdir(d), os.listdir(d)\n"
    )
    proc = _run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_reference_mode_disables_kernels(tmp_path):
    code = (
        "import torch, actpass.ops\n"
        "from actpass import _extension\n"
        "q, s, lo = torch.ops.actpass.quantize(torch.randn(4, 8), 8, 1, -1, False, None, 0.9)\n"
        "st = _extension.status()\n"
        "assert not st['loaded'] and st['reason'] == 'ACTPASS_KERNELS=reference', st\n"
        "assert not _extension.has_kernel('cpu')\n"
        "assert not torch._C._dispatch_has_kernel_for_dispatch_key('actpass::quantize', 'CPU')\n"
    )
    proc = _run_python(code, tmp_path, ACTPASS_KERNELS="reference")
    assert proc.returncode == 0, proc.stderr
    assert "compiled kernels unavailable" not in proc.stderr


# A build that cannot succeed: no prebuilt module importable and a compiler that does not exist.
_BROKEN = {"CXX": "/nonexistent/c++", "ACTPASS_KERNELS": "auto"}
_FALLBACK_CODE = (
    "import warnings, torch, actpass.ops\n"
    "from actpass import _extension, _reference as ref\n"
    "if _extension.load_once():\n"
    "    print('PREBUILT'); raise SystemExit(0)\n"
    "x = torch.randn(4, 8)\n"
    "with warnings.catch_warnings(record=True) as w:\n"
    "    warnings.simplefilter('always')\n"
    "    a = torch.ops.actpass.quantize(x, 8, 1, -1, False, None, 0.9)\n"
    "    torch.ops.actpass.quantize(x, 8, 1, -1, False, None, 0.9)\n"
    "assert not w, [str(m.message) for m in w]  # warned once, at the first load, not again\n"
    "assert all(torch.equal(u, v) for u, v in zip(a, ref.quantize(x, 8, 1, -1, False, None, 0.9)))\n"
    "st = _extension.status()\n"
    "assert not st['loaded'] and 'jit' in st['reason'], st\n"
)


def test_failed_build_warns_once_and_falls_back(tmp_path):
    proc = _run_python(_FALLBACK_CODE, tmp_path, **_BROKEN)
    assert proc.returncode == 0, proc.stderr
    if "PREBUILT" in proc.stdout:
        pytest.skip("a prebuilt actpass._C is importable: the JIT fallback path is not reached")
    assert proc.stderr.count("compiled kernels unavailable") == 1, proc.stderr


def test_compiled_mode_makes_a_failed_build_an_error(tmp_path):
    code = (
        "import torch, actpass.ops\n"
        "try:\n"
        "    torch.ops.actpass.quantize(torch.randn(4, 8), 8, 1, -1, False, None, 0.9)\n"
        "except RuntimeError as e:\n"
        "    assert 'ACTPASS_KERNELS=compiled' in str(e), e; print('RAISED')\n"
    )
    proc = _run_python(code, tmp_path, **{**_BROKEN, "ACTPASS_KERNELS": "compiled"})
    assert proc.returncode == 0, proc.stderr
    if "RAISED" not in proc.stdout:
        pytest.skip("a prebuilt actpass._C is importable: the build is not reached")


# ---------------------------------------------------------------------------------------------------------------------
# The CUDA sources compile here with nvcc (no GPU needed).


@pytest.mark.slow
def test_cuda_source_compiles_with_nvcc(tmp_path):
    """``nvcc -c csrc/quantize_cuda.cu`` for sm_90, as the JIT build would on a GPU machine.

    A CPU-only torch ships the CUDA headers but not the generated ``c10/cuda/impl/cuda_cmake_macros.h``;
    ``C10_CUDA_NO_CMAKE_CONFIGURE_FILE`` skips it (it only defines Windows export macros).
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    from torch.utils import cpp_extension

    _, nvcc_flags, _ = _extension.compiler_flags()
    cmd = [
        nvcc,
        "-c",
        str(ROOT / "csrc" / "quantize_cuda.cu"),
        "-o",
        str(tmp_path / "quantize_cuda.o"),
        "-std=c++17",
        "-gencode=arch=compute_90,code=sm_90",
        "-Xcompiler",
        "-fPIC",
        "-Xcompiler",
        "-Wno-c++20-extensions",
        # torch >= 2.12 headers use C++20 bit-field initialisers; torch 2.11 (the GPU machine) builds as C++17.
        "-diag-suppress=3306",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{ROOT / 'csrc'}",
        f"-I{sysconfig.get_paths()['include']}",
        *[f"-I{p}" for p in cpp_extension.include_paths()],
        *cpp_extension.COMMON_NVCC_FLAGS,
        *nvcc_flags,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "quantize_cuda.o").stat().st_size > 0
    print(f"nvcc compile: {time.perf_counter() - start:.1f} s")


def test_gpu_bench_step_without_cuda_exits_with_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the script would run the benchmark")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_bench_step.py")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "CUDA is not available" in proc.stderr


@pytest.mark.slow
def test_failed_cuda_build_keeps_the_cpu_kernels(tmp_path):
    """When CUDA looks available but the CUDA build fails, the CPU kernels still load and one warning says why.

    Simulated on any machine: ``_cuda_build_reason`` is patched to claim CUDA, and CUDA_HOME points nowhere. The
    CPU-only fallback build (``actpass_C_cpu_<key>``) is cached in torch's default extensions directory after the
    first run.
    """
    code = (
        "import warnings, torch, actpass.ops\n"
        "from actpass import _extension as e\n"
        "e._cuda_build_reason = lambda: None\n"
        "e._load_prebuilt = lambda: (_ for _ in ()).throw(ImportError('prebuilt module ignored by this test'))\n"
        "import torch.utils.cpp_extension as ce\n"
        "ce.CUDA_HOME = '/nonexistent/cuda'\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert e.load_once()\n"
        "msgs = [str(m.message) for m in w if 'actpass' in str(m.message)]\n"
        "assert len(msgs) == 1 and 'CUDA kernels failed to build' in msgs[0], msgs\n"
        "st = e.status()\n"
        "assert st['source'] == 'jit' and st['devices'] == ['cpu'] and st['cuda_error'], st\n"
        "assert e.has_kernel('cpu') and not e.has_kernel('cuda')\n"
        "print('OK')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]

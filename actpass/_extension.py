"""Loading the compiled kernels from ``csrc/``.

Importing actpass never compiles anything, never imports a compiled module and never initialises CUDA. The first
call of an actpass op calls :func:`load_once`, which tries, in order:

1. the prebuilt module ``actpass._C`` (``ACTPASS_BUILD_EXT=1 pip install --no-build-isolation -e .``);
2. a JIT build of ``csrc/`` with ``torch.utils.cpp_extension.load(name="actpass_C")``: the C++ CPU kernels always,
   the CUDA kernels too when ``torch.cuda.is_available()``, torch has a CUDA version and ``CUDA_HOME`` is found. It
   needs a C++ compiler and ninja, takes about a minute on 2 cores, and is cached under torch's extensions directory
   (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), so it happens once per machine.

If both fail, a warning naming the reason is issued once and every op keeps using the pure-PyTorch reference
(``_reference.py``), which gives the same results (bit for bit with nearest rounding).

The environment variable ``ACTPASS_KERNELS`` selects the behaviour:

* ``auto`` (default): as above.
* ``reference``: never load compiled kernels; the reference serves every device.
* ``compiled``: a failure to load the compiled kernels raises ``RuntimeError`` instead of falling back.

:func:`status` reports what was loaded, from where, and why not.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ENV_VAR = "ACTPASS_KERNELS"
JIT_NAME = "actpass_C"
_MODES = ("auto", "reference", "compiled")
_CSRC = Path(__file__).resolve().parent.parent / "csrc"
CPU_SOURCES = ("quantize_cpu.cpp",)
CUDA_SOURCES = ("quantize_cuda.cu",)

_lock = threading.Lock()
_attempted = False
_loaded = False
_state: dict[str, Any] = {
    "mode": None,  # the ACTPASS_KERNELS mode the load ran under
    "loaded": False,  # whether compiled kernels are registered
    "source": None,  # "prebuilt" (actpass._C) or "jit" (torch.utils.cpp_extension.load)
    "path": None,  # the shared library or build directory
    "devices": [],  # device types with a registered compiled kernel, e.g. ["cpu"]
    "reason": None,  # why compiled kernels are not used (None when they are)
    "attempts": [],  # one line per thing tried, with its error
    "build_seconds": None,  # time spent in the JIT build/load (None when not tried)
    "cuda_error": None,  # why the CUDA kernels did not build while the CPU ones did (JIT only)
}


def compiler_flags() -> tuple[list[str], list[str], list[str]]:
    """Flags for the C++ compiler, nvcc and the linker, shared by the JIT build and ``setup.py``.

    Returns:
        ``(cxx_flags, nvcc_flags, ld_flags)``.
    """
    # NOTE: no -march flags and no FMA contraction: the kernels must match _reference.py bit for bit on any host.
    cxx = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
    ld: list[str] = []
    if sys.platform.startswith("linux"):
        # at::parallel_for only runs in parallel when the extension itself is compiled with OpenMP; at run time the
        # libgomp.so.1 that torch already loaded is reused (same soname).
        cxx.append("-fopenmp")
        ld.append("-fopenmp")
    nvcc = ["-O3", "--fmad=false", "-Xcompiler", "-ffp-contract=off"]
    return cxx, nvcc, ld


def _mode() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        warnings.warn(
            f"actpass: ignoring {ENV_VAR}={mode!r} (expected one of {', '.join(_MODES)}); using 'auto'",
            RuntimeWarning,
            stacklevel=3,
        )
        mode = "auto"
    return mode


def _registered_devices() -> list[str]:
    import torch

    devices = []
    for key, device in (("CPU", "cpu"), ("CUDA", "cuda")):
        if all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"actpass::{op}", key) for op in ("quantize", "dequantize")
        ):
            devices.append(device)
    return devices


def _cuda_build_reason() -> str | None:
    """None when the CUDA kernels should be built, else why not."""
    import torch

    if torch.version.cuda is None:
        return "torch has no CUDA"
    if not torch.cuda.is_available():  # does not initialise CUDA
        return "no CUDA device available"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not Path(CUDA_HOME).exists():
        return "CUDA_HOME not found (no nvcc)"
    return None


def _load_prebuilt() -> str:
    module = importlib.import_module("actpass._C")
    return str(getattr(module, "__file__", "actpass._C"))


def _build(name: str, sources: list[Path], with_cuda: bool) -> str:
    from torch.utils import cpp_extension

    cxx, nvcc, ld = compiler_flags()
    logger.info("actpass: compiling %s from %s (one-time, cached under torch's extensions dir)", name, _CSRC)
    cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=cxx,
        extra_cuda_cflags=nvcc,
        extra_ldflags=ld,
        extra_include_paths=[str(_CSRC)],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )
    try:
        return cpp_extension._get_build_directory(name, False)
    except Exception:  # private helper: the path is only informative
        return "torch extensions dir"


def _load_jit() -> str:
    cpu_sources = [_CSRC / s for s in CPU_SOURCES]
    missing = [str(s) for s in cpu_sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"kernel sources not found: {', '.join(missing)} (a non-editable install?)")
    cuda_reason = _cuda_build_reason()
    if cuda_reason is not None:
        logger.info("actpass: building CPU kernels only: %s", cuda_reason)
        return _build(JIT_NAME, cpu_sources, with_cuda=False)
    try:
        return _build(JIT_NAME, cpu_sources + [_CSRC / s for s in CUDA_SOURCES], with_cuda=True)
    except Exception as e:
        # Keep the CPU kernels when only the CUDA build fails (CUDA tensors then use the reference; _attempt warns).
        _state["cuda_error"] = f"jit (CPU+CUDA): {_describe(e)}"
        return _build(f"{JIT_NAME}_cpu", cpu_sources, with_cuda=False)


def _describe(e: BaseException) -> str:
    """One line for an exception. For a failed build: the first line of the log that says what went wrong (compiler
    ``error:``, ``not found``...), not the long command lines; the full log is in torch's extensions directory."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    head = lines[0] if lines else ""
    if ": [1/" in head:  # "Error building extension 'x': [1/2] c++ ... (the command)"
        head = head.split(": [1/", 1)[0]
    text = f"{type(e).__name__}: {head[:160]}"
    markers = ("error:", "error ", "not found", "no such file", "cannot", "undefined")
    culprit = next((ln for ln in lines[1:] if any(m in ln.lower() for m in markers) and len(ln) < 300), None)
    if culprit:
        text += f": {culprit[:200]}"
    return text


def _attempt() -> None:
    _state["mode"] = mode = _mode()
    if mode == "reference":
        _state["reason"] = f"{ENV_VAR}=reference"
        return
    errors = []
    for source, fn in (("prebuilt", _load_prebuilt), ("jit", _load_jit)):
        start = time.perf_counter()
        try:
            path = fn()
        except Exception as e:  # anything at all: fall back to the reference
            errors.append(f"{source}: {_describe(e)}")
            continue
        finally:
            if source == "jit":
                _state["build_seconds"] = round(time.perf_counter() - start, 1)
        devices = _registered_devices()
        if not devices:
            errors.append(f"{source}: loaded {path} but it registered no actpass kernel")
            continue
        _state.update(loaded=True, source=source, path=path, devices=devices, reason=None)
        _state["attempts"] = errors + ([_state["cuda_error"]] if _state["cuda_error"] else [])
        logger.info("actpass: compiled kernels for %s loaded (%s: %s)", ", ".join(devices), source, path)
        if _state["cuda_error"] and mode != "compiled":
            warnings.warn(
                f"actpass: the CUDA kernels failed to build, CUDA tensors use the PyTorch reference "
                f"({_state['cuda_error']})",
                RuntimeWarning,
                stacklevel=4,
            )
        return
    if _state["cuda_error"]:
        errors.append(_state["cuda_error"])
    _state["attempts"] = errors
    _state["reason"] = "; ".join(errors)
    if mode != "compiled":  # compiled: load_once raises instead
        warnings.warn(
            f"actpass: compiled kernels unavailable, using the PyTorch reference ({_state['reason']})",
            RuntimeWarning,
            stacklevel=4,
        )


def load_once() -> bool:
    """Try to load the compiled kernels once; True if they are loaded.

    Cheap after the first call. Never raises unless ``ACTPASS_KERNELS=compiled``.

    Example:
        >>> from actpass import _extension
        >>> _extension.load_once() in (True, False)
        True
    """
    global _attempted, _loaded
    if not _attempted:
        with _lock:
            if not _attempted:
                try:
                    _attempt()
                except Exception as e:  # a bug in the loader itself must not break the ops either
                    _state["reason"] = f"loader failed: {_describe(e)}"
                    message = f"actpass: {_state['reason']}; using the PyTorch reference"
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
                finally:
                    _attempted = True
                    _loaded = bool(_state["loaded"])
    if _state["mode"] == "compiled" and (not _loaded or _state["cuda_error"]):
        reason = _state["reason"] or _state["cuda_error"]
        raise RuntimeError(
            f"actpass: compiled kernels unavailable ({reason}) and {ENV_VAR}=compiled forbids the fallback"
        )
    return _loaded


def has_kernel(device_type: str) -> bool:
    """Whether a compiled kernel is registered for ``device_type`` (``"cpu"``, ``"cuda"``)."""
    return _loaded and device_type in _state["devices"]


def status() -> dict[str, Any]:
    """What was loaded, from where, and why not (a copy; ``loaded`` stays False until :func:`load_once` ran).

    Returns:
        dict with keys ``attempted, mode, loaded, source, path, devices, reason, attempts, build_seconds,
        cuda_error``.
    """
    return {"attempted": _attempted, **{k: (list(v) if isinstance(v, list) else v) for k, v in _state.items()}}

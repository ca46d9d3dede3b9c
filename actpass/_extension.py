"""Loading the compiled kernels from ``csrc/``.

Importing actpass never compiles anything, never imports a compiled module and never initialises CUDA. The first
call of an actpass op calls :func:`load_once`, which tries, in order:

1. the prebuilt module ``actpass._C`` (``ACTPASS_BUILD_EXT=1 pip install --no-build-isolation -e .``);
2. a JIT build of ``csrc/`` with ``torch.utils.cpp_extension.load``: the C++ CPU kernels always, the CUDA kernels
   too when ``torch.cuda.is_available()``, torch has a CUDA version and ``CUDA_HOME`` is found. It needs a C++
   compiler and ninja and takes about a minute on 2 cores. The result is cached under torch's extensions directory
   (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) by a name that holds a hash of everything that
   changes the binary (:func:`cache_key`: the sources' contents, compiler flags, torch, CUDA and Python versions), so
   two checkouts or virtual environments with the same sources share one build and never rebuild each other's.
   A cached build is loaded directly, without running ninja or printing anything; a build that actually runs says so
   in a WARNING log line (and every ~15 s while it lasts), since a silent minute-long stall looks like a hang.

If both fail, a warning naming the reason is issued once and every op keeps using the pure-PyTorch reference
(``_reference.py``), which gives the same results (bit for bit with nearest rounding).

The environment variable ``ACTPASS_KERNELS`` selects the behaviour:

* ``auto`` (default): as above.
* ``reference``: never load compiled kernels; the reference serves every device.
* ``compiled``: a failure to load the compiled kernels raises ``RuntimeError`` instead of falling back.

:func:`status` reports what was loaded, from where, and why not.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ENV_VAR = "ACTPASS_KERNELS"
JIT_NAME = "actpass_C"
_MODES = ("auto", "reference", "compiled")
_CSRC = Path(__file__).resolve().parent.parent / "csrc"
CPU_SOURCES = ("quantize_cpu.cpp",)
CUDA_SOURCES = ("quantize_cuda.cu",)
_HEADER_SUFFIXES = (".h", ".hpp", ".cuh")
PROGRESS_SECONDS = 15.0  # a slow build logs a line this often

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
    "built": None,  # True: this process compiled the kernels; False: a cached build was loaded; None: no JIT
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


def cache_key(sources: list[Path], with_cuda: bool) -> str:
    """A hash of everything that changes the compiled binary: 16 hex digits, part of the JIT extension's name.

    It covers the contents (not the paths) of ``sources`` and of every header in ``csrc/``, the compiler flags, the
    compilers picked by ``CXX``/``CC``, torch's version and git revision, its CUDA version and ``CUDA_HOME`` and
    ``TORCH_CUDA_ARCH_LIST`` for a CUDA build, the Python version and ABI, and the platform. Two checkouts or
    virtual environments with the same sources and toolchain get the same key, hence one shared cached build;
    anything that would change the binary gets a new key, hence a new build instead of a rebuild in place.

    Args:
        sources: the files compiled.
        with_cuda: whether the CUDA kernels are part of the build.

    Returns:
        16 hex digits.

    Example:
        >>> len(cache_key([_CSRC / "quantize_cpu.cpp"], with_cuda=False))
        16
    """
    import torch

    h = hashlib.sha256()

    def add(label: str, value: object) -> None:
        h.update(f"{label}={value!r}\n".encode())

    files = {Path(s).name: Path(s) for s in sources}
    if _CSRC.is_dir():
        files.update({p.name: p for p in _CSRC.iterdir() if p.suffix in _HEADER_SUFFIXES})
    for name in sorted(files):
        add("file", name)
        h.update(files[name].read_bytes())
    add("flags", compiler_flags())
    add("with_cuda", with_cuda)
    add("compilers", (os.environ.get("CXX"), os.environ.get("CC")))
    add("torch", (torch.__version__, getattr(torch.version, "git_version", None), torch.version.cuda))
    add("cxx11_abi", bool(torch._C._GLIBCXX_USE_CXX11_ABI))
    if with_cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        add("cuda", (CUDA_HOME, os.environ.get("TORCH_CUDA_ARCH_LIST"), os.environ.get("NVCC_FLAGS")))
    add("python", (sys.implementation.name, sys.version_info[:2], getattr(sys, "abiflags", "")))
    add("platform", (sys.platform, platform.machine()))
    return h.hexdigest()[:16]


def jit_name(sources: list[Path], with_cuda: bool) -> str:
    """The JIT extension's name, e.g. ``actpass_C_cpu_0123456789abcdef``: its build directory and library name."""
    return f"{JIT_NAME}_{'cuda' if with_cuda else 'cpu'}_{cache_key(sources, with_cuda)}"


def _cached_library(name: str) -> Path | None:
    """The library of a finished build of ``name``, or None if there is none (or one is being built right now)."""
    from torch.utils import cpp_extension

    try:
        directory = Path(cpp_extension._get_build_directory(name, False))
    except Exception:  # private helper: without it, always go through cpp_extension.load
        return None
    library = directory / f"{name}{cpp_extension.LIB_EXT}"
    # torch's FileBaton holds `lock` while a build runs: the library may then be incomplete.
    if library.is_file() and not (directory / "lock").exists():
        return library
    return None


@contextmanager
def _progress(what: str, every: float | None = None) -> Iterator[Callable[[], float]]:
    """Log a line every ``every`` seconds (default :data:`PROGRESS_SECONDS`) until the block ends."""
    every = PROGRESS_SECONDS if every is None else every
    start = time.perf_counter()
    done = threading.Event()

    def tick() -> None:
        while not done.wait(every):
            logger.warning("actpass: still %s (%.0f s so far)", what, time.perf_counter() - start)

    thread = threading.Thread(target=tick, name="actpass-build-progress", daemon=True)
    thread.start()
    try:
        yield lambda: time.perf_counter() - start
    finally:
        done.set()
        thread.join()


def _build(sources: list[Path], with_cuda: bool) -> str:
    """Load the cached build for these sources, or build it first; returns the library's path."""
    import torch
    from torch.utils import cpp_extension

    name = jit_name(sources, with_cuda)
    library = _cached_library(name)
    if library is not None:
        try:
            torch.ops.load_library(str(library))
        except OSError as e:  # a truncated or foreign file: build it again
            logger.warning("actpass: cached kernels %s do not load (%s); building them again", library, e)
            library.unlink(missing_ok=True)
        else:
            _state["built"] = False
            logger.info("actpass: loaded cached kernels %s", library)
            return str(library)
    cxx, nvcc, ld = compiler_flags()
    kind = "CPU and CUDA" if with_cuda else "CPU"
    # NOTE: WARNING, not INFO: with no logging configured only WARNING and above reach stderr, and a build stalls the
    # first training step for 30-60 s (measured 37 s on 2 cores), which looks like a hang. It happens once per
    # toolchain and kernel version; `logging.getLogger("actpass").setLevel(logging.ERROR)` silences it.
    logger.warning("actpass: compiling the %s kernels (one-time, about a minute; cached as %s)", kind, name)
    with _progress(f"compiling the {kind} kernels") as elapsed:
        path = cpp_extension.load(
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
        seconds = elapsed()
    _state["built"] = True
    logger.warning("actpass: compiled the %s kernels in %.0f s: %s", kind, seconds, path)
    return str(path)


def _load_jit() -> str:
    cpu_sources = [_CSRC / s for s in CPU_SOURCES]
    missing = [str(s) for s in cpu_sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"kernel sources not found: {', '.join(missing)} (a non-editable install?)")
    cuda_reason = _cuda_build_reason()
    if cuda_reason is not None:
        logger.info("actpass: CPU kernels only: %s", cuda_reason)
        return _build(cpu_sources, with_cuda=False)
    try:
        return _build(cpu_sources + [_CSRC / s for s in CUDA_SOURCES], with_cuda=True)
    except Exception as e:
        # Keep the CPU kernels when only the CUDA build fails (CUDA tensors then use the reference; _attempt warns).
        _state["cuda_error"] = f"jit (CPU+CUDA): {_describe(e)}"
        return _build(cpu_sources, with_cuda=False)


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
        dict with keys ``attempted, mode, loaded, source, path, devices, reason, attempts, build_seconds, built,
        cuda_error``.
    """
    return {"attempted": _attempted, **{k: (list(v) if isinstance(v, list) else v) for k, v in _state.items()}}

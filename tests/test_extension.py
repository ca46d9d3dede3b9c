"""The JIT kernel cache (actpass/_extension.py): what its key covers, and that installs never rebuild each other.

The end-to-end test copies the package into two temporary "checkouts" that share one extensions directory, as two
clones or two virtual environments on one machine do. It builds the kernels at most once per machine (the first
time the current sources are seen; cached afterwards under TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from actpass import _extension

ROOT = Path(__file__).resolve().parent.parent


def _copy_csrc(dst: Path) -> Path:
    shutil.copytree(ROOT / "csrc", dst)
    return dst


def _key(monkeypatch: pytest.MonkeyPatch, csrc: Path, with_cuda: bool = False) -> str:
    monkeypatch.setattr(_extension, "_CSRC", csrc)
    return _extension.cache_key([csrc / s for s in _extension.CPU_SOURCES], with_cuda)


def test_cache_key_ignores_the_checkout_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _key(monkeypatch, _copy_csrc(tmp_path / "a" / "csrc"))
    b = _key(monkeypatch, _copy_csrc(tmp_path / "elsewhere" / "b" / "csrc"))
    assert a == b and len(a) == 16 and int(a, 16) >= 0


def test_cache_key_changes_with_what_changes_the_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    csrc = _copy_csrc(tmp_path / "csrc")
    base = _key(monkeypatch, csrc)
    keys = {"base": base}

    (csrc / "quantize_cpu.cpp").write_bytes((csrc / "quantize_cpu.cpp").read_bytes() + b"\n// edited\n")
    keys["source"] = _key(monkeypatch, csrc)
    shutil.copy(ROOT / "csrc" / "quantize_cpu.cpp", csrc / "quantize_cpu.cpp")
    assert _key(monkeypatch, csrc) == base  # back to the same contents: back to the same key

    header = next(p for p in csrc.iterdir() if p.suffix == ".h")
    original = header.read_bytes()
    header.write_bytes(original + b"\n// edited\n")
    keys["header"] = _key(monkeypatch, csrc)
    header.write_bytes(original)

    keys["with_cuda"] = _key(monkeypatch, csrc, with_cuda=True)
    with monkeypatch.context() as m:
        m.setattr(_extension, "compiler_flags", lambda: (["-O2"], [], []))
        keys["flags"] = _key(m, csrc)
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "2.99.0")
        keys["torch"] = _key(m, csrc)
    with monkeypatch.context() as m:
        m.setenv("CXX", "clang++")
        keys["compiler"] = _key(m, csrc)
    with monkeypatch.context() as m:
        m.setattr(sys, "implementation", type("Impl", (), {"name": "pypy"})())
        keys["python"] = _key(m, csrc)
    assert len(set(keys.values())) == len(keys), keys
    assert _key(monkeypatch, csrc) == base


def test_jit_name_tells_cpu_from_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    sources = [ROOT / "csrc" / s for s in _extension.CPU_SOURCES]
    assert _extension.jit_name(sources, False).startswith("actpass_C_cpu_")
    assert _extension.jit_name(sources, True).startswith("actpass_C_cuda_")


def test_progress_logs_while_a_slow_step_runs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="actpass")
    with _extension._progress("compiling the CPU kernels", every=0.05) as elapsed:
        time.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 2 and all(line.startswith("actpass: still compiling the CPU kernels (") for line in lines)
    assert elapsed() >= 0.3
    n = len(caplog.records)
    time.sleep(0.15)
    assert len(caplog.records) == n  # the progress thread stopped with the block


_LOAD = (
    "import time, torch\n"
    "from actpass import _extension as e\n"
    "assert e._CSRC.parent.as_posix() == {root!r}, e._CSRC\n"
    "t = time.perf_counter(); ok = e.load_once(); dt = time.perf_counter() - t\n"
    "st = e.status()\n"
    "print('RESULT', ok, st['built'], round(dt, 2), st['path'])\n"
)


def _load_in(checkout: Path, ext_dir: Path) -> tuple[bool, bool | None, float, str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(checkout),
        "TORCH_EXTENSIONS_DIR": str(ext_dir),
        "ACTPASS_KERNELS": "auto",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD.format(root=checkout.as_posix())],
        env=env,
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    _, ok, built, seconds, path = line.split(" ", 4)
    return ok == "True", {"True": True, "False": False}.get(built), float(seconds), path, proc.stderr


def test_two_checkouts_share_one_build(tmp_path: Path) -> None:
    """Second install on the same machine: the kernels are loaded from the cache, with no rebuild and no message."""
    # The build dir every load uses (the rest of the suite's too): a build made earlier in the run is found, and a
    # second full build here (about a minute) is not paid. The test is about the second and later loads.
    from torch.utils import cpp_extension

    ext_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    checkouts = []
    for name in ("clone_a", "venv_b"):
        checkout = tmp_path / name
        shutil.copytree(ROOT / "actpass", checkout / "actpass", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        shutil.copytree(ROOT / "csrc", checkout / "csrc")
        checkouts.append(checkout)
    a, b = checkouts
    ok, built, _, path_a, err = _load_in(a, ext_dir)
    if not ok:
        pytest.skip(f"the kernels cannot be built here: {err.strip().splitlines()[-1:]}")
    assert ("actpass: compiling the CPU kernels" in err) == bool(built), err  # the message only when a build runs
    for checkout in (b, a, b):  # alternating checkouts used to rebuild each other every time
        ok, built, seconds, path, err = _load_in(checkout, ext_dir)
        assert ok and built is False, err
        assert path == path_a and "compiling" not in err, err

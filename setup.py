"""Build script. Package metadata lives in pyproject.toml; this file only adds the optional compiled extension.

By default nothing is compiled, so ``pip install -e .`` works without torch in the build environment; the kernels are
then JIT-compiled on first use (see ``actpass/_extension.py``). To prebuild them as ``actpass._C``::

    ACTPASS_BUILD_EXT=1 pip install --no-build-isolation -e .      # torch must already be installed
    ACTPASS_BUILD_EXT=1 FORCE_CUDA=1 pip install --no-build-isolation -e .   # CUDA kernels without a visible GPU

The CUDA kernels are included when ``torch.cuda.is_available()`` or ``FORCE_CUDA=1``; that needs a CUDA build of
torch and nvcc (``CUDA_HOME``). ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures, as for any torch extension.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _truthy(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _compiler_flags() -> tuple[list[str], list[str], list[str]]:
    """The flags the JIT build uses, read from actpass/_extension.py without importing the package."""
    spec = importlib.util.spec_from_file_location("_actpass_extension_flags", HERE / "actpass" / "_extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compiler_flags()


def _extension_kwargs() -> dict:
    if not _truthy("ACTPASS_BUILD_EXT"):
        return {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    with_cuda = torch.cuda.is_available() or _truthy("FORCE_CUDA")
    if with_cuda and (torch.version.cuda is None or CUDA_HOME is None):
        raise RuntimeError(
            "actpass: a CUDA build was requested but "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
        )
    cxx, nvcc, ld = _compiler_flags()
    sources = ["csrc/module.cpp", "csrc/quantize_cpu.cpp"] + (["csrc/quantize_cuda.cu"] if with_cuda else [])
    extension = (CUDAExtension if with_cuda else CppExtension)(
        name="actpass._C",
        sources=sources,
        include_dirs=[str(HERE / "csrc")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=ld,
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**_extension_kwargs())

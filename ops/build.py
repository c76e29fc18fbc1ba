"""Build and load the compiled `deta_ops` library: ahead of time by setup.py, or with ninja on first use.

An ahead-of-time build (ops/_C*.so) always wins; rerun ``pip install -e . --no-build-isolation`` after
editing ops/csrc, or delete it to go back to the JIT build. The JIT build goes to a cache directory
(``$DETA_OPS_BUILD_DIR``, default ``~/.cache/deta_ops``) keyed by Python and torch versions, and ninja
rebuilds only what changed. setup.py imports this file by path for the source list and flags, so it
must not import the rest of the package.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = [CSRC / "ms_deform_attn.cpp", CSRC / "ms_deform_attn_cpu.cpp"]
CUDA_SOURCES = [CSRC / "ms_deform_attn_cuda.cu"]
CXX_FLAGS = ["-O3", "-fopenmp"]  # at::parallel_for only runs in parallel when compiled with OpenMP
LD_FLAGS = ["-fopenmp"]
# -lineinfo lets compute-sanitizer and profilers point at source lines and costs nothing at run time.
NVCC_FLAGS = ["-O3", "-lineinfo"]
# Without a GPU to query, build for Turing through Hopper plus PTX that newer GPUs compile at load time.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;9.0+PTX"


def _cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, imported without its warning that a machine without a GPU has no CUDA runtime."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def cuda_home() -> str | None:
    """The CUDA toolkit root: ``$CUDA_HOME``, else the one holding ``nvcc`` on PATH, else /usr/local/cuda.

    torch guesses the parent of whatever ``nvcc`` is on PATH, which is wrong when that is a wrapper
    script (e.g. /usr/local/bin/nvcc); a candidate only counts if it has both nvcc and the headers.
    """
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  str(Path(nvcc).resolve().parent.parent) if nvcc else None, "/usr/local/cuda"]
    for candidate in filter(None, candidates):
        root = Path(candidate)
        if (root / "bin" / "nvcc").exists() and (root / "include" / "cuda_runtime.h").exists():
            return str(root)
    return None


def configure_cuda() -> str | None:
    """Point torch's extension builder at `cuda_home()` and pick GPU architectures; returns the root."""
    cpp_extension = _cpp_extension()

    root = cuda_home()
    if root is not None:
        os.environ["CUDA_HOME"] = root
        cpp_extension.CUDA_HOME = root  # read by the builder at build time, guessed once at import
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    return root


def can_build_cuda() -> bool:
    """Whether this torch has CUDA support and a CUDA toolkit is installed (a GPU is not needed)."""
    return torch.version.cuda is not None and cuda_home() is not None


def build_dir(with_cuda: bool) -> Path:
    """The JIT cache directory of one variant of the library."""
    root = Path(os.environ.get("DETA_OPS_BUILD_DIR", Path.home() / ".cache" / "deta_ops"))
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
    path = root / f"{tag}-{'cuda' if with_cuda else 'cpu'}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def jit_load(with_cuda: bool, verbose: bool = False) -> None:
    """Compile (if the cache is stale) and load the library, registering its ops in torch.ops.deta_ops."""
    cpp_extension = _cpp_extension()

    if with_cuda:
        configure_cuda()
    sources = CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])
    cpp_extension.load(
        name=f"deta_ops_{'cuda' if with_cuda else 'cpu'}",
        sources=[str(s) for s in sources],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        extra_ldflags=LD_FLAGS,
        build_directory=str(build_dir(with_cuda)),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )

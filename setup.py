"""Install the `deta` model package and its `ops` kernels (distribution `deta-nms`): ``pip install .``, or
``pip install -e . --no-build-isolation`` for development.

Only `deta` and `ops` are installed: main.py, engine.py, training/, datasets/ and scripts/ are the training code
of this repository and run from it (a top-level `datasets` would shadow HuggingFace's).

The attention kernels are built ahead of time: the CPU kernels everywhere, plus the CUDA kernels when this torch
has CUDA support and nvcc is installed (a GPU is not needed; TORCH_CUDA_ARCH_LIST picks the architectures). Build
isolation must be off so that the extension compiles against the installed torch. With DETA_BUILD_KERNELS=0 the
install skips that build (minutes on a few cores); the kernels are then built on first use (ops/build.py).
"""
import importlib.util
import os
from pathlib import Path

from setuptools import Extension, find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent

# ops/build.py holds the source list and flags; loaded by path so that the package itself is not imported.
_spec = importlib.util.spec_from_file_location("deta_ops_build", ROOT / "ops" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def kernel_extensions() -> list[Extension]:
    """ops._C, of the CPU kernels and, where they can be built, the CUDA ones; none with DETA_BUILD_KERNELS=0."""
    if os.environ.get("DETA_BUILD_KERNELS", "1") == "0":
        return []
    with_cuda = build.can_build_cuda()
    if with_cuda:
        build.configure_cuda()
    sources = [str(path.relative_to(ROOT)) for path in build.CPU_SOURCES + (build.CUDA_SOURCES if with_cuda else [])]
    return [(CUDAExtension if with_cuda else CppExtension)(
        "ops._C",
        sources,
        extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.NVCC_FLAGS},
        extra_link_args=build.LD_FLAGS,
    )]


setup(
    packages=find_packages(include=["deta", "deta.*", "ops", "ops.*"]),
    package_data={"ops": ["csrc/*"]},  # the kernels' sources, for the build on first use
    ext_modules=kernel_extensions(),
    cmdclass={"build_ext": BuildExtension},
)

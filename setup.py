"""Ahead-of-time build of the attention kernels: ``pip install -e . --no-build-isolation``.

Builds the CPU kernels everywhere, plus the CUDA kernels when this torch has CUDA support and nvcc is
installed (a GPU is not needed; TORCH_CUDA_ARCH_LIST picks the architectures). Build isolation must be
off so that the extension compiles against the installed torch. Without this step the kernels are
built on first use instead (ops/build.py).
"""
import importlib.util
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent

# ops/build.py holds the source list and flags; loaded by path so that the package itself is not imported.
_spec = importlib.util.spec_from_file_location("deta_ops_build", ROOT / "ops" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

with_cuda = build.can_build_cuda()
if with_cuda:
    build.configure_cuda()
sources = [str(path.relative_to(ROOT)) for path in build.CPU_SOURCES + (build.CUDA_SOURCES if with_cuda else [])]
extension = (CUDAExtension if with_cuda else CppExtension)(
    "ops._C",
    sources,
    extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.NVCC_FLAGS},
    extra_link_args=build.LD_FLAGS,
)

setup(
    packages=find_packages(exclude=["tests", "tests.*"]),
    py_modules=[path.stem for path in ROOT.glob("*.py") if path.name != "setup.py"],
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
)

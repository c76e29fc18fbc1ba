"""The CUDA kernels, run on the CPU: ops/csrc/ms_deform_attn_cuda_kernels.cuh compiled with g++ against
tests/cuda_emulation/cuda_emulation.h, checked against the PyTorch reference in float64.

Without a GPU the CUDA tests of test_ops_kernels.py skip and nvcc only shows that the kernels compile. Here the
same kernels and host code (vector width, grid, lane groups, shuffle masks, vector atomics, dtype handling)
run with one OS thread per GPU thread, under AddressSanitizer and UBSan in place of compute-sanitizer
(out-of-bounds accesses, misaligned vector loads), on cases that reach every launch configuration. What this
cannot show: nvcc's code generation, the GPU's memory model, speed. Builds once (about a minute), cached
next to the kernels' JIT build.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_ops_kernels import DETA_SHAPES, ODD_SHAPES, assert_close_to, make_inputs, reference_in_float64

REPO = Path(__file__).resolve().parent.parent
SANITIZER_RUNTIMES = [Path(subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True)
                           .stdout.strip()) for name in ("libasan.so", "libstdc++.so")] if shutil.which("g++") else []
pytestmark = pytest.mark.skipif(not SANITIZER_RUNTIMES or not all(p.is_absolute() and p.exists()
                                                                  for p in SANITIZER_RUNTIMES),
                                reason="needs g++ with AddressSanitizer")
Inputs = tuple[torch.Tensor, ...]


def misaligned(inputs: Inputs) -> Inputs:
    """value moved one element off its 16-byte alignment: the kernels must fall back to scalar loads."""
    value = inputs[0]
    storage = torch.empty(value.numel() + 1, dtype=value.dtype)
    shifted = storage[1:].view(value.shape).copy_(value)
    assert shifted.data_ptr() % 16 != 0
    return (shifted, *inputs[1:])


def non_contiguous(inputs: Inputs) -> Inputs:
    """The same values in other layouts: channels-first value, strided locations, transposed weights."""
    value, spatial, starts, locations, weights = inputs
    return (value.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), spatial, starts,
            torch.stack([locations, locations], 2).flatten(1, 2)[:, ::2],
            weights.transpose(1, 2).contiguous().transpose(1, 2))


def borders() -> Inputs:
    """Samples on the map's edges, pixel centres, one pixel outside and far outside, in float64."""
    value, spatial, starts, _, _ = make_inputs([[4, 8], [1, 2], [2, 1], [1, 1]], batch=1, queries=1, heads=1,
                                               channels=2, points=1, dtype=torch.float64)
    pixels = torch.tensor([-5.0, -1.0, -0.999, -0.5, 0.0, 0.5, 1.0, 3.5, 4.0, 5.999, 7.0, 100.0],
                          dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(pixels, pixels, indexing="ij")
    pixel_xy = torch.stack([grid_x.flatten(), grid_y.flatten()], -1)
    locations = ((pixel_xy[:, None, :] + 0.5) / spatial.flip(1).to(torch.float64))[None, :, None, :, None, :]
    return value, spatial, starts, locations, torch.ones(locations.shape[:-1], dtype=torch.float64)


# Each case reaches a launch configuration of its own (lanes per group = channels / vector width, up to 32).
CASES: dict[str, Callable[[], Inputs]] = {
    "float32 deta": lambda: make_inputs(DETA_SHAPES, queries=6),  # 4-float vectors, 8 lanes, float4 atomics
    "float32 whole warp": lambda: make_inputs(ODD_SHAPES, queries=9, heads=1, channels=128),  # 32 lanes
    "float32 one lane": lambda: make_inputs(ODD_SHAPES, queries=5, heads=3, channels=4),  # 1 lane, no shuffle
    "float32 odd channels": lambda: make_inputs(ODD_SHAPES, queries=5, heads=2, channels=6),  # scalar, 4 lanes
    "float32 misaligned": lambda: misaligned(make_inputs(DETA_SHAPES, queries=4, heads=2)),  # scalar, 32 lanes
    "float32 non-contiguous": lambda: non_contiguous(make_inputs(DETA_SHAPES, batch=1, queries=5)),
    "float32 partial warp": lambda: make_inputs(DETA_SHAPES, batch=1, queries=7, heads=3),  # 168 of 256 threads
    "bfloat16": lambda: make_inputs(DETA_SHAPES, queries=6, dtype=torch.bfloat16),  # 8-element vectors, 4 lanes
    "float16": lambda: make_inputs(ODD_SHAPES, queries=8, channels=16, dtype=torch.float16),  # 2 lanes
    "float64": lambda: make_inputs(ODD_SHAPES, queries=5, dtype=torch.float64),  # 2-double vectors, 16 lanes
    "float64 borders": borders,
    "no queries": lambda: make_inputs(ODD_SHAPES, queries=0),
}
WARP_VALUES = torch.arange(32, dtype=torch.float32) ** 2
WIDTHS = (1, 2, 8, 32)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def build_emulation() -> object:
    """Compile (cached) and import the emulated kernels; the process must have the sanitizer runtimes preloaded."""
    from ops import build

    cache = Path(os.environ.get("DETA_OPS_BUILD_DIR", Path.home() / ".cache" / "deta_ops")) / "cuda-emulation"
    cache.mkdir(parents=True, exist_ok=True)
    sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    return build._cpp_extension().load(
        name="deta_cuda_emulation", sources=[str(REPO / "tests" / "cuda_emulation" / "emulated_kernels.cpp")],
        extra_include_paths=[str(REPO / "ops" / "csrc"), str(REPO / "tests" / "cuda_emulation")],
        extra_cflags=["-O1", "-g", "-fno-omit-frame-pointer", "-Wno-unknown-pragmas", *sanitizers],
        extra_ldflags=sanitizers, build_directory=str(cache))


def emulated_forward_and_grads(module: object, inputs: Inputs, grad_seed: int = 1) -> list[torch.Tensor]:
    """What test_ops_kernels.forward_and_grads computes, from the emulated forward and backward entry points."""
    output = module.forward(*inputs)
    grad = torch.randn(output.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    grad = grad.to(output).mT.contiguous().mT  # any layout is accepted
    return [output, *module.backward(grad, *inputs)]


def run_sanitized(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Python code in a process with AddressSanitizer and UBSan loaded, after building the emulation."""
    preamble = f"""
        import os, sys
        os.environ.pop("LD_PRELOAD")  # the compiler that the build runs must not load the sanitizers
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
        from test_cuda_emulation import *
        module = build_emulation()
    """
    env = {**os.environ, "LD_PRELOAD": " ".join(map(str, SANITIZER_RUNTIMES)),
           "ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(preamble) + textwrap.dedent(code)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def report(stderr: str) -> str:
    """A sanitizer's finding opens its report and a Python error ends it; their stack traces are long."""
    return stderr if len(stderr) < 6000 else f"{stderr[:3000]}\n...\n{stderr[-3000:]}"


@pytest.fixture(scope="module")
def emulated(tmp_path_factory) -> dict[str, object]:
    """Every case's output and gradients from the emulated kernels, warp sums of WARP_VALUES for a few
    segment widths, and the error of a backward pass given grad_output on another device, computed in one
    sanitized process."""
    results = tmp_path_factory.mktemp("emulation") / "results.pt"
    process = run_sanitized(f"""
        import torch
        inputs = CASES["float32 deta"]()
        try:  # checked before any memory is read
            module.backward(torch.empty(2, 6, 256, device="meta"), *inputs)
            device_error = None
        except RuntimeError as error:
            device_error = str(error)
        torch.save({{"cases": {{name: emulated_forward_and_grads(module, case()) for name, case in CASES.items()}},
                    "warp_sums": {{width: module.warp_sum(WARP_VALUES, 0xFFFFFFFF, width) for width in WIDTHS}},
                    "device_error": device_error}},
                   {str(results)!r})
    """)
    assert process.returncode == 0, report(process.stderr)
    return torch.load(results)


@pytest.mark.parametrize("case", CASES)
def test_emulated_cuda_kernels_match_the_reference(emulated, case):
    inputs = CASES[case]()
    actual = emulated["cases"][case]
    expected = reference_in_float64(inputs)
    assert [t.dtype for t in actual] == [inputs[0].dtype, inputs[0].dtype, inputs[3].dtype, inputs[4].dtype]
    if case == "no queries":
        assert [t.shape for t in actual] == [t.shape for t in expected]
        assert not actual[1].any()
    else:
        assert_close_to(actual, expected, TOLERANCE[inputs[0].dtype])


def test_grad_output_on_another_device_is_refused(emulated):
    # On a GPU, a host pointer read by the kernel would be an illegal access that poisons the context.
    assert "grad_output is on meta, value on cpu" in emulated["device_error"]


@pytest.mark.parametrize(("code", "message"), ids=["level past the end", "shuffle mask"], argvalues=[
    # The CPU kernel's TORCH_CHECK cannot run on a GPU without a host synchronisation; the kernels assert.
    ("inputs = make_inputs(ODD_SHAPES)\nmodule.forward(inputs[0], inputs[1], inputs[2] + 1, *inputs[3:])",
     "does not fit in value"),
    # The emulation's own checks: a shuffle whose mask leaves out a lane that calls it (whichever of that lane
    # and its partner gets there first reports it).
    ("module.warp_sum(torch.arange(32.0), 0xFFFFFFFE, 8)", "mask does not include it|outside its mask"),
])
def test_errors_stop_the_kernel(code, message):
    process = run_sanitized(f"import torch\n{code}\nprint('no error')")
    assert process.returncode != 0 and "no error" not in process.stdout
    assert re.search(message, process.stderr), report(process.stderr)


@pytest.mark.parametrize("width", WIDTHS)
def test_emulated_shuffles_sum_each_segment(emulated, width):
    # The shuffle semantics that every backward case relies on: an xor butterfly over segments of `width`
    # lanes leaves each lane with its segment's sum.
    expected = WARP_VALUES.view(-1, width).sum(1, keepdim=True).expand(-1, width).flatten()
    assert emulated["warp_sums"][width].equal(expected)

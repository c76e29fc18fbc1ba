"""Benchmark of multi-scale deformable attention at DETA R50 shapes: an 800x1333 image, batch 2.

    python ops/benchmark.py [--device cpu|cuda] [--dtype float32|bfloat16|float16|float64]
                            [--repeats N] [--original PATH/TO/Deformable-DETR]

Times the compiled op (what `ops.ms_deform_attn` runs) and the PyTorch reference in the same run, for the
encoder (all 22,300 tokens of the five levels are queries) and the decoder (900 queries), forward and
forward+backward, as the median of `--repeats` runs after a warm-up. Bandwidth counts every input and
output once, the least traffic any implementation needs, against the device's peak: the GPU's memory
clock x bus width, or on CPU the best of a few large copies measured here. `--original` also builds and
times the original Deformable-DETR CUDA kernel from that checkout (float32/float64 only).
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from ops.custom_op import compiled_devices
from ops.reference import ms_deform_attn_pytorch

# Backbone strides 8, 16, 32 and two stride-2 convolutions: ceil(800 / s) x ceil(1333 / s).
LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21), (7, 11)]
BATCH, HEADS, CHANNELS, POINTS, DECODER_QUERIES = 2, 8, 32, 4, 900

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make_inputs(queries: str, dtype: torch.dtype, device: str) -> Inputs:
    """Inputs with DETA's sampling pattern: each head looks along its own direction, 1-4 pixels per point
    (the module's initialisation, plus noise), around pixel centres (encoder) or random boxes (decoder)."""
    generator = torch.Generator().manual_seed(0)
    shapes = torch.tensor(LEVELS)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    tokens = int(sizes.sum())
    if queries == "encoder":
        reference = torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h,
                                                          indexing="xy"), -1).reshape(-1, 2) for h, w in LEVELS])
    else:
        reference = torch.rand(DECODER_QUERIES, 2, generator=generator) * 0.9 + 0.05
    count = reference.shape[0]
    angles = torch.arange(HEADS) * (2 * math.pi / HEADS)
    directions = torch.stack([angles.cos(), angles.sin()], -1)
    pixels = directions[:, None, None, :] * torch.arange(1, POINTS + 1)[None, None, :, None]  # (H, 1, P, 2)
    pixels = pixels + torch.randn(BATCH, count, HEADS, len(LEVELS), POINTS, 2, generator=generator)
    locations = reference[None, :, None, None, None, :] + pixels / shapes.flip(1)[:, None, :]
    logits = torch.randn(BATCH, count, HEADS, len(LEVELS) * POINTS, generator=generator)
    weights = logits.softmax(-1).view(BATCH, count, HEADS, len(LEVELS), POINTS)
    value = torch.randn(BATCH, tokens, HEADS, CHANNELS, generator=generator)
    return (value.to(device, dtype), shapes.to(device), starts.to(device), locations.to(device, dtype),
            weights.to(device, dtype))


def traffic(inputs: Inputs, backward: bool) -> int:
    """Bytes of the inputs and outputs of the forward pass, plus those of the backward pass if asked."""
    value, _, _, locations, weights = inputs
    output = value.shape[0] * locations.shape[1] * HEADS * CHANNELS * value.element_size()
    forward = sum(t.numel() * t.element_size() for t in (value, locations, weights)) + output
    # Backward reads grad_output, value, locations and weights and writes a gradient for each of the last three.
    return forward + (output + 2 * (forward - output) if backward else 0)


def measure(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median milliseconds of fn after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def autograd_step(op: Callable[..., torch.Tensor], inputs: Inputs, backward: bool) -> Callable[[], object]:
    value, shapes, starts, locations, weights = inputs
    if not backward:
        def forward() -> object:
            with torch.no_grad():
                return op(value, shapes, starts, locations, weights)
        return forward
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    grad = torch.randn(BATCH, locations.shape[1], HEADS * CHANNELS, dtype=value.dtype, device=value.device)

    def forward_backward() -> object:
        for leaf in leaves:
            leaf.grad = None  # time writing fresh gradients, not accumulating into old ones
        op(leaves[0], shapes, starts, leaves[1], leaves[2]).backward(grad)
        return [leaf.grad for leaf in leaves]
    return forward_backward


def peak_bandwidth(device: str) -> tuple[float, str]:
    """Bytes per second and how that figure was obtained."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        # memory_clock_rate is in kHz; double data rate.
        return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8, "spec: memory clock x bus width"
    source = torch.ones(2**28)  # 1 GiB, beyond any cache
    target = torch.empty_like(source)
    best = min(measure(lambda: target.copy_(source), "cpu", 1) for _ in range(5))
    return 2 * source.numel() * 4 / (best / 1e3), "measured: best of five 1 GiB copies"


def load_original(checkout: Path) -> object:
    """The original Deformable-DETR CUDA extension, JIT-built from a checkout for the comparison only.

    Its sources predate torch 2; a few API renames are applied to a temporary copy so that they compile.
    """
    from torch.utils import cpp_extension

    from ops import build

    build.configure_cuda()
    candidates = (checkout / "models" / "ops" / "src", checkout / "src", checkout)
    source = next(p for p in candidates if (p / "vision.cpp").exists())
    work = Path(tempfile.mkdtemp(prefix="original_msda_"))
    renames = [(".type().is_cuda()", ".is_cuda()"), ("(value.type(),", "(value.scalar_type(),"),
               (".data<", ".data_ptr<"), ("<THC/THCAtomics.cuh>", "<ATen/cuda/Atomic.cuh>")]
    for path in source.rglob("*"):
        if path.suffix in {".cpp", ".h", ".cu", ".cuh"}:
            text = path.read_text()
            for old, new in renames:
                text = text.replace(old, new)
            (work / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (work / path.relative_to(source)).write_text(text)
    # ATen/cuda/CUDAContext.h needs the cuSPARSE/cuBLAS headers, which pip's CUDA wheels carry when the
    # toolkit does not.
    nvidia = Path(torch.__file__).parent.parent / "nvidia"
    includes = [str(work), *sorted({str(p.parent) for p in nvidia.glob("*/include/cusparse.h")})]
    return cpp_extension.load(
        name="original_ms_deform_attn",
        sources=[str(work / "vision.cpp"), str(work / "cpu" / "ms_deform_attn_cpu.cpp"),
                 str(work / "cuda" / "ms_deform_attn_cuda.cu")],
        extra_include_paths=includes, extra_cflags=["-O3", "-DWITH_CUDA"],
        extra_cuda_cflags=["-O3", "-DWITH_CUDA", "-DCUDA_HAS_FP16=1"], build_directory=str(work), verbose=False)


def original_step(module: object, inputs: Inputs, backward: bool) -> Callable[[], object]:
    value, shapes, starts, locations, weights = inputs
    im2col_step = 64  # the official module's setting; batch 2 runs in one step
    grad = torch.randn(BATCH, locations.shape[1], HEADS * CHANNELS, dtype=value.dtype, device=value.device)

    def run() -> object:
        output = module.ms_deform_attn_forward(value, shapes, starts, locations, weights, im2col_step)
        if backward:
            return module.ms_deform_attn_backward(value, shapes, starts, locations, weights, grad, im2col_step)
        return output
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default: 3 CPU, 20 GPU)")
    parser.add_argument("--original", type=Path, default=None, help="Deformable-DETR checkout to compare with")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (20 if args.device == "cuda" else 3)
    if args.device not in compiled_devices():
        sys.exit(f"no compiled kernel for {args.device}; see the warning above")
    if args.device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                          if line.startswith("model name")), "")
            name = f"{model}, {torch.get_num_threads()} threads"
    peak, peak_source = peak_bandwidth(args.device)
    print(f"device: {name}; dtype {args.dtype}; torch {torch.__version__}; median of {repeats}")
    print(f"peak bandwidth: {peak / 1e9:.0f} GB/s ({peak_source})")
    implementations: dict[str, Callable[[Inputs, bool], Callable[[], object]]] = {
        "deta_ops": lambda inputs, backward: autograd_step(torch.ops.deta_ops.ms_deform_attn, inputs, backward),
        "reference": lambda inputs, backward: autograd_step(ms_deform_attn_pytorch, inputs, backward),
    }
    if args.original is not None and dtype in (torch.float32, torch.float64):
        original = load_original(args.original)
        implementations["original"] = lambda inputs, backward: original_step(original, inputs, backward)
    print(f"{'case':<8} {'pass':<8} {'impl':<10} {'ms':>9} {'GB/s':>8} {'% peak':>7} {'speed-up vs reference':>22}")
    for queries in ("encoder", "decoder"):
        inputs = make_inputs(queries, dtype, args.device)
        for backward in (False, True):
            times = {impl: measure(step(inputs, backward), args.device, repeats)
                     for impl, step in implementations.items()}
            for impl, ms in times.items():
                bandwidth = traffic(inputs, backward) / (ms / 1e3)
                print(f"{queries:<8} {'fwd+bwd' if backward else 'fwd':<8} {impl:<10} {ms:9.2f} "
                      f"{bandwidth / 1e9:8.1f} {100 * bandwidth / peak:6.1f}% {times['reference'] / ms:21.2f}x")


if __name__ == "__main__":
    main()

"""The compiled multi-scale deformable attention kernels, and the gather formulation, against the PyTorch reference.

CPU tests always run (the first one JIT-builds the CPU library, cached in ~/.cache/deta_ops). CUDA tests run
the same checks where a GPU is present and skip otherwise; `bash scripts/gpu_checks.sh` runs them, and again
under ``compute-sanitizer --tool memcheck``. Without a GPU, test_cuda_emulation.py runs the CUDA kernels'
code on the CPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ops
from ops import build
from ops.custom_op import compiled_devices
from ops.dispatch import ms_deform_attn
from ops.reference import ms_deform_attn_gather

REPO = Path(__file__).resolve().parent.parent
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
# DETA's attention: 8 heads of 32 channels, 4 points on 5 levels (maps shrunk to keep the tests quick).
DETA_SHAPES = [[24, 32], [12, 16], [6, 8], [3, 4], [2, 2]]
# Levels with odd sizes, a single row and a single pixel. With 30 queries and 4 points these have many
# samples per token, like the encoder, and DETA_SHAPES few, like the decoder: the CPU backward pass uses a
# different memory layout for each.
ODD_SHAPES = [[5, 7], [1, 4], [3, 1], [1, 1]]


def make_inputs(shapes: list[list[int]], batch: int = 2, queries: int = 30, heads: int = 8, channels: int = 32,
                points: int = 4, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                away_from_edges: bool = False) -> tuple[torch.Tensor, ...]:
    """value, spatial_shapes, level_start_index, locations (spilling outside [0, 1]), softmaxed weights.

    With `away_from_edges`, every sample's pixel coordinate stays >= 0.2 from the lattice where bilinear
    interpolation has kinks, so that finite differences with a coarse step are exact.
    """
    generator = torch.Generator().manual_seed(seed)
    spatial = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(shapes)
    value = torch.randn(batch, int(sizes.sum()), heads, channels, generator=generator, dtype=torch.float64)
    size_xy = spatial.flip(1).to(torch.float64)[:, None, :]  # (levels, 1, 2) as (W, H)
    if away_from_edges:
        cell = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=torch.float64)
        pixel = (cell * (size_xy + 1)).floor() - 1 + 0.2 + 0.6 * torch.rand(cell.shape, generator=generator,
                                                                            dtype=torch.float64)
        locations = (pixel + 0.5) / size_xy
    else:
        locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator,
                               dtype=torch.float64) * 1.3 - 0.15
    logits = torch.randn(batch, queries, heads, levels * points, generator=generator, dtype=torch.float64)
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    return (value.to(device, dtype), spatial.to(device), starts.to(device), locations.to(device, dtype),
            weights.to(device, dtype))


def forward_and_grads(fn, inputs: tuple[torch.Tensor, ...], grad_seed: int = 1) -> list[torch.Tensor]:
    """Output and the gradients of value, locations and weights for a fixed random output gradient."""
    value, spatial, starts, locations, weights = (t.detach().clone() for t in inputs)
    leaves = [t.requires_grad_() for t in (value, locations, weights)]
    output = fn(value, spatial, starts, locations, weights)
    generator = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(output.shape, generator=generator, dtype=torch.float64).to(output)
    output.backward(grad)
    return [output.detach()] + [leaf.grad for leaf in leaves]


def reference_in_float64(inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    exact = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    return forward_and_grads(ops.ms_deform_attn_pytorch, exact)


def assert_close_to(actual: list[torch.Tensor], expected: list[torch.Tensor], tolerance: float) -> None:
    """Each tensor within `tolerance` times the largest magnitude of its expected value."""
    for name, a, e in zip(("output", "grad value", "grad locations", "grad weights"), actual, expected, strict=True):
        assert a.shape == e.shape, name
        error = (a.double() - e.double().to(a.device)).abs().max().item()
        scale = e.abs().max().item()
        assert error <= tolerance * scale, f"{name}: max error {error:.3g} > {tolerance} * {scale:.3g}"


@pytest.fixture(scope="module", autouse=True)
def kernels() -> frozenset[str]:
    devices = compiled_devices()
    assert "cpu" in devices, "the CPU kernel did not build; see the warning above"
    if torch.cuda.is_available():
        assert "cuda" in devices, "the CUDA kernel did not build; see the warning above"
    return devices


# The compiled kernels (what ms_deform_attn runs) and the gather formulation that ONNX export traces.
IMPLEMENTATIONS = [pytest.param(ms_deform_attn, id="kernel"), pytest.param(ms_deform_attn_gather, id="gather")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shapes", [DETA_SHAPES, ODD_SHAPES], ids=["deta", "odd"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_forward_and_gradients_match_reference(device, dtype, tolerance, shapes, implementation):
    inputs = make_inputs(shapes, dtype=dtype, device=device)
    actual = forward_and_grads(implementation, inputs)
    assert_close_to(actual, reference_in_float64(inputs), tolerance)


@pytest.mark.parametrize("device", DEVICES)
def test_gather_formulation_matches_the_kernel(device):
    inputs = make_inputs(DETA_SHAPES, device=device)
    assert_close_to(forward_and_grads(ms_deform_attn_gather, inputs), forward_and_grads(ms_deform_attn, inputs), 1e-5)


def test_onnx_export_runs_the_gather_formulation(monkeypatch):
    inputs = make_inputs(ODD_SHAPES)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    monkeypatch.setattr(torch.ops.deta_ops, "ms_deform_attn", None)  # the kernel must not run
    assert torch.equal(ms_deform_attn(*inputs), ms_deform_attn_gather(*inputs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_accumulates_in_float32(device, dtype, tolerance):
    # The reference runs in float64 on the same rounded inputs, so the only error allowed is the final
    # rounding of each result (2^-8 for bfloat16, 2^-11 for float16) plus that of the output gradient.
    inputs = make_inputs(DETA_SHAPES, dtype=dtype, device=device)
    actual = forward_and_grads(ms_deform_attn, inputs)
    assert all(t.dtype == dtype for t in actual)
    assert_close_to(actual, reference_in_float64(inputs), tolerance)


def test_mixed_precision_keeps_each_input_dtype():
    # Under autocast the value projection is bfloat16 while locations and weights stay float32.
    value, spatial, starts, locations, weights = make_inputs(ODD_SHAPES)
    output, grad_value, grad_locations, grad_weights = forward_and_grads(
        ms_deform_attn, (value.bfloat16(), spatial, starts, locations, weights))
    assert output.dtype == grad_value.dtype == torch.bfloat16
    assert grad_locations.dtype == grad_weights.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_borders_and_outside_locations(device, implementation):
    # Pixel coordinate = location * size - 0.5. The map's edges (locations 0 and 1), pixel centres and
    # lattice points, one pixel outside (-1: one corner inside, so a one-sided gradient; size: none),
    # far outside and just inside those limits. Power-of-two sizes keep location <-> pixel conversions exact,
    # so that the reference's differently ordered arithmetic lands on the same side of each limit.
    value, spatial, starts, _, weights = make_inputs([[4, 8], [1, 2], [2, 1], [1, 1]], batch=1, queries=1, heads=1,
                                                      channels=4, points=1, dtype=torch.float64, device=device)
    pixels = torch.tensor([-5.0, -1.0 - 1e-9, -1.0, -0.999, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 3.5, 4.0, 4.5,
                           5.0, 5.999, 6.0, 7.0, 100.0], dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(pixels, pixels, indexing="ij")
    # One query per (x, y) pair, applied to every level in pixels of that level.
    pixel_xy = torch.stack([grid_x.flatten(), grid_y.flatten()], -1)  # (queries, 2)
    size_xy = spatial.flip(1).to(torch.float64).cpu()  # (levels, 2)
    locations = ((pixel_xy[:, None, :] + 0.5) / size_xy).to(device)  # (queries, levels, 2)
    locations = locations[None, :, None, :, None, :]
    weights = torch.ones(locations.shape[:-1], dtype=torch.float64, device=device)
    inputs = (value, spatial, starts, locations, weights)
    assert_close_to(forward_and_grads(implementation, inputs), reference_in_float64(inputs), 1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    inputs = make_inputs(ODD_SHAPES, batch=1, queries=3, heads=2, channels=3, points=2, dtype=torch.float64,
                         device=device)
    value, spatial, starts, locations, weights = (t.requires_grad_() if t.is_floating_point() else t
                                                  for t in inputs)
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn(v, spatial, starts, loc, w),
                                    (value, locations, weights))


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float32_deta_shapes(device):
    # Random directional derivatives (fast mode) over every input, with a step small enough to stay on
    # one side of every kink: 1e-3 of a 32-pixel-wide map is 0.03 pixel.
    inputs = make_inputs(DETA_SHAPES, queries=20, device=device, away_from_edges=True)
    value, spatial, starts, locations, weights = (t.requires_grad_() if t.is_floating_point() else t
                                                  for t in inputs)
    # On CUDA, float atomics sum the value gradient in a run-dependent order: two backward passes agree only
    # to rounding, which gradcheck's reentrancy check must allow.
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn(v, spatial, starts, loc, w),
                                    (value, locations, weights), eps=1e-3, atol=1e-3, rtol=1e-2, fast_mode=True,
                                    nondet_tol=1e-5 if device == "cuda" else 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_one_and_non_contiguous_inputs(device):
    value, spatial, starts, locations, weights = make_inputs(DETA_SHAPES, batch=1, device=device)
    # Same values, other memory layouts: channels-first storage, every other row, weights transposed.
    value_view = value.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    locations_view = torch.stack([locations, locations], 2).flatten(1, 2)[:, ::2]
    weights_view = weights.transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(t.is_contiguous() for t in (value_view, locations_view, weights_view))
    actual = forward_and_grads(ms_deform_attn, (value_view, spatial, starts, locations_view, weights_view))
    assert_close_to(actual, reference_in_float64((value, spatial, starts, locations, weights)), 1e-5)


@CUDA
def test_cuda_backward_is_reported_as_nondeterministic():
    inputs = make_inputs(ODD_SHAPES, device="cuda")
    value = inputs[0].requires_grad_()
    output = ms_deform_attn(value, *inputs[1:])
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward"):
            output.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


def test_level_past_the_end_of_value_is_an_error():
    value, spatial, starts, locations, weights = make_inputs(ODD_SHAPES)
    with pytest.raises(RuntimeError, match="does not fit"):
        ms_deform_attn(value, spatial, starts + 1, locations, weights)


def test_dispatch_uses_the_compiled_kernel_for_cpu_tensors(monkeypatch):
    def fail(*args):
        raise AssertionError("the reference ran instead of the kernel")

    monkeypatch.setattr("ops.dispatch.ms_deform_attn_pytorch", fail)
    assert ms_deform_attn(*make_inputs(ODD_SHAPES)).shape == (2, 30, 256)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_schema_fake_and_autograd_registrations(device):
    inputs = make_inputs(ODD_SHAPES, queries=4, heads=2, channels=8, points=2, dtype=torch.float64, device=device)
    value, spatial, starts, locations, weights = (t.requires_grad_() if t.is_floating_point() else t
                                                  for t in inputs)
    torch.library.opcheck(torch.ops.deta_ops.ms_deform_attn.default, (value, spatial, starts, locations, weights))


def _module_inputs(device: str) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    spatial = torch.tensor(ODD_SHAPES)
    tokens = int(spatial.prod(1).sum())
    starts = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    query = torch.randn(2, 10, 64, generator=generator)
    reference_points = torch.rand(2, 10, len(ODD_SHAPES), 2, generator=generator)
    features = torch.randn(2, tokens, 64, generator=generator)
    return tuple(t.to(device) for t in (query, reference_points, features, spatial, starts))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_msdeformattn(device):
    torch.manual_seed(0)
    module = ops.MSDeformAttn(d_model=64, n_levels=len(ODD_SHAPES), n_heads=4, n_points=2).to(device)
    inputs = _module_inputs(device)
    expected = module(*inputs)
    expected.square().sum().backward()
    expected_grad = module.sampling_offsets.weight.grad.clone()
    module.zero_grad()
    compiled = torch.compile(module, fullgraph=True)  # raises on any graph break
    actual = compiled(*inputs)
    actual.square().sum().backward()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.sampling_offsets.weight.grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_torch_export_keeps_the_op():
    torch.manual_seed(0)
    module = ops.MSDeformAttn(d_model=64, n_levels=len(ODD_SHAPES), n_heads=4, n_points=2)
    inputs = _module_inputs("cpu")
    exported = torch.export.export(module, inputs)
    targets = [node.target for node in exported.graph.nodes]
    assert torch.ops.deta_ops.ms_deform_attn.default in targets
    torch.testing.assert_close(exported.module()(*inputs), module(*inputs))


def _run_python(code: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(any(REPO.glob("ops/_C*.so")), reason="an ahead-of-time build is installed and always loads")
def test_failed_build_warns_once_and_falls_back_to_the_reference(tmp_path):
    # A compiler that always fails, in an empty cache directory.
    result = _run_python("""
        import warnings
        import torch
        import ops
        from ops.dispatch import ms_deform_attn
        from test_ops_kernels import make_inputs
        inputs = make_inputs([[3, 4], [1, 1]])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, second = ms_deform_attn(*inputs), ms_deform_attn(*inputs)
        assert len([w for w in caught if "deta_ops" in str(w.message)]) == 1, caught
        torch.testing.assert_close(first, ops.ms_deform_attn_pytorch(*inputs))
        print("fell back")
    """, {"CXX": "false", "DETA_OPS_BUILD_DIR": str(tmp_path), "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"},
        timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fell back" in result.stdout


@pytest.mark.skipif(not build.can_build_cuda(), reason="needs nvcc and a CUDA build of torch")
def test_cuda_sources_compile_with_nvcc():
    # Builds (cached under its own directory) and loads the CUDA variant for one architecture in a fresh
    # process: a GPU is not needed to compile, link and register the kernels.
    cache = Path(os.environ.get("DETA_OPS_BUILD_DIR", Path.home() / ".cache" / "deta_ops")) / "nvcc-check"
    result = _run_python("""
        import torch
        from ops import build
        build.jit_load(with_cuda=True)
        assert torch._C._dispatch_has_kernel_for_dispatch_key("deta_ops::ms_deform_attn_backward", "CUDA")
        print("cuda kernels registered")
    """, {"TORCH_CUDA_ARCH_LIST": "9.0", "DETA_OPS_BUILD_DIR": str(cache), "PYTHONPATH": str(REPO)},
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cuda kernels registered" in result.stdout


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_encoder_at_800x1333_batch_2(dtype):
    # All 22,300 tokens of the five levels as queries, checked against the CPU kernel in float64.
    shapes = [[100, 167], [50, 84], [25, 42], [13, 21], [7, 11]]
    inputs = make_inputs(shapes, queries=sum(h * w for h, w in shapes), dtype=dtype, device="cuda")
    actual = forward_and_grads(ms_deform_attn, inputs)
    exact = tuple(t.cpu().double() if t.is_floating_point() else t.cpu() for t in inputs)
    expected = forward_and_grads(ms_deform_attn, exact)
    assert_close_to(actual, expected, 1e-5 if dtype == torch.float32 else 1e-2)

"""The PyTorch attention reference against a direct per-sample bilinear computation."""
import math

import torch

import ops


def _bilinear(value_map: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """value_map (H, W, C) sampled at normalised (x, y): pixel centres at (i + 0.5) / size, zeros outside."""
    height, width, channels = value_map.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    result = torch.zeros(channels, dtype=value_map.dtype)
    for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yi < height and 0 <= xi < width:
                result += wy * wx * value_map[yi, xi]
    return result


def _direct(value, shapes, locations, weights):
    batch, _, heads, channels = value.shape
    _, queries, _, _, points, _ = locations.shape
    starts = [0]
    for h, w in shapes.tolist():
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, channels, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lv, (h, w) in enumerate(shapes.tolist()):
                    value_map = value[b, starts[lv]:starts[lv + 1], m].reshape(h, w, channels)
                    for p in range(points):
                        x, y = locations[b, q, m, lv, p].tolist()
                        out[b, q, m] += weights[b, q, m, lv, p] * _bilinear(value_map, x, y)
    return out.flatten(2)


def test_reference_equals_direct_bilinear_sampling():
    generator = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[4, 5], [2, 3], [1, 1]])
    level_start = torch.tensor([0, 20, 26])
    value = torch.randn(2, 27, 2, 3, generator=generator, dtype=torch.float64)
    # Locations spill outside [0, 1] and include exact borders and pixel centres.
    locations = torch.rand(2, 4, 2, 3, 2, 2, generator=generator, dtype=torch.float64) * 1.4 - 0.2
    locations[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    locations[0, 0, 0, 0, 1] = torch.tensor([0.1, 0.125], dtype=torch.float64)
    weights = torch.rand(2, 4, 2, 3, 2, generator=generator, dtype=torch.float64)
    expected = _direct(value, shapes, locations, weights)
    actual = ops.ms_deform_attn_pytorch(value, shapes, level_start, locations, weights)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_msdeformattn_initial_offsets_fan_out_by_head_and_point():
    attention = ops.MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    grid = attention.sampling_offsets.bias.detach().view(4, 2, 3, 2)
    # Head h points along angle 2πh/4, scaled onto the unit square; point p at distance p + 1.
    torch.testing.assert_close(grid[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    torch.testing.assert_close(grid[1, 1], torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]), atol=1e-6, rtol=0)
    assert torch.count_nonzero(attention.attention_weights.weight) == 0


def test_msdeformattn_with_point_and_box_references():
    torch.manual_seed(0)
    attention = ops.MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2)
    shapes = torch.tensor([[6, 8], [3, 4]])
    start = torch.tensor([0, 48])
    memory = torch.randn(2, 60, 16)
    query = torch.randn(2, 5, 16)
    padding = torch.zeros(2, 60, dtype=torch.bool)
    padding[1, 40:48] = True
    points = attention(query, torch.rand(2, 5, 2, 2), memory, shapes, start, padding)
    boxes = attention(query, torch.rand(2, 5, 2, 4), memory, shapes, start, padding)
    assert points.shape == boxes.shape == (2, 5, 16)
    # Changing padded memory must not change anything.
    memory_changed = memory.clone()
    memory_changed[1, 40:48] = 100.0
    torch.testing.assert_close(attention(query, torch.rand(2, 5, 2, 2).fill_(0.5), memory_changed, shapes, start,
                                         padding),
                               attention(query, torch.rand(2, 5, 2, 2).fill_(0.5), memory, shapes, start, padding))


def test_the_public_entry_point_agrees_with_the_reference():
    generator = torch.Generator().manual_seed(2)
    shapes = torch.tensor([[6, 5], [3, 3]])
    value = torch.randn(2, 39, 4, 8, generator=generator)
    locations = torch.rand(2, 7, 4, 2, 3, 2, generator=generator)
    weights = torch.rand(2, 7, 4, 2, 3, generator=generator)
    start = torch.tensor([0, 30])
    torch.testing.assert_close(ops.ms_deform_attn(value, shapes, start, locations, weights),
                               ops.ms_deform_attn_pytorch(value, shapes, start, locations, weights))

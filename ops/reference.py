"""Pure-PyTorch multi-scale deformable attention: the numerical reference for the compiled kernels."""
import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with bilinear sampling and zero padding.

    Args:
        value: (B, S, heads, C) values of all levels, flattened row-major and concatenated.
        spatial_shapes: (levels, 2) int64 (H, W) of each level.
        level_start_index: (levels,) offset of each level in S (unused here; kept so that every
            implementation shares one signature).
        sampling_locations: (B, Q, heads, levels, points, 2) normalised (x, y); (0, 0) is the top-left
            corner of the map, pixel centres lie at (i + 0.5) / size, and samples outside read zeros.
        attention_weights: (B, Q, heads, levels, points).

    Returns:
        (B, Q, heads * C)
    """
    del level_start_index
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split(sizes, dim=1)
    # grid_sample wants coordinates in [-1, 1] and heads folded into the batch dimension.
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)  # (B*heads, Q, levels, points, 2)
    sampled = []
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        value_level = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, channels,
                                                                                 height, width)
        sampled.append(F.grid_sample(value_level, grids[:, :, level], mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (B*heads, C, Q, points)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (B*heads, C, Q)
    return output.view(batch, heads * channels, queries).transpose(1, 2).contiguous()


def ms_deform_attn_gather(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """`ms_deform_attn_pytorch` by explicit gathers of each sample's four bilinear neighbours.

    Same arguments, conventions and result (up to float rounding). It exists for ONNX export: it lowers to
    standard ops (Gather, Floor, MatMul; no GridSample, which TensorRT miscompiles in deformable attention,
    NVIDIA/TensorRT#4813), and the level sizes are read as tensors, never as Python numbers, so that the
    image size stays a dynamic dimension of the exported graph.
    """
    batch, tokens, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    device = value.device
    # One row n per (image, query, head), so that tensors keep few dimensions (cheaper to trace), and sizes
    # that broadcast against (rows, levels, points, 4 neighbours).
    rows = batch * queries * heads
    locations = sampling_locations.reshape(rows, levels, points, 2)
    height, width = spatial_shapes[:, 0, None, None], spatial_shapes[:, 1, None, None]
    # Pixel coordinates with pixel centres on integers (align_corners=False).
    x = locations[..., 0] * width.to(locations.dtype)[..., 0] - 0.5
    y = locations[..., 1] * height.to(locations.dtype)[..., 0] - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    # The four neighbours of a sample, as offsets (dx, dy) from its top-left one, and their weights.
    dx = torch.tensor([0, 1, 0, 1], device=device)
    dy = torch.tensor([0, 0, 1, 1], device=device)
    bilinear = torch.stack([1 - fx, fx, 1 - fx, fx], -1) * torch.stack([1 - fy, 1 - fy, fy, fy], -1)
    xi = x0.long()[..., None] + dx
    yi = y0.long()[..., None] + dy
    # Zero padding: neighbours outside the map get weight 0 and read row 0 instead. Masks by multiplication:
    # ONNX Runtime's broadcasting Where is several times slower.
    inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    weights = (bilinear * attention_weights.reshape(rows, levels, points, 1) * inside).to(value.dtype)
    token = (level_start_index[:, None, None] + yi * width + xi) * inside
    # value as a table with one row per (image, token, head): row (b * tokens + token) * heads + head.
    table = value.reshape(batch * tokens * heads, channels)
    image_head = (torch.arange(batch, device=device)[:, None, None] * (tokens * heads)
                  + torch.arange(heads, device=device)).expand(batch, queries, heads).reshape(rows, 1, 1, 1)
    row = token * heads + image_head
    output = None
    for level in range(levels):  # one level's neighbours at a time bounds the gathered memory
        neighbours = table.index_select(0, row[:, level].reshape(-1)).view(rows, points * 4, channels)
        sampled = torch.matmul(weights[:, level].reshape(rows, 1, points * 4), neighbours)
        output = sampled if output is None else output + sampled
    return output.view(batch, queries, heads * channels)

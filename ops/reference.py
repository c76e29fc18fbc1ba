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

"""The multi-scale deformable attention module (Zhu et al., Deformable DETR)."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Each query attends to `n_points` learned sampling locations per head and per feature level.

    Parameter names and initialisation follow the official implementation so that its checkpoints
    load unchanged.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Initial offsets point from each head in its own direction (8 compass directions for 8
        # heads), at distances 1..n_points: a spread-out sampling pattern before any training.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        distances = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        grid = directions[:, None, None, :] * distances[None, None, :, None]
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            query: (B, Q, d_model).
            reference_points: (B, Q, levels, 2) normalised points, or (B, Q, levels, 4) boxes
                (cx, cy, w, h) whose size scales the offsets; relative to the padded maps.
            input_flatten: (B, S, d_model) features of all levels.
            spatial_shapes: (levels, 2) int64 (H, W).
            level_start_index: (levels,) int64.
            padding_mask: (B, S) True at padded positions, whose values are zeroed.
        """
        batch, queries, _ = query.shape
        tokens = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(batch, tokens, self.n_heads, self.d_model // self.n_heads)
        locations = self.sampling_locations(query, reference_points, spatial_shapes)
        # In the locations' precision, which the kernels read both in (fp32 under autocast, where a bf16
        # softmax would also be slower).
        weights = self.attention_weights(query).view(batch, queries, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1, dtype=locations.dtype).view(locations.shape[:-1])
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(output)

    def sampling_locations(self, query: Tensor, reference_points: Tensor, spatial_shapes: Tensor) -> Tensor:
        """(B, Q, heads, levels, points, 2) normalised (x, y): the references moved by the predicted offsets."""
        batch, queries, _ = query.shape
        offsets = self.sampling_offsets(query).view(batch, queries, self.n_heads, self.n_levels, self.n_points, 2)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level.
            sizes = spatial_shapes.flip(-1).to(reference_points.dtype)
            return reference_points[:, :, None, :, None, :] + offsets / sizes[None, None, None, :, None, :]
        if reference_points.shape[-1] == 4:
            # Offsets are in units of half the reference box, spread over the points.
            return (reference_points[:, :, None, :, None, :2]
                    + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {reference_points.shape[-1]}")

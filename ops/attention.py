"""The multi-scale deformable attention module (Zhu et al., Deformable DETR)."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import ms_deform_attn
from .linear import linear


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
        value = linear(input_flatten, self.value_proj.weight, self.value_proj.bias)
        if padding_mask is not None:
            # In place: a linear layer keeps its input, not its output, for the backward pass.
            value = value.masked_fill_(padding_mask[..., None], 0.0)
        value = value.view(batch, tokens, self.n_heads, self.d_model // self.n_heads)
        sample_shape = (batch, queries, self.n_heads, self.n_levels, self.n_points, 2)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level. Their projection's rows divided by the level sizes (W for x,
            # H for y) give them normalised straight away, which saves a pass over the module's largest tensor
            # (the encoder's locations, 28 MB per 800x1333 image). The references are added in place, in their
            # precision (fp32 under autocast), laid out along each head's levels x points x 2 values:
            # broadcasting over a last dimension of 2 runs element by element.
            sizes = spatial_shapes.flip(-1).to(self.sampling_offsets.weight.dtype)
            sizes = sizes[None, :, None, :].expand(self.n_heads, -1, self.n_points, -1).reshape(-1)
            locations = linear(query, self.sampling_offsets.weight / sizes[:, None], self.sampling_offsets.bias / sizes)
            locations = locations.to(torch.promote_types(locations.dtype, reference_points.dtype))
            references = reference_points.repeat(1, 1, 1, self.n_points).view(batch, queries, 1, -1)
            locations = locations.view(batch, queries, self.n_heads, -1).add_(references).view(sample_shape)
        elif reference_points.shape[-1] == 4:
            # Offsets are in units of half the reference box, spread over the points.
            offsets = linear(query, self.sampling_offsets.weight, self.sampling_offsets.bias).view(sample_shape)
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {reference_points.shape[-1]}")
        # In the locations' precision, which the kernels read both in (fp32 under autocast, where a bf16
        # softmax would also be slower).
        weights = linear(query, self.attention_weights.weight, self.attention_weights.bias)
        weights = weights.view(batch, queries, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1, dtype=locations.dtype).view(sample_shape[:-1])
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return linear(output, self.output_proj.weight, self.output_proj.bias)

"""`ms_deform_attn`: the one entry point that every caller uses, whichever implementation runs."""
from torch import Tensor

from .reference import ms_deform_attn_pytorch


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention; see `ms_deform_attn_pytorch` for shapes and conventions."""
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights)

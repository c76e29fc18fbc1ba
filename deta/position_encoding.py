"""Sine position encodings: of feature-map pixels (from the padding mask) and of proposal boxes."""
import math

import torch
from torch import Tensor, nn


def _sine_features(positions: Tensor, num_feats: int, temperature: float) -> Tensor:
    """(..., ) positions → (..., num_feats) interleaved sin/cos at geometric frequencies."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=positions.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    angles = positions[..., None] / dim_t
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Per-pixel encoding of the normalised (y, x) position inside the unpadded image region.

    As in Deformable DETR: pixel i of n valid pixels sits at (i + 0.5) / n · scale, so the encoding
    of a pixel does not depend on how much padding the batch added.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, mask: Tensor) -> Tensor:
        """mask: (B, H, W) True on padding → (B, 2·num_pos_feats, H, W), y-features first."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale
        pos_y = _sine_features(y_embed, self.num_pos_feats, self.temperature)
        pos_x = _sine_features(x_embed, self.num_pos_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def proposal_position_embedding(boxes_logit: Tensor, num_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """(B, Q, 4) unsquashed proposal boxes → (B, Q, 4·num_feats) encodings of cx, cy, w, h in turn."""
    return _sine_features(boxes_logit.sigmoid() * (2 * math.pi), num_feats, temperature).flatten(-2)

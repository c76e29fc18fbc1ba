"""Deformable transformer: encoder over multi-scale features, decoder over object queries."""
import copy

import torch
from torch import Tensor, nn

from ops import MSDeformAttn

from .box_ops import inverse_sigmoid
from .position_encoding import proposal_position_embedding
from .proposals import grid_proposals, select_proposals
from .self_attention import QuerySelfAttention


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then a feed-forward block (post-norm)."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = nn.ReLU()
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None) -> Tensor:
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        return self.feed_forward(self.norm1(src + self.dropout1(attended)))

    def feed_forward(self, src: Tensor) -> Tensor:
        hidden = self.dropout2(self.activation(self.linear1(src)))
        return self.norm2(src + self.dropout3(self.linear2(hidden)))


class DecoderLayer(nn.Module):
    """Query self-attention, deformable cross-attention to the encoder memory, feed-forward (post-norm)."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = QuerySelfAttention(d_model, n_heads, dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = nn.ReLU()
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, padding_mask: Tensor | None) -> Tensor:
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(tgt + query_pos, tgt)))
        attended = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                                   padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        hidden = self.dropout3(self.activation(self.linear1(tgt)))
        return self.norm3(tgt + self.dropout4(self.linear2(hidden)))


def encoder_reference_points(level_shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Pixel centres of every level, normalised to the padded map and repeated for each level.

    `level_shapes` are the (H, W) of the levels as sizes, not a tensor, so that they stay symbolic in export.

    Returns (B, S, levels, 2): each token's (x, y) as seen from every level, which differs between
    levels only through their valid (unpadded) ratios.
    """
    points = []
    for level, (height, width) in enumerate(level_shapes):
        # arange + 0.5, not linspace(0.5, size - 0.5, size) (the same numbers), keeps sizes symbolic in export.
        ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=valid_ratios.device) + 0.5,
                                torch.arange(width, dtype=torch.float32, device=valid_ratios.device) + 0.5,
                                indexing="ij")
        ys = ys.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
        xs = xs.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((xs, ys), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor,
                pos: Tensor, padding_mask: Tensor | None, level_shapes: list[tuple[int, int]]) -> Tensor:
        """`level_shapes`: `spatial_shapes` as sizes, for Python loops (symbolic in export)."""
        reference_points = encoder_reference_points(level_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class Decoder(nn.Module):
    """Decoder that predicts a box after every layer.

    Each layer's box is `sigmoid(box_head(hidden) + logit(reference))`. With iterative refinement
    that box (detached) becomes the next layer's reference; otherwise every layer keeps the first.
    """

    def __init__(self, layer: DecoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, tgt: Tensor, reference: Tensor, memory: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, valid_ratios: Tensor, query_pos: Tensor, padding_mask: Tensor | None,
                box_heads: nn.ModuleList, refine: bool) -> tuple[Tensor, Tensor]:
        """Returns hidden states and boxes of every layer: (layers, B, Q, C) and (layers, B, Q, 4)."""
        hidden_states, boxes = [], []
        for layer, box_head in zip(self.layers, box_heads, strict=False):
            # References live in unpadded-image coordinates; attention samples the padded maps.
            scale = valid_ratios if reference.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
            tgt = layer(tgt, query_pos, reference[:, :, None] * scale[:, None], memory, spatial_shapes,
                        level_start_index, padding_mask)
            delta = box_head(tgt)
            if reference.shape[-1] == 4:
                box = (delta + inverse_sigmoid(reference)).sigmoid()
            else:
                box = torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()
            if refine:
                reference = box.detach()
            hidden_states.append(tgt)
            boxes.append(box)
        return torch.stack(hidden_states), torch.stack(boxes)


class DeformableTransformer(nn.Module):
    """Encoder, query initialisation (two-stage proposals or learned queries) and decoder.

    Heads are owned by the detector and passed to `forward`: index `dec_layers` of each head list is
    the encoder (proposal) head in two-stage mode.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, num_feature_levels: int = 4,
                 dec_n_points: int = 4, enc_n_points: int = 4, two_stage: bool = False,
                 two_stage_num_proposals: int = 300, proposal_nms: bool = False) -> None:
        super().__init__()
        self.d_model = d_model
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.proposal_nms = proposal_nms
        self.encoder = Encoder(EncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead,
                                            enc_n_points), num_encoder_layers)
        self.decoder = Decoder(DecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead,
                                            dec_n_points), num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
            self.pix_trans = nn.Linear(d_model, d_model)
            self.pix_trans_norm = nn.LayerNorm(d_model)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        if not self.two_stage:
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor], query_embed: Tensor | None,
                class_heads: nn.ModuleList, box_heads: nn.ModuleList, refine: bool,
                candidate_mask: Tensor | None = None) -> dict[str, Tensor]:
        """
        Args:
            srcs, masks, pos_embeds: per level (B, C, H, W), (B, H, W) True on padding, (B, C, H, W).
            query_embed: (Q, 2C) learned queries of single-stage mode; None in two-stage mode.
            candidate_mask: (B, S) tokens allowed as two-stage proposals; default all.

        Returns a dict with `hidden_states` (layers, B, Q, C), `boxes` (layers, B, Q, 4),
        `init_reference`, and in two-stage mode `enc_logits`, `enc_boxes`, `anchors`.
        """
        # As sizes for Python loops, and as a tensor for the attention. torch.full keeps sizes symbolic in export
        # (torch.as_tensor would turn them into constants of the traced image size).
        level_shapes = [tuple(src.shape[-2:]) for src in srcs]
        spatial_shapes = torch.stack([torch.stack([torch.full((), size, dtype=torch.long, device=srcs[0].device)
                                                   for size in shape]) for shape in level_shapes])
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([_valid_ratio(mask) for mask in masks], 1)
        src_flat = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        mask_flat = torch.cat([mask.flatten(1) for mask in masks], 1)
        pos_flat = torch.cat([pos.flatten(2).transpose(1, 2) + self.level_embed[level]
                              for level, pos in enumerate(pos_embeds)], 1)

        # Without padding (one image, or images of one size) attention has no values to zero. Whether there is
        # padding is data, which a traced graph (torch.compile, export) cannot branch on: it keeps the mask.
        padding_mask = mask_flat if torch.compiler.is_compiling() or mask_flat.any() else None
        memory = self.encoder(src_flat, spatial_shapes, level_start_index, valid_ratios, pos_flat, padding_mask,
                              level_shapes)

        out: dict[str, Tensor] = {}
        if self.two_stage:
            proposals, proposal_valid, level_ids = grid_proposals(mask_flat, level_shapes)
            valid_memory = memory.masked_fill(~proposal_valid, 0.0)
            output_memory = self.enc_output_norm(self.enc_output(valid_memory))
            enc_layer = len(self.decoder.layers)
            enc_logits = class_heads[enc_layer](output_memory)
            enc_coords = box_heads[enc_layer](output_memory) + proposals
            if candidate_mask is None:
                candidate_mask = torch.ones_like(mask_flat)
            # The encoder head learns class 0 as objectness (its targets are class-agnostic).
            chosen = select_proposals(enc_logits[..., 0].detach(), enc_coords.detach().sigmoid(), level_ids,
                                      candidate_mask, self.two_stage_num_proposals, len(srcs), self.proposal_nms)
            chosen_coords = torch.gather(enc_coords, 1, chosen[..., None].expand(-1, -1, 4)).detach()
            reference = chosen_coords.sigmoid()
            query_pos, tgt = self.pos_trans_norm(self.pos_trans(
                proposal_position_embedding(chosen_coords, self.d_model // 2))).split(self.d_model, dim=2)
            chosen_features = torch.gather(output_memory, 1, chosen[..., None].expand(-1, -1, self.d_model)).detach()
            tgt = tgt + self.pix_trans_norm(self.pix_trans(chosen_features))
            out.update(enc_logits=enc_logits, enc_boxes=enc_coords.sigmoid(), anchors=proposals.sigmoid())
        else:
            batch = memory.shape[0]
            query_pos, tgt = query_embed.split(self.d_model, dim=1)
            query_pos = query_pos[None].expand(batch, -1, -1)
            tgt = tgt[None].expand(batch, -1, -1)
            reference = self.reference_points(query_pos).sigmoid()

        hidden_states, boxes = self.decoder(tgt, reference, memory, spatial_shapes, level_start_index, valid_ratios,
                                            query_pos, padding_mask, box_heads, refine)
        out.update(hidden_states=hidden_states, boxes=boxes, init_reference=reference)
        return out


def _valid_ratio(mask: Tensor) -> Tensor:
    """(B, H, W) padding mask → (B, 2) fraction of unpadded width and height."""
    _, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / height
    valid_w = (~mask[:, 0, :]).sum(1).float() / width
    return torch.stack([valid_w, valid_h], -1)

"""The DETA detector: backbone, input projections, deformable transformer and prediction heads."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Joiner
from .heads import build_heads
from .transformer import DeformableTransformer


class DETA(nn.Module):
    """Two-stage Deformable DETR as trained by DETA (and the other Deformable DETR variants).

    Batches run in one of two ways. Padded (`pad_in_training`, the default in training mode): the
    batch is zero-padded before the backbone and padded tokens may become proposals, exactly the
    official computation, which DETA's published models were trained with. Per image (the default in
    eval mode, `pad_in_inference=False`): the backbone and input projections (whose GroupNorm would see
    the padding) run on each image at its own size, features are then zero-padded with exact masks, and
    padded tokens cannot become proposals, so every image's outputs are independent of its batch. A
    batch of one is the same computation either way.
    """

    def __init__(self, backbone: Joiner, transformer: DeformableTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int, aux_loss: bool = True, with_box_refine: bool = False,
                 two_stage: bool = False, pad_in_training: bool = True, pad_in_inference: bool = False) -> None:
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.pad_in_training = pad_in_training
        self.pad_in_inference = pad_in_inference
        # Registration order equals the official one, so parameter order, and with it the optimizer
        # state of official checkpoints, lines up.
        self.transformer = transformer
        num_decoder_layers = len(transformer.decoder.layers)
        self.class_embed, self.bbox_embed = build_heads(
            hidden_dim, num_classes, num_decoder_layers + int(two_stage), shared=not with_box_refine)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        self.input_proj = nn.ModuleList(_input_projections(backbone.num_channels, hidden_dim, num_feature_levels))
        self.backbone = backbone
        if not two_stage:
            # Learned single-stage queries start as small boxes (sides sigmoid(-2) ≈ 0.12); two-stage
            # queries start as their proposals. With shared heads, head 0 is every head.
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)

    def forward(self, images: list[Tensor] | Tensor) -> dict:
        """images: normalised 3×H×W tensors of any sizes, or a (B, 3, H, W) batch of images of one size
        (what ONNX export traces: no padding, so the same computation as the list in either batching mode).
        Returns the prediction dict (see README)."""
        if isinstance(images, Tensor):
            srcs = self._project(self.backbone[0](images))
            masks = [torch.zeros_like(src[:, 0], dtype=torch.bool) for src in srcs]
            candidate_mask = None
        elif self.pad_in_training if self.training else self.pad_in_inference:
            srcs, masks = self._features_padded(images)
            candidate_mask = None
        else:
            srcs, masks = self._features_per_image(images)
            candidate_mask = ~torch.cat([mask.flatten(1) for mask in masks], 1)
        pos = [self.backbone[1](mask).to(src.dtype) for src, mask in zip(srcs, masks, strict=True)]
        query_embed = None if self.two_stage else self.query_embed.weight
        transformer_out = self.transformer(srcs, masks, pos, query_embed, self.class_embed, self.bbox_embed,
                                           self.with_box_refine, candidate_mask)
        hidden_states, boxes = transformer_out["hidden_states"], transformer_out["boxes"]
        logits = torch.stack([head(hidden) for head, hidden in zip(self.class_embed, hidden_states, strict=False)])
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "init_reference": transformer_out["init_reference"]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": lg, "pred_boxes": bx}
                                  for lg, bx in zip(logits[:-1], boxes[:-1], strict=True)]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": transformer_out["enc_logits"],
                                  "pred_boxes": transformer_out["enc_boxes"],
                                  "anchors": transformer_out["anchors"]}
        return out

    def _project(self, features: list[Tensor]) -> list[Tensor]:
        """Backbone maps → hidden_dim maps, adding stride-2 levels on top of the last backbone map."""
        srcs = [proj(feature) for proj, feature in zip(self.input_proj, features, strict=False)]
        for level in range(len(features), self.num_feature_levels):
            srcs.append(self.input_proj[level](features[-1] if level == len(features) else srcs[-1]))
        return srcs

    def _features_padded(self, images: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        batch, mask = pad_images(images)
        srcs = self._project(self.backbone[0](batch))
        masks = [F.interpolate(mask[None].float(), size=src.shape[-2:])[0].bool() for src in srcs]
        return srcs, masks

    def _features_per_image(self, images: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        per_image: list[list[Tensor]] = [[] for _ in images]
        # Images of equal size still share one backbone call.
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(tuple(image.shape), []).append(index)
        for indices in by_size.values():
            srcs = self._project(self.backbone[0](torch.stack([images[i] for i in indices])))
            for position, index in enumerate(indices):
                per_image[index] = [src[position] for src in srcs]
        srcs, masks = [], []
        for level_maps in zip(*per_image, strict=True):
            src, mask = pad_images(list(level_maps))
            srcs.append(src)
            masks.append(mask)
        return srcs, masks


def pad_images(tensors: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Zero-pad C×H×W tensors at the bottom and right to a common size; mask is True on padding."""
    height = max(t.shape[-2] for t in tensors)
    width = max(t.shape[-1] for t in tensors)
    batch = torch.stack([F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2])) for t in tensors])
    mask = torch.ones((len(tensors), height, width), dtype=torch.bool, device=tensors[0].device)
    for index, tensor in enumerate(tensors):
        mask[index, :tensor.shape[-2], :tensor.shape[-1]] = False
    return batch, mask


def _input_projections(in_channels: list[int], hidden_dim: int, num_levels: int) -> list[nn.Sequential]:
    """1×1 conv + GroupNorm per backbone level, then 3×3 stride-2 conv + GroupNorm per extra level."""
    projections = [nn.Sequential(nn.Conv2d(channels, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
                   for channels in in_channels[:num_levels]]
    channels = in_channels[-1]
    for _ in range(num_levels - len(projections)):
        projections.append(nn.Sequential(nn.Conv2d(channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                                         nn.GroupNorm(32, hidden_dim)))
        channels = hidden_dim
    for projection in projections:
        nn.init.xavier_uniform_(projection[0].weight)
        nn.init.zeros_(projection[0].bias)
    return projections

"""Key names and shapes of detrex's DETA state dicts, written down from detrex's model definitions.

Sources (IDEA-Research/detrex): projects/deta/configs/models/deta_r50.py and deta_swin.py (what is
built), projects/deta/modeling/deformable_detr.py and deformable_transformer.py, detrex/layers
(BaseTransformerLayer: attentions/ffns/norms lists; FFN: layers = [[Linear, act, drop], Linear,
drop]; MultiheadAttention wraps nn.MultiheadAttention as `attn`; MultiScaleDeformableAttention),
detrex/modeling/neck/channel_mapper.py (ConvNormAct: conv + norm) and detectron2's ResNet / Swin.
The published checkpoints (converted_deta_r50_5scale_12ep.pth, deta_r50_5scale_12ep_bs8.pth,
converted_deta_swin_o365_finetune.pth, ...) hold exactly these entries under 'model'.

This file does not use our mapping (deta/formats/detrex.py): the tests check one against the other.
"""
from collections.abc import Sequence

Shapes = dict[str, tuple[int, ...]]

EMBED_DIM, HEADS, LEVELS, POINTS, FFN_DIM, LAYERS, NUM_CLASSES = 256, 8, 5, 4, 2048, 6, 80


def _norm(prefix: str, channels: int, frozen_bn: bool = False) -> Shapes:
    names = ("weight", "bias", "running_mean", "running_var") if frozen_bn else ("weight", "bias")
    return {f"{prefix}.{name}": (channels,) for name in names}


def _linear(prefix: str, out_features: int, in_features: int) -> Shapes:
    return {f"{prefix}.weight": (out_features, in_features), f"{prefix}.bias": (out_features,)}


def resnet50_backbone() -> Shapes:
    """detectron2 ResNet-50 (BasicStem, FrozenBN, stride in the 3x3 conv), stages res2..res5."""
    shapes = {"backbone.stem.conv1.weight": (64, 3, 7, 7), **_norm("backbone.stem.conv1.norm", 64, True)}
    in_channels = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True), start=2):
        out_channels = 4 * width
        for block in range(blocks):
            prefix = f"backbone.res{stage}.{block}"
            if block == 0:
                shapes[f"{prefix}.shortcut.weight"] = (out_channels, in_channels, 1, 1)
                shapes.update(_norm(f"{prefix}.shortcut.norm", out_channels, True))
            for conv, shape in (("conv1", (width, in_channels, 1, 1)), ("conv2", (width, width, 3, 3)),
                                ("conv3", (out_channels, width, 1, 1))):
                shapes[f"{prefix}.{conv}.weight"] = shape
                shapes.update(_norm(f"{prefix}.{conv}.norm", shape[0], True))
            in_channels = out_channels
    return shapes


def swin_large_backbone(depths: Sequence[int] = (2, 2, 18, 2)) -> Shapes:
    """detectron2 SwinTransformer(embed_dim 192, heads (6, 12, 24, 48), window 12, out_indices (1, 2, 3))."""
    shapes = {"backbone.patch_embed.proj.weight": (192, 3, 4, 4), "backbone.patch_embed.proj.bias": (192,),
              **_norm("backbone.patch_embed.norm", 192)}
    for stage, (depth, heads) in enumerate(zip(depths, (6, 12, 24, 48), strict=True)):
        dim = 192 * 2 ** stage
        for block in range(depth):
            prefix = f"backbone.layers.{stage}.blocks.{block}"
            shapes.update({**_norm(f"{prefix}.norm1", dim),
                           f"{prefix}.attn.relative_position_bias_table": ((2 * 12 - 1) ** 2, heads),
                           f"{prefix}.attn.relative_position_index": (12 * 12, 12 * 12),
                           **_linear(f"{prefix}.attn.qkv", 3 * dim, dim), **_linear(f"{prefix}.attn.proj", dim, dim),
                           **_norm(f"{prefix}.norm2", dim), **_linear(f"{prefix}.mlp.fc1", 4 * dim, dim),
                           **_linear(f"{prefix}.mlp.fc2", dim, 4 * dim)})
        if stage < 3:
            shapes[f"backbone.layers.{stage}.downsample.reduction.weight"] = (2 * dim, 4 * dim)
            shapes.update(_norm(f"backbone.layers.{stage}.downsample.norm", 4 * dim))
    for out_index in (1, 2, 3):
        shapes.update(_norm(f"backbone.norm{out_index}", 192 * 2 ** out_index))
    return shapes


def _deformable_attention(prefix: str) -> Shapes:
    return {**_linear(f"{prefix}.sampling_offsets", HEADS * LEVELS * POINTS * 2, EMBED_DIM),
            **_linear(f"{prefix}.attention_weights", HEADS * LEVELS * POINTS, EMBED_DIM),
            **_linear(f"{prefix}.value_proj", EMBED_DIM, EMBED_DIM),
            **_linear(f"{prefix}.output_proj", EMBED_DIM, EMBED_DIM)}


def _ffn(prefix: str) -> Shapes:
    return {**_linear(f"{prefix}.ffns.0.layers.0.0", FFN_DIM, EMBED_DIM),
            **_linear(f"{prefix}.ffns.0.layers.1", EMBED_DIM, FFN_DIM)}


def _heads(prefix: str) -> Shapes:
    """7 class and box heads: one per decoder layer, then the encoder (proposal) head."""
    shapes: Shapes = {}
    for head in range(LAYERS + 1):
        shapes.update(_linear(f"{prefix}class_embed.{head}", NUM_CLASSES, EMBED_DIM))
    for head in range(LAYERS + 1):
        for layer, out_features in enumerate((EMBED_DIM, EMBED_DIM, 4)):
            shapes.update(_linear(f"{prefix}bbox_embed.{head}.layers.{layer}", out_features, EMBED_DIM))
    return shapes


def deta_shapes(backbone: Shapes, backbone_channels: Sequence[int]) -> Shapes:
    """DeformableDETR(num_classes 80, with_box_refine, as_two_stage, 5 levels) around `backbone`."""
    shapes = dict(backbone)
    for index, channels in enumerate(backbone_channels):
        shapes.update({f"neck.convs.{index}.conv.weight": (EMBED_DIM, channels, 1, 1),
                       f"neck.convs.{index}.conv.bias": (EMBED_DIM,), **_norm(f"neck.convs.{index}.norm", EMBED_DIM)})
    for index, channels in enumerate((backbone_channels[-1], EMBED_DIM)):
        shapes.update({f"neck.extra_convs.{index}.conv.weight": (EMBED_DIM, channels, 3, 3),
                       f"neck.extra_convs.{index}.conv.bias": (EMBED_DIM,),
                       **_norm(f"neck.extra_convs.{index}.norm", EMBED_DIM)})
    for layer in range(LAYERS):
        prefix = f"transformer.encoder.layers.{layer}"
        shapes.update({**_deformable_attention(f"{prefix}.attentions.0"), **_ffn(prefix),
                       **_norm(f"{prefix}.norms.0", EMBED_DIM), **_norm(f"{prefix}.norms.1", EMBED_DIM)})
    for layer in range(LAYERS):
        prefix = f"transformer.decoder.layers.{layer}"
        shapes.update({f"{prefix}.attentions.0.attn.in_proj_weight": (3 * EMBED_DIM, EMBED_DIM),
                       f"{prefix}.attentions.0.attn.in_proj_bias": (3 * EMBED_DIM,),
                       **_linear(f"{prefix}.attentions.0.attn.out_proj", EMBED_DIM, EMBED_DIM),
                       **_deformable_attention(f"{prefix}.attentions.1"), **_ffn(prefix),
                       **{key: shape for norm in range(3) for key, shape in _norm(f"{prefix}.norms.{norm}",
                                                                                  EMBED_DIM).items()}})
    shapes.update(_heads("transformer.decoder."))  # the detector hands its head lists to the decoder too
    shapes["transformer.level_embeds"] = (LEVELS, EMBED_DIM)
    shapes.update({**_linear("transformer.enc_output", EMBED_DIM, EMBED_DIM),
                   **_norm("transformer.enc_output_norm", EMBED_DIM),
                   **_linear("transformer.pos_trans", 2 * EMBED_DIM, 2 * EMBED_DIM),
                   **_norm("transformer.pos_trans_norm", 2 * EMBED_DIM),
                   **_linear("transformer.pix_trans", EMBED_DIM, EMBED_DIM),
                   **_norm("transformer.pix_trans_norm", EMBED_DIM)})
    shapes.update(_heads(""))
    return shapes


def deta_r50_shapes() -> Shapes:
    return deta_shapes(resnet50_backbone(), (512, 1024, 2048))


def deta_swin_large_shapes(depths: Sequence[int] = (2, 2, 18, 2)) -> Shapes:
    return deta_shapes(swin_large_backbone(depths), (384, 768, 1536))

"""Swin Transformer backbone from timm's modules, returning the stride-8/16/32 maps (DETA's Swin-L)."""
import functools
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.swin_transformer import (
    SwinTransformerBlock,
    WindowAttention,
    checkpoint_filter_fn,
    window_partition,
    window_reverse,
)
from torch import Tensor, nn

from .errors import ArgumentError

SWIN_VARIANTS = {
    # Official DETA's Swin-L (its models/swin.py): patch 4, no absolute position embedding, drop path 0.3.
    "swin_large": {"model_name": "swin_large_patch4_window12_384", "embed_dim": 192, "depths": (2, 2, 18, 2),
                   "num_heads": (6, 12, 24, 48), "window_size": 12, "drop_path_rate": 0.3},
}
SWIN_ALIASES = {"swin": "swin_large"}  # the official spelling, `--backbone swin`
_PRETRAINED_TAG = "ms_in22k"  # the ImageNet-22k weights the official Swin-L starts from


class _OriginalPaddingBlock(SwinTransformerBlock):
    """timm's Swin block, but padding maps to whole windows before the cyclic shift, not after.

    The original Swin detection code (used by official DETA, detectron2 and HF) pads first; the two
    orders differ on every map whose sides are not multiples of the window, i.e. on most images.
    """

    def _attn(self, x: Tensor) -> Tensor:
        _, height, width, channels = x.shape
        window_h, window_w = self.window_size
        x = F.pad(x, (0, 0, 0, -width % window_w, 0, -height % window_h))
        padded_h, padded_w = x.shape[1:3]
        shift = self.shift_size
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, self.window_area, channels)
        windows = self.attn(windows, mask=self.get_attn_mask(x))
        x = window_reverse(windows.view(-1, window_h, window_w, channels), self.window_size, padded_h, padded_w)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :height, :width].contiguous()


class SwinBackbone(nn.Module):
    """Swin stages 2–4 (strides 8, 16, 32), each through its own LayerNorm, as NCHW maps.

    Windows keep their full size and shift on maps smaller than a window, and images are padded to
    whole patches, as in the original code. The body is trained whole (no frozen stages) unless
    `train_backbone` is False; gradient checkpointing saves memory at the large Swin-L input sizes.
    """

    def __init__(self, name: str, train_backbone: bool, pretrained: str) -> None:
        super().__init__()
        variant = SWIN_VARIANTS[SWIN_ALIASES.get(name, name)]
        swin = _create_swin(variant, pretrained)
        for module in swin.modules():
            if isinstance(module, SwinTransformerBlock):
                module.__class__ = _OriginalPaddingBlock
            if isinstance(module, WindowAttention):
                # timm recomputes the index on load; the other code bases save it, and so do we to share their keys.
                module.register_buffer("relative_position_index", module.relative_position_index, persistent=True)
        swin.set_grad_checkpointing(True)
        channels = [info["num_chs"] for info in swin.feature_info]
        self.strides = [8, 16, 32]
        self.num_channels = channels[1:]
        self.body = nn.ModuleDict({"patch_embed": swin.patch_embed, "layers": swin.layers,
                                   **{f"norm{stage}": nn.LayerNorm(channels[stage]) for stage in (1, 2, 3)}})
        self.body.requires_grad_(train_backbone)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.body["patch_embed"](images)
        features = []
        for stage, layer in enumerate(self.body["layers"]):
            x = layer(x)
            if stage > 0:
                features.append(self.body[f"norm{stage}"](x).permute(0, 3, 1, 2).contiguous())
        return features


def is_swin(name: str) -> bool:
    return name in SWIN_VARIANTS or name in SWIN_ALIASES


def _create_swin(variant: dict, pretrained: str) -> nn.Module:
    """timm's Swin for any input size; `pretrained`: 'default' (timm's download of the ImageNet-22k
    weights the official Swin-L starts from), 'none', or a file of the original Swin release."""
    name = variant["model_name"]
    options = {**{key: value for key, value in variant.items() if key != "model_name"}, "num_classes": 0,
               "strict_img_size": False, "always_partition": True,
               "embed_layer": functools.partial(PatchEmbed, dynamic_img_pad=True)}
    if pretrained == "default":
        try:
            return timm.create_model(f"{name}.{_PRETRAINED_TAG}", pretrained=True, **options)
        except Exception as error:  # offline, proxy, corrupt cache: all end the same way for the user
            raise ArgumentError(f"{{pretrained_backbone}}: could not load timm's {name}.{_PRETRAINED_TAG} weights "
                                f"({type(error).__name__}); pass 'none' or the path of "
                                "swin_large_patch4_window12_384_22k.pth", pretrained_backbone=pretrained) from error
    model = timm.create_model(name, **options)
    if pretrained != "none":
        _load_release_file(model, pretrained)
    return model


def _load_release_file(model: nn.Module, path: str) -> None:
    """Weights in the original Swin release's layout (the official code loads
    swin_large_patch4_window12_384_22k.pth), optionally under 'model'; the classifier is not used."""
    if not Path(path).is_file():
        raise ArgumentError("{pretrained_backbone}: no such file (use 'default', 'none' or a path)",
                            pretrained_backbone=path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        # timm's own import: renumbers the patch merging, drops the buffers it recomputes.
        state_dict = checkpoint_filter_fn(state_dict, model)
        missing, _ = model.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("head.")},
                                           strict=False)
    except Exception as error:
        raise ArgumentError(f"{{pretrained_backbone}}: not a readable Swin state dict of this size "
                            f"({type(error).__name__}: {str(error)[:200]})", pretrained_backbone=path) from error
    missing = [key for key in missing if not key.startswith("head.")]
    if missing:
        raise ArgumentError(f"{{pretrained_backbone}}: not Swin weights of this size; missing {len(missing)} "
                            f"keys, e.g. {missing[:3]}", pretrained_backbone=path)

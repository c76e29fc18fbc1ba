"""ResNet backbone with frozen BatchNorm, returning the stride-8/16/32 feature maps."""
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from .errors import ArgumentError

RESNET_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, stored as buffers.

    Unlike torchvision's version, eps is added to the variance before the rsqrt (as in the
    official DETA), which keeps near-zero variances finite.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        # In x's dtype: fp32 statistics would turn bf16 activations (autocast) into fp32 ones, which the
        # next convolution casts back. One fused pass over x instead of a multiply and an add.
        return torch.addcmul(shift.to(x.dtype)[None, :, None, None], x, scale.to(x.dtype)[None, :, None, None])


class ResNetBackbone(nn.Module):
    """torchvision ResNet body returning layer2/3/4 (strides 8, 16, 32), or layer4 alone.

    The stem and layer1 are frozen as in the official recipe; the whole body is frozen when
    `train_backbone` is False (lr_backbone 0).
    """

    def __init__(self, name: str, train_backbone: bool, multi_scale: bool, dilation: bool) -> None:
        super().__init__()
        if name not in RESNET_WEIGHTS:
            raise ArgumentError(f"{{backbone}}: expected one of {', '.join(RESNET_WEIGHTS)}, swin_large (or swin)",
                                backbone=name)
        if dilation and name in ("resnet18", "resnet34"):
            raise ArgumentError(f"{{dilation}}: {name}'s basic blocks cannot be dilated; use resnet50 or resnet101",
                                dilation=True)
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=FrozenBatchNorm2d)
        for param_name, param in resnet.named_parameters():
            trainable = train_backbone and any(layer in param_name for layer in ("layer2", "layer3", "layer4"))
            param.requires_grad_(trainable)
        layer_channels = [resnet.layer2[-1], resnet.layer3[-1], resnet.layer4[-1]]
        channels = [_block_out_channels(block) for block in layer_channels]
        if multi_scale:
            return_layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
            self.strides = [8, 16, 32]
            self.num_channels = channels
        else:
            return_layers = {"layer4": "0"}
            self.strides = [32]
            self.num_channels = channels[-1:]
        if dilation:
            self.strides[-1] //= 2
        self.body = IntermediateLayerGetter(resnet, return_layers=return_layers)

    def forward(self, images: Tensor) -> list[Tensor]:
        return list(self.body(images).values())


def _block_out_channels(block: nn.Module) -> int:
    last_conv = block.conv3 if hasattr(block, "conv3") else block.conv2
    return last_conv.out_channels


class Joiner(nn.Sequential):
    """(backbone, position encoding) as one module.

    It exists so that parameter names start with `backbone.0.body.`, as in official checkpoints
    and in the optimiser's backbone parameter group.
    """

    def __init__(self, backbone: nn.Module, position_encoding: nn.Module) -> None:
        super().__init__(backbone, position_encoding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels


def load_pretrained_backbone(backbone: ResNetBackbone, name: str, choice: str) -> None:
    """Load ImageNet weights into the body: `default` (torchvision's), `none`, or a file path."""
    if choice == "none":
        return
    if choice == "default":
        weights = getattr(torchvision.models, RESNET_WEIGHTS[name]).IMAGENET1K_V1
        cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
        cached = cache_dir / Path(weights.url).name
        try:
            state_dict = weights.get_state_dict(progress=False)
        except Exception as error:  # offline, proxy, corrupt cache: all end the same way for the user
            raise ArgumentError(
                f"{{pretrained_backbone}}: could not load torchvision's {name} ImageNet weights (looked in {cached}; "
                f"{type(error).__name__}); pass 'none' or a local file path", pretrained_backbone=choice) from error
    else:
        path = Path(choice)
        if not path.is_file():
            raise ArgumentError("{pretrained_backbone}: no such file (use 'default', 'none' or a path)",
                                pretrained_backbone=choice)
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ArgumentError(f"{{pretrained_backbone}}: not a readable PyTorch state dict ({error})",
                                pretrained_backbone=choice) from error
        state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    body_keys = backbone.body.state_dict().keys()
    body_state = {k: v for k, v in state_dict.items() if k in body_keys}
    missing = sorted(set(body_keys) - set(body_state) - {k for k in body_keys if k.endswith("num_batches_tracked")})
    if missing:
        raise ArgumentError(f"{{pretrained_backbone}}: not {name} weights; missing {len(missing)} keys, "
                            f"e.g. {missing[:3]}", pretrained_backbone=choice)
    backbone.body.load_state_dict(body_state, strict=False)

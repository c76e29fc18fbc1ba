"""Inference-only ResNet: frozen BatchNorm folded into the convolutions, ReLU and residual adds fused into them.

A frozen BatchNorm is an affine map per channel, so conv -> BN equals one convolution with scaled weights and
a bias; on the CPU, oneDNN also applies the ReLU and the residual add as post-ops of that convolution. That
removes every separate pass over the feature maps (BN, ReLU, add): about a fifth of the backbone's time on
CPU at 800x1333. The weights are folded again whenever any of them changes (a training step between two
evaluations), so the module's own parameters stay the ones that train and that checkpoints hold.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# oneDNN's fused convolution (the one torch.compile's CPU backend emits), where this torch build has it.
_FUSED_CONV = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if torch.backends.mkldnn.is_available() \
    else None


class FoldedConv:
    """conv -> frozen BN as one convolution: weight x scale, bias = shift."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module) -> None:
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        shift = norm.bias - norm.running_mean * scale
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        self.weight = (conv.weight * scale[:, None, None, None]).contiguous(memory_format=torch.channels_last)
        self.bias = shift
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def __call__(self, x: Tensor, relu: bool, residual: Tensor | None = None) -> Tensor:
        """conv(x) [+ residual] [then ReLU]."""
        if _FUSED_CONV is not None and x.device.type == "cpu" and x.dtype == torch.float32 \
                and not torch.is_autocast_enabled("cpu"):
            geometry = (self.padding, self.stride, self.dilation, self.groups)
            if residual is not None:
                return _FUSED_CONV.binary(x, residual, self.weight, self.bias, *geometry, "add", 1.0,
                                          "relu" if relu else "none", [], "")
            return _FUSED_CONV(x, self.weight, self.bias, *geometry, "relu" if relu else "none", [], "")
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if residual is not None:
            out = out + residual
        return out.relu_() if relu else out


class FoldedResNet:
    """A torchvision ResNet body (IntermediateLayerGetter of FrozenBatchNorm2d blocks), folded for inference.

    Calling it gives what the body gives: {return name: feature map}.
    """

    def __init__(self, body: nn.Module) -> None:
        self.stem = FoldedConv(body.conv1, body.bn1)
        self.maxpool = body.maxpool
        self.layers = [(name, [_fold_block(block) for block in getattr(body, name)])
                       for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(body, name)]
        self.return_layers = body.return_layers

    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.stem(x, relu=True))
        out = {}
        for name, blocks in self.layers:
            for convs, downsample in blocks:
                identity = x if downsample is None else downsample(x, relu=False)
                for conv in convs[:-1]:
                    x = conv(x, relu=True)
                x = convs[-1](x, relu=True, residual=identity)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def _fold_block(block: nn.Module) -> tuple[list[FoldedConv], FoldedConv | None]:
    """A Bottleneck's (conv1..3) or BasicBlock's (conv1..2) folded convolutions, and its folded downsample."""
    convs = [FoldedConv(getattr(block, f"conv{i}"), getattr(block, f"bn{i}"))
             for i in (1, 2, 3) if hasattr(block, f"conv{i}")]
    downsample = FoldedConv(*block.downsample) if block.downsample is not None else None
    return convs, downsample


def weights_version(module: nn.Module) -> tuple:
    """Changes whenever any parameter or buffer of `module` is replaced or modified in place."""
    return tuple((tensor.data_ptr(), tensor._version) for tensor in (*module.parameters(), *module.buffers()))

"""A torchvision ResNet body rewritten for inference: frozen BatchNorms folded into the convolutions, and on the
CPU the ReLU and residual add fused into them too.

A frozen BatchNorm is an affine map per channel, so conv -> BN equals one convolution with scaled weights and a
bias; oneDNN also applies the ReLU and the residual add as post-ops of that convolution. That removes every
separate pass over the feature maps (BN, ReLU, add): about a fifth of the backbone's time on CPU at 800x1333.
Part of `deta.optimize_for_inference`; the folded weights are a snapshot of the ones they were made from.
"""
import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

# oneDNN's fused convolution (the one torch.compile's CPU backend emits), where this torch build has it.
_FUSED_CONV = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if torch.backends.mkldnn.is_available() \
    else None


class FoldedConv2d(nn.Conv2d):
    """conv -> frozen BatchNorm as one convolution, then optionally + a residual, then optionally ReLU.

    Inputs are made channels-last (NHWC): oneDNN's convolutions work on that layout and would otherwise reorder
    every input and output, and the feature maps' flattening into tokens becomes a view.
    """

    def __init__(self, conv: nn.Conv2d, norm: nn.Module, relu: bool) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, bias=True, device="meta")
        weight, bias = fuse_conv_bn_weights(conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
                                            norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias)
        self.weight = nn.Parameter(weight.detach().contiguous(memory_format=torch.channels_last), requires_grad=False)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False)
        self.relu = relu

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        # The fused op has no autograd, and traced graphs (torch.compile, export) cannot hold it.
        if (_FUSED_CONV is not None and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling()):
            geometry = (self.padding, self.stride, self.dilation, self.groups)
            activation = "relu" if self.relu else "none"
            if residual is not None:
                return _FUSED_CONV.binary(x, residual, self.weight, self.bias, *geometry, "add", 1.0, activation, [],
                                          "")
            return _FUSED_CONV(x, self.weight, self.bias, *geometry, activation, [], "")
        out = self._conv_forward(x, self.weight, self.bias)
        if residual is not None:
            out = out + residual
        return out.relu() if self.relu else out


class FoldedBlock(nn.Module):
    """A torchvision Bottleneck or BasicBlock with its convolutions folded: the last one adds the shortcut."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        numbers = [i for i in (1, 2, 3) if hasattr(block, f"conv{i}")]
        self.convs = nn.ModuleList(FoldedConv2d(getattr(block, f"conv{i}"), getattr(block, f"bn{i}"), relu=True)
                                   for i in numbers)
        self.downsample = None if block.downsample is None else FoldedConv2d(*block.downsample, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        for conv in self.convs[:-1]:
            x = conv(x)
        return self.convs[-1](x, shortcut)


def fold_resnet_body(body: nn.Module) -> None:
    """Rewrite a ResNet body (torchvision's IntermediateLayerGetter) in place: stem and blocks folded."""
    body.conv1 = FoldedConv2d(body.conv1, body.bn1, relu=True)
    body.bn1 = body.relu = nn.Identity()
    for name in ("layer1", "layer2", "layer3", "layer4"):
        if hasattr(body, name):
            setattr(body, name, nn.Sequential(*(FoldedBlock(block) for block in getattr(body, name))))

"""`optimize_for_inference`: the one explicit step that makes a trained DETA faster at inference.

The model itself computes through its modules' `forward` in training and evaluation alike, so that forward
hooks, torch.fx, LoRA (peft), quantisation and pruning see every layer. The speed-ups below instead rewrite a
copy of it, mostly for the CPU:

- ResNet: frozen BatchNorms folded into the convolutions, ReLU and residual adds fused into them, channels-last
  feature maps (deta.folded_resnet);
- linear layers: bias, and the ReLU that follows a feed-forward or box-head layer, applied by oneDNN inside the
  matmul (PyTorch's CPU linear copies the bias into the output first, and a ReLU is one more pass);
- encoder feed-forward blocks run on slices of tokens (fresh memory for a whole (tokens, 2048) hidden layer, 180
  MB at 800x1333, costs more in page faults than its matmuls);
- deformable attention: the level sizes folded into the offset projection's rows, one pass fewer over its
  largest tensor.

Each fast path runs only where it is exact and possible (fp32 on the CPU, no autograd, eager mode); elsewhere
the same modules compute as the plain ones, so the copy also runs on CUDA, under bf16 autocast, torch.compile and
ONNX export.
"""
import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ops import MSDeformAttn

from .backbone import ResNetBackbone
from .folded_resnet import fold_resnet_body
from .heads import MLP
from .transformer import DecoderLayer, EncoderLayer

# oneDNN's linear with post-ops (the one torch.compile's CPU backend emits), where this torch build has it.
_FUSED_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() \
    else None
# Tokens per slice of an encoder feed-forward block: a 16 MB fp32 hidden layer at d_ffn 2048.
FFN_SLICE_TOKENS = 2048


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode, rewritten for fast inference, with the same outputs up to float rounding.

    `model` is left as it is. The copy holds a snapshot of the weights: after they change (a training step),
    make it again. Its state dict keeps the model's keys except for the folded ResNet's.
    """
    optimized = copy.deepcopy(model).eval().requires_grad_(False)
    for module in list(optimized.modules()):
        if isinstance(module, ResNetBackbone):
            fold_resnet_body(module.body)
        elif isinstance(module, EncoderLayer | DecoderLayer):
            module.linear1 = FusedLinear(module.linear1, relu=True)
            module.activation = nn.Identity()
            if isinstance(module, EncoderLayer):
                module.__class__ = SlicedEncoderLayer
        elif isinstance(module, MLP):
            module.layers = nn.ModuleList([*(FusedLinear(layer, relu=True) for layer in module.layers[:-1]),
                                           module.layers[-1]])
            module.activation = nn.Identity()
        elif isinstance(module, MSDeformAttn):
            module.__class__ = LevelFoldedMSDeformAttn
    for parent in list(optimized.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, FusedLinear(child, relu=False))
    return optimized


def fused_linear(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
    """x @ weight.T + bias, then max(., 0) with `relu`: one oneDNN op on the CPU in fp32 without autograd
    (it has no backward) outside traced graphs (ONNX has no such op), else F.linear."""
    if (_FUSED_LINEAR is not None and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()):
        return _FUSED_LINEAR(x, weight, bias, "relu" if relu else "none", [], "")
    out = F.linear(x, weight, bias)
    return F.relu(out) if relu else out


class FusedLinear(nn.Linear):
    """An nn.Linear (the same parameters) whose bias, and optionally a following ReLU, are fused into the matmul."""

    def __init__(self, linear: nn.Linear, relu: bool) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        return fused_linear(x, self.weight, self.bias, self.relu)


class SlicedEncoderLayer(EncoderLayer):
    """An encoder layer whose feed-forward block runs on slices of FFN_SLICE_TOKENS tokens in eager mode.

    Slices of the (batch·tokens, C) rows stay contiguous; slices along the token axis of a batch of several
    images would not, and linear layers would copy them through a batched matmul. Traced graphs (torch.compile,
    export) take the whole block: they would fix the number of slices.
    """

    def feed_forward(self, src: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return super().feed_forward(src)
        rows = src.flatten(0, 1)
        return torch.cat([EncoderLayer.feed_forward(self, part) for part in rows.split(FFN_SLICE_TOKENS)]).view_as(src)


class LevelFoldedMSDeformAttn(MSDeformAttn):
    """Deformable attention whose offset projection gives normalised offsets directly.

    Its rows divided by the level sizes (W for x, H for y) save a pass over the module's largest tensor (the
    encoder's locations, 28 MB per 800x1333 image); the references are then added in place, in their precision
    (fp32 under autocast), laid out along each head's levels x points x 2 values (broadcasting over a last
    dimension of 2 runs element by element). Traced graphs take the plain computation: in place on a view of
    the projection, ONNX export makes a Transpose and a ScatterND of it.
    """

    def sampling_locations(self, query: Tensor, reference_points: Tensor, spatial_shapes: Tensor) -> Tensor:
        if reference_points.shape[-1] != 2 or torch.compiler.is_compiling():
            return super().sampling_locations(query, reference_points, spatial_shapes)
        batch, queries, _ = query.shape
        projection = self.sampling_offsets
        sizes = spatial_shapes.flip(-1).to(projection.weight.dtype)
        sizes = sizes[None, :, None, :].expand(self.n_heads, -1, self.n_points, -1).reshape(-1)
        locations = fused_linear(query, projection.weight / sizes[:, None], projection.bias / sizes, relu=False)
        locations = locations.to(torch.promote_types(locations.dtype, reference_points.dtype))
        references = reference_points.repeat(1, 1, 1, self.n_points).view(batch, queries, 1, -1)
        locations = locations.view(batch, queries, self.n_heads, -1).add_(references)
        return locations.view(batch, queries, self.n_heads, self.n_levels, self.n_points, 2)

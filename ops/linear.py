"""`linear`: F.linear with an optional ReLU, bias and ReLU fused into the matmul at CPU inference.

PyTorch's CPU linear copies the bias into the output before the matmul, and a ReLU is one more pass; over
the encoder's (tokens, 2048) hidden layers those passes cost several percent of the forward at 800x1333.
oneDNN's linear (the one torch.compile's CPU backend emits) applies bias and ReLU as post-ops of the
matmul. It has no backward, so it runs only where no gradient is recorded, in fp32 outside autocast, and
not in traced graphs (torch.compile, export: ONNX has no such op); everywhere else this is F.linear.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

_FUSED_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() \
    else None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool = False) -> Tensor:
    """x @ weight.T + bias, then max(., 0) with `relu`."""
    if (_FUSED_LINEAR is not None and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()):
        return _FUSED_LINEAR(x, weight, bias, "relu" if relu else "none", [], "")
    out = F.linear(x, weight, bias)
    return F.relu(out, inplace=True) if relu else out

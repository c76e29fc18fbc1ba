"""The compiled kernels as PyTorch custom ops `torch.ops.deta_ops.*`: loading, fake implementations, autograd.

The schema and the CPU/CUDA kernels are registered by the C++ library (ops/csrc); this module adds what
`torch.compile` and `torch.export` need to trace through the op: a fake (meta) implementation of each op
and an autograd formula whose backward is itself the compiled backward op.
"""
from __future__ import annotations

import functools
import importlib
import warnings

import torch
from torch import Tensor

from . import build

FORWARD = "deta_ops::ms_deform_attn"
BACKWARD = "deta_ops::ms_deform_attn_backward"


@functools.cache
def compiled_devices() -> frozenset[str]:
    """Device types ("cpu", "cuda") that have a compiled kernel; loads, and if needed builds, the library once.

    Empty after one warning when no library can be loaded, in which case callers use the PyTorch reference.
    """
    try:
        _load_library()
    except Exception as error:  # whatever failed (no compiler, build error), the reference works
        warnings.warn(f"deta_ops: the compiled multi-scale deformable attention is unavailable ({error}); "
                      "using the much slower PyTorch reference", stacklevel=2)
        return frozenset()
    _register()
    return frozenset(device for device in ("cpu", "cuda")
                     if torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD, device.upper()))


def _load_library() -> None:
    try:  # built ahead of time by `pip install -e .` / setup.py
        importlib.import_module(f"{__package__}._C")
        return
    except ImportError:
        pass
    with_cuda = torch.cuda.is_available() and build.can_build_cuda()
    try:
        build.jit_load(with_cuda)
    except Exception as error:
        if not with_cuda:
            raise
        warnings.warn(f"deta_ops: the CUDA kernels failed to build ({error}); building the CPU kernels only",
                      stacklevel=3)
        build.jit_load(with_cuda=False)


def _register() -> None:
    torch.library.register_fake(FORWARD)(_forward_fake)
    torch.library.register_fake(BACKWARD)(_backward_fake)
    torch.library.register_autograd(FORWARD, _backward, setup_context=_setup_context)


def _forward_fake(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor) -> Tensor:
    batch, _, heads, channels = value.shape
    return value.new_empty(batch, sampling_locations.shape[1], heads * channels)


def _backward_fake(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # The kernels return contiguous gradients in the dtype of each input.
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx: torch.autograd.function.FunctionCtx,
              grad_output: Tensor) -> tuple[Tensor, None, None, Tensor, Tensor]:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = torch.ops.deta_ops.ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return grad_value, None, None, grad_locations, grad_weights

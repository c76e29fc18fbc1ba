"""`ms_deform_attn`: the one entry point that every caller uses, whichever implementation runs."""
import warnings

import torch
from torch import Tensor

from .custom_op import compiled_devices
from .reference import ms_deform_attn_gather, ms_deform_attn_pytorch


# Evaluated while tracing, not traced: torch.compile(fullgraph=True) and torch.export see a constant and
# never step into the library loader.
@torch.compiler.assume_constant_result
def _use_compiled(device_type: str) -> bool:
    """Whether tensors on this device type run the compiled kernel (loading it on first use)."""
    devices = compiled_devices()
    if devices and device_type == "cuda" and "cuda" not in devices:
        warnings.warn("deta_ops was built without CUDA kernels (reinstall where nvcc is available); using the "
                      "much slower PyTorch reference for CUDA tensors", stacklevel=3)
    return device_type in devices


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention; see `ms_deform_attn_pytorch` for shapes and conventions.

    Runs the compiled CPU or CUDA kernel when one is available for value's device, else the reference.
    Levels must lie inside value: the CPU kernel raises otherwise, while the CUDA kernel, which reads the
    shapes on the device to avoid a host synchronisation, stops with a device-side assert (as PyTorch's own
    indexing kernels do), after which the process's CUDA context is unusable. Its backward pass adds value
    gradients with atomics, so it is not bitwise deterministic (`torch.use_deterministic_algorithms` says so).
    """
    if torch.onnx.is_in_onnx_export():
        return ms_deform_attn_gather(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if value.is_floating_point() and _use_compiled(value.device.type):
        return torch.ops.deta_ops.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                                 attention_weights)
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights)

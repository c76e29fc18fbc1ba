"""Process group from torchrun's environment, and the few collectives the loop needs.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, on one node or many (Slurm
runs one torchrun per node, see scripts/slurm_train.sh). Without them we are a single process.
"""
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from deta.errors import InputError


def init_distributed(device_name: str | None) -> torch.device:
    """Join the process group when launched by torchrun; return this process's device."""
    name = device_name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise InputError(f"--device {name}: not a device name; pass cuda or cpu") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is visible; pass --device cpu")
    if "RANK" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_gather_object(obj: Any) -> list[Any]:
    """`obj` of every process, in rank order."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def reduce_mean(values: dict[str, Tensor]) -> dict[str, float]:
    """Mean of each scalar over all processes (one all-reduce for the whole dict)."""
    if not values:
        return {}
    names = sorted(values)  # every process must stack in the same order
    stacked = torch.stack([values[name].detach().float() for name in names])
    if dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist(), strict=True))


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX); without, oneDNN falls back
    to a path far slower than fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()

"""One training epoch, and one COCO evaluation pass."""
import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from deta.checkpoint import save_text_atomically
from training.accumulation import VirtualRanks, effective_num_boxes
from training.board import Board
from training.coco_eval import coco_box_stats, coco_detections, gather_detections
from training.distributed import is_main_process, reduce_mean
from training.ema import ModelEMA
from training.progress import Progress
from training.writing import write_on_main_process

log = logging.getLogger(__name__)

# On the progress line: the final decoder layer's terms. All terms go to log.txt and TensorBoard.
SHOWN = ("loss", "loss_ce", "loss_bbox", "loss_giou", "grad_norm", "lr")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def train_one_epoch(model: nn.Module, criterion: nn.Module, data_loader: DataLoader,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int, *,
                    max_norm: float = 0.0, amp: bool = False, print_freq: int = 10,
                    board: Board | None = None, ema: ModelEMA | None = None) -> dict[str, float]:
    """Train for one pass over `data_loader`; returns the epoch means of the weighted losses, lr and grad norm.
    `ema`, if given, is updated after every optimizer step.

    `data_loader` yields (images, targets) batches, one per optimizer step, or is a VirtualRanks whose steps
    are --accumulate micro-batches (training.accumulation). Raises NonFiniteLossError (on every process alike)
    before stepping on a NaN/inf loss.
    """
    model.train()
    criterion.train()
    virtual_ranks = data_loader if isinstance(data_loader, VirtualRanks) else None
    progress = Progress(f"Epoch [{epoch}]", print_freq, SHOWN)
    for it, step in enumerate(progress.track(data_loader)):
        micro_batches = step if virtual_ranks is not None else [step]
        num_boxes = effective_num_boxes(micro_batches, device)
        optimizer.zero_grad(set_to_none=True)
        step_terms: dict[str, Tensor] = {}
        for k, (images, targets) in enumerate(micro_batches):
            with _micro_batch(model, virtual_ranks, k, last=k == len(micro_batches) - 1):
                images, targets = _to_device(images, targets, device)
                with _autocast(device, amp):
                    outputs = model(images)
                loss_dict = criterion(_to_float(outputs), targets, num_boxes=num_boxes)
                # DDP averages the gradients over the processes; the micro-batches' are averaged here.
                weighted = {name: value * criterion.weight_dict[name] / len(micro_batches)
                            for name, value in loss_dict.items() if name in criterion.weight_dict}
                sum(weighted.values()).backward()
            for name, value in weighted.items():
                step_terms[name] = step_terms.get(name, 0) + value.detach()

        logged = reduce_mean(step_terms)  # the same numbers on every process, so all of them stop together
        total = sum(logged.values())
        if not math.isfinite(total):
            bad = ", ".join(f"{k}={v}" for k, v in logged.items() if not math.isfinite(v))
            raise NonFiniteLossError(f"loss is {total} at epoch {epoch}, iteration {it}/{len(data_loader)} "
                                     f"({bad or 'every term finite, their sum overflowed'}); stopped without "
                                     "saving this epoch, the last checkpoint is intact")

        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
        optimizer.step()
        if ema is not None:
            ema.update(model)

        values = {"loss": total, **logged, "grad_norm": grad_norm.item(), "lr": optimizer.param_groups[0]["lr"]}
        progress.update(**values)
        if board is not None and it % print_freq == 0:
            board.add_scalars("train", values, epoch * len(data_loader) + it)
    return progress.averages()


@contextlib.contextmanager
def _micro_batch(model: nn.Module, virtual_ranks: VirtualRanks | None, k: int, last: bool) -> Iterator[None]:
    """Micro-batch k of a step: under virtual rank k's random state; DDP reduces the gradients summed over the
    step's micro-batches once, at the last."""
    with contextlib.ExitStack() as stack:
        if virtual_ranks is not None:
            stack.enter_context(virtual_ranks.playing(k))
        if not last and isinstance(model, DistributedDataParallel):
            stack.enter_context(model.no_sync())
        yield


@torch.no_grad()
def evaluate(model: nn.Module, postprocessors: dict[str, nn.Module], data_loader: DataLoader, coco_gt: COCO,
             device: torch.device, *, amp: bool = False, print_freq: int = 10,
             output_dir: Path | None = None, prefix: str = "") -> dict[str, float]:
    """COCO box metrics of `model` on `data_loader`, whose sampler shards the images over the processes.

    Every process must call this; the main one scores the gathered detections, writes them with the
    metrics to `output_dir` ({prefix}coco_results.json, {prefix}coco_stats.json) and returns the metrics, the
    others {}.
    """
    model.eval()
    local: dict[int, list[dict]] = {}
    for images, targets in Progress("Test", print_freq).track(data_loader):
        images, targets = _to_device(images, targets, device)
        with _autocast(device, amp):
            outputs = model(images)
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        results = postprocessors["bbox"](_to_float(outputs), orig_sizes)
        for target, result in zip(targets, results, strict=True):
            image_id = int(target["image_id"])
            local[image_id] = coco_detections(image_id, result)
    detections = gather_detections(local)
    stats = coco_box_stats(coco_gt, detections) if is_main_process() else {}
    if output_dir is not None:
        write_on_main_process(_save_results, output_dir, detections, stats, prefix)
    return stats


def _save_results(output_dir: Path, detections: list[dict], stats: dict[str, float], prefix: str) -> None:
    save_text_atomically(json.dumps(detections), output_dir / f"{prefix}coco_results.json")
    save_text_atomically(json.dumps(stats, indent=1), output_dir / f"{prefix}coco_stats.json")


def _to_device(images: list[Tensor], targets: list[dict[str, Any]],
               device: torch.device) -> tuple[list[Tensor], list[dict[str, Any]]]:
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def _to_float(outputs: Any) -> Any:
    """bf16 outputs of autocast back to fp32: assignment IoUs, losses and NMS need the precision."""
    if isinstance(outputs, Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, list | tuple):
        return type(outputs)(_to_float(v) for v in outputs)
    return outputs

"""Exact gradient accumulation: P processes × --batch_size B × --accumulate N make the update of P·N processes × B.

DETA couples the images of a batch only through the padding of each process's batch and the loss normaliser
(its BatchNorms are frozen, GroupNorm and LayerNorm work per image). So each process here plays N virtual
ranks p·N + k of the P·N-process run, each with what that run's process has:

- its shard of a DistributedSampler with P·N replicas, its own data loader (and workers), and its micro-batch
  padded on its own by the model;
- its random state, seeded with --seed + virtual rank when training starts: augmentation (in the main process
  or in the loader's workers, whose seeds are drawn from it) and dropout follow the virtual rank;
- the loss normaliser of the whole effective batch: its boxes over P·N, as every process of that run divides by;
- the gradients of the N micro-batches are summed (each loss divided by N, as DDP averages over P·N), then
  clipped and stepped once, so the epoch has the steps, and the schedule the epochs, of the P·N-process run.
"""
import argparse
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch import distributed as dist
from torch.utils.data import BatchSampler, Dataset, DistributedSampler

from datasets import DetectionLoader
from datasets.transforms import Target
from deta.errors import InputError
from training.checkpointing import rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)

MicroBatch = tuple[list[Tensor], list[Target]]


class VirtualRanks:
    """The training steps of one process: each a list of `--accumulate` micro-batches, one per virtual rank.

    Iterate it as a data loader of steps (len: optimizer steps per epoch); `set_epoch` reshuffles as
    DistributedSampler does, `playing(k)` runs a block under virtual rank k's random state.
    """

    def __init__(self, dataset: Dataset, args: argparse.Namespace, rank: int, world_size: int,
                 device: torch.device) -> None:
        self.count = args.accumulate
        self.first = rank * self.count
        self.replicas = world_size * self.count
        self.device = device
        # The shuffle depends only on (seed, epoch), however the P·N virtual ranks are spread over processes.
        self.samplers = [DistributedSampler(dataset, self.replicas, self.first + k, shuffle=True, seed=args.seed)
                         for k in range(self.count)]
        self.loaders = [DetectionLoader(dataset, batch_sampler=BatchSampler(sampler, args.batch_size, drop_last=True),
                                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
                        for sampler in self.samplers]
        if len(self.loaders[0]) == 0:  # the data set itself is not empty: build_dataset refuses that
            raise InputError(_unfilled_batch_message(len(dataset), args, world_size))
        self.states = []
        for k in range(self.count):
            seed_everything(args.seed + self.first + k)
            self.states.append(rng_state(device))

    def __len__(self) -> int:
        return len(self.loaders[0])  # every shard has the same length (DistributedSampler pads)

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.samplers:
            sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[MicroBatch]]:
        iterators = []
        for k, loader in enumerate(self.loaders):
            with self.playing(k):  # a loader draws its workers' seeds when its iterator starts
                iterators.append(iter(loader))
        for _ in range(len(self)):
            step = []
            for k, iterator in enumerate(iterators):
                with self.playing(k):
                    step.append(next(iterator))
            yield step

    @contextlib.contextmanager
    def playing(self, k: int) -> Iterator[None]:
        """Run the block under virtual rank k's random state, and keep where it leaves that state."""
        set_rng_state(self.states[k], self.device)
        try:
            yield
        finally:
            self.states[k] = rng_state(self.device)

    def rng_states(self) -> list[dict[str, Any]]:
        """This process's virtual ranks' random states, in virtual-rank order."""
        return list(self.states)

    def restore_rng_states(self, saved: list[dict[str, Any]] | None) -> bool:
        """Take this process's states from a checkpoint's `rng_states` (all virtual ranks of the run, in order);
        False, keeping fresh seeds, when the checkpoint's run had another number of virtual ranks."""
        if not saved or len(saved) != self.replicas:
            return False
        self.states = list(saved[self.first:self.first + self.count])
        return True


def effective_num_boxes(step: list[MicroBatch], device: torch.device) -> float:
    """The loss normaliser of one optimizer step: the boxes of all micro-batches of all processes, divided by
    the number of (virtual) ranks, at least 1: what every process of the P·N-process run divides its loss by."""
    boxes = sum(len(target["labels"]) for _, targets in step for target in targets)
    total = torch.tensor([float(boxes)], device=device)
    replicas = len(step)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        replicas *= dist.get_world_size()
    return (total / replicas).clamp(min=1).item()


def resolve_accumulate(args: argparse.Namespace, checkpoint: dict[str, Any] | None) -> int:
    """--accumulate as given, else the --resume checkpoint's (its run continues with the same effective batch),
    else 1."""
    if args.accumulate is not None:
        return args.accumulate
    saved = checkpoint.get("args") if args.resume and checkpoint is not None else None
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved or {})
    accumulate = saved.get("accumulate") or 1
    if accumulate > 1:
        log.info(f"--resume: --accumulate {accumulate} as the checkpoint's run (pass --accumulate to change it)")
    return accumulate


def effective_batch_line(args: argparse.Namespace, world_size: int) -> str:
    """The log line that says how many images make one optimizer step."""
    return (f"effective batch: {world_size} process(es) × --batch_size {args.batch_size} × --accumulate "
            f"{args.accumulate} = {world_size * args.batch_size * args.accumulate} images per optimizer step")


def _unfilled_batch_message(num_images: int, args: argparse.Namespace, world_size: int) -> str:
    shares = world_size * args.accumulate
    if args.accumulate == 1:
        return (f"--batch_size {args.batch_size}: the {num_images} training images give {world_size} process(es) "
                "less than one batch each; lower --batch_size")
    return (f"--accumulate {args.accumulate}: the {num_images} training images cannot fill one step of {world_size} "
            f"process(es) × --batch_size {args.batch_size} × --accumulate {args.accumulate} ({shares} shares of "
            f"{-(-num_images // shares)} image(s)); lower --accumulate or --batch_size")

"""What a training checkpoint holds beyond the model: when it is written, and the RNG states that make
`--resume` continue exactly where an uninterrupted run would be.

Stage-1 assignment samples anchors from torch's generator, and the augmentations draw from it too
(data-loader workers are seeded from it), so these states must travel with the weights.
"""
import argparse
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deta.checkpoint import save_atomically
from deta.errors import InputError
from deta.hub import checkpoint_file, is_remote
from training.distributed import all_gather_object, get_rank

# What save_atomically names its temporary files (`.NAME.<random>.tmp`), for the files a run writes.
_TEMPORARIES = (".checkpoint*.pth.*.tmp", ".log.txt.*.tmp", ".*coco_results.json.*.tmp", ".*coco_stats.json.*.tmp")


def save_checkpoint(checkpoint: dict[str, Any], output_dir: Path, epoch: int, lr_drop: int) -> list[Path]:
    """`checkpoint.pth` every epoch, plus `checkpoint{epoch:04}.pth` before each learning-rate drop and
    every 5 epochs (the official choice of kept checkpoints). Returns the paths written.

    `checkpoint.pth` is written last: once it holds an epoch, so does every file of that epoch, and a run
    stopped between the two resumes from the previous epoch, which writes them again.
    """
    paths = [output_dir / "checkpoint.pth"]
    if (epoch + 1) % lr_drop == 0 or (epoch + 1) % 5 == 0:
        paths.insert(0, output_dir / f"checkpoint{epoch:04}.pth")
    for path in paths:
        save_atomically(checkpoint, path)
    return paths


def remove_stale_temporaries(output_dir: Path) -> list[Path]:
    """Delete the temporary files that `save_atomically` leaves when its process is killed outright (kill -9,
    an out-of-memory kill, a node failure) while writing a checkpoint, log.txt or the COCO results; returns
    them. Only those names are touched: `.NAME.<random>.tmp` for our NAMEs."""
    stale = sorted(path for pattern in _TEMPORARIES for path in output_dir.glob(pattern) if path.is_file())
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def fetch_checkpoint(args: argparse.Namespace) -> None:
    """A --resume/--finetune URL or zoo name downloaded into the hub cache by the main process, before anything is
    written and before the other processes read the cached file (one download, one progress bar per machine
    that shares the cache). A failed download is every process's InputError, naming the flag."""
    flag, source = ("--resume", args.resume) if args.resume else ("--finetune", args.finetune)
    problem = None
    if source and is_remote(source) and get_rank() == 0:
        try:
            checkpoint_file(source)
        except InputError as err:
            problem = f"{flag}: {err}"
    problem = all_gather_object(problem)[0]
    if problem:
        raise InputError(problem)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generator states, in types that `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of `rng_state`."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)

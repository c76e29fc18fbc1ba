"""Batches of (images, targets) lists, from worker processes or not, whose data errors read as they were raised.

torch re-raises an exception of a DataLoader worker in the main process with the worker's traceback in its
message, so an InputError ("photo.jpg: cannot read image ...") would reach the user as twenty lines. Here
the worker hands the error over as a value instead, and the loader raises it as the same one-line InputError.
"""
import os
import signal
from collections.abc import Iterator
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from datasets.transforms import Target
from deta.errors import InputError


class LoadFailure:
    """An InputError met in a worker, in place of its item and then of its batch."""

    def __init__(self, message: str) -> None:
        self.message = message


class _FailuresAsValues(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except InputError as err:
            if get_worker_info() is None:  # in the main process the error can keep its own traceback
                err.local = True
                raise
            return LoadFailure(str(err))


def collate_fn(batch: list[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]] | LoadFailure:
    """Keep images as a list: they differ in size and the model pads them itself."""
    failure = next((item for item in batch if isinstance(item, LoadFailure)), None)
    if failure is not None:
        return failure
    return [image for image, _ in batch], [target for _, target in batch]


def _exit_quietly_on_signals(worker_id: int) -> None:
    # Ctrl-C and Slurm's SIGTERM reach the whole process group, workers included; the main process stops the
    # run (training.interrupts, whose handler the workers would inherit). A worker that dies of the signal or
    # exits with an error makes the main process report "DataLoader worker exited unexpectedly" on top;
    # one that exits with status 0 is not reported.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: os._exit(0))


class DetectionLoader(DataLoader):
    """DataLoader of a detection data set (any DataLoader arguments but `collate_fn` and `worker_init_fn`),
    yielding (images, targets) lists; an InputError of the data set is raised as it was, also from workers,
    marked `local` (this process's images)."""

    def __init__(self, dataset: Dataset, **kwargs: Any) -> None:
        super().__init__(_FailuresAsValues(dataset), collate_fn=collate_fn,
                         worker_init_fn=_exit_quietly_on_signals, **kwargs)

    def __iter__(self) -> Iterator[tuple[list[Tensor], list[Target]]]:
        for batch in super().__iter__():
            if isinstance(batch, LoadFailure):
                raise InputError(batch.message, local=True)
            yield batch

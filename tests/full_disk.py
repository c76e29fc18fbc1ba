"""A full disk under TensorBoard's event file, made without mounting anything."""
from pathlib import Path


def fill_the_disk_under(folder: Path) -> None:
    """The event file in `folder` now writes to /dev/full, where every write fails with ENOSPC as on a full disk."""
    (events,) = folder.glob("events.out.tfevents.*")
    events.unlink()
    events.symlink_to("/dev/full")

"""Where a run writes: --output_dir; else, resuming a local file, the folder of the --resume checkpoint; else a new
outputs/<date>-<time> folder. Training always saves somewhere it names; --eval writes only to --output_dir.

The folder is created and tried with a file before anything else runs, so that a folder that cannot be
written fails at once, not after an epoch of training or a whole evaluation.
"""
import argparse
import datetime
import tempfile
from pathlib import Path

from deta.errors import InputError
from deta.hub import is_remote

DEFAULT_ROOT = Path("outputs")


def choose_output_dir(args: argparse.Namespace) -> tuple[Path | None, str]:
    """(folder, what it is: "--output_dir" or which default) for this run's flags; (None, "") for --eval without
    --output_dir."""
    if args.output_dir:
        return Path(args.output_dir), "--output_dir"
    if args.eval:
        return None, ""
    if args.resume and not is_remote(args.resume):  # a download's folder is the hub cache: not a run's
        resume = Path(args.resume)
        return (resume if resume.is_dir() else resume.parent), "the --resume checkpoint's folder"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder, number = DEFAULT_ROOT / stamp, 1
    while folder.exists():  # runs started in the same second
        number += 1
        folder = DEFAULT_ROOT / f"{stamp}-{number}"
    return folder, "the default output folder"


def make_writable_dir(folder: Path, what: str) -> None:
    """Create `folder` and write a file there, or raise InputError saying why not (`what` names the folder)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise InputError(f"{what} {folder}: cannot write there ({err.strerror or err}); pass an "
                         "--output_dir you can write to") from err

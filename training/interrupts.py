"""Stopping on SIGINT (Ctrl-C) and SIGTERM (Slurm preemption and time limits, scancel, kill).

Both become an exception in the main thread, so whatever is being written is abandoned through
`save_atomically`'s cleanup (no half-written file, no stale temporary), and the run ends with one line
saying where its last good checkpoint is and the command that resumes from it. A disk that fills up ends a
run the same way (`LastCheckpoint.no_space_message`).
"""
import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deta.errors import NoSpaceError

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Flags the resume command sets itself (--finetune and --start_epoch do not go with --resume).
_REPLACED_FLAGS = ("--resume", "--output_dir", "--finetune", "--start_epoch")


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that `except Exception` in
    library code does not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, the first SIGINT or SIGTERM raises Interrupted; later ones are ignored (the run is
    already stopping). Any other exception after a signal, such as a collective failing because another
    process has stopped, is reported as the Interrupted it follows from. Outside the main thread, where
    Python delivers no signals, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not received:
            received.append(signum)
            raise Interrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
    try:
        yield
    except Interrupted:
        raise
    except BaseException as err:
        if received:
            raise Interrupted(received[0]) from err
        raise
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@dataclass
class LastCheckpoint:
    """What a stopped run has to resume from: updated as the run writes."""

    output_dir: Path | None = None
    path: Path | None = None
    epoch: int | None = None
    evaluated: bool = True  # the epoch's evaluation and log.txt line are written

    def stop_message(self, interrupt: Interrupted, argv: list[str]) -> str:
        """One line: the signal, the last good checkpoint and the command that resumes from it."""
        if self.path is None or self.output_dir is None:
            return (f"interrupted by {interrupt}; there is no checkpoint to resume from, run again with: "
                    f"{shlex.join([*_launcher(argv), *argv])}")
        return (f"interrupted by {interrupt}; the last good checkpoint is {self.path} ({self._state()}); "
                f"resume with: {resume_command(argv, self.output_dir, self.path)}")

    def no_space_message(self, error: NoSpaceError, argv: list[str]) -> str:
        """One line: what could not be written where, the space left, the last good checkpoint (intact: every
        write is atomic) and the command that resumes from it once there is room."""
        if self.path is None or self.output_dir is None:
            return f"{error}; free some space there, then run again with: {shlex.join([*_launcher(argv), *argv])}"
        return (f"{error}; the last good checkpoint {self.path} ({self._state()}) is intact; free some space there, "
                f"then resume with: {resume_command(argv, self.output_dir, self.path)}")

    def _state(self) -> str:
        undone = "" if self.evaluated else ", whose evaluation was cut short and runs first on resume"
        return f"epoch {self.epoch}{undone}"


def resume_command(argv: list[str], output_dir: Path, checkpoint: Path) -> str:
    """The command line of this run (`argv`: main.py and its flags) continued from `checkpoint` into
    `output_dir`: the same launcher (under torchrun, the torchrun command), --resume and --output_dir set."""
    kept, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg in _REPLACED_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f"{flag}=" for flag in _REPLACED_FLAGS)):
            kept.append(arg)
    return shlex.join([*_launcher(argv), argv[0], *kept, "--output_dir", str(output_dir),
                       "--resume", str(checkpoint)])


def _launcher(argv: list[str]) -> list[str]:
    """What ran main.py: torchrun's command line up to main.py (its process is our parent), else Python."""
    if "LOCAL_WORLD_SIZE" not in os.environ:  # not under torchrun
        return [sys.executable]
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
        return parent[:parent.index(argv[0])]
    except (OSError, ValueError):  # not Linux, or torchrun ran main.py by another name
        nodes = int(os.environ.get("WORLD_SIZE", 1)) // int(os.environ["LOCAL_WORLD_SIZE"])
        return ["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"]

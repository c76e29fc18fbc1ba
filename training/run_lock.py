"""One run per output folder: a run into a folder that a live run writes refuses at start, naming that run.

Two runs of one command (two terminals, a re-queued job overlapping the old one) would otherwise both write
checkpoint.pth and log.txt. The lock is a POSIX record lock (fcntl) on FOLDER/.run.lock, which the OS drops
when its process ends, however it ends: a killed run never blocks its own resume. Unlike flock (what the
filelock package takes), a record lock is not shared with forked children, so DataLoader workers that outlive
a SIGKILLed main process for a few seconds do not hold it. The file holds the holder's host and PID, for the
message. Under torchrun, the process of rank 0, which writes the folder, holds it.
"""
import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from deta.errors import InputError, NoSpaceError

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
_HOLDER_WAIT_S = 2.0  # a holder writes its host and PID just after taking the lock
_held: dict[Path, int] = {}  # folder -> descriptor of the lock this process holds


def lock_output_dir(folder: Path, what: str) -> None:
    """Hold `folder`'s lock until `release_output_dirs` or the end of this process; an InputError naming the
    holder when another process holds it (`what` names the folder, e.g. "--output_dir").

    Taking it again in the process that holds it does nothing. On a file system without record locks (an NFS
    mount without a lock daemon) the run goes on unlocked, with a warning.
    """
    folder = folder.resolve()
    if folder in _held:
        return
    path = folder / LOCK_NAME
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # never truncated unlocked
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(descriptor)  # held by another process: ours had no lock on the file to drop
        if err.errno in (errno.EACCES, errno.EAGAIN):
            raise InputError(f"{what} {folder}: another run is writing there ({_holder(path)}); wait for it to "
                             "end or stop it, or pass another --output_dir") from err
        log.warning(f"warning: {what} {folder}: cannot lock {path.name} ({err.strerror}); nothing stops a second "
                    "run from writing into this folder at the same time")
        return
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
    except OSError as err:  # a full disk, at the start of the run
        os.close(descriptor)
        reason = str(NoSpaceError(path)) if NoSpaceError.caused(err) else f"cannot write there ({err.strerror})"
        raise InputError(f"{what} {folder}: {reason}; free some space there or pass another --output_dir") from err
    _held[folder] = descriptor


def release_output_dirs() -> None:
    """Release the locks this process holds (for a process that runs main() more than once)."""
    while _held:
        os.close(_held.popitem()[1])


def _holder(path: Path) -> str:
    """'PID 123 on host NAME' as the lock file says it."""
    deadline = time.monotonic() + _HOLDER_WAIT_S
    while True:
        try:
            host, pid = path.read_text().split()
            return f"PID {pid} on host {host}"
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                return f"a process whose host and PID {path.name} does not say"
            time.sleep(0.05)

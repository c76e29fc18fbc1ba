"""The run's TensorBoard scalars, which a full disk ends with one warning rather than a traceback.

TensorBoard writes its event file from a background thread. On a full disk that thread dies with a traceback
printed by `threading.excepthook`, and every later `add_scalar` raises the same OSError in the training loop.
The scalars are a convenience (log.txt holds every number), and stopping there would stop the main process
alone, mid-epoch, while the others wait in a collective. So the board warns once and stops writing; the next
checkpoint or log.txt write meets the full disk where every process learns of it (training.writing) and the
run stops in one line naming the last good checkpoint.
"""
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from torch.utils.tensorboard import SummaryWriter

from deta.errors import NoSpaceError

log = logging.getLogger(__name__)


class Board:
    """Scalars in a TensorBoard event file under `output_dir`, while used as a context manager."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.writing = True  # False once the disk was full
        self._writer: SummaryWriter | None = None
        self._threads_hook: Callable[[threading.ExceptHookArgs], object] = threading.excepthook

    def __enter__(self) -> "Board":
        self._threads_hook = threading.excepthook
        threading.excepthook = self._quiet_writer_thread_out_of_space
        self._write(self._open)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            if self._writer is not None:
                self._write(self._writer.close)
        finally:
            threading.excepthook = self._threads_hook

    def add_scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        """Each value as the scalar `prefix/name` at `step`."""
        for name, value in values.items():
            if self.writing:
                self._write(self._writer.add_scalar, f"{prefix}/{name}", value, step)

    def flush(self) -> None:
        if self.writing:
            self._write(self._writer.flush)

    def _open(self) -> None:
        self._writer = SummaryWriter(self.output_dir)

    def _write(self, write: Callable[..., object], *args: object) -> None:
        try:
            write(*args)
        except Exception as error:
            if not NoSpaceError.caused(error):
                raise
            if self.writing:
                log.warning(f"warning: {NoSpaceError(self.output_dir / 'events.out.tfevents')}; TensorBoard "
                            "logging stops here, training goes on (log.txt keeps every number)")
            self.writing = False

    def _quiet_writer_thread_out_of_space(self, args: threading.ExceptHookArgs) -> None:
        """Passes over the event writer thread's ENOSPC, which its next write raises again in `_write`."""
        if NoSpaceError.caused(args.exc_value) and type(args.thread).__module__.startswith("tensorboard."):
            return
        self._threads_hook(args)

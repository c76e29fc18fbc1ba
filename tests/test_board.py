"""TensorBoard on a full disk: one warning, no traceback, and the caller goes on."""
import logging
import threading
from pathlib import Path

import pytest
from full_disk import fill_the_disk_under
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from training.board import Board


def test_a_full_disk_ends_tensorboard_with_one_warning_and_no_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    thread_errors = []  # what would print a thread's traceback
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    with Board(tmp_path) as board:
        board.add_scalars("train", {"loss": 2.0}, 0)
        board.flush()
        (events,) = tmp_path.glob("events.out.tfevents.*")
        assert EventAccumulator(str(events)).Reload().Tags()["scalars"] == ["train/loss"]
        fill_the_disk_under(tmp_path)
        for step in range(1, 4):
            board.add_scalars("train", {"loss": 1.0, "lr": 1e-4}, step)
            board.flush()
        assert not board.writing
    assert thread_errors == [] and threading.excepthook == thread_errors.append
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.startswith(f"warning: no space left to write events.out.tfevents in {tmp_path} (")
    assert warning.endswith("; TensorBoard logging stops here, training goes on (log.txt keeps every number)")


def test_other_threads_errors_still_reach_the_hook_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reported = []
    monkeypatch.setattr(threading, "excepthook", reported.append)

    def fail() -> None:
        raise OSError(28, "No space left on device")  # not TensorBoard's writer thread: reported as usual

    with Board(tmp_path):
        thread = threading.Thread(target=fail)
        thread.start()
        thread.join()
    assert [(args.thread, type(args.exc_value)) for args in reported] == [(thread, OSError)]
    assert threading.excepthook == reported.append

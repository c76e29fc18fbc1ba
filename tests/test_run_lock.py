"""One run per output folder: a second run refuses, naming the first; a killed run does not block its resume."""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_main import ENV, REPO, TINY, run_main

from datasets.synthetic import generate
from deta.errors import InputError
from training.run_lock import LOCK_NAME, lock_output_dir, release_output_dirs


@pytest.fixture(scope="module")
def data_flags(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    paths = generate(tmp_path_factory.mktemp("shapes"), seed=1, num_train=4, num_val=2, image_size=(64, 96),
                     object_size=(24, 48), max_objects=2)
    return [f"--{flag}={path}" for flag, path in paths.items()]


def test_a_second_run_refuses_and_a_killed_one_does_not_block_its_resume(data_flags: list[str], tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    flags = [*TINY, *data_flags, "--epochs", "1", "--num_workers", "1", "--output_dir", str(tmp_path)]
    first = subprocess.Popen([sys.executable, str(REPO / "main.py"), *flags], cwd=REPO, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if line.startswith("Epoch [0] [1/2]"):  # its DataLoader worker, forked from it, is running
                first.send_signal(signal.SIGSTOP)  # alive, holding the lock, until killed
                break
        with pytest.raises(SystemExit) as second:  # this process, the same command
            run_main(*flags)
        assert second.value.code == 2
        assert capsys.readouterr().err == (
            f"error: --output_dir {tmp_path}: another run is writing there (PID {first.pid} on host "
            f"{socket.gethostname()}); wait for it to end or stop it, or pass another --output_dir\n")
        assert not (tmp_path / "log.txt").exists()
    finally:
        first.kill()  # SIGKILL: no cleanup of its own; the worker it forked lives on for a few seconds
        first.wait(timeout=60)
        first.stdout.close()
    run_main(*flags)  # at once
    assert [json.loads(line)["epoch"] for line in (tmp_path / "log.txt").read_text().splitlines()] == [0]


def _locked_by_another(folder: Path) -> bool:
    """Whether a fresh process finds the lock taken."""
    script = ("import fcntl, sys; f = open(sys.argv[1], 'a')\ntry: fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
              "except OSError: sys.exit(1)")
    return subprocess.run([sys.executable, "-c", script, str(folder / LOCK_NAME)], timeout=60).returncode == 1


def test_the_holder_may_take_its_lock_again_and_releases_it(tmp_path: Path) -> None:
    lock_output_dir(tmp_path, "--output_dir")
    lock_output_dir(tmp_path, "--output_dir")
    assert _locked_by_another(tmp_path)
    assert (tmp_path / LOCK_NAME).read_text() == f"{socket.gethostname()} {os.getpid()}\n"
    release_output_dirs()
    assert not _locked_by_another(tmp_path)


def test_an_unreadable_holder_is_still_refused(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                               "fcntl.lockf(f, fcntl.LOCK_EX); print(flush=True); time.sleep(60)",
                               str(tmp_path / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        with pytest.raises(InputError, match="whose host and PID .run.lock does not say"):
            lock_output_dir(tmp_path, "--output_dir")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_a_full_disk_at_the_start_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(descriptor: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", no_space)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(2**40, 2**40, 0))
    with pytest.raises(InputError) as error:
        lock_output_dir(tmp_path, "--output_dir")
    assert str(error.value) == (f"--output_dir {tmp_path}: no space left to write .run.lock in {tmp_path} (0 bytes "
                                "free there); free some space there or pass another --output_dir")
    assert not _locked_by_another(tmp_path)

"""--accumulate: one process with N micro-batches per step makes the weights of N processes; its loss normaliser."""
import json
import math
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datasets.synthetic import generate
from deta.criterion import _num_boxes
from tests.test_main import TINY, run_main, run_script
from training.accumulation import effective_num_boxes


@pytest.fixture(scope="module")
def data_flags(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """4 training images (1 or 2 objects each) and one validation image."""
    paths = generate(tmp_path_factory.mktemp("shapes"), seed=3, num_train=4, num_val=1, image_size=(64, 96),
                     object_size=(24, 40), max_objects=2)
    return [f"--{flag}={path}" for flag, path in paths.items()]


def test_accumulate_2_on_one_process_makes_the_weights_of_2_processes(data_flags: list[str], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    # Multi-scale augmentation and dropout (TINY keeps 0.1) draw from each rank's random state; 2 epochs of 2
    # steps; the second epoch of the accumulating run is resumed without --accumulate (the checkpoint's is kept).
    flags = [*TINY, *data_flags, "--batch_size", "1", "--epochs", "2"]
    two = tmp_path / "two"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    trained = run_script(*flags, "--output_dir", str(two), launcher=launcher)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun processes (OMP_NUM_THREADS=1): the same float operations
    try:
        one = tmp_path / "one"
        run_main(*flags, "--accumulate", "2", "--epochs", "1", "--output_dir", str(one))
        run_main(*flags, "--resume", str(one / "checkpoint.pth"), "--output_dir", str(one))
    finally:
        torch.set_num_threads(threads)

    expected = torch.load(two / "checkpoint.pth", map_location="cpu", weights_only=True)
    actual = torch.load(one / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert actual["epoch"] == expected["epoch"] == 1 and actual["args"]["accumulate"] == 2
    for name, value in expected["model"].items():
        torch.testing.assert_close(actual["model"][name], value, rtol=0, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # the virtual ranks' random states are the processes', bit for bit
    assert [torch.equal(a["torch"], b["torch"]) for a, b in zip(actual["rng_states"], expected["rng_states"],
                                                                 strict=True)] == [True, True]
    out = capsys.readouterr().out
    assert out.count("effective batch: 1 process(es) × --batch_size 1 × --accumulate 2 = 2 images per optimizer "
                     "step") == 2
    assert "--resume: --accumulate 2 as the checkpoint's run" in out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _targets(counts: list[int]) -> list[dict[str, torch.Tensor]]:
    return [{"labels": torch.zeros(count, dtype=torch.int64)} for count in counts]


# Per process of the 2-process run: its images' box counts; the effective batch has 5, 0 and 1 boxes.
BATCHES = [([1], [4]), ([0], [0]), ([0, 1], [0, 0])]


def _official_normalisers(rank: int, port: int, results: "mp.Queue") -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results.put((rank, [_num_boxes(_targets(batch[rank]), torch.device("cpu")) for batch in BATCHES]))
    finally:
        dist.destroy_process_group()


def test_the_loss_normaliser_is_the_2_process_one_on_unequal_batches() -> None:
    context = mp.get_context("fork")  # no re-import: the children only count boxes
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_official_normalisers, args=(rank, port, results)) for rank in range(2)]
    for process in processes:
        process.start()
    official = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert official[0] == official[1] == [2.5, 1.0, 1.0]  # the mean box count, at least 1
    step = [[([], _targets(batch[rank]))] for batch in BATCHES for rank in range(2)]
    accumulated = [effective_num_boxes(step[2 * i] + step[2 * i + 1], torch.device("cpu"))
                   for i in range(len(BATCHES))]
    assert accumulated == official[0]


@pytest.mark.parametrize(("flags", "message"), [
    (("--accumulate", "0"), "error: --accumulate 0: must be 1 or more (micro-batches per optimizer step)"),
    # 4 images in 4 shares of 1, for micro-batches of 2
    (("--accumulate", "4"), "error: --accumulate 4: the 4 training images cannot fill one step of 1 process(es) × "
                            "--batch_size 2 × --accumulate 4 (4 shares of 1 image(s)); lower --accumulate or "
                            "--batch_size"),
])
def test_bad_accumulate_is_a_one_line_error(flags: tuple[str, ...], message: str, data_flags: list[str],
                                            tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_main(*TINY, *data_flags, *flags, "--epochs", "1", "--output_dir", str(tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == message + "\n"


def test_accumulate_with_amp_trains(data_flags: list[str], tmp_path: Path) -> None:
    run_main(*TINY, *data_flags, "--batch_size", "1", "--accumulate", "2", "--amp", "--epochs", "1",
             "--output_dir", str(tmp_path))
    checkpoint = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert checkpoint["args"]["amp"] and checkpoint["args"]["accumulate"] == 2
    stats = json.loads((tmp_path / "log.txt").read_text())
    assert math.isfinite(stats["train_loss"]) and stats["train_loss"] > 0

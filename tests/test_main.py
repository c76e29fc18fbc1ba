"""main.py end to end: training, checkpoints and resume, torchrun, evaluation of checkpoints, errors."""
import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main as main_module
from datasets.loading import DetectionLoader
from datasets.synthetic import generate
from deta import build_model
from deta.checkpoint import to_official
from deta.errors import InputError

REPO = Path(__file__).resolve().parents[1]
# A model small enough for CPU tests. hidden_dim 64: with 5 levels the stride-128 map of these images is 1×1,
# and GroupNorm needs 2 channels per group to train on it.
TINY = [
    "--backbone", "resnet18", "--pretrained_backbone", "none", "--enc_layers", "1", "--dec_layers", "1",
    "--hidden_dim", "64", "--nheads", "2", "--dim_feedforward", "64", "--num_queries", "20",
    "--num_feature_levels", "5", "--two_stage", "--with_box_refine", "--assign_first_stage", "--assign_second_stage",
    "--train_sizes", "96,128", "--max_size", "160", "--eval_size", "96", "--batch_size", "2", "--num_workers", "0",
    "--device", "cpu", "--print_freq", "1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data_flags(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """4 training images and 3 validation ones: an odd count, so 2 processes see a repeated image."""
    paths = generate(tmp_path_factory.mktemp("shapes"), seed=1, num_train=4, num_val=3, image_size=(64, 96),
                     object_size=(24, 48), max_objects=2)
    return [f"--{flag}={path}" for flag, path in paths.items()]


def run_main(*flags: str) -> None:
    """main.py in this process (its import is already paid for)."""
    main_module.main(argparse.ArgumentParser(parents=[main_module.get_args_parser()]).parse_args(list(flags)))


def run_script(*flags: str, launcher: tuple[str, ...] = (sys.executable,)) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, str(REPO / "main.py"), *flags], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def one_epoch(data_flags: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder of a one-epoch run with a learning-rate drop after it."""
    out = tmp_path_factory.mktemp("one_epoch")
    run_main(*TINY, *data_flags, "--epochs", "1", "--lr_drop", "1", "--output_dir", str(out))
    return out


def test_training_writes_checkpoint_log_and_results(one_epoch: Path) -> None:
    checkpoint = torch.load(one_epoch / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["args"]["num_classes"] == 6  # 5 shapes, ids 1..5
    assert checkpoint["category_names"] == {1: "circle", 2: "square", 3: "triangle", 4: "ring", 5: "cross"}
    assert checkpoint["lr_scheduler"]["_last_lr"] == pytest.approx([2e-5, 2e-6, 2e-6])  # dropped after epoch 0
    assert len(checkpoint["optimizer"]["param_groups"]) == 3 and len(checkpoint["rng_states"]) == 1
    assert (one_epoch / "checkpoint0000.pth").is_file()  # kept: the learning rate drops after it
    assert not list(one_epoch.glob(".*.tmp"))
    (line,) = (one_epoch / "log.txt").read_text().splitlines()
    stats = json.loads(line)
    assert stats["epoch"] == 0 and stats["train_loss"] > 0 and 0 <= stats["test_AP"] <= 1
    assert {d["image_id"] for d in json.loads((one_epoch / "coco_results.json").read_text())} == {1, 2, 3}
    assert list(one_epoch.glob("events.out.tfevents.*"))


def test_resume_after_a_kill_matches_an_uninterrupted_run(data_flags: list[str], tmp_path: Path) -> None:
    flags = [*TINY, *data_flags, "--epochs", "2", "--batch_size", "1"]
    uninterrupted = run_script(*flags, "--output_dir", str(tmp_path / "a"))
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    killed = subprocess.Popen([sys.executable, str(REPO / "main.py"), *flags, "--output_dir", str(tmp_path / "b")],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in killed.stdout:
        if line.startswith("Epoch [1] [1/4]"):  # epoch 0's checkpoint is written, epoch 1 is under way
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)["epoch"] == 0

    resumed = run_script(*flags, "--output_dir", str(tmp_path / "b"), "--resume", str(tmp_path / "b/checkpoint.pth"))
    assert resumed.returncode == 0, resumed.stderr
    expected, actual = weights(tmp_path / "a" / "checkpoint.pth"), weights(tmp_path / "b" / "checkpoint.pth")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected), "resumed weights differ"
    # the epochs the killed run did not finish are logged once, and alike
    log_a = [json.loads(line) for line in (tmp_path / "a" / "log.txt").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "b" / "log.txt").read_text().splitlines()]
    assert [s["epoch"] for s in log_b] == [0, 1] and log_b == log_a


def test_resume_applies_a_new_schedule_and_says_so(data_flags: list[str], one_epoch: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """Extending a run as official users do: the learning rate that dropped after epoch 0 (--lr_drop 1) is
    back at --lr for epoch 1 under --lr_drop 5."""
    for name in ("checkpoint.pth", "log.txt"):  # epoch 0 finished: trained, saved and logged
        shutil.copy(one_epoch / name, tmp_path / name)
    run_main(*TINY, *data_flags, "--epochs", "2", "--lr_drop", "5", "--resume", str(tmp_path / "checkpoint.pth"),
             "--output_dir", str(tmp_path))
    out = capsys.readouterr().out
    assert "--resume: training to --epochs 2 (the checkpoint's run planned 1)" in out
    assert "--resume: applying --lr_drop 5 (checkpoint: 1); after 1 epochs with 0 drop(s)" in out
    _, line = (tmp_path / "log.txt").read_text().splitlines()
    assert json.loads(line)["epoch"] == 1 and json.loads(line)["train_lr"] == pytest.approx(2e-4)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["lr_scheduler"]["step_size"] == 5 and checkpoint["args"]["lr_drop"] == 5
    assert checkpoint["lr_scheduler"]["_last_lr"] == pytest.approx([2e-4, 2e-5, 2e-5])


def test_r50_recipe_trains_padded_batches_and_evaluates_alike_at_any_batch_size(
        data_flags: list[str], tmp_path: Path) -> None:
    """The acceptance run of the COCO recipe on a tiny COCO root (tiny model flags override the recipe's), with
    2 micro-batches per step (ACCUMULATE)."""
    paths = dict(flag.lstrip("-").split("=", 1) for flag in data_flags)
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (coco / f"{split}2017").symlink_to(paths[f"{split}_images"])
        shutil.copy(paths[f"{split}_json"], coco / "annotations" / f"instances_{split}2017.json")
    env = {**ENV, "GPUS": "1", "ACCUMULATE": "2", "COCO_PATH": str(coco), "OUTPUT_DIR": str(tmp_path / "run"),
           "MASTER_PORT": str(_free_port())}
    trained = subprocess.run(["bash", str(REPO / "scripts" / "r50_5scale_12ep.sh"), *TINY, "--epochs", "1"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert checkpoint["args"]["train_batching"] == "padded" and checkpoint["args"]["eval_batching"] == "per_image"
    assert checkpoint["args"]["num_queries"] == 20 and checkpoint["args"]["dim_feedforward"] == 64
    assert checkpoint["args"]["accumulate"] == 2 and len(checkpoint["rng_states"]) == 2
    assert "effective batch: 1 process(es) × --batch_size 2 × --accumulate 2 = 4 images per optimizer step" \
        in trained.stdout

    stats = []
    for batch_size in ("1", "2"):
        out = tmp_path / f"eval_batch{batch_size}"
        run_main(*TINY, "--coco_path", str(coco), "--eval", "--resume", str(tmp_path / "run" / "checkpoint.pth"),
                 "--batch_size", batch_size, "--output_dir", str(out))
        stats.append(json.loads((out / "coco_stats.json").read_text()))
    assert stats[0]["AP"] > 0
    assert stats[0] == pytest.approx(stats[1], abs=1e-9)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_gathers_every_image_once(data_flags: list[str], tmp_path: Path) -> None:
    # Batch size 1 and one thread in every process: each image then takes the same float operations under
    # torchrun as alone, and the results can be compared exactly.
    flags = [*TINY, *data_flags, "--batch_size", "1"]
    two = tmp_path / "two"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    trained = run_script(*flags, "--epochs", "1", "--output_dir", str(two), launcher=launcher)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert len(torch.load(two / "checkpoint.pth", weights_only=True)["rng_states"]) == 2

    one = tmp_path / "one"
    evaluated = run_script(*flags, "--eval", "--resume", str(two / "checkpoint.pth"), "--output_dir", str(one))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    gathered = json.loads((two / "coco_results.json").read_text())
    assert {d["image_id"] for d in gathered} == {1, 2, 3}
    assert gathered == json.loads((one / "coco_results.json").read_text())
    assert json.loads((two / "coco_stats.json").read_text()) == json.loads((one / "coco_stats.json").read_text())


def test_eval_of_an_official_checkpoint(data_flags: list[str], one_epoch: Path, tmp_path: Path) -> None:
    ours = weights(one_epoch / "checkpoint.pth")
    official = {"model": to_official(ours, two_stage=True, with_box_refine=True), "epoch": 0,
                "args": argparse.Namespace(num_classes=6)}
    assert official["model"].keys() > ours.keys()
    torch.save(official, tmp_path / "official.pth")
    for name, path in (("ours", one_epoch / "checkpoint.pth"), ("official", tmp_path / "official.pth")):
        run_main(*TINY, *data_flags, "--eval", "--resume", str(path), "--output_dir", str(tmp_path / name))
    assert (tmp_path / "ours" / "coco_results.json").read_text() == \
        (tmp_path / "official" / "coco_results.json").read_text()


def test_finetune_replaces_a_class_head_of_another_size(data_flags: list[str], one_epoch: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_main(*TINY, *data_flags, "--epochs", "1", "--num_classes", "9", "--finetune", str(one_epoch / "checkpoint.pth"),
             "--output_dir", str(tmp_path))
    assert ("--finetune: re-initialised 4 class-head tensor(s) whose size differs from the checkpoint's: "
            "class_embed.0.weight, class_embed.0.bias, class_embed.1.weight, class_embed.1.bias"
            ) in capsys.readouterr().out
    source, tuned = weights(one_epoch / "checkpoint.pth"), weights(tmp_path / "checkpoint.pth")
    assert tuned["class_embed.0.bias"].shape == (9,)
    assert tuned["backbone.0.body.conv1.weight"].shape == source["backbone.0.body.conv1.weight"].shape


def test_nan_loss_stops_and_keeps_the_last_checkpoint(data_flags: list[str], one_epoch: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    shutil.copy(one_epoch / "checkpoint.pth", tmp_path / "checkpoint.pth")
    before = (tmp_path / "checkpoint.pth").read_bytes()

    def build_poisoned(args: argparse.Namespace) -> tuple:
        model, criterion, postprocessors = build_model(args)
        calls, forward = [], criterion.forward

        def poisoned(outputs: dict, targets: list, num_boxes: float | None = None) -> dict:
            losses = forward(outputs, targets, num_boxes)
            calls.append(None)
            if len(calls) == 2:  # the first step has changed the weights in memory
                losses["loss_giou"] = losses["loss_giou"] * float("nan")
            return losses

        criterion.forward = poisoned
        return model, criterion, postprocessors

    monkeypatch.setattr(main_module, "build_model", build_poisoned)
    with pytest.raises(SystemExit) as exit_info:
        run_main(*TINY, *data_flags, "--epochs", "3", "--resume", str(tmp_path / "checkpoint.pth"),
                 "--output_dir", str(tmp_path))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == ("error: loss is nan at epoch 1, iteration 1/2 (loss_giou=nan); stopped "
                                       "without saving this epoch, the last checkpoint is intact\n")
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["checkpoint.pth"]


def _without_optimizer(checkpoint: dict) -> None:
    del checkpoint["optimizer"]


def _reordered_optimizer(checkpoint: dict) -> None:
    state = checkpoint["optimizer"]["state"]
    first, second = next((a, b) for a, b in zip(state, list(state)[1:], strict=False)
                         if state[a]["exp_avg"].shape != state[b]["exp_avg"].shape)
    state[first], state[second] = state[second], state[first]


@pytest.mark.parametrize(("spoil", "message"), [
    (_without_optimizer, "no optimizer in the checkpoint; to start a new run from its weights pass it as --finetune"),
    (_reordered_optimizer, "its optimizer state is ordered for another model"),
])
def test_resume_rejects_an_unusable_optimizer_state(spoil, message: str, data_flags: list[str], one_epoch: Path,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = torch.load(one_epoch / "checkpoint.pth", weights_only=True)
    spoil(checkpoint)
    torch.save(checkpoint, tmp_path / "spoilt.pth")
    with pytest.raises(SystemExit):
        run_main(*TINY, *data_flags, "--epochs", "2", "--resume", str(tmp_path / "spoilt.pth"))
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    ((), "error: no train data: pass --coco_path DIR"),
    (("--coco_path", "/nonexistent/coco"), "error: --coco_path: file /nonexistent/coco/annotations/instances_"),
    (("--resume", "a.pth", "--finetune", "b.pth"), "error: --resume and --finetune exclude each other"),
    (("--resume", "{corrupt}"), "error: checkpoint {corrupt}: cannot be read as a PyTorch checkpoint"),
    (("--lr_drop", "0"), "error: --lr_drop 0: must be 1 or more"),
    (("--hidden_dim", "48"), "error: --hidden_dim 48: must be a multiple of 32"),
    (("--eval",), "error: --eval needs the checkpoint to evaluate: pass --resume CKPT"),
    # before any data or checkpoint is read: neither is given or readable here
    (("--output_dir", "{file}/run"), "error: --output_dir {file}/run: cannot write there (Not a directory)"),
    (("--eval", "--resume", "{corrupt}", "--output_dir", "{file}"), "error: --output_dir {file}: cannot write there"),
])
def test_bad_input_is_a_one_line_error(flags: tuple[str, ...], message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    corrupt, file = tmp_path / "corrupt.pth", tmp_path / "file"
    corrupt.write_bytes(b"\x80\x02 definitely not a checkpoint")
    file.write_text("a file, not a folder")
    flags = tuple(flag.format(corrupt=corrupt, file=file) for flag in flags)
    message = message.format(corrupt=corrupt, file=file)
    with pytest.raises(SystemExit) as exit_info:
        run_main(*TINY, *flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_bad_input_exits_without_traceback() -> None:
    result = run_script(*TINY, "--eval")
    assert result.returncode == 2
    assert result.stderr.startswith("error: --eval needs the checkpoint to evaluate: pass --resume CKPT")
    assert result.stderr.count("\n") == 1, result.stderr


# --- runs that must not lose work ------------------------------------------------------------------

def _copy_run(one_epoch: Path, folder: Path, *names: str) -> Path:
    """The files of the one-epoch run (trained, saved and logged) in `folder`; returns its checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names or ("checkpoint.pth", "log.txt"):
        shutil.copy(one_epoch / name, folder / name)
    return folder / "checkpoint.pth"


def _one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_without_output_dir_a_run_saves_where_it_says(data_flags: list[str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    run_main(*TINY, *data_flags, "--epochs", "1")
    (folder,) = (tmp_path / "outputs").iterdir()
    assert f"no --output_dir given: saving to the default output folder, outputs/{folder.name}" in \
        capsys.readouterr().out
    assert torch.load(folder / "checkpoint.pth", weights_only=True)["epoch"] == 0

    run_main(*TINY, *data_flags, "--epochs", "2", "--resume", str(folder / "checkpoint.pth"))
    assert f"no --output_dir given: saving to the --resume checkpoint's folder, {folder}" in capsys.readouterr().out
    assert torch.load(folder / "checkpoint.pth", weights_only=True)["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in (folder / "log.txt").read_text().splitlines()] == [0, 1]
    assert len(list((tmp_path / "outputs").iterdir())) == 1


def test_epochs_at_or_below_the_resumed_epoch_say_so(data_flags: list[str], one_epoch: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    checkpoint = _copy_run(one_epoch, tmp_path)
    before = checkpoint.read_bytes()
    stale = [tmp_path / ".checkpoint.pth.k9x2z1ab.tmp", tmp_path / ".checkpoint0004.pth.q1w2e3r4.tmp"]
    not_ours = tmp_path / ".notes.txt.tmp"
    for path in [*stale, not_ours]:
        path.write_bytes(b"half a checkpoint")
    run_main(*TINY, *data_flags, "--epochs", "1", "--resume", str(checkpoint))
    out = capsys.readouterr().out
    assert "--resume: the checkpoint has trained all --epochs 1, nothing is left to train; pass a larger" in out
    assert "removed 2 temporary file(s) left in" in out and not any(path.exists() for path in stale)
    assert not_ours.exists() and checkpoint.read_bytes() == before

    later = torch.load(checkpoint, weights_only=True)
    later["epoch"] = 3
    torch.save(later, tmp_path / "epoch3.pth")
    with pytest.raises(SystemExit) as exit_info:
        run_main(*TINY, *data_flags, "--epochs", "2", "--resume", str(tmp_path / "epoch3.pth"))
    assert exit_info.value.code == 2
    assert _one_line(capsys.readouterr().err).startswith(
        f"error: --epochs 2: the --resume checkpoint {tmp_path / 'epoch3.pth'} has already trained 4 epochs (0..3); "
        "pass --epochs above 4")


def test_a_checkpoint_of_another_architecture_names_the_differing_flags(
        data_flags: list[str], one_epoch: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        run_main(*TINY, *data_flags, "--eval", "--resume", str(one_epoch / "checkpoint.pth"), "--hidden_dim", "32")
    err = _one_line(capsys.readouterr().err)
    assert "check --backbone, --hidden_dim" in err
    assert err.rstrip().endswith("the flags differ from the checkpoint's saved arguments: --hidden_dim 32 "
                                 "(checkpoint: 64)")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_checkpoint_write_leaves_the_last_one_and_says_how_to_resume(
        signum: int, data_flags: list[str], one_epoch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    checkpoint = _copy_run(one_epoch, tmp_path)
    before = checkpoint.read_bytes()
    save_atomically = main_module.save_checkpoint.__globals__["save_atomically"]

    def write_half_then_signal(obj: object, file) -> None:
        file.write(b"the first half of a checkpoint")
        os.kill(os.getpid(), signum)  # Python runs the handler at its next instruction, here
        torch.save(obj, file)

    monkeypatch.setitem(main_module.save_checkpoint.__globals__, "save_atomically",
                        lambda obj, path: save_atomically(obj, path, write_half_then_signal))
    flags = [*TINY, *data_flags, "--epochs", "2"]
    monkeypatch.setattr(sys, "argv", ["main.py", *flags, "--output_dir", "elsewhere", "--resume", "old.pth"])
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with pytest.raises(SystemExit) as exit_info:
        run_main(*flags, "--resume", str(checkpoint), "--output_dir", str(tmp_path))
    assert exit_info.value.code == 128 + signum
    resume = shlex.join([sys.executable, "main.py", *flags, "--output_dir", str(tmp_path), "--resume", str(checkpoint)])
    assert _one_line(capsys.readouterr().err) == (
        f"error: interrupted by {signal.Signals(signum).name}; the last good checkpoint is {checkpoint} (epoch 0); "
        f"resume with: {resume}\n")
    assert checkpoint.read_bytes() == before
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith("events.out")} == {"checkpoint.pth", "log.txt"}
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers


def test_resume_finishes_the_evaluation_a_kill_cut_short(data_flags: list[str], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    flags = [*TINY, *data_flags, "--epochs", "1", "--output_dir", str(tmp_path)]
    killed = subprocess.Popen([sys.executable, str(REPO / "main.py"), *flags], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in killed.stdout:
        if line.startswith("Test [1/2]"):  # epoch 0 is saved, its evaluation under way
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 0
    assert not (tmp_path / "log.txt").exists()

    run_main(*flags, "--resume", str(tmp_path / "checkpoint.pth"))
    out = capsys.readouterr().out
    assert f"--resume: epoch 0 has a checkpoint but no line in {tmp_path / 'log.txt'}" in out
    assert "nothing is left to train (its last epoch's evaluation, cut short, is run)" in out
    (line,) = (tmp_path / "log.txt").read_text().splitlines()
    stats = json.loads(line)
    assert stats["epoch"] == 0 and stats["train_loss"] > 0 and 0 <= stats["test_AP"] <= 1
    assert (tmp_path / "coco_stats.json").is_file()


def test_sigterm_to_the_process_group_with_workers_is_one_line_and_the_resume_command_works(
        data_flags: list[str], tmp_path: Path) -> None:
    flags = [*TINY, *data_flags, "--epochs", "1", "--num_workers", "2", "--output_dir", str(tmp_path)]
    stopped = subprocess.Popen([sys.executable, str(REPO / "main.py"), *flags], cwd=REPO, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in stopped.stdout:
        if line.startswith("Test [1/2]"):
            os.killpg(stopped.pid, signal.SIGTERM)  # as Slurm does: every process of the job, workers included
            break
    _, err = stopped.communicate(timeout=60)
    assert stopped.returncode == 128 + signal.SIGTERM
    assert _one_line(err).startswith(f"error: interrupted by SIGTERM; the last good checkpoint is {tmp_path}/"
                                     "checkpoint.pth (epoch 0, whose evaluation was cut short and runs first on "
                                     "resume); resume with: ")
    assert not list(tmp_path.glob(".*.tmp"))

    python, script, *resume_flags = shlex.split(err.split("resume with: ", 1)[1])
    assert (python, script) == (sys.executable, str(REPO / "main.py"))
    run_main(*resume_flags)  # the command as printed, in this process
    assert [json.loads(line)["epoch"] for line in (tmp_path / "log.txt").read_text().splitlines()] == [0]


def test_ctrl_c_under_torchrun_is_one_line_from_the_first_process(data_flags: list[str], tmp_path: Path) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    flags = [*TINY, *data_flags, "--epochs", "1", "--output_dir", str(tmp_path)]
    stopped = subprocess.Popen([*launcher, str(REPO / "main.py"), *flags], cwd=REPO, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in stopped.stdout:
        if line.startswith("Epoch [0] [1/1]"):
            os.killpg(stopped.pid, signal.SIGINT)  # as the terminal does
            break
    _, err = stopped.communicate(timeout=60)
    assert stopped.returncode != 0
    # torchrun adds its own lines about the signal; of ours there is one
    (ours,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert ours.startswith("error: interrupted by SIGINT; there is no checkpoint to resume from, run again with: "
                           f"{shlex.join([*launcher, str(REPO / 'main.py')])}")
    assert "Traceback" not in err.split("error: interrupted")[0]  # no process of ours printed one


class _UnreadableImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> object:
        raise InputError(f"{index:06d}.png: cannot read image")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_data_error_of_the_loader_is_this_process_s_own(num_workers: int) -> None:
    with pytest.raises(InputError, match="000000.png: cannot read image") as error:
        next(iter(DetectionLoader(_UnreadableImages(), batch_size=2, num_workers=num_workers)))
    assert error.value.local


@pytest.mark.parametrize(("rank", "local", "said"), [("0", False, True), ("1", False, False), ("1", True, True)])
def test_under_torchrun_one_process_says_an_error_all_meet(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture, rank: str, local: bool,
                                                           said: bool) -> None:
    def run(args: argparse.Namespace, last: object) -> None:
        raise InputError("x.png: bad", local=local)

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(main_module, "_run", run)
    with pytest.raises(SystemExit) as exit_info:
        run_main(*TINY)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: x.png: bad\n" if said else "")


def test_a_bad_flag_is_said_by_the_first_process_only(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    for rank, expected in (("1", ""), ("0", "error: --lr_drop 0: must be 1 or more\n")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_info:
            run_main(*TINY, "--lr_drop", "0")
        assert exit_info.value.code == 2 and capsys.readouterr().err == expected


def test_a_bad_image_read_by_a_worker_is_one_line(data_flags: list[str], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    paths = dict(flag.lstrip("-").split("=", 1) for flag in data_flags)
    images = tmp_path / "train"
    shutil.copytree(paths["train_images"], images)
    (images / "000002.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exit_info:
        run_main(*TINY, *data_flags, "--train_images", str(images), "--num_workers", "2", "--epochs", "1",
                 "--output_dir", str(tmp_path / "run"))
    assert exit_info.value.code == 2
    assert _one_line(capsys.readouterr().err).startswith(f"error: {images / '000002.png'}: cannot read image")

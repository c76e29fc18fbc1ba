"""main.py end to end: training, checkpoints and resume, torchrun, evaluation of checkpoints, errors."""
import argparse
import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from full_disk import fill_the_disk_under
from local_http import Routes, serve
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main as main_module
import training.board as board_module
from datasets.loading import DetectionLoader
from datasets.synthetic import generate
from deta import build_model
from deta.checkpoint import to_official
from deta.errors import InputError
from training.coco_eval import STAT_NAMES

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
    """main.py in this process (its import is already paid for), with the command line's semantics."""
    main_module.main(*main_module.parse_command_line(list(flags)))


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
    # per class: the AP and AP50 of each shape the validation images have
    val = json.loads(Path(checkpoint["args"]["val_json"]).read_text())
    shapes = {checkpoint["category_names"][a["category_id"]] for a in val["annotations"] if not a["iscrowd"]}
    assert shapes and {key[len(metric):] for key in stats for metric in ("test_AP/", "test_AP50/")
                       if key.startswith(metric)} == shapes
    assert all(f"test_AP50/{shape}" in stats for shape in shapes)
    assert {d["image_id"] for d in json.loads((one_epoch / "coco_results.json").read_text())} == {1, 2, 3}
    (events,) = one_epoch.glob("events.out.tfevents.*")
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"test/AP", "test/AP50"} | {f"test/{m}/{shape}" for m in ("AP", "AP50") for shape in shapes} <= set(tags)


def test_resume_after_a_kill_matches_an_uninterrupted_run(data_flags: list[str], tmp_path: Path) -> None:
    """With --ema: the average of the weights resumes bit for bit too, and so does the best checkpoint."""
    flags = [*TINY, *data_flags, "--epochs", "2", "--batch_size", "1", "--ema", "--ema_warmup", "2"]
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
    ema_a, ema_b = (torch.load(tmp_path / run / "checkpoint.pth", weights_only=True)["ema"] for run in "ab")
    assert ema_a["updates"] == ema_b["updates"] == 8 and ema_a["model"].keys() == expected.keys()
    assert all(torch.equal(ema_a["model"][k], ema_b["model"][k]) for k in expected), "resumed EMA differs"
    assert not all(torch.equal(ema_a["model"][k], expected[k]) for k in expected)  # an average, not the weights
    best_a, best_b = (torch.load(tmp_path / run / "checkpoint_best.pth", weights_only=True) for run in "ab")
    assert (best_a["epoch"], best_a["AP"], best_a["weights"]) == (best_b["epoch"], best_b["AP"], best_b["weights"])
    # the epochs the killed run did not finish are logged once, and alike
    log_a = [json.loads(line) for line in (tmp_path / "a" / "log.txt").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "b" / "log.txt").read_text().splitlines()]
    assert [s["epoch"] for s in log_b] == [0, 1] and log_b == log_a
    assert all({"test_AP", "test_ema_AP"} <= record.keys() for record in log_a)
    assert best_a["AP"] == max(max(r["test_AP"], r["test_ema_AP"]) for r in log_a)


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


@pytest.fixture(scope="module")
def r50_run(data_flags: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(COCO root, checkpoint) of the COCO recipe's acceptance run on a tiny COCO root (tiny model flags override
    the recipe's), with
    2 micro-batches per step (ACCUMULATE)."""
    tmp_path = tmp_path_factory.mktemp("r50")
    paths = dict(flag.lstrip("-").split("=", 1) for flag in data_flags)
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (coco / f"{split}2017").symlink_to(paths[f"{split}_images"])
        shutil.copy(paths[f"{split}_json"], coco / "annotations" / f"instances_{split}2017.json")
    env = {**ENV, "GPUS": "1", "ACCUMULATE": "2", "COCO_PATH": str(coco), "OUTPUT_DIR": str(tmp_path / "run"),
           "PYTHON": sys.executable,
           "MASTER_PORT": str(_free_port())}
    trained = subprocess.run(["bash", str(REPO / "scripts" / "r50_5scale_12ep.sh"), *TINY, "--epochs", "1"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "effective batch: 1 process(es) × --batch_size 2 × --accumulate 2 = 4 images per optimizer step" \
        in trained.stdout
    return coco, tmp_path / "run" / "checkpoint.pth"


@pytest.fixture(scope="module")
def r50_stats(r50_run: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, float]]:
    """COCO metrics of the recipe's checkpoint evaluated with every flag given, at batch sizes 1 and 2."""
    coco, checkpoint = r50_run
    stats = []
    for batch_size in ("1", "2"):
        out = tmp_path_factory.mktemp(f"eval_batch{batch_size}")
        run_main(*TINY, "--coco_path", str(coco), "--eval", "--resume", str(checkpoint), "--batch_size", batch_size,
                 "--output_dir", str(out))
        stats.append(json.loads((out / "coco_stats.json").read_text()))
    return stats


def test_r50_recipe_trains_padded_batches_and_evaluates_alike_at_any_batch_size(
        r50_run: tuple[Path, Path], r50_stats: list[dict[str, float]]) -> None:
    checkpoint = torch.load(r50_run[1], weights_only=True)
    assert checkpoint["args"]["train_batching"] == "padded" and checkpoint["args"]["eval_batching"] == "per_image"
    assert checkpoint["args"]["num_queries"] == 20 and checkpoint["args"]["dim_feedforward"] == 64
    assert checkpoint["args"]["accumulate"] == 2 and len(checkpoint["rng_states"]) == 2
    assert r50_stats[0]["AP"] > 0
    assert r50_stats[0] == pytest.approx(r50_stats[1], abs=1e-9)


def test_the_documented_eval_command_takes_model_and_data_from_the_checkpoint(
        r50_run: tuple[Path, Path], r50_stats: list[dict[str, float]], tmp_path: Path) -> None:
    """`torchrun --nproc_per_node=2 main.py --eval --resume ckpt.pth`, as the README writes it, run elsewhere."""
    coco, checkpoint = r50_run
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    evaluated = subprocess.run([*launcher, str(REPO / "main.py"), "--eval", "--resume", str(checkpoint)],
                               cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    (taken,) = [line for line in evaluated.stdout.splitlines() if line.startswith("--resume: from the checkpoint")]
    assert "--backbone resnet18, " in taken and "--two_stage, " in taken and f"--coco_path {coco}" in taken
    assert "--pretrained_backbone" not in taken  # the checkpoint holds the backbone's weights
    # The COCO table's first 12 metrics (faster-coco-eval adds AR50 and AR75), printed to 3 decimals, against those
    # of the evaluation with every flag.
    table = re.findall(r"\] = +(-?[0-9.]+)", evaluated.stdout)[:len(STAT_NAMES)]
    assert [float(value) for value in table] == pytest.approx([r50_stats[0][name] for name in STAT_NAMES],
                                                              abs=5e-4 + 1e-9)


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


def test_resume_takes_the_flags_not_given_from_the_checkpoint_and_says_which(
        one_epoch: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_main("--eval", "--resume", str(one_epoch / "checkpoint.pth"), "--eval_size", "64", "--device", "cpu",
             "--output_dir", str(tmp_path))
    out = capsys.readouterr().out
    (taken,) = [line for line in out.splitlines() if line.startswith("--resume: from the checkpoint's saved")]
    assert "--hidden_dim 64, " in taken and "--num_classes 6" in taken and "--val_json " in taken
    assert "--eval_size" not in taken and "--device" not in taken  # given on the command line
    assert "eval_size=64, " in out and "hidden_dim=64, " in out  # the arguments the run logs
    assert json.loads((tmp_path / "coco_stats.json").read_text())["AP"] >= 0


def test_resume_of_an_official_checkpoint_takes_its_namespace(one_epoch: Path, tmp_path: Path) -> None:
    """Official checkpoints save an argparse.Namespace, without num_classes; the same model evaluates alike."""
    ours = torch.load(one_epoch / "checkpoint.pth", map_location="cpu", weights_only=True)
    saved = {key: value for key, value in ours["args"].items() if key != "num_classes"}
    official = {"model": to_official(ours["model"], two_stage=True, with_box_refine=True), "epoch": 0,
                "args": argparse.Namespace(**saved)}
    torch.save(official, tmp_path / "official.pth")
    for name, path in (("ours", one_epoch / "checkpoint.pth"), ("official", tmp_path / "official.pth")):
        run_main("--eval", "--resume", str(path), "--device", "cpu", "--output_dir", str(tmp_path / name))
    results = (tmp_path / "ours" / "coco_results.json").read_text()
    assert results == (tmp_path / "official" / "coco_results.json").read_text()
    assert results == (one_epoch / "coco_results.json").read_text()  # as the training run evaluated it


def test_resume_of_a_checkpoint_without_arguments_asks_for_the_model_flags(
        one_epoch: Path, data_flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """detrex files hold the weights alone: the model flags must be given."""
    torch.save({"model": weights(one_epoch / "checkpoint.pth")}, tmp_path / "detrex.pth")
    with pytest.raises(SystemExit) as exit_info:
        run_main(*data_flags, "--eval", "--resume", str(tmp_path / "detrex.pth"), "--device", "cpu")
    assert exit_info.value.code == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith(f"error: {tmp_path / 'detrex.pth'}: ")
    assert err.rstrip().endswith("the checkpoint saves no model arguments (detrex): pass the model flags it was "
                                 "trained with")


def test_finetune_from_a_url_replaces_a_class_head_of_another_size(data_flags: list[str], one_epoch: Path,
                                                                   tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    routes = Routes(files={"/ckpt.pth": (one_epoch / "checkpoint.pth").read_bytes()})
    with serve(routes) as base:
        run_main(*TINY, *data_flags, "--epochs", "1", "--num_classes", "9", "--finetune", f"{base}/ckpt.pth",
                 "--output_dir", str(tmp_path / "run"))
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / "ckpt.pth").is_file()
    tmp_path = tmp_path / "run"
    assert ("--finetune: re-initialised 4 class-head tensor(s) whose size differs from the checkpoint's: "
            "class_embed.0.weight, class_embed.0.bias, class_embed.1.weight, class_embed.1.bias"
            ) in capsys.readouterr().out
    source, tuned = weights(one_epoch / "checkpoint.pth"), weights(tmp_path / "checkpoint.pth")
    assert tuned["class_embed.0.bias"].shape == (9,)
    assert tuned["backbone.0.body.conv1.weight"].shape == source["backbone.0.body.conv1.weight"].shape


def test_patience_stops_without_improvement_and_leaves_a_resumable_run(data_flags: list[str], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """Learning rates 0: the AP of epoch 0 is never beaten, so --patience 1 stops after epoch 1."""
    flags = [*TINY, *data_flags, "--lr", "0", "--lr_backbone", "0", "--output_dir", str(tmp_path)]
    run_main(*flags, "--epochs", "4", "--patience", "1")
    out = capsys.readouterr().out
    assert out.count("per class:\nclass") == 2  # the table of every evaluation
    assert "epoch 0: AP " in out and "is the best so far; saved to" in out
    assert ("--patience 1: no AP improvement in the 1 evaluations since epoch 0 (best AP "
            ) in out and "stopping after epoch 1" in out
    assert [json.loads(line)["epoch"] for line in (tmp_path / "log.txt").read_text().splitlines()] == [0, 1]
    best = torch.load(tmp_path / "checkpoint_best.pth", weights_only=True)
    assert best["epoch"] == 0 and best["weights"] == "model" and best["model"].keys() == weights(
        tmp_path / "checkpoint.pth").keys()
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1
    # the stopped run resumes; its log's history still counts (epoch 2 does not improve either)
    run_main(*flags, "--epochs", "4", "--patience", "2", "--resume", str(tmp_path / "checkpoint.pth"))
    assert "--patience 2: no AP improvement in the 2 evaluations since epoch 0" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in (tmp_path / "log.txt").read_text().splitlines()] == [0, 1, 2]


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
    # the resumed epoch 0 was evaluated (the copy has no log.txt): its best checkpoint; nothing of epoch 1
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["checkpoint.pth", "checkpoint_best.pth"]
    assert torch.load(tmp_path / "checkpoint_best.pth", weights_only=True)["epoch"] == 0


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
    (("--ema", "--ema_decay", "1"), "error: --ema_decay 1.0: must be in (0, 1)"),
    (("--ema_decay", "0"), "error: --ema_decay 0.0: must be in (0, 1)"),
    (("--patience", "0", "--coco_path", "/data"), "error: --patience 0: must be 1 or more"),
    (("--patience", "3", "--train_json", "t.json", "--train_images", "t"),
     "error: --patience 3: early stopping needs a validation set to evaluate; pass --val_json FILE"),
    (("--finetune", "deta_r50_typo"), "error: checkpoint deta_r50_typo: no such file, nor an http(s) URL or a "
                                      "model-zoo name (known names: deta_r50_5scale_12ep_bs8, "),
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


def test_a_failed_download_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with serve(Routes()) as base, pytest.raises(SystemExit) as exit_info:
        run_main(*TINY, "--finetune", f"{base}/ckpt.pth", "--output_dir", str(tmp_path / "run"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: --finetune: download of {base}/ckpt.pth failed (HTTP Error 404: Not "
                                       "Found); check the URL and the connection\n")
    assert not (tmp_path / "run").exists() and not list((tmp_path / "torch_home").rglob("*.*"))


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
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith("events.out")} == {"checkpoint.pth", "log.txt",
                                                                                           ".run.lock"}
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers


def fill_the_disk_at(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes of the file `name` fail with ENOSPC (when flushed to the disk, as they may on a full one), and
    shutil.disk_usage says 12345 bytes are free."""
    fsync = os.fsync

    def no_space_for_name(descriptor: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{descriptor}")).name.startswith(f".{name}."):  # save_atomically's
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", no_space_for_name)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(2**40, 2**40 - 12345, 12345))


@pytest.mark.parametrize(("name", "last_good"), [
    ("checkpoint.pth", "the last good checkpoint {folder}/checkpoint.pth (epoch 0) is intact"),
    ("log.txt", "the last good checkpoint {folder}/checkpoint.pth (epoch 1, whose evaluation was cut short and runs "
                "first on resume) is intact"),
], ids=["checkpoint", "log"])
def test_a_full_disk_is_one_line_naming_the_last_good_checkpoint_and_the_resume(
        name: str, last_good: str, data_flags: list[str], one_epoch: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    checkpoint = _copy_run(one_epoch, tmp_path)
    before = {path: path.read_bytes() for path in (checkpoint, tmp_path / "log.txt")}
    fill_the_disk_at(name, monkeypatch)
    flags = [*TINY, *data_flags, "--epochs", "2"]
    monkeypatch.setattr(sys, "argv", ["main.py", *flags, "--resume", str(checkpoint), "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        run_main(*flags, "--resume", str(checkpoint), "--output_dir", str(tmp_path))
    assert exit_info.value.code == 1
    resume = shlex.join([sys.executable, "main.py", *flags, "--output_dir", str(tmp_path), "--resume", str(checkpoint)])
    assert _one_line(capsys.readouterr().err) == (
        f"error: no space left to write {name} in {tmp_path} (12.1 KiB free there); "
        f"{last_good.format(folder=tmp_path)}; free some space there, then resume with: {resume}\n")
    assert (tmp_path / "log.txt").read_bytes() == before[tmp_path / "log.txt"]
    assert (checkpoint.read_bytes() == before[checkpoint]) == (name == "checkpoint.pth")
    assert not list(tmp_path.glob(".*.tmp"))


def test_tensorboard_on_a_full_disk_is_one_warning_and_training_goes_on(
        data_flags: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    """The event file fills up at the first training step (its thread's traceback and the OSError that every
    later write raises are TensorBoard's way of saying so); the epoch, its checkpoint and log.txt carry on."""
    class FullAfterOpening(board_module.SummaryWriter):
        def __init__(self, folder: Path) -> None:
            super().__init__(folder)
            fill_the_disk_under(Path(folder))

    monkeypatch.setattr(board_module, "SummaryWriter", FullAfterOpening)
    run_main(*TINY, *data_flags, "--epochs", "1", "--output_dir", str(tmp_path))
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Exception in thread" not in err
    (warning,) = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warning.startswith(f"warning: no space left to write events.out.tfevents in {tmp_path} (")
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 0
    assert [json.loads(line)["epoch"] for line in (tmp_path / "log.txt").read_text().splitlines()] == [0]


def test_a_full_disk_under_eval_is_one_line_with_the_command_to_run_again(
        data_flags: list[str], one_epoch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    fill_the_disk_at("coco_results.json", monkeypatch)
    flags = [*TINY, *data_flags, "--eval", "--resume", str(one_epoch / "checkpoint.pth"), "--output_dir",
             str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["main.py", *flags])
    with pytest.raises(SystemExit) as exit_info:
        run_main(*flags)
    assert exit_info.value.code == 1
    assert _one_line(capsys.readouterr().err) == (
        f"error: no space left to write coco_results.json in {tmp_path} (12.1 KiB free there); free some space "
        f"there, then run again with: {shlex.join([sys.executable, 'main.py', *flags])}\n")
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob(".*.tmp"))


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


def test_a_full_disk_under_torchrun_is_one_line_from_the_first_process(data_flags: list[str],
                                                                        small_disk: Path) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    flags = [*TINY, *data_flags, "--epochs", "1", "--output_dir", str(small_disk)]
    stopped = subprocess.run([*launcher, str(REPO / "main.py"), *flags], cwd=REPO, env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert stopped.returncode == 1
    (ours,) = [line for line in stopped.stderr.splitlines() if line.startswith("error: ")]
    assert ours.startswith(f"error: no space left to write checkpoint.pth in {small_disk} (")
    assert f"free some space there, then run again with: {shlex.join([*launcher, str(REPO / 'main.py')])}" in ours
    assert "[rank" not in stopped.stderr  # no process of ours printed a traceback; both stopped with status 1
    assert [p.name for p in small_disk.iterdir() if not p.name.startswith("events.out")] == [".run.lock"]


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
    def run(args: argparse.Namespace, given: object, last: object) -> None:
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

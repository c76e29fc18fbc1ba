"""Reading, checking and writing checkpoints: clear errors and nothing half-written."""
import argparse
import datetime
import errno
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import deta
from deta.checkpoint import (
    class_head_size,
    detect_format,
    from_official,
    load_checkpoint,
    load_model_weights,
    save_atomically,
    to_official,
)
from deta.errors import InputError, NoSpaceError
from main import get_args_parser
from scripts import convert_checkpoint

FLAGS = ["--backbone", "resnet18", "--pretrained_backbone", "none", "--enc_layers", "1", "--dec_layers", "1",
         "--hidden_dim", "64", "--nheads", "2", "--dim_feedforward", "64", "--num_queries", "10",
         "--num_feature_levels", "2", "--two_stage", "--with_box_refine", "--device", "cpu"]


def _model(*extra: str):
    return deta.build_model(get_args_parser().parse_args([*FLAGS, *extra]))[0]


def test_official_state_dict_is_detected_and_its_head_copies_dropped():
    state = _model().state_dict()
    official = to_official(state, two_stage=True, with_box_refine=True)
    official["transformer.total_ops"] = torch.zeros(1)
    assert detect_format(official) == "official" and detect_format(state) == "deta"
    assert from_official(official).keys() == state.keys()


def test_inconsistent_official_head_copy_is_rejected():
    official = to_official(_model().state_dict(), two_stage=True, with_box_refine=True)
    official["transformer.decoder.class_embed.0.bias"] = official["class_embed.0.bias"] + 1
    with pytest.raises(InputError, match="class_embed.0.bias differs"):
        from_official(official)


@pytest.mark.parametrize(("content", "message"), [
    (b"not a checkpoint at all", "corrupt, truncated"),
    (None, "no such file"),
])
def test_unreadable_checkpoints_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "checkpoint.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_truncated_and_foreign_checkpoints_are_rejected(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": _model().state_dict()}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(InputError, match="truncated"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"fc.weight": torch.zeros(3)}}, foreign)
    with pytest.raises(InputError, match="not a DETA state dict"):
        load_checkpoint(foreign)
    arbitrary = tmp_path / "arbitrary.pth"
    torch.save({"model": {"x": datetime.date(2020, 1, 1)}}, arbitrary)
    with pytest.raises(InputError, match="pickles datetime.date, which is not loaded for safety"):
        load_checkpoint(arbitrary)


def test_checkpoint_with_saved_namespace_loads_without_unsafe_unpickling(tmp_path):
    path = tmp_path / "c.pth"
    torch.save({"model": _model().state_dict(), "args": argparse.Namespace(lr=1.0), "epoch": 3}, path)
    checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] == 3 and checkpoint["args"].lr == 1.0


def test_mismatched_weights_are_listed_by_name():
    small = _model("--num_classes", "5").state_dict()
    with pytest.raises(InputError, match=r"shape of class_embed\.0\.weight: checkpoint \(5, 64\), model \(91, 64\)"):
        load_model_weights(_model(), small)
    del small["transformer.level_embed"]
    with pytest.raises(InputError, match="missing transformer.level_embed"):
        load_model_weights(_model("--num_classes", "5"), small)


def test_finetune_keeps_fresh_class_heads_of_another_size():
    source = _model("--num_classes", "5")
    target = _model()
    fresh_head = target.class_embed[0].weight.detach().clone()
    skipped = load_model_weights(target, source.state_dict(), finetune=True)
    assert sorted(skipped) == sorted(k for k in source.state_dict() if k.startswith("class_embed."))
    assert torch.equal(target.class_embed[0].weight, fresh_head)
    assert torch.equal(target.transformer.level_embed, source.transformer.level_embed)


def test_atomic_save_leaves_the_previous_file_intact_on_failure(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_atomically({"epoch": 1}, path)
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_atomically({"epoch": 2, "bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def _fill_the_disk(obj: object, file) -> None:
    file.write(b"the first part of a checkpoint")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_line_with_the_space_left_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_atomically({"epoch": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30 - 12345,
                                                                                       12345))
    with pytest.raises(NoSpaceError) as error:
        save_atomically({"epoch": 2}, path, _fill_the_disk)
    assert str(error.value) == f"no space left to write checkpoint.pth in {tmp_path} (12.1 KiB free there)"
    assert error.value.retry_message().endswith("; an earlier checkpoint.pth there is unchanged; free some space "
                                                "there and run it again")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_a_real_full_disk_names_the_file_and_the_space_torch_save_left(small_disk):
    path = small_disk / "checkpoint.pth"
    save_atomically({"weights": torch.zeros(1000)}, path)
    before = path.read_bytes()
    free = shutil.disk_usage(small_disk).free
    with pytest.raises(NoSpaceError) as error:  # torch raises a RuntimeError while handling the OSError
        save_atomically({"weights": torch.zeros(100_000)}, path)
    assert str(error.value) == (f"no space left to write checkpoint.pth in {small_disk} ({free / 1024:.1f} KiB free "
                                "there)")
    assert path.read_bytes() == before
    assert [p.name for p in small_disk.iterdir()] == ["checkpoint.pth"]


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory) -> Path:
    """A small model's checkpoint as main.py writes it: weights, arguments and training state."""
    args = get_args_parser().parse_args(FLAGS)
    model = deta.build_model(args)[0]
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "args": vars(args), "epoch": 3, "optimizer": {"state": {}}}, path)
    return path


def _convert(monkeypatch, capsys, *argv: str) -> str:
    monkeypatch.setattr(sys, "argv", ["convert_checkpoint.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        convert_checkpoint.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("target_format", ["deta", "official", "detrex", "hf"])
@pytest.mark.parametrize("link", ["same path", "symlink", "hard link"])
def test_convert_refuses_to_overwrite_its_input(training_checkpoint, tmp_path, monkeypatch, capsys, target_format,
                                                link):
    source = tmp_path / "checkpoint.pth"
    shutil.copy(training_checkpoint, source)
    before = source.read_bytes()
    target = {"same path": source, "symlink": tmp_path / "link.pth", "hard link": tmp_path / "hard.pth"}[link]
    if link == "symlink":
        target.symlink_to(source)
    elif link == "hard link":
        os.link(source, target)
    err = _convert(monkeypatch, capsys, "--to", target_format, str(source), str(target))
    assert f"error: {target}: the output is the input {source} (the same file" in err
    assert source.read_bytes() == before


def test_convert_refuses_to_write_an_hf_folder_over_itself(training_checkpoint, tmp_path, monkeypatch, capsys):
    convert_checkpoint.convert(str(training_checkpoint), str(tmp_path / "hf"), "auto", "hf", [])
    before = (tmp_path / "hf" / "model.safetensors").read_bytes()
    err = _convert(monkeypatch, capsys, "--to", "hf", str(tmp_path / "hf"), str(tmp_path / "hf"))
    assert "the output is the input" in err
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == before


def test_class_head_size_reads_the_head_or_names_the_flag_that_gives_it() -> None:
    assert class_head_size({"class_embed.0.bias": torch.zeros(91)}, "--resume", "--num_classes") == 91
    with pytest.raises(InputError, match="^--resume: the checkpoint has no class_embed.0.bias .*; pass --num_classes$"):
        class_head_size({"backbone.0.weight": torch.zeros(1)}, "--resume", "--num_classes")


@pytest.mark.parametrize("use_ema", [True, False])
def test_convert_takes_the_ema_weights_to_another_format_unless_told(training_checkpoint, tmp_path, capsys, use_ema):
    saved = torch.load(training_checkpoint, weights_only=True)
    average = {key: value + 1 if value.is_floating_point() else value for key, value in saved["model"].items()}
    source = tmp_path / "with_ema.pth"
    torch.save({**saved, "ema": {"model": average, "updates": 5}}, source)
    convert_checkpoint.convert(str(source), str(tmp_path / "official.pth"), "auto", "official", [], use_ema)
    converted = torch.load(tmp_path / "official.pth", weights_only=False)
    expected = to_official(average if use_ema else saved["model"], two_stage=True, with_box_refine=True)
    assert "ema" not in converted and converted["model"].keys() == expected.keys()
    assert all(torch.equal(converted["model"][key], value) for key, value in expected.items())
    assert ("converting its EMA weights (the moving average of 5 training steps)" in capsys.readouterr().out) == use_ema
    convert_checkpoint.convert(str(source), str(tmp_path / "ours.pth"), "auto", "deta", [], use_ema)
    ours = torch.load(tmp_path / "ours.pth", weights_only=False)  # our format keeps both
    assert all(torch.equal(ours["ema"]["model"][key], value) for key, value in average.items())
    assert all(torch.equal(ours["model"][key], value) for key, value in saved["model"].items())

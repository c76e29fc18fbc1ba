"""main.py's flag checks: a value that could only fail later fails at start, naming its flag."""
import argparse

import pytest
from test_main import TINY

from deta.config import architecture_differences, given_args
from deta.errors import InputError
from main import get_args_parser
from training.args_check import validate_args


def _args(*flags: str) -> argparse.Namespace:
    return get_args_parser().parse_args(["--coco_path", "coco", *flags])


@pytest.mark.parametrize(("flags", "message"), [
    (("--lr_drop", "0"), "--lr_drop 0: must be 1 or more"),
    (("--batch_size", "0"), "--batch_size 0: must be 1 or more"),
    (("--num_queries", "0"), "--num_queries 0: must be 1 or more"),
    (("--num_feature_levels", "0"), "--num_feature_levels 0: must be 1 or more"),
    (("--dec_layers", "0"), "--dec_layers 0: must be 1 or more"),
    (("--epochs", "0"), "--epochs 0: must be 1 or more"),
    (("--eval_size", "0"), "--eval_size 0: must be 1 or more"),
    (("--print_freq", "0"), "--print_freq 0: must be 1 or more"),
    (("--num_workers", "-1"), "--num_workers -1: must be 0 or more"),
    (("--lr=-1e-4",), "--lr -0.0001: must be a finite number, 0 or more"),
    (("--lr_backbone", "nan"), "--lr_backbone nan: must be a finite number, 0 or more"),
    (("--dropout", "1"), "--dropout 1.0: must be in [0, 1)"),
    (("--num_classes", "0"), "--num_classes 0: must be 1 or more"),
    (("--hidden_dim", "48", "--nheads", "2"), "--hidden_dim 48: must be a multiple of 32 (the input projections' "
                                              "GroupNorm has 32 groups)"),
    (("--hidden_dim", "64", "--nheads", "3"), "--hidden_dim 64 is not divisible by --nheads 3"),
    (("--start_epoch", "5", "--epochs", "5"), "--start_epoch 5 leaves nothing to train with --epochs 5"),
    (("--train_sizes", "0,64"), "--train_sizes: expected positive comma-separated integers"),
    (("--eval",), "--eval needs the checkpoint to evaluate: pass --resume CKPT"),
    (("--resume", "a.pth", "--finetune", "b.pth"), "--resume and --finetune exclude each other"),
])
def test_values_that_cannot_work_fail_naming_their_flag(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(InputError) as info:
        validate_args(_args(*flags))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize("flags", [(), tuple(TINY), ("--hidden_dim", "64", "--nheads", "64", "--enc_layers", "0"),
                                   ("--eval", "--resume", "ckpt.pth", "--epochs", "1", "--start_epoch", "3")])
def test_working_values_pass(flags: tuple[str, ...]) -> None:
    validate_args(_args(*flags))


def test_architecture_differences_name_the_flag_and_the_saved_value() -> None:
    args = _args("--hidden_dim", "64", "--num_queries", "20")
    saved = {**vars(_args()), "lr": 1.0}
    assert architecture_differences(saved, args) == ["--hidden_dim 64 (checkpoint: 256)",
                                                     "--num_queries 20 (checkpoint: 300)"]
    assert architecture_differences(argparse.Namespace(hidden_dim=256), args) == ["--hidden_dim 64 (checkpoint: 256)"]
    assert architecture_differences(None, args) == []


def test_given_args_are_the_command_line_s_even_at_their_default_values() -> None:
    given = given_args(get_args_parser(), ["--two_stage", "--lr", "2e-4", "--no_aux_loss", "--backbone=resnet18"])
    assert given == {"two_stage": True, "lr": 2e-4, "aux_loss": False, "backbone": "resnet18"}
    assert given_args(get_args_parser(), []) == {}

"""main.py's flags checked before anything runs: a value that can only fail later (after an epoch of
training, or deep in the model) fails at once, naming its flag.

The model's flags are checked by deta.config; here are the training loop's: positive counts and sizes,
finite non-negative rates, a run to continue or evaluate that is named.
"""
import argparse
import math

from datasets import parse_sizes
from deta.config import check_model_args
from deta.errors import ArgumentError, InputError

AT_LEAST_ONE = ("batch_size", "epochs", "lr_drop", "print_freq")
AT_LEAST_ZERO = ("num_workers", "start_epoch")
NON_NEGATIVE_FLOATS = ("lr", "lr_linear_proj_mult", "weight_decay", "clip_max_norm")


def validate_args(args: argparse.Namespace) -> None:
    """Raise InputError naming the first flag whose value cannot work, and what would."""
    if args.resume and args.finetune:
        raise InputError("--resume and --finetune exclude each other: --resume continues a run (weights, "
                         "optimizer, schedule, epoch), --finetune starts a new run from weights only; pass one")
    if args.eval and not args.resume:
        raise InputError("--eval needs the checkpoint to evaluate: pass --resume CKPT (without it the model's "
                         "random weights would be scored)")
    for name in AT_LEAST_ONE:
        _require(args, name, getattr(args, name) >= 1, "must be 1 or more")
    for name in AT_LEAST_ZERO:
        _require(args, name, getattr(args, name) >= 0, "must be 0 or more")
    for name in NON_NEGATIVE_FLOATS:
        value = getattr(args, name)
        _require(args, name, math.isfinite(value) and value >= 0, "must be a finite number, 0 or more")
    validate_model_args(args)
    if not args.resume and args.start_epoch >= args.epochs:
        raise InputError(f"--start_epoch {args.start_epoch} leaves nothing to train with --epochs {args.epochs}; "
                         "pass a larger --epochs")
    parse_sizes(args.train_sizes)


def validate_model_args(args: argparse.Namespace) -> None:
    """deta.config's checks of the model's arguments, their errors naming the flags."""
    try:
        check_model_args(args)
    except ArgumentError as err:
        raise InputError(err.on_command_line()) from err


def _require(args: argparse.Namespace, name: str, valid: bool, rule: str) -> None:
    if not valid:
        raise InputError(f"--{name} {getattr(args, name)}: {rule}")

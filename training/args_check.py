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
AT_LEAST_ZERO = ("num_workers", "start_epoch", "ema_warmup")
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
    if args.accumulate is not None:
        _require(args, "accumulate", args.accumulate >= 1, "must be 1 or more (micro-batches per optimizer step)")
    validate_model_args(args)
    if not args.resume and args.start_epoch >= args.epochs:
        raise InputError(f"--start_epoch {args.start_epoch} leaves nothing to train with --epochs {args.epochs}; "
                         "pass a larger --epochs")
    _require(args, "ema_decay", 0 < args.ema_decay < 1, "must be in (0, 1), e.g. 0.9997 (the average's weight)")
    if args.patience is not None:
        _require(args, "patience", args.patience >= 1, "must be 1 or more (evaluations without an AP improvement "
                 "before training stops); leave it out to train all --epochs")
        if not (args.val_json or args.coco_path):
            raise InputError(f"--patience {args.patience}: early stopping needs a validation set to evaluate; pass "
                             "--val_json FILE and --val_images DIR, or --coco_path DIR")
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

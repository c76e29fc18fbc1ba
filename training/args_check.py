"""main.py's flags checked before anything runs: a value that can only fail later (after an epoch of
training, or deep in the model) fails at once, naming its flag.

What is checked is what the model and the loop really need: GroupNorm(32, hidden_dim) in the input
projections, hidden_dim split evenly over the attention heads, at least one decoder layer (the heads read
its output), positive counts and sizes, finite non-negative rates and loss weights.
"""
import argparse
import math
from collections.abc import Mapping
from typing import Any

from datasets import parse_sizes
from deta.errors import InputError

GROUP_NORM_GROUPS = 32  # of the input projections' GroupNorm (deta.detector), as in the official code

AT_LEAST_ONE = ("batch_size", "epochs", "lr_drop", "num_queries", "num_feature_levels", "hidden_dim", "nheads",
                "dec_layers", "dim_feedforward", "dec_n_points", "enc_n_points", "num_detections", "max_size",
                "eval_size", "print_freq")
AT_LEAST_ZERO = ("enc_layers", "num_workers", "start_epoch")
NON_NEGATIVE_FLOATS = ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay", "clip_max_norm",
                       "set_cost_class", "set_cost_bbox", "set_cost_giou", "cls_loss_coef", "bbox_loss_coef",
                       "giou_loss_coef")

# Saved arguments that decide the shapes of the state dict: where a checkpoint does not fit the flags,
# these are the ones to compare.
ARCHITECTURE_ARGS = ("backbone", "dilation", "num_feature_levels", "hidden_dim", "nheads", "enc_layers", "dec_layers",
                     "dim_feedforward", "enc_n_points", "dec_n_points", "num_queries", "num_classes", "two_stage",
                     "with_box_refine")


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
    _require(args, "dropout", 0 <= args.dropout < 1, "must be in [0, 1)")
    _require(args, "focal_alpha", args.focal_alpha <= 1, "must be at most 1 (negative: no class balancing)")
    _require(args, "position_embedding_scale", math.isfinite(args.position_embedding_scale)
             and args.position_embedding_scale > 0, "must be a positive number")
    if args.num_classes is not None:
        _require(args, "num_classes", args.num_classes >= 1, "must be 1 or more (largest category id + 1)")
    _require(args, "hidden_dim", args.hidden_dim % GROUP_NORM_GROUPS == 0,
             f"must be a multiple of {GROUP_NORM_GROUPS} (the input projections' GroupNorm has "
             f"{GROUP_NORM_GROUPS} groups); e.g. 64 or 256")
    if args.hidden_dim % args.nheads:
        raise InputError(f"--hidden_dim {args.hidden_dim} is not divisible by --nheads {args.nheads}: each "
                         "attention head takes an equal share of the channels; pass an --nheads that divides it")
    if not args.resume and args.start_epoch >= args.epochs:
        raise InputError(f"--start_epoch {args.start_epoch} leaves nothing to train with --epochs {args.epochs}; "
                         "pass a larger --epochs")
    parse_sizes(args.train_sizes)


def _require(args: argparse.Namespace, name: str, valid: bool, rule: str) -> None:
    if not valid:
        raise InputError(f"--{name} {getattr(args, name)}: {rule}")


def architecture_differences(saved_args: Any, args: argparse.Namespace) -> list[str]:
    """'--flag VALUE (checkpoint: SAVED)' for each shape-deciding argument where the flags differ from a
    checkpoint's saved arguments (a dict or an argparse.Namespace; none: nothing to compare)."""
    saved = vars(saved_args) if isinstance(saved_args, argparse.Namespace) else saved_args
    if not isinstance(saved, Mapping):
        return []
    return [f"--{name} {getattr(args, name)} (checkpoint: {saved[name]})" for name in ARCHITECTURE_ARGS
            if name in saved and hasattr(args, name) and saved[name] != getattr(args, name)]

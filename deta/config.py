"""The model's arguments: the flags that decide the model, its loss, its evaluation preprocessing and where it
runs; their defaults and checks; and the reading of a checkpoint's saved arguments into them.

argparse-compatible, with the flag names of the official DETA main.py: main.py composes its parser with
`add_model_args`, `Detector.from_checkpoint` and the scripts build a checkpoint's model from `checkpoint_args`.
"""
import argparse
import math
from collections.abc import Collection, Mapping
from typing import Any

from .checkpoint import class_head_size
from .errors import ArgumentError, InputError

BATCHING = ("padded", "per_image")
GROUP_NORM_GROUPS = 32  # of the input projections' GroupNorm (deta.detector), as in the official code
# How the model runs on this machine, not what it is: never taken from a checkpoint's saved arguments.
MACHINE_ARGS = ("device", "amp")
# Saved arguments that decide the shapes of the state dict: where a checkpoint does not fit the flags,
# these are the ones to compare.
ARCHITECTURE_ARGS = ("backbone", "dilation", "num_feature_levels", "hidden_dim", "nheads", "enc_layers", "dec_layers",
                     "dim_feedforward", "enc_n_points", "dec_n_points", "num_queries", "num_classes", "two_stage",
                     "with_box_refine")
_AT_LEAST_ONE = ("num_queries", "num_feature_levels", "hidden_dim", "nheads", "dec_layers", "dim_feedforward",
                 "dec_n_points", "enc_n_points", "num_detections", "max_size", "eval_size")
_NON_NEGATIVE_FLOATS = ("lr_backbone", "set_cost_class", "set_cost_bbox", "set_cost_giou", "cls_loss_coef",
                        "bbox_loss_coef", "giou_loss_coef")
# What a Detector decides itself rather than take from the training run: per-image evaluation, and the
# backbone's ImageNet weights are not loaded (the checkpoint holds its weights).
_DETECTOR_OWN = ("eval_batching", "official_batching", "pretrained_backbone")
_NO_ARGS_EXAMPLE = "e.g. two_stage, with_box_refine, num_feature_levels 5, ..."


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model's flags with their defaults, in the argument groups 'model', 'assignment and loss',
    'evaluation images' and 'device'."""
    model = parser.add_argument_group("model")
    model.add_argument("--with_box_refine", action="store_true")
    model.add_argument("--two_stage", action="store_true")
    model.add_argument("--backbone", default="resnet50", type=str,
                       help="resnet18, resnet34, resnet50, resnet101 (torchvision) or swin_large (timm; the "
                            "official spelling 'swin' also works)")
    model.add_argument("--pretrained_backbone", default="default", type=str,
                       help="'default': torchvision's ImageNet weights from its cache, 'none': random "
                            "initialisation, or the path of a backbone state dict")
    model.add_argument("--lr_backbone", default=2e-5, type=float,
                       help="learning rate of the backbone; 0 freezes it")
    model.add_argument("--dilation", action="store_true",
                       help="replace the stride of the last ResNet stage with dilation (DC5)")
    model.add_argument("--position_embedding", default="sine", choices=("sine",))
    model.add_argument("--position_embedding_scale", default=2 * math.pi, type=float,
                       help="position / size * scale")
    model.add_argument("--num_feature_levels", default=4, type=int)
    model.add_argument("--enc_layers", default=6, type=int)
    model.add_argument("--dec_layers", default=6, type=int)
    model.add_argument("--dim_feedforward", default=1024, type=int)
    model.add_argument("--hidden_dim", default=256, type=int)
    model.add_argument("--dropout", default=0.1, type=float)
    model.add_argument("--nheads", default=8, type=int)
    model.add_argument("--num_queries", default=300, type=int)
    model.add_argument("--dec_n_points", default=4, type=int)
    model.add_argument("--enc_n_points", default=4, type=int)
    model.add_argument("--num_classes", default=None, type=int,
                       help="size of the class head; default: largest category id + 1 of the training "
                            "annotations when training, else 91 (COCO category ids)")
    model.add_argument("--train_batching", default="padded", choices=BATCHING,
                       help="padded: the batch is padded before the backbone and padding may become proposals, "
                            "the official computation that DETA's published models were trained with; per_image: "
                            "each image independent of its batch (ours, not measured on COCO)")
    model.add_argument("--eval_batching", default="per_image", choices=BATCHING,
                       help="per_image: detections independent of the batch size, whatever the training mode; "
                            "padded: the official code's padded evaluation (results depend on the batch)")
    model.add_argument("--official_batching", action="store_true",
                       help="padded batches in training and evaluation, as the official code runs")
    model.add_argument("--num_detections", default=100, type=int,
                       help="detections kept per image at inference (300 reproduces detrex's non-NMS baseline)")

    loss = parser.add_argument_group("assignment and loss")
    loss.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                      help="disable the per-decoder-layer and encoder losses")
    loss.add_argument("--assign_first_stage", action="store_true",
                      help="IoU (RPN-style) assignment for the encoder proposals instead of Hungarian")
    loss.add_argument("--assign_second_stage", action="store_true",
                      help="IoU one-to-many assignment for the decoder, and NMS post-processing")
    loss.add_argument("--set_cost_class", default=2, type=float)
    loss.add_argument("--set_cost_bbox", default=5, type=float)
    loss.add_argument("--set_cost_giou", default=2, type=float)
    loss.add_argument("--cls_loss_coef", default=2, type=float)
    loss.add_argument("--bbox_loss_coef", default=5, type=float)
    loss.add_argument("--giou_loss_coef", default=2, type=float)
    loss.add_argument("--focal_alpha", default=0.25, type=float)

    images = parser.add_argument_group("evaluation images")
    images.add_argument("--max_size", default=1333, type=int, help="longest side after resizing")
    images.add_argument("--eval_size", default=800, type=int, help="shorter side at evaluation")
    images.add_argument("--bigger", action="store_true",
                        help="Swin-L recipe: scales x1.5 and max size 2000 (crop branch unchanged)")

    device = parser.add_argument_group("device")
    device.add_argument("--device", default=None, help="cuda or cpu; default: cuda when available")
    device.add_argument("--amp", action="store_true", help="bf16 autocast where the device supports it")


def model_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """A parser of the model's flags alone (`kwargs` go to ArgumentParser)."""
    parser = argparse.ArgumentParser(add_help=False, **kwargs)
    add_model_args(parser)
    return parser


def default_args() -> argparse.Namespace:
    """The model's arguments at their defaults."""
    return model_parser().parse_args([])


def given_args(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """The arguments that `argv` itself sets, by name, and their values: the defaults left out.

    argparse fills in a default only where the namespace lacks the argument, so every argument is preset to a
    marker that no flag can give.
    """
    unset = object()
    preset = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset))
    given = parser.parse_args(argv, namespace=preset)
    return {name: value for name, value in vars(given).items() if value is not unset}


def model_flags(argv: list[str]) -> dict[str, Any]:
    """Model flags on a command line (`--eval_size 600 --amp`, what the scripts take after '--') as the keyword
    arguments of `checkpoint_args` and `Detector.from_checkpoint`: only the flags given, by argument name."""
    parser = model_parser(exit_on_error=False)
    try:
        _, unknown = parser.parse_known_args(argv)  # unknown flags named here, before argparse would exit on them
        if unknown:
            raise InputError(f"main.py flags after '--': unknown {' '.join(unknown)}; see python main.py --help "
                             "(the model's flags)")
        return given_args(parser, argv)
    except argparse.ArgumentError as err:
        raise InputError(f"main.py flags after '--': {err}") from err


def saved_args(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's saved arguments as a dict: ours save one, official DETA an argparse.Namespace, detrex
    none (None)."""
    saved = checkpoint.get("args")
    if saved is None:
        return None
    return dict(vars(saved) if isinstance(saved, argparse.Namespace) else saved)


def take_saved(args: argparse.Namespace, saved: Mapping[str, Any], keep: Collection[str] = ()) -> dict[str, Any]:
    """Set the model arguments of `args` to their `saved` values, except those named in `keep` and the machine's
    (MACHINE_ARGS); returns those that changed, with their new values."""
    changed = {}
    for name in vars(default_args()):
        if name in saved and name not in keep and name not in MACHINE_ARGS and getattr(args, name) != saved[name]:
            changed[name] = saved[name]
            setattr(args, name, saved[name])
    return changed


def checkpoint_args(checkpoint: Mapping[str, Any], source: str, flags: Mapping[str, Any]) -> argparse.Namespace:
    """The model arguments of a checkpoint: defaults, then its saved arguments, then `flags` (by argument name),
    checked. The evaluation is per image and the backbone's ImageNet weights are not loaded unless `flags` say
    otherwise; a class head size that no argument gives is the checkpoint's. One that saves no arguments (detrex)
    needs the model's flags."""
    saved = saved_args(checkpoint)
    if saved is None and not flags:
        raise InputError(f"{source}: it saves no model arguments; pass the model flags it was trained with "
                         f"({_NO_ARGS_EXAMPLE})")
    args = default_args()
    unknown = sorted(set(flags) - set(vars(args)))
    if unknown:
        raise InputError(f"unknown main.py flag(s) {', '.join(unknown)}: not a model argument; see python main.py "
                         "--help")
    take_saved(args, saved or {}, keep=_DETECTOR_OWN)
    args.pretrained_backbone = "none"
    vars(args).update(flags)
    if args.num_classes is None:
        args.num_classes = class_head_size(checkpoint["model"], source, "num_classes")
    check_model_args(args)
    return args


def check_model_args(args: argparse.Namespace) -> None:
    """Raise ArgumentError naming the first model argument whose value cannot work, and what would: what the model
    needs (GroupNorm(32, hidden_dim) in the input projections, hidden_dim split evenly over the attention heads, at
    least one decoder layer, positive counts and sizes, finite non-negative rates and loss weights)."""
    for name in _AT_LEAST_ONE:
        _require(args, name, getattr(args, name) >= 1, "must be 1 or more")
    _require(args, "enc_layers", args.enc_layers >= 0, "must be 0 or more")
    for name in _NON_NEGATIVE_FLOATS:
        value = getattr(args, name)
        _require(args, name, math.isfinite(value) and value >= 0, "must be a finite number, 0 or more")
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
        raise ArgumentError("{hidden_dim} is not divisible by {nheads}: each attention head takes an equal share of "
                            "the channels; pass a number of heads that divides it", hidden_dim=args.hidden_dim,
                            nheads=args.nheads)


def _require(args: argparse.Namespace, name: str, valid: bool, rule: str) -> None:
    if not valid:
        raise ArgumentError(f"{{{name}}}: {rule}", **{name: getattr(args, name)})


def architecture_differences(saved: Mapping[str, Any] | argparse.Namespace | None,
                             args: argparse.Namespace) -> list[str]:
    """'--flag VALUE (checkpoint: SAVED)' for each shape-deciding argument where the flags differ from a
    checkpoint's saved arguments (a dict or an argparse.Namespace; None: nothing to compare)."""
    if isinstance(saved, argparse.Namespace):
        saved = vars(saved)
    if not isinstance(saved, Mapping):
        return []
    return [f"--{name} {getattr(args, name)} (checkpoint: {saved[name]})" for name in ARCHITECTURE_ARGS
            if name in saved and hasattr(args, name) and saved[name] != getattr(args, name)]

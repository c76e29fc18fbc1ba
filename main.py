"""Train and evaluate DETA.

Flag names follow the official DETA / Deformable-DETR `main.py`, so existing command lines
(e.g. configs/deta.sh) keep working. Launch with `python main.py ...` on one process or
`torchrun --nproc_per_node=N main.py ...` for data-parallel training.
"""
import argparse
import contextlib
import datetime
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from torch.utils.tensorboard import SummaryWriter

from datasets import DetectionLoader, build_dataset, resolve_num_classes
from datasets.coco import category_names
from deta import build_model
from deta.checkpoint import class_head_size, load_checkpoint, load_model_weights
from deta.errors import InputError
from engine import NonFiniteLossError, evaluate, train_one_epoch
from training.accumulation import VirtualRanks, effective_batch_line, resolve_accumulate
from training.args_check import architecture_differences, validate_args
from training.checkpointing import remove_stale_temporaries, rng_state, save_checkpoint, seed_everything, set_rng_state
from training.cpu_memory import keep_freed_memory
from training.distributed import (
    all_gather_object,
    cleanup_distributed,
    cpu_has_bf16_matmul,
    get_rank,
    get_world_size,
    init_distributed,
)
from training.interrupts import Interrupted, LastCheckpoint, signals_raise
from training.optim import build_optimizer, group_learning_rates
from training.run_dir import choose_output_dir, make_writable_dir
from training.run_log import LOG_NAME, log_epoch, logged_epochs

log = logging.getLogger("main")

BATCHING = ("padded", "per_image")
# Saved arguments that say how a model ran, not what it is: a checkpoint's model evaluates per image
# (batch-independent) unless the caller asks otherwise.
_RUN_ONLY_ARGS = ("device", "eval_batching", "official_batching")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DETA training and evaluation", add_help=False)

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--lr", default=2e-4, type=float)
    opt.add_argument("--lr_backbone_names", default=["backbone.0"], type=str, nargs="+")
    opt.add_argument("--lr_backbone", default=2e-5, type=float)
    opt.add_argument("--lr_linear_proj_names", default=["reference_points", "sampling_offsets"],
                     type=str, nargs="+")
    opt.add_argument("--lr_linear_proj_mult", default=0.1, type=float)
    opt.add_argument("--batch_size", default=2, type=int, help="images per process")
    opt.add_argument("--accumulate", default=None, type=int,
                     help="micro-batches of --batch_size per optimizer step: P processes then make the exact update "
                          "of P x N processes (e.g. 2 GPUs with --accumulate 4: the published 8x2 batch); default: "
                          "the --resume checkpoint's, else 1")
    opt.add_argument("--weight_decay", default=1e-4, type=float)
    opt.add_argument("--epochs", default=50, type=int)
    opt.add_argument("--lr_drop", default=40, type=int, help="epochs between 10x learning-rate drops")
    opt.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm (0: off)")
    opt.add_argument("--sgd", action="store_true", help="SGD with momentum 0.9 instead of AdamW")
    opt.add_argument("--amp", action="store_true", help="bf16 autocast where the device supports it")

    model = parser.add_argument_group("model")
    model.add_argument("--with_box_refine", action="store_true")
    model.add_argument("--two_stage", action="store_true")
    model.add_argument("--backbone", default="resnet50", type=str,
                       help="resnet18, resnet34, resnet50, resnet101 (torchvision) or swin_large (timm; the "
                            "official spelling 'swin' also works)")
    model.add_argument("--pretrained_backbone", default="default", type=str,
                       help="'default': torchvision's ImageNet weights from its cache, 'none': random "
                            "initialisation, or the path of a backbone state dict")
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

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_file", default="coco", choices=("coco",))
    data.add_argument("--coco_path", default=None, type=str,
                      help="COCO root with train2017/, val2017/ and annotations/")
    data.add_argument("--train_json", default=None, type=str, help="COCO-format training annotations")
    data.add_argument("--train_images", default=None, type=str, help="folder of the training images")
    data.add_argument("--val_json", default=None, type=str, help="COCO-format validation annotations")
    data.add_argument("--val_images", default=None, type=str, help="folder of the validation images")
    data.add_argument("--train_sizes", default="480,512,544,576,608,640,672,704,736,768,800", type=str,
                      help="comma-separated shorter-side sizes for multi-scale training")
    data.add_argument("--max_size", default=1333, type=int, help="longest side after resizing")
    data.add_argument("--eval_size", default=800, type=int, help="shorter side at evaluation")
    data.add_argument("--bigger", action="store_true",
                      help="Swin-L recipe: scales x1.5 and max size 2000 (crop branch unchanged)")
    data.add_argument("--num_workers", default=2, type=int)
    data.add_argument("--skip_mismatched_images", action="store_true",
                      help="read every image header at start and leave out (with a count) the images whose size "
                           "matches neither the JSON's width/height nor their EXIF-turned form; without it such an "
                           "image is an error when it loads")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default="",
                     help="where to save checkpoints, log.txt, TensorBoard and COCO results; default: the folder of "
                          "the --resume checkpoint, else a new outputs/DATE-TIME folder (--eval: nowhere)")
    run.add_argument("--device", default=None, help="cuda or cpu; default: cuda when available")
    run.add_argument("--seed", default=42, type=int)
    run.add_argument("--resume", default="",
                     help="continue a run: model, optimizer, scheduler and epoch from a checkpoint")
    run.add_argument("--finetune", default="",
                     help="start from a checkpoint's weights only; class heads of another size are dropped")
    run.add_argument("--start_epoch", default=0, type=int)
    run.add_argument("--eval", action="store_true", help="evaluate only")
    run.add_argument("--print_freq", default=10, type=int, help="iterations between progress lines")
    return parser


def model_args(checkpoint: dict[str, Any], source: str, overrides: list[str]) -> argparse.Namespace:
    """Arguments of a checkpoint's model: parser defaults, then its saved 'args', then `overrides` (flags).

    Official checkpoints save an argparse.Namespace, ours a dict; one that saves none needs the model
    flags in `overrides`, which the scripts take after '--'. The backbone is not initialised from ImageNet
    (the checkpoint holds its weights); the device and the evaluation batching are the overrides' or the
    defaults, not those the checkpoint was trained with.
    """
    saved_args = checkpoint.get("args")
    if saved_args is None and not overrides:
        raise InputError(f"checkpoint {source}: it saves no model arguments; pass the main.py model flags after "
                         "'--' (e.g. -- --two_stage --with_box_refine --num_feature_levels 5 ...)")
    parser = get_args_parser()
    args = parser.parse_args([])
    saved = vars(saved_args) if isinstance(saved_args, argparse.Namespace) else dict(saved_args or {})
    for key, value in saved.items():
        if hasattr(args, key) and key not in _RUN_ONLY_ARGS:
            setattr(args, key, value)
    args = parser.parse_args(overrides, namespace=args)
    args.pretrained_backbone = "none"
    return args


def main(args: argparse.Namespace) -> None:
    """Train with evaluation after every epoch, or only evaluate with --eval.

    Bad input ends the process with `error: <message>` and status 2, a non-finite loss with status 1,
    SIGINT and SIGTERM with one line naming the last good checkpoint and the resume command, and status
    128 + the signal number (130, 143).
    """
    last = LastCheckpoint()
    try:
        with signals_raise():
            _run(args, last)
    except InputError as err:
        # Every process of a torchrun run meets a bad flag or file alike: the first says it. A data error in
        # one process's images, that process says.
        if err.local or os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as err:
        if get_rank() == 0:  # the loss is reduced over the processes: every one stops at the same step
            print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as interrupt:
        if get_rank() == 0:  # every process stops; one says so
            print(f"error: {last.stop_message(interrupt, sys.argv)}", file=sys.stderr)
        sys.exit(128 + interrupt.signum)
    finally:
        cleanup_distributed()


def _run(args: argparse.Namespace, last: LastCheckpoint) -> None:
    validate_args(args)
    device = init_distributed(args.device)
    if device.type == "cpu":
        keep_freed_memory()
    rank, world_size = get_rank(), get_world_size()
    logging.basicConfig(format="%(message)s", level=logging.INFO if rank == 0 else logging.WARNING,
                        stream=sys.stdout, force=True)
    if args.amp and not (device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())):
        raise InputError(f"--amp: {device} has no bf16 support; drop --amp")
    if args.amp and device.type == "cpu" and not cpu_has_bf16_matmul():
        log.warning("warning: --amp on a CPU without AVX512-BF16 or AMX: bf16 matmuls run far slower than fp32 "
                    "here (100x on an AVX2 machine); drop --amp")
    output_dir = last.output_dir = _prepare_output_dir(args)
    seed_everything(args.seed + rank)
    log.info(f"{world_size} process(es) on {device}; {args}")

    checkpoint = load_checkpoint(args.resume or args.finetune) if args.resume or args.finetune else None
    args.accumulate = resolve_accumulate(args, checkpoint)
    if not args.eval:
        log.info(effective_batch_line(args, world_size))
    evaluate_first = False  # the resumed epoch's evaluation, cut short by the end of the last run
    if args.resume and not args.eval:
        last.path, last.epoch = Path(args.resume), checkpoint.get("epoch")
        if "epoch" in checkpoint:
            evaluate_first = _unlogged(output_dir, checkpoint["epoch"])
            if not _epochs_left(checkpoint, args, evaluate_first):
                return
    if args.num_classes is None:
        args.num_classes = (class_head_size(checkpoint["model"], "--resume", "--num_classes") if args.resume
                            else resolve_num_classes(args))
    model, criterion, postprocessors = build_model(args)
    model.to(device)
    criterion.to(device)
    if checkpoint is not None:
        _load_weights(model, checkpoint, args)
    log.info(f"trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad)}")

    dataset_val = build_dataset("val", args)
    loader_val = DetectionLoader(dataset_val, batch_size=args.batch_size, num_workers=args.num_workers,
                                 sampler=DistributedSampler(dataset_val, world_size, rank, shuffle=False),
                                 pin_memory=device.type == "cuda")

    def run_evaluation() -> dict[str, float]:
        # Evaluating leaves the random generators as it found them: training then does not depend on the
        # validation set, and a resumed run continues exactly whether or not it evaluates first.
        state = rng_state(device)
        stats = evaluate(model, postprocessors, loader_val, dataset_val.coco, device, amp=args.amp,
                         print_freq=args.print_freq, output_dir=output_dir)
        set_rng_state(state, device)
        return stats

    if args.eval:
        run_evaluation()
        return

    dataset_train = build_dataset("train", args)
    # Shards, loaders and random states of this process's --accumulate virtual ranks (seeded here).
    virtual_ranks = VirtualRanks(dataset_train, args, rank, world_size, device)
    optimizer = build_optimizer(model, args)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    train_model = model
    if world_size > 1:
        # Without aux losses the intermediate class heads get no gradient, which DDP must be told.
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              find_unused_parameters=not args.aux_loss)
    if args.resume:
        _restore_training_state(checkpoint, optimizer, lr_scheduler, args, virtual_ranks)
    with SummaryWriter(output_dir) if rank == 0 else contextlib.nullcontext() as writer:
        if evaluate_first:
            log.info(f"--resume: epoch {checkpoint['epoch']} has a checkpoint but no line in "
                     f"{output_dir / LOG_NAME} (the run stopped during its evaluation); evaluating it first")
            last.evaluated = False
            _log_epoch(output_dir, writer, checkpoint["epoch"], checkpoint.get("train_stats", {}), run_evaluation())
            last.evaluated = True
            if args.start_epoch == args.epochs:
                return

        log.info(f"training epochs {args.start_epoch}..{args.epochs - 1}, saving to {output_dir}")
        start = time.time()
        for epoch in range(args.start_epoch, args.epochs):
            virtual_ranks.set_epoch(epoch)
            train_stats = train_one_epoch(train_model, criterion, virtual_ranks, optimizer, device, epoch,
                                          max_norm=args.clip_max_norm, amp=args.amp, print_freq=args.print_freq,
                                          writer=writer)
            lr_scheduler.step()
            # every virtual rank's, in order, for an exact resume on any processes x --accumulate of that count
            rng_states = [state for states in all_gather_object(virtual_ranks.rng_states()) for state in states]
            if rank == 0:
                save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": vars(args),
                                 "rng_states": rng_states, "category_names": category_names(dataset_train.coco),
                                 "train_stats": train_stats},
                                output_dir, epoch, args.lr_drop)
            last.path, last.epoch, last.evaluated = output_dir / "checkpoint.pth", epoch, False
            _log_epoch(output_dir, writer, epoch, train_stats, run_evaluation())
            last.evaluated = True
        log.info(f"training time {datetime.timedelta(seconds=round(time.time() - start))}")


def _prepare_output_dir(args: argparse.Namespace) -> Path | None:
    """This run's output folder (see training.run_dir), created and writable, the same on every process;
    for training, cleared of the temporary files of a killed run's writes.

    Sets args.output_dir to it, so that the checkpoints' saved arguments name it.
    """
    decision = None
    if get_rank() == 0:  # the one process that writes decides, and tries the folder
        folder, what = choose_output_dir(args)
        try:
            if folder is not None:
                make_writable_dir(folder, what)
            decision = (folder, what, None)
        except InputError as err:
            decision = (folder, what, str(err))
    folder, what, problem = all_gather_object(decision)[0]
    if problem:
        raise InputError(problem)
    if folder is None:
        return None
    args.output_dir = str(folder)
    if what != "--output_dir":
        log.info(f"no --output_dir given: saving to {what}, {folder}")
    stale = remove_stale_temporaries(folder) if get_rank() == 0 and not args.eval else []
    if stale:
        log.info(f"removed {len(stale)} temporary file(s) left in {folder} by a write that was killed: "
                 f"{', '.join(path.name for path in stale)}")
    return folder


def _epochs_left(checkpoint: dict[str, Any], args: argparse.Namespace, evaluate_first: bool) -> bool:
    """Whether --epochs leaves anything to do after the resumed checkpoint's epochs: training, or only the
    evaluation of its last epoch. --epochs below the epochs trained is an error; equal to them, a message."""
    trained = checkpoint["epoch"] + 1
    if args.epochs < trained:
        raise InputError(f"--epochs {args.epochs}: the --resume checkpoint {args.resume} has already trained "
                         f"{trained} epochs (0..{trained - 1}); pass --epochs above {trained} to train on, or "
                         "--eval to evaluate it")
    if args.epochs == trained:
        left = " (its last epoch's evaluation, cut short, is run)" if evaluate_first else ""
        log.info(f"--resume: the checkpoint has trained all --epochs {args.epochs}, nothing is left to train{left}; "
                 "pass a larger --epochs to train on")
    return args.epochs > trained or evaluate_first


def _unlogged(output_dir: Path, epoch: int) -> bool:
    """Whether log.txt lacks `epoch`, as the main process reads it (all processes must evaluate alike)."""
    return all_gather_object(epoch not in logged_epochs(output_dir) if get_rank() == 0 else None)[0]


def _load_weights(model: torch.nn.Module, checkpoint: dict[str, Any], args: argparse.Namespace) -> None:
    """The checkpoint's weights into `model`; a mismatch names the saved arguments that differ from the flags,
    and --finetune logs the class-head tensors it re-initialised."""
    source = args.resume or args.finetune
    try:
        skipped = load_model_weights(model, checkpoint["model"], finetune=bool(args.finetune))
    except InputError as err:
        differences = architecture_differences(checkpoint.get("args"), args)
        hint = f"; the flags differ from the checkpoint's saved arguments: {', '.join(differences)}" if differences \
            else ""
        raise InputError(f"{source}: {err}{hint}") from err
    if args.finetune:
        log.info(f"--finetune: re-initialised {len(skipped)} class-head tensor(s) whose size differs from the "
                 f"checkpoint's: {', '.join(skipped)}" if skipped else
                 "--finetune: every tensor loaded from the checkpoint (its class heads fit --num_classes)")


def _restore_training_state(checkpoint: dict[str, Any], optimizer: torch.optim.Optimizer,
                            lr_scheduler: torch.optim.lr_scheduler.LRScheduler, args: argparse.Namespace,
                            virtual_ranks: VirtualRanks) -> None:
    """Optimizer, schedule, epoch and RNG of --resume, so the run continues as if never stopped."""
    missing = [key for key in ("optimizer", "lr_scheduler", "epoch") if key not in checkpoint]
    if missing:
        raise InputError(f"--resume {args.resume}: no {', '.join(missing)} in the checkpoint; to start a new "
                         "run from its weights pass it as --finetune")
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as err:  # torch compares group sizes only
        raise InputError(f"--resume {args.resume}: its optimizer state does not fit this model ({err}); "
                         "check the model flags, or pass it as --finetune") from err
    # Equal group sizes with another parameter order (e.g. another code base's) would fail at the first step.
    for group in optimizer.param_groups:
        for param in group["params"]:
            if any(v.dim() > 0 and v.shape != param.shape for v in optimizer.state.get(param, {}).values()
                   if isinstance(v, torch.Tensor)):
                raise InputError(f"--resume {args.resume}: its optimizer state is ordered for another model; "
                                 "pass it as --finetune to start a new run from its weights")
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    args.start_epoch = checkpoint["epoch"] + 1
    _apply_schedule_flags(optimizer, lr_scheduler, checkpoint, args)
    rng_states = checkpoint.get("rng_states") or []
    if not virtual_ranks.restore_rng_states(rng_states):
        log.warning(f"--resume: the checkpoint has RNG states of {len(rng_states)} (virtual) rank(s), not "
                    f"{virtual_ranks.replicas} (processes x --accumulate); augmentation and sampling continue "
                    "from fresh seeds")


def _apply_schedule_flags(optimizer: torch.optim.Optimizer, lr_scheduler: torch.optim.lr_scheduler.StepLR,
                          checkpoint: dict[str, Any], args: argparse.Namespace) -> None:
    """Learning rates and --lr_drop of this command line over a resumed schedule (to extend a run, as with the
    official code's `--resume ckpt --epochs 24 --lr_drop 20`); logs what changed.

    The resumed state is kept bit for bit when nothing changed, so that an interrupted run continues exactly.
    """
    saved = checkpoint.get("args")
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved or {})
    if "epochs" in saved and saved["epochs"] != args.epochs:
        log.info(f"--resume: training to --epochs {args.epochs} (the checkpoint's run planned {saved['epochs']})")
    initial_lrs = group_learning_rates(args)
    changes = []
    if lr_scheduler.step_size != args.lr_drop:
        changes.append(f"--lr_drop {args.lr_drop} (checkpoint: {lr_scheduler.step_size})")
    if lr_scheduler.base_lrs != initial_lrs:
        changes.append(f"initial learning rates {initial_lrs} (checkpoint: {lr_scheduler.base_lrs})")
    if not changes:
        return
    lr_scheduler.step_size = args.lr_drop
    lr_scheduler.base_lrs = initial_lrs
    drops = lr_scheduler.last_epoch // args.lr_drop
    for group, initial_lr in zip(optimizer.param_groups, initial_lrs, strict=True):
        group["initial_lr"] = initial_lr
        group["lr"] = initial_lr * lr_scheduler.gamma ** drops
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    log.info(f"--resume: applying {' and '.join(changes)}; after {lr_scheduler.last_epoch} epochs with "
             f"{drops} drop(s) the learning rates are now {lr_scheduler._last_lr}")


def _log_epoch(output_dir: Path, writer: SummaryWriter | None, epoch: int, train_stats: dict[str, float],
               test_stats: dict[str, float]) -> None:
    """The epoch's line in log.txt, and its test metrics in TensorBoard (by the main process, `writer` given)."""
    if writer is None:
        return
    log_epoch(output_dir, epoch, train_stats, test_stats)
    for name, value in test_stats.items():
        writer.add_scalar(f"test/{name}", value, epoch)
    writer.flush()


if __name__ == "__main__":
    main(argparse.ArgumentParser("DETA training and evaluation", parents=[get_args_parser()]).parse_args())

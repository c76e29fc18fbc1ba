"""Train and evaluate DETA.

Flag names follow the official DETA / Deformable-DETR `main.py`, so existing command lines
(e.g. configs/deta.sh) keep working. Launch with `python main.py ...` on one process or
`torchrun --nproc_per_node=N main.py ...` for data-parallel training.
"""
import argparse
import contextlib
import datetime
import logging
import os
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from datasets import DetectionLoader, build_dataset, resolve_num_classes
from datasets.coco import category_names
from deta import build_model, optimize_for_inference
from deta.checkpoint import class_head_size, load_checkpoint, load_model_weights
from deta.config import add_model_args, architecture_differences, given_args, saved_args, take_saved
from deta.errors import InputError, NoSpaceError, command_line_message
from engine import NonFiniteLossError, evaluate, train_one_epoch
from training.accumulation import VirtualRanks, effective_batch_line, resolve_accumulate
from training.args_check import validate_args, validate_model_args
from training.best_checkpoint import BestCheckpoint
from training.board import Board
from training.checkpointing import (
    fetch_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from training.cpu_memory import keep_freed_memory
from training.distributed import (
    all_gather_object,
    cleanup_distributed,
    cpu_has_bf16_matmul,
    get_rank,
    get_world_size,
    init_distributed,
)
from training.ema import ModelEMA
from training.interrupts import Interrupted, LastCheckpoint, signals_raise
from training.optim import build_optimizer, group_learning_rates
from training.run_dir import choose_output_dir, make_writable_dir
from training.run_lock import lock_output_dir, release_output_dirs
from training.run_log import LOG_NAME, log_epoch, logged_epochs, logged_records
from training.writing import write_on_main_process

log = logging.getLogger("main")

DATA_PATHS = ("coco_path", "train_json", "train_images", "val_json", "val_images")


def get_args_parser() -> argparse.ArgumentParser:
    """main.py's flags: the training loop's, the model's (deta.config), the data's and the run's."""
    parser = argparse.ArgumentParser("DETA training and evaluation", add_help=False)

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--lr", default=2e-4, type=float)
    opt.add_argument("--lr_backbone_names", default=["backbone.0"], type=str, nargs="+")
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
    opt.add_argument("--ema", action="store_true",
                     help="keep an exponential moving average of the weights (training/ema.py), evaluated and saved "
                          "beside the model; off by default, as in the published recipes")
    opt.add_argument("--ema_decay", default=0.9997, type=float, help="the EMA's decay, in (0, 1)")
    opt.add_argument("--ema_warmup", default=2000, type=int,
                     help="optimizer steps over which the EMA's decay warms up: decay * (1 - exp(-step / warmup))")
    opt.add_argument("--patience", default=None, type=int,
                     help="stop after this many evaluations without a validation AP improvement (default: never)")

    add_model_args(parser)

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
    data.add_argument("--num_workers", default=2, type=int)
    data.add_argument("--skip_mismatched_images", action="store_true",
                      help="read every image header at start and leave out (with a count) the images whose size "
                           "matches neither the JSON's width/height nor their EXIF-turned form; without it such an "
                           "image is an error when it loads")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default="",
                     help="where to save checkpoints, log.txt, TensorBoard and COCO results; default: the folder of "
                          "the --resume checkpoint, else a new outputs/DATE-TIME folder (--eval: nowhere)")
    run.add_argument("--seed", default=42, type=int)
    run.add_argument("--resume", default="",
                     help="continue a run: model, optimizer, scheduler and epoch from a checkpoint (a path, an "
                          "http(s) URL or a name of docs/MODEL_ZOO.md); the model flags and data paths not given are "
                          "the checkpoint's")
    run.add_argument("--finetune", default="",
                     help="start from a checkpoint's weights only (a path, an http(s) URL or a name of "
                          "docs/MODEL_ZOO.md); class heads of another size are dropped")
    run.add_argument("--start_epoch", default=0, type=int)
    run.add_argument("--eval", action="store_true", help="evaluate only")
    run.add_argument("--print_freq", default=10, type=int, help="iterations between progress lines")
    return parser


def parse_command_line(argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
    """main.py's arguments from a command line, and the names of those it gives (the rest are defaults)."""
    parser = argparse.ArgumentParser("DETA training and evaluation", parents=[get_args_parser()])
    return parser.parse_args(argv), set(given_args(parser, argv))


def main(args: argparse.Namespace, given: Collection[str] | None = None) -> None:
    """Train with evaluation after every epoch, or only evaluate with --eval.

    `given`: the names of the arguments that the command line gave (`parse_command_line`); with --resume, the
    model's arguments and the data paths that it does not give are the checkpoint's. None: all of them given.

    Bad input ends the process with `error: <message>` and status 2, a non-finite loss with status 1, a full
    disk with status 1 and one line naming the last good checkpoint and the resume command, SIGINT and
    SIGTERM with such a line and status 128 + the signal number (130, 143).
    """
    last = LastCheckpoint()
    try:
        with signals_raise():
            _run(args, given, last)
    except InputError as err:
        # Every process of a torchrun run meets a bad flag or file alike: the first says it. A data error in
        # one process's images, that process says.
        if err.local or os.environ.get("RANK", "0") == "0":
            print(f"error: {command_line_message(err)}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as err:
        if get_rank() == 0:  # the loss is reduced over the processes: every one stops at the same step
            print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except NoSpaceError as err:
        if get_rank() == 0:  # the process that writes; the others stop with it (training.writing)
            print(f"error: {last.no_space_message(err, sys.argv)}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as interrupt:
        if get_rank() == 0:  # every process stops; one says so
            print(f"error: {last.stop_message(interrupt, sys.argv)}", file=sys.stderr)
        sys.exit(128 + interrupt.signum)
    finally:
        release_output_dirs()
        cleanup_distributed()


def _run(args: argparse.Namespace, given: Collection[str] | None, last: LastCheckpoint) -> None:
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
    fetch_checkpoint(args)  # a download that fails leaves no output folder behind
    output_dir = last.output_dir = _prepare_output_dir(args)
    seed_everything(args.seed + rank)
    checkpoint = load_checkpoint(args.resume or args.finetune) if args.resume or args.finetune else None
    from_checkpoint = _take_from_checkpoint(args, given, checkpoint) if args.resume and given is not None else {}
    if from_checkpoint:
        log.info("--resume: from the checkpoint's saved arguments, as the command line does not give them: "
                 + ", ".join(f"--{name}" if value is True else f"--{name} {value}"
                             for name, value in from_checkpoint.items()))
    log.info(f"{world_size} process(es) on {device}; {args}")

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
    ema = _build_ema(model, checkpoint, args)
    log.info(f"trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad)}")

    dataset_val = build_dataset("val", args)
    loader_val = DetectionLoader(dataset_val, batch_size=args.batch_size, num_workers=args.num_workers,
                                 sampler=DistributedSampler(dataset_val, world_size, rank, shuffle=False),
                                 pin_memory=device.type == "cuda")

    def inference_form(module: torch.nn.Module) -> torch.nn.Module:
        # On the CPU, a faster copy made from the current weights (deta.optimize_for_inference).
        return optimize_for_inference(module) if device.type == "cpu" else module

    def run_evaluation() -> dict[str, float]:
        # Evaluating leaves the random generators as it found them: training then does not depend on the
        # validation set, and a resumed run continues exactly whether or not it evaluates first.
        state = rng_state(device)
        stats = evaluate(inference_form(model), postprocessors, loader_val, dataset_val.coco, device, amp=args.amp,
                         print_freq=args.print_freq, output_dir=output_dir)
        if ema is not None:  # both are evaluated: the EMA's metrics as ema_AP, ... (files ema_coco_*.json)
            ema_stats = evaluate(inference_form(ema.module), postprocessors, loader_val, dataset_val.coco, device,
                                 amp=args.amp, print_freq=args.print_freq, output_dir=output_dir, prefix="ema_")
            stats.update({f"ema_{name}": value for name, value in ema_stats.items()})
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
    # The run's earlier evaluations count towards the best AP and --patience (none when starting afresh).
    best = BestCheckpoint(output_dir if rank == 0 else None, args.patience,
                          [r for r in logged_records(output_dir) if r["epoch"] < args.start_epoch] if args.resume
                          else [])

    def best_weights(which: str) -> dict[str, Any]:
        weights = ema.module.state_dict() if which == "ema" else model.state_dict()
        return {"model": weights, "args": vars(args), "category_names": category_names(dataset_train.coco)}

    with Board(output_dir) if rank == 0 else contextlib.nullcontext() as board:
        if evaluate_first:
            log.info(f"--resume: epoch {checkpoint['epoch']} has a checkpoint but no line in "
                     f"{output_dir / LOG_NAME} (the run stopped during its evaluation); evaluating it first")
            last.evaluated = False
            test_stats = run_evaluation()
            _log_epoch(output_dir, board, checkpoint["epoch"], checkpoint.get("train_stats", {}), test_stats)
            best.update(checkpoint["epoch"], test_stats, best_weights)
            last.evaluated = True
            if args.start_epoch == args.epochs:
                return

        log.info(f"training epochs {args.start_epoch}..{args.epochs - 1}, saving to {output_dir}")
        start = time.time()
        for epoch in range(args.start_epoch, args.epochs):
            virtual_ranks.set_epoch(epoch)
            train_stats = train_one_epoch(train_model, criterion, virtual_ranks, optimizer, device, epoch,
                                          max_norm=args.clip_max_norm, amp=args.amp, print_freq=args.print_freq,
                                          board=board, ema=ema)
            lr_scheduler.step()
            # every virtual rank's, in order, for an exact resume on any processes x --accumulate of that count
            rng_states = [state for states in all_gather_object(virtual_ranks.rng_states()) for state in states]
            write_on_main_process(save_checkpoint,
                                  {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": vars(args),
                                   "rng_states": rng_states, "category_names": category_names(dataset_train.coco),
                                   "train_stats": train_stats, **({"ema": ema.state_dict()} if ema else {})},
                                  output_dir, epoch, args.lr_drop)
            last.path, last.epoch, last.evaluated = output_dir / "checkpoint.pth", epoch, False
            test_stats = run_evaluation()
            _log_epoch(output_dir, board, epoch, train_stats, test_stats)
            best.update(epoch, test_stats, best_weights)
            last.evaluated = True
            if all_gather_object(best.should_stop)[0]:  # the main process's decision: it holds the metrics
                log.info(best.stop_message(epoch))
                break
        log.info(f"training time {datetime.timedelta(seconds=round(time.time() - start))}")


def _prepare_output_dir(args: argparse.Namespace) -> Path | None:
    """This run's output folder (see training.run_dir), created, writable and locked against a second run (see
    training.run_lock), the same on every process; for training, cleared of the temporary files of a killed
    run's writes.

    Sets args.output_dir to it, so that the checkpoints' saved arguments name it.
    """
    decision = None
    if get_rank() == 0:  # the one process that writes decides, and tries the folder
        folder, what = choose_output_dir(args)
        try:
            if folder is not None:
                make_writable_dir(folder, what)
                lock_output_dir(folder, what)  # before anything in it is touched: another run may be writing
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


def _take_from_checkpoint(args: argparse.Namespace, given: Collection[str],
                          checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The --resume checkpoint's saved model arguments and data paths into the arguments that the command line
    does not give; returns those that changed. Data paths are taken when the command line gives none and they
    still exist. The backbone is not initialised from ImageNet: the checkpoint holds its weights."""
    if "pretrained_backbone" not in given:
        args.pretrained_backbone = "none"
    saved = saved_args(checkpoint)
    if saved is None:
        return {}
    taken = take_saved(args, saved, keep={*given, "pretrained_backbone"})
    if taken:
        validate_model_args(args)
    if not any(name in given for name in DATA_PATHS):
        for name in DATA_PATHS:
            if saved.get(name) and Path(saved[name]).exists() and saved[name] != getattr(args, name):
                taken[name] = saved[name]
                setattr(args, name, saved[name])
    return taken


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
        if checkpoint.get("args") is None:
            hint = "; the checkpoint saves no model arguments (detrex): pass the model flags it was trained with"
        raise InputError(f"{source}: {err}{hint}") from err
    if args.finetune:
        log.info(f"--finetune: re-initialised {len(skipped)} class-head tensor(s) whose size differs from the "
                 f"checkpoint's: {', '.join(skipped)}" if skipped else
                 "--finetune: every tensor loaded from the checkpoint (its class heads fit --num_classes)")


def _build_ema(model: torch.nn.Module, checkpoint: dict[str, Any] | None, args: argparse.Namespace
               ) -> ModelEMA | None:
    """With --ema, the average of the weights: a --resume checkpoint's (or, without one, the resumed weights);
    for --finetune and new runs, the starting weights."""
    if not args.ema:
        return None
    ema = ModelEMA(model, args.ema_decay, args.ema_warmup)
    if args.resume and checkpoint.get("ema") is not None:
        ema.load_state_dict(checkpoint["ema"])
    elif args.resume:
        log.info(f"--ema: the --resume checkpoint {args.resume} has no EMA; the average starts from its weights")
    return ema


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


def _log_epoch(output_dir: Path, board: Board | None, epoch: int, train_stats: dict[str, float],
               test_stats: dict[str, float]) -> None:
    """The epoch's line in log.txt, and its test metrics in TensorBoard (by the main process, `board` given).
    Every process calls this."""
    write_on_main_process(log_epoch, output_dir, epoch, train_stats, test_stats)
    if board is not None:
        board.add_scalars("test", test_stats, epoch)
        board.flush()


if __name__ == "__main__":
    main(*parse_command_line(sys.argv[1:]))

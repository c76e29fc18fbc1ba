"""Data sets from command-line flags: COCO 2017 (`--coco_path`) or any COCO-format JSON and image folder."""
import argparse
import logging
from pathlib import Path

from datasets.coco import CocoDetection, category_ids, load_coco
from datasets.loading import DetectionLoader, collate_fn
from datasets.transforms import make_transforms
from deta.errors import InputError

COCO_LAYOUT = "train2017/, val2017/ and annotations/instances_{train,val}2017.json"
SHOWN_SKIPPED = 5  # file names listed in the log line of --skip_mismatched_images

log = logging.getLogger(__name__)

__all__ = ["DetectionLoader", "build_dataset", "collate_fn", "parse_sizes", "resolve_num_classes"]


def _data_paths(image_set: str, args: argparse.Namespace) -> list[tuple[Path, str]]:
    """[(annotation file, flag that named it), (image folder, flag)]; explicit flags win over --coco_path."""
    paths = []
    for kind, in_coco in (("json", f"annotations/instances_{image_set}2017.json"), ("images", f"{image_set}2017")):
        flag = f"{image_set}_{kind}"
        if getattr(args, flag):
            paths.append((Path(getattr(args, flag)), f"--{flag}"))
        elif args.coco_path:
            paths.append((Path(args.coco_path) / in_coco, "--coco_path"))
        else:
            raise InputError(f"no {image_set} data: pass --coco_path DIR ({COCO_LAYOUT}) or "
                             f"--{image_set}_json FILE and --{image_set}_images DIR")
    return paths


def _require(path: Path, flag: str, is_dir: bool) -> Path:
    if not (path.is_dir() if is_dir else path.is_file()):
        kind = "folder" if is_dir else "file"
        hint = f"the folder needs {COCO_LAYOUT}" if flag == "--coco_path" else f"pass an existing {kind}"
        raise InputError(f"{flag}: {kind} {path} does not exist; {hint}")
    return path


def _annotation_file(image_set: str, args: argparse.Namespace) -> Path:
    return _require(*_data_paths(image_set, args)[0], is_dir=False)


def resolve_num_classes(args: argparse.Namespace) -> int:
    """`--num_classes`, else the largest category id of the training annotations + 1 (91 on COCO).

    With `--eval` and no training annotations at hand, the validation annotations decide.
    """
    if args.num_classes is not None:
        return args.num_classes
    image_set = "train"
    if args.eval:
        try:
            _annotation_file("train", args)
        except InputError:
            image_set = "val"
    path = _annotation_file(image_set, args)
    ids = category_ids(load_coco(path))
    if not ids:
        raise InputError(f"{path}: no categories to count; pass --num_classes")
    return max(ids) + 1


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(size) for size in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) <= 0:
        raise InputError(f"--train_sizes: expected positive comma-separated integers like 480,512,544, "
                         f"got {text!r}")
    return sizes


def build_dataset(image_set: str, args: argparse.Namespace) -> CocoDetection:
    """The 'train' (augmented) or 'val' data set named by the data flags; logs its summary line.

    Category ids are checked against `resolve_num_classes(args)`, so labels always fit the class head. A data
    set without images, or without a box that training would keep, is an error.
    """
    if image_set not in ("train", "val"):
        raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")
    (ann_file, json_flag), (image_dir, images_flag) = _data_paths(image_set, args)
    _require(ann_file, json_flag, is_dir=False)
    _require(image_dir, images_flag, is_dir=True)
    transforms = make_transforms(image_set == "train", parse_sizes(args.train_sizes), args.max_size,
                                 args.eval_size, args.bigger)
    dataset = CocoDetection(image_dir, ann_file, transforms, num_classes=resolve_num_classes(args),
                            skip_mismatched=args.skip_mismatched_images)
    if dataset.skipped:
        shown = ", ".join(dataset.skipped[:SHOWN_SKIPPED]) + (", ..." if len(dataset.skipped) > SHOWN_SKIPPED else "")
        log.info(f"--skip_mismatched_images: left out {len(dataset.skipped)} {image_set} images whose size matches "
                 f"neither the JSON's width/height nor their EXIF-turned form: {shown}")
    if not dataset.ids:
        what = "every image was left out by --skip_mismatched_images" if dataset.skipped else "it lists no images"
        raise InputError(f"{json_flag}: {ann_file} gives an empty data set ({what}); pass an annotation file "
                         "with images")
    if dataset.summary.boxes == 0:
        consequence = "nothing to train on" if image_set == "train" else "every AP would be -1"
        raise InputError(f"{json_flag}: {ann_file} has no usable box ({consequence}): {dataset.summary}; check "
                         "the bbox values (COCO [x, y, width, height] in pixels), image ids and iscrowd flags")
    log.info(f"{image_set} data {ann_file}: {dataset.summary}")
    return dataset

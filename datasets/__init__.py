"""Data sets from command-line flags: COCO 2017 (`--coco_path`) or any COCO-format JSON and image folder."""
import argparse
from pathlib import Path

from torch import Tensor

from datasets.coco import CocoDetection, category_ids, load_coco
from datasets.transforms import Target, make_transforms
from deta.errors import InputError

COCO_LAYOUT = "train2017/, val2017/ and annotations/instances_{train,val}2017.json"


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
    """The 'train' (augmented) or 'val' data set named by the data flags.

    Category ids are checked against `resolve_num_classes(args)`, so labels always fit the class head.
    """
    if image_set not in ("train", "val"):
        raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")
    (ann_file, json_flag), (image_dir, images_flag) = _data_paths(image_set, args)
    _require(ann_file, json_flag, is_dir=False)
    _require(image_dir, images_flag, is_dir=True)
    transforms = make_transforms(image_set == "train", parse_sizes(args.train_sizes), args.max_size,
                                 args.eval_size, args.bigger)
    return CocoDetection(image_dir, ann_file, transforms, num_classes=resolve_num_classes(args))


def collate_fn(batch: list[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """Keep images as a list: they differ in size and the model pads them itself."""
    return [image for image, _ in batch], [target for _, target in batch]

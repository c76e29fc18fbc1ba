"""COCO-format detection data set (pycocotools annotations, one folder of images)."""
import contextlib
import functools
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from datasets.images import open_image, to_rgb
from datasets.transforms import Target, remove_empty_boxes
from deta.errors import InputError

# Keys every entry needs: pycocotools indexes by the ids, the target needs bbox, COCOeval needs area.
REQUIRED_KEYS = {
    "images": ("id", "file_name"),
    "annotations": ("id", "image_id", "category_id", "bbox", "area"),
    "categories": ("id",),
}


def _check_coco_format(data: Any, path: Path) -> None:
    if not isinstance(data, dict) or any(section not in data for section in REQUIRED_KEYS):
        raise InputError(f"{path}: not a COCO detection file; it needs the keys "
                         f"{', '.join(REQUIRED_KEYS)}")
    for section, keys in REQUIRED_KEYS.items():
        for index, entry in enumerate(data[section]):
            missing = [key for key in keys if key not in entry]
            if missing:
                raise InputError(f"{path}: {section}[{index}] lacks {', '.join(missing)}; fix the file")
    for index, annotation in enumerate(data["annotations"]):
        if len(annotation["bbox"]) != 4:
            raise InputError(f"{path}: annotations[{index}] bbox is not [x, y, w, h]; fix the file")


@functools.lru_cache(maxsize=2)
def _load_coco(path: Path, mtime_ns: int) -> COCO:
    try:
        with path.open() as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err}); pass a COCO-format annotation file") from err
    _check_coco_format(data, path)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints its progress
        coco.createIndex()
    return coco


def load_coco(path: str | Path) -> COCO:
    """Parse and index a COCO annotation file.

    Cached (keyed on path and modification time) because the class count and the data set read the
    same file, and COCO's training JSON takes many seconds to parse.
    """
    path = Path(path).resolve()
    return _load_coco(path, path.stat().st_mtime_ns)


def category_ids(coco: COCO) -> set[int]:
    """Ids of the declared categories and of those the annotations use."""
    return set(coco.cats) | {annotation["category_id"] for annotation in coco.anns.values()}


def category_names(coco: COCO) -> dict[int, str]:
    """Category id → name of the declared categories (the id itself where a category has no name)."""
    return {cat_id: str(cat.get("name", cat_id)) for cat_id, cat in coco.cats.items()}


def check_category_ids(coco: COCO, path: str | Path, num_classes: int | None) -> None:
    """Labels index the class head, so every id must be in [0, num_classes)."""
    ids = category_ids(coco)
    if ids and min(ids) < 0:
        raise InputError(f"{path}: category id {min(ids)} is negative; ids must be in [0, --num_classes)")
    if num_classes is not None and ids and max(ids) >= num_classes:
        raise InputError(f"{path}: category id {max(ids)} does not fit --num_classes {num_classes}; "
                         f"pass --num_classes {max(ids) + 1} or more")


def prepare_target(annotations: list[dict], image_id: int, width: int, height: int) -> Target:
    """Target of one image in pixels: crowd regions dropped, boxes XYXY clamped to the image, empty ones
    dropped (degenerate boxes must never reach the loss)."""
    annotations = [a for a in annotations if not a.get("iscrowd", 0)]
    boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    labels = torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)
    target = {
        "boxes": F.clamp_bounding_boxes(tv_tensors.BoundingBoxes(boxes, format="XYXY",
                                                                  canvas_size=(height, width))),
        "labels": labels,
        "iscrowd": torch.zeros_like(labels),
        "image_id": torch.tensor(image_id, dtype=torch.int64),
        "orig_size": torch.tensor([height, width], dtype=torch.int64),
    }
    return remove_empty_boxes(target)


class CocoDetection(Dataset):
    """Images of a COCO annotation file; items are (normalised 3xHxW image, target) after `transforms`.

    Target keys: `boxes` (float32 Nx4, cxcywh normalised by the transformed image size), `labels`
    (int64 category ids), `image_id` (int64 scalar), `orig_size` and `size` (int64 [H, W]), `area`,
    `iscrowd`. `coco` is the pycocotools index, for evaluation.
    """

    def __init__(self, image_dir: str | Path, ann_file: str | Path,
                 transforms: Callable[[Image.Image, Target], tuple[Tensor, Target]],
                 num_classes: int | None = None):
        self.image_dir = Path(image_dir)
        self.coco = load_coco(ann_file)
        check_category_ids(self.coco, ann_file, num_classes)
        self.ids = sorted(self.coco.imgs)
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image_id = self.ids[index]
        image = to_rgb(open_image(self.image_dir / self.coco.imgs[image_id]["file_name"]))
        target = prepare_target(self.coco.imgToAnns[image_id], image_id, image.width, image.height)
        return self.transforms(image, target)

"""COCO-format detection data set (pycocotools annotations, one folder of images)."""
import contextlib
import functools
import io
import json
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from datasets.checks import summarize
from datasets.transforms import Target, remove_empty_boxes
from deta.coco_categories import category_names as names_of_categories
from deta.errors import InputError
from deta.images import follows_exif, header, open_image, orientation, to_rgb, turned_size, upright

HEADER_READERS = 8  # threads reading image headers for --skip_mismatched_images
# Keys every entry needs: pycocotools indexes by the ids, the target needs bbox. COCOeval also needs an
# annotation's area and iscrowd, which several labelling tools leave out: those are filled in (`_fill_in`).
REQUIRED_KEYS = {
    "images": ("id", "file_name"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id",),
}
SECTION_NOUNS = {"images": "image", "annotations": "annotation", "categories": "category"}


def _check_coco_format(data: Any, path: Path) -> None:
    if not isinstance(data, dict) or any(section not in data for section in REQUIRED_KEYS):
        raise InputError(f"{path}: not a COCO detection file; it needs the keys "
                         f"{', '.join(REQUIRED_KEYS)}")
    for section, keys in REQUIRED_KEYS.items():
        for index, entry in enumerate(data[section]):
            missing = [key for key in keys if key not in entry]
            if missing:
                raise InputError(f"{path}: {section}[{index}] lacks {', '.join(missing)}; fix the file")
        _check_unique_ids(data[section], section, path)
    for index, image in enumerate(data["images"]):
        for key in ("width", "height"):
            if key in image and not (_is_whole(image[key]) and image[key] > 0):
                raise InputError(f"{path}: image id {image['id']} (images[{index}]) has {key} {_shown(image[key])}, "
                                 "not a positive whole number of pixels; fix the file")
    for index, annotation in enumerate(data["annotations"]):
        bbox = annotation["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
            raise InputError(f"{path}: annotation id {annotation['id']} (annotations[{index}]) has bbox "
                             f"{_shown(bbox)}, not [x, y, width, height] of 4 numbers; fix the file")
        if isinstance(annotation["category_id"], bool) or not isinstance(annotation["category_id"], int):
            raise InputError(f"{path}: annotation id {annotation['id']} (annotations[{index}]) has category_id "
                             f"{_shown(annotation['category_id'])}, not an integer; fix the file")


def _check_unique_ids(entries: list[dict], section: str, path: Path, shown: int = 5) -> None:
    """pycocotools keeps the last of the entries sharing an id: a duplicated image id would silently draw one
    picture's boxes onto another, so duplicates are an error naming them."""
    places: dict[Any, list[int]] = {}
    for index, entry in enumerate(entries):
        places.setdefault(_shown(entry["id"]), []).append(index)
    duplicated = [(shown_id, indices) for shown_id, indices in places.items() if len(indices) > 1]
    if duplicated:
        listed = "; ".join(f"{shown_id} ({', '.join(f'{section}[{i}]' for i in indices)})"
                           for shown_id, indices in duplicated[:shown])
        more = f"; and {len(duplicated) - shown} more" if len(duplicated) > shown else ""
        raise InputError(f"{path}: duplicated {SECTION_NOUNS[section]} ids {listed}{more}; each entry of {section} "
                         "needs its own id (pycocotools would keep only the last); fix the file")


def _fill_in(annotations: list[dict]) -> Counter:
    """Give the annotations that lack them `area` (the box's) and `iscrowd` (0), as COCOeval needs; returns how
    many got each."""
    filled: Counter = Counter()
    for annotation in annotations:
        if "area" not in annotation:
            _, _, width, height = annotation["bbox"]
            annotation["area"] = float(max(width, 0) * max(height, 0))
            filled["area"] += 1
        if "iscrowd" not in annotation:
            annotation["iscrowd"] = 0
            filled["iscrowd"] += 1
    return filled


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return _is_number(value) and (isinstance(value, int) or value.is_integer())


def _shown(value: Any, limit: int = 60) -> str:
    """A JSON value for a one-line message, shortened."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


@functools.lru_cache(maxsize=2)
def _load_coco(path: Path, mtime_ns: int) -> COCO:
    try:
        with path.open() as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err}); pass a COCO-format annotation file") from err
    _check_coco_format(data, path)
    return _index(data, _fill_in(data["annotations"]))


def _index(data: dict, filled: Counter) -> COCO:
    """pycocotools' index of `data`; `filled` (annotations given an area or iscrowd, by key) becomes its
    `filled` attribute, for the data set's summary."""
    coco = COCO()
    coco.dataset = data
    coco.filled = filled
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints its progress
        coco.createIndex()
    return coco


def load_coco(path: str | Path) -> COCO:
    """Parse, check and index a COCO annotation file; annotations without `area` or `iscrowd` get the box's area
    and iscrowd 0 (counted in the index's `filled`), so that evaluation scores against those values.

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
    return names_of_categories(coco.cats.values())


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
    dropped (degenerate boxes must never reach the loss). `datasets.checks` counts what is dropped and why.

    Boxes with a NaN or infinite coordinate are dropped too (the official code would clamp an infinite side to
    the image's edge and train on it).
    """
    annotations = [a for a in annotations if not a.get("iscrowd", 0)]
    boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)
    finite = boxes.isfinite().all(1)
    boxes, labels = boxes[finite], labels[finite]
    boxes[:, 2:] += boxes[:, :2]
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
    `iscrowd`. `coco` is the pycocotools index, for evaluation; `summary` counts the boxes kept and dropped.

    Each image is read in the frame its annotations were made in: turned by its EXIF orientation when that
    gives the JSON's width and height (see `images.follows_exif`). An image that has neither size is an error
    when it loads; with `skip_mismatched` every image header is read at start and such images are left out
    (`skipped` names them), of `coco` too, so that evaluation does not count them as missed.
    """

    def __init__(self, image_dir: str | Path, ann_file: str | Path,
                 transforms: Callable[[Image.Image, Target], tuple[Tensor, Target]],
                 num_classes: int | None = None, skip_mismatched: bool = False):
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.coco = load_coco(ann_file)
        check_category_ids(self.coco, ann_file, num_classes)
        self.ids = sorted(self.coco.imgs)
        mismatched = set(self._mismatched()) if skip_mismatched else set()
        self.skipped = [self.coco.imgs[i]["file_name"] for i in sorted(mismatched)]
        self.ids = [i for i in self.ids if i not in mismatched]
        self.summary = summarize(self.coco, self.ids, self.coco.filled)
        if mismatched:
            self.coco = _without_images(self.coco, mismatched)
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image_id = self.ids[index]
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        image = open_image(path)
        turn = follows_exif(image.size, orientation(image), self._annotated_size(image_id))
        if turn is None:
            raise InputError(self._mismatch(path, image.size, orientation(image), image_id))
        image = to_rgb(upright(image) if turn else image)
        target = prepare_target(self.coco.imgToAnns[image_id], image_id, image.width, image.height)
        return self.transforms(image, target)

    def _annotated_size(self, image_id: int) -> tuple[int, int] | None:
        info = self.coco.imgs[image_id]
        return (int(info["width"]), int(info["height"])) if "width" in info and "height" in info else None

    def _mismatch(self, path: Path, size: tuple[int, int], orientation_value: int, image_id: int) -> str:
        (width, height), (turned_w, turned_h) = size, turned_size(size, orientation_value)
        annotated_w, annotated_h = self._annotated_size(image_id)
        return (f"{path}: the image is {width}x{height} as stored and {turned_w}x{turned_h} as displayed (EXIF "
                f"orientation {orientation_value}), but {self.ann_file} gives {annotated_w}x{annotated_h}, so its "
                "boxes would land on the wrong pixels; correct width/height there (or the image file), or pass "
                "--skip_mismatched_images to leave such images out")

    def _mismatched(self) -> list[int]:
        """Ids of the images whose stored and displayed sizes both differ from the JSON's (headers only)."""
        sized = [i for i in self.ids if self._annotated_size(i) is not None]
        paths = [self.image_dir / self.coco.imgs[i]["file_name"] for i in sized]
        with ThreadPoolExecutor(HEADER_READERS) as pool:  # reading headers waits on the disk, not the CPU
            headers = list(pool.map(header, paths))
        return [i for i, (size, orientation_value) in zip(sized, headers, strict=True)
                if follows_exif(size, orientation_value, self._annotated_size(i)) is None]


def _without_images(coco: COCO, image_ids: set[int]) -> COCO:
    """A new index of `coco`'s data without these images and their annotations."""
    data = {**coco.dataset, "images": [i for i in coco.dataset["images"] if i["id"] not in image_ids],
            "annotations": [a for a in coco.dataset["annotations"] if a["image_id"] not in image_ids]}
    return _index(data, coco.filled)

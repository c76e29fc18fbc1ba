"""Names of the COCO 2017 detection categories, by category id (1..90, of which 12, 26, 29, 30, 45, 66, 68, 69,
71 and 83 are unused), for the 91-way class heads of COCO checkpoints; and the names a COCO-format file declares."""
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import InputError

COCO_NUM_CLASSES = 91  # COCO category ids run 1..90; index 0 and 10 unused ids are never targets

COCO_CATEGORY_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}


def category_names(categories: Iterable[Mapping[str, Any]]) -> dict[int, str]:
    """Category id → name of COCO `categories` entries (the id itself where an entry has no name)."""
    return {category["id"]: str(category.get("name", category["id"])) for category in categories}


def read_category_names(path: str | os.PathLike, flag: str = "names_json") -> dict[int, str]:
    """The categories a COCO-format annotation file declares, id → name; a file that has none is an
    InputError naming `flag`."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError as err:
        raise InputError(f"{flag}: file {path} does not exist; pass a COCO-format annotation file") from err
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{flag}: {path} is not readable JSON ({err}); pass a COCO-format annotation file") from err
    categories = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(categories, list) or not all(isinstance(c, dict) and "id" in c for c in categories):
        raise InputError(f"{flag}: {path} has no COCO 'categories' list of entries with an id; pass a COCO-format "
                         "annotation file")
    return category_names(categories)

"""What an annotation file gives the model, counted at start: boxes kept, boxes dropped and why.

The reasons are those of `coco.prepare_target` (the official semantics): crowd regions are dropped, boxes
are clamped to the image and dropped when nothing is left. Here they are told apart so that a data set whose
boxes vanish says so before training. Evaluation is not affected: pycocotools scores against the file as it
is (crowd regions are ignored there, every other box counts), with the area and iscrowd that
`coco.load_coco` gives the annotations that lack them.
"""
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from pycocotools.coco import COCO

UNKNOWN_IMAGE, SKIPPED_IMAGE, CROWD = "with an unknown image id", "on skipped images", "crowd"
NOT_FINITE, DEGENERATE, OUTSIDE = "NaN/inf", "degenerate (width or height <= 0)", "entirely outside the image"
# Each dropped box is counted under the first reason that applies, in this order.
REASONS = (UNKNOWN_IMAGE, SKIPPED_IMAGE, CROWD, NOT_FINITE, DEGENERATE, OUTSIDE)


@dataclass
class AnnotationSummary:
    images: int
    boxes: int  # kept for training
    dropped: Counter = field(default_factory=Counter)  # reason -> boxes
    images_without_boxes: int = 0
    images_without_size: int = 0  # no width/height in the JSON: boxes clamped only when the image loads
    filled: Counter = field(default_factory=Counter)  # "area" / "iscrowd" -> annotations the file gave none

    def __str__(self) -> str:
        text = f"{_count(self.images, 'image')}, {_count(self.boxes, 'box')} kept"
        if self.dropped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in self.dropped.items())
            text += f", {sum(self.dropped.values())} dropped ({reasons})"
        text += f", {_count(self.images_without_boxes, 'image')} without boxes"
        if self.images_without_size:
            text += (f"; {_count(self.images_without_size, 'image')} without width/height in the JSON, whose size "
                     "is not checked against the file")
        if self.filled:
            values = {"area": "the box's area", "iscrowd": "iscrowd 0"}
            text += "; the file lacks " + ", ".join(f"{key} in {_count(self.filled[key], 'annotation')} (given "
                                                    f"{values[key]})" for key in values if self.filled[key])
        return text


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "es" if noun.endswith("x") else "s")


def summarize(coco: COCO, image_ids: Iterable[int], filled: Counter | None = None) -> AnnotationSummary:
    """Boxes of `coco` that training keeps on the images `image_ids` (those of the data set), and the dropped
    ones by reason; `filled`: the annotations given an area or iscrowd at load, by key."""
    image_ids = set(image_ids)
    dropped: Counter = Counter()
    owners, boxes, sizes = [], [], []
    for annotation in coco.dataset["annotations"]:
        image_id = annotation["image_id"]
        if image_id not in coco.imgs:
            dropped[UNKNOWN_IMAGE] += 1
        elif image_id not in image_ids:
            dropped[SKIPPED_IMAGE] += 1
        elif annotation.get("iscrowd", 0):
            dropped[CROWD] += 1
        else:
            image = coco.imgs[image_id]
            owners.append(image_id)
            boxes.append(annotation["bbox"])
            sizes.append((image.get("width", np.inf), image.get("height", np.inf)))
    xywh = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    # As prepare_target computes it: corners in float32, then clamped to the image.
    low, high = xywh[:, :2], xywh[:, :2] + xywh[:, 2:]
    limit = np.asarray(sizes, dtype=np.float32).reshape(-1, 2)
    finite = np.isfinite(xywh).all(1)
    with np.errstate(invalid="ignore"):  # NaN compares False; such boxes are counted as NaN/inf first
        proper = finite & (high > low).all(1)
        inside = proper & (np.clip(high, 0, limit) > np.clip(low, 0, limit)).all(1)
    dropped.update({NOT_FINITE: int((~finite).sum()), DEGENERATE: int((finite & ~proper).sum()),
                    OUTSIDE: int((proper & ~inside).sum())})
    with_boxes = {owner for owner, keep in zip(owners, inside.tolist(), strict=True) if keep}
    return AnnotationSummary(
        images=len(image_ids), boxes=int(inside.sum()),
        dropped=Counter({reason: dropped[reason] for reason in REASONS if dropped[reason]}),
        images_without_boxes=len(image_ids - with_boxes),
        images_without_size=sum(1 for i in image_ids if not {"width", "height"} <= coco.imgs[i].keys()),
        filled=Counter(filled or {}))

"""Detection transforms on (PIL image, target) pairs, as in the official DETA / Deformable-DETR recipe.

Targets hold `boxes` as a `tv_tensors.BoundingBoxes` (XYXY, pixels) until `ToModelTarget`, so the
torchvision v2 transforms move them along with the image. Only what v2 lacks is written here: the random-size
crop and dropping boxes that a crop emptied; the resize with the official rounding and the normalisation are
the model's own (deta.preprocess), shared with `deta.Detector`.
"""
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from deta.box_ops import box_xyxy_to_cxcywh
from deta.preprocess import (
    BIGGER_MAX_SIZE,
    BIGGER_SCALE,
    RandomShorterSideResize,
    eval_resize,
    random_index,
    to_model_input,
)

CROP_RESIZE_SIZES = (400, 500, 600)  # shorter side before the crop; --bigger leaves these unscaled
CROP_MIN, CROP_MAX = 384, 600

Target = dict[str, Tensor]


class RandomSizeCrop(v2.Transform):
    """Crop a uniformly placed region with width and height drawn uniformly from [min_size, max_size].

    Both bounds are capped by the image, so a side shorter than `min_size` is kept whole (the official
    code raises there; it never meets such images because it resizes to >= 400 first). Boxes are clipped
    to the region; follow with `RemoveEmptyBoxes`.
    """

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_w = random_index(min(self.min_size, width), min(width, self.max_size))
        crop_h = random_index(min(self.min_size, height), min(height, self.max_size))
        return {"top": random_index(0, height - crop_h), "left": random_index(0, width - crop_w),
                "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def remove_empty_boxes(target: Target) -> Target:
    """Drop boxes without area, with their labels and crowd flags.

    v2.SanitizeBoundingBoxes cannot stand in: its smallest threshold is 1 px, while the official code
    keeps every box of positive width and height.
    """
    boxes = target["boxes"]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    target = {key: value[keep] if key in ("boxes", "labels", "iscrowd") else value
              for key, value in target.items()}
    target["boxes"] = tv_tensors.wrap(target["boxes"], like=boxes)  # indexing unwraps the tv_tensor
    return target


class RemoveEmptyBoxes:
    """`remove_empty_boxes` as a pipeline step."""

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        return image, remove_empty_boxes(target)


class ToModelTarget:
    """Final step: boxes to plain cxcywh tensors normalised by the image size; adds `size` and `area`.

    `area` is the box area in pixels of the transformed image. The COCO evaluator takes its areas from
    the annotation file (`dataset.coco`), not from here.
    """

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        height, width = image.shape[-2:]
        boxes = target["boxes"].as_subclass(Tensor)
        target = dict(target)
        target["boxes"] = box_xyxy_to_cxcywh(boxes) / torch.tensor([width, height, width, height],
                                                                  dtype=torch.float32)
        target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        target["size"] = torch.tensor([height, width], dtype=torch.int64)
        return image.as_subclass(Tensor), target


def make_transforms(train: bool, train_sizes: Sequence[int], max_size: int, eval_size: int,
                    bigger: bool = False) -> v2.Compose:
    """The official training augmentation (`train`) or evaluation resize, then tensor conversion.

    `bigger` is the Swin-L recipe: `train_sizes` and `eval_size` x1.5 and `max_size` 2000; the crop
    branch keeps its sizes.
    """
    if not train:
        return v2.Compose([eval_resize(max_size, eval_size, bigger), *to_model_input(), ToModelTarget()])
    if bigger:
        train_sizes = [int(BIGGER_SCALE * size) for size in train_sizes]
        max_size = BIGGER_MAX_SIZE
    multi_scale = RandomShorterSideResize(train_sizes, max_size)
    geometry = [
        v2.RandomHorizontalFlip(0.5),
        v2.RandomChoice([
            multi_scale,
            v2.Compose([RandomShorterSideResize(CROP_RESIZE_SIZES), RandomSizeCrop(CROP_MIN, CROP_MAX),
                        RemoveEmptyBoxes(), multi_scale]),
        ]),
    ]
    return v2.Compose([*geometry, *to_model_input(), ToModelTarget()])

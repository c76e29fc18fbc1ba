"""Detection transforms on (PIL image, target) pairs, as in the official DETA / Deformable-DETR recipe.

Targets hold `boxes` as a `tv_tensors.BoundingBoxes` (XYXY, pixels) until `ToModelTarget`, so the
torchvision v2 transforms move them along with the image. Only what v2 lacks is written here: a resize
with the official output-size rounding, the random-size crop, and dropping boxes that a crop emptied.
"""
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from deta.box_ops import box_xyxy_to_cxcywh

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RESIZE_SIZES = (400, 500, 600)  # shorter side before the crop; --bigger leaves these unscaled
CROP_MIN, CROP_MAX = 384, 600
BIGGER_SCALE, BIGGER_MAX_SIZE = 1.5, 2000

Target = dict[str, Tensor]


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high], both ends included, from torch's generator like the v2 transforms,
    so that one torch.manual_seed fixes the whole pipeline."""
    return int(torch.randint(low, high + 1, ()))


def resized_shape(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to `size`, lowered so the longer side fits `max_size`.

    Same arithmetic as the official `get_size_with_aspect_ratio`; v2.Resize / RandomShortestSize round
    differently (off by a pixel). Because `size` is rounded, the longer side can exceed `max_size` by up to
    half the aspect ratio, exactly as in the official code.
    """
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = round(max_size * short / long)
            if size == 0:  # e.g. 4000x3 under max_size 1000, where the official code fails: 1 pixel, squeezed
                return (max_size, 1) if width < height else (1, max_size)
    if min(height, width) == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


class RandomShorterSideResize(v2.Transform):
    """Resize the shorter side to a random choice of `sizes` (see `resized_shape`)."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        super().__init__()
        self.sizes = list(sizes)
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        size = self.sizes[_randint(0, len(self.sizes) - 1)]
        return {"size": list(resized_shape(height, width, size, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


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
        crop_w = _randint(min(self.min_size, width), min(width, self.max_size))
        crop_h = _randint(min(self.min_size, height), min(height, self.max_size))
        return {"top": _randint(0, height - crop_h), "left": _randint(0, width - crop_w),
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
    if bigger:
        train_sizes = [int(BIGGER_SCALE * size) for size in train_sizes]
        eval_size = int(BIGGER_SCALE * eval_size)
        max_size = BIGGER_MAX_SIZE
    if train:
        multi_scale = RandomShorterSideResize(train_sizes, max_size)
        geometry = [
            v2.RandomHorizontalFlip(0.5),
            v2.RandomChoice([
                multi_scale,
                v2.Compose([RandomShorterSideResize(CROP_RESIZE_SIZES), RandomSizeCrop(CROP_MIN, CROP_MAX),
                            RemoveEmptyBoxes(), multi_scale]),
            ]),
        ]
    else:
        geometry = [RandomShorterSideResize([eval_size], max_size)]
    return v2.Compose([*geometry, v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), ToModelTarget()])


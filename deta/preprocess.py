"""Images as the model reads them: the official evaluation resize (shorter side to `eval_size`, longer side
at most `max_size`), then float tensors normalised with ImageNet's statistics.

The resize is written here, not taken from torchvision's v2.Resize, for the official output-size rounding
(v2 is off by a pixel). Training (datasets.transforms) adds its augmentation around the same steps.
"""
from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BIGGER_SCALE, BIGGER_MAX_SIZE = 1.5, 2000  # the Swin-L recipe's sizes (--bigger)


def random_index(low: int, high: int) -> int:
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
        size = self.sizes[random_index(0, len(self.sizes) - 1)]
        return {"size": list(resized_shape(height, width, size, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


def to_model_input() -> list[v2.Transform]:
    """A PIL image (or uint8 tensor) to the float tensor the model reads, normalised."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def eval_resize(max_size: int, eval_size: int, bigger: bool = False) -> RandomShorterSideResize:
    """The evaluation resize; `bigger` (the Swin-L recipe) scales `eval_size` by 1.5 and sets `max_size` 2000."""
    if bigger:
        return RandomShorterSideResize([int(BIGGER_SCALE * eval_size)], BIGGER_MAX_SIZE)
    return RandomShorterSideResize([eval_size], max_size)


def eval_transform(max_size: int, eval_size: int, bigger: bool = False) -> v2.Compose:
    """An image's evaluation preprocessing: `eval_resize`, then `to_model_input`. Its first step is the resize."""
    return v2.Compose([eval_resize(max_size, eval_size, bigger), *to_model_input()])

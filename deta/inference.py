"""`Detector`: a trained DETA as a Python object that turns images into detections.

    detector = Detector.from_checkpoint("checkpoint.pth", device="cpu")
    result = detector.predict("street.jpg", score_threshold=0.3)
    result["boxes"], result["scores"], result["labels"], result["names"]
"""
from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as F

from .build import build_model
from .checkpoint import load_checkpoint, load_model_weights
from .coco_categories import COCO_CATEGORY_NAMES, COCO_NUM_CLASSES, read_category_names
from .config import checkpoint_args
from .errors import InputError
from .images import read_rgb, to_rgb, upright
from .optimize import optimize_for_inference
from .preprocess import eval_transform

ImageInput = str | os.PathLike | Image.Image | np.ndarray | Tensor
Detections = dict[str, Any]


class Detector:
    """A DETA model in eval mode with its evaluation preprocessing, post-processing and class names.

    Images are resized and normalised exactly as for evaluation, and each image's detections are
    independent of the others in its batch (`--eval_batching per_image`, the default).
    """

    def __init__(self, model: nn.Module, postprocess: nn.Module, args: argparse.Namespace,
                 class_names: dict[int, str], optimize: bool = True) -> None:
        # The faster copy of deta.optimize_for_inference by default; optimize=False keeps `model` itself (to
        # hook or modify its modules).
        self.model = optimize_for_inference(model) if optimize else model.eval()
        self.postprocess = postprocess
        self.args = args
        self.class_names = class_names
        self.device = next(model.parameters()).device
        self.transform = eval_transform(args.max_size, args.eval_size, args.bigger)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None, *,
                        names_json: str | os.PathLike | None = None, use_ema: bool = True,
                        optimize: bool = True, **flags: Any) -> Detector:
        """Load any checkpoint that `main.py --resume` reads: ours, official DETA, detrex or an HF model folder,
        by path, http(s) URL or model-zoo name (docs/MODEL_ZOO.md; downloaded once into torch's hub cache).
        The weights are the EMA's where the checkpoint has one (main.py --ema), saying so in a warning, unless
        `use_ema` is False.

        The model is the one of the arguments saved in the checkpoint (`deta.config.checkpoint_args`). Keyword
        arguments are the model's flags (deta.config, main.py's) by their argument names and override them
        (`eval_size=600`, `amp=True` for bf16 autocast, also on CPU); detrex checkpoints save none and need the
        model flags (`two_stage=True, with_box_refine=True, num_feature_levels=5, ...`). `device` ("cpu", "cuda",
        "cuda:1", ...) defaults to CUDA when available. Class names come from `names_json` (a COCO-format
        annotation file), else from the checkpoint (main.py saves the training set's), else COCO's for
        91-class models. `optimize`: see `Detector`.
        """
        checkpoint = load_checkpoint(path)
        args = checkpoint_args(checkpoint, f"checkpoint {path}", flags)
        if device is not None:
            args.device = str(device)
        model, _, postprocessors = build_model(args)
        load_model_weights(model, _inference_weights(checkpoint, path, use_ema))
        model_device = next(model.parameters()).device
        if args.amp and model_device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise InputError(f"amp: {model_device} has no bf16 support; drop amp=True")
        return cls(model, postprocessors["bbox"], args, class_names(checkpoint, names_json, args.num_classes),
                   optimize)

    def preprocess(self, image: ImageInput) -> tuple[Tensor, tuple[int, int]]:
        """An image as the model reads it: the normalised, resized 3×h×w float tensor, and the (H, W) of the
        image before resizing (what boxes are scaled back to). What an exported ONNX graph needs too."""
        picture = _as_rgb(image)
        return self.transform(picture).as_subclass(Tensor), (picture.height, picture.width)

    @torch.no_grad()
    def predict(self, images: ImageInput | Sequence[ImageInput], score_threshold: float = 0.0,
                batch_size: int = 4) -> Detections | list[Detections]:
        """Detections of one image (a dict) or of a list of images (a list of dicts, in order).

        Images are file paths (EXIF orientation applied, as viewers show photos), PIL images (likewise),
        NumPy uint8 arrays H×W×3 in RGB order (as PIL, imageio and scikit-image give them; OpenCV gives BGR:
        convert with `cv2.cvtColor(image, cv2.COLOR_BGR2RGB)`) or H×W (grey), or 3×H×W RGB tensors, uint8 or
        float in [0, 1] as torchvision's `to_tensor`/`ToDtype(scale=True)` give them. Up to `batch_size` images
        share a forward pass; the results do not depend on it (beyond the rounding of batched matrix products).
        Each dict holds, on the CPU, torchvision's detection fields `boxes` (N×4 float xyxy in the original
        image's pixels), `scores` (N, at least `score_threshold`, best first) and `labels` (N, int64 class ids),
        plus `names` (N class names, the id as text where the class has no name).
        """
        if batch_size < 1:
            raise InputError(f"batch_size {batch_size}: must be at least 1")
        single = not isinstance(images, list | tuple)
        inputs = [images] if single else list(images)
        results = []
        for start in range(0, len(inputs), batch_size):
            results += self._predict_batch(inputs[start:start + batch_size], score_threshold)
        return results[0] if single else results

    def _predict_batch(self, images: list[ImageInput], score_threshold: float) -> list[Detections]:
        tensors, sizes = zip(*(self.preprocess(image) for image in images), strict=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.amp):
            outputs = self.model([tensor.to(self.device) for tensor in tensors])
        # bf16 outputs of autocast back to fp32: NMS needs the precision.
        outputs = {key: outputs[key].float() for key in ("pred_logits", "pred_boxes")}
        results = self.postprocess(outputs, torch.tensor(sizes, device=self.device))
        detections = []
        for result in results:
            keep = result["scores"].double() >= score_threshold  # against the threshold itself, not its fp32 rounding
            kept = {key: result[key][keep].cpu() for key in ("boxes", "scores", "labels")}
            kept["names"] = [self.class_names.get(label, str(label)) for label in kept["labels"].tolist()]
            detections.append(kept)
        return detections


def _inference_weights(checkpoint: dict, path: str | os.PathLike, use_ema: bool) -> dict[str, Tensor]:
    """The EMA of a checkpoint's weights where it has one (and `use_ema`), else its weights."""
    ema = checkpoint.get("ema")
    if not use_ema or not ema:
        return checkpoint["model"]
    warnings.warn(f"checkpoint {path}: using its EMA weights (the moving average of {ema['updates']} training steps, "
                  "which main.py --ema evaluates beside the model); pass use_ema=False (--no_ema) for the trained "
                  "weights", stacklevel=3)
    return ema["model"]


def _as_rgb(image: ImageInput) -> Image.Image:
    """Any supported input as an upright 8-bit RGB PIL image. Tensors go through PIL too, so that every input
    type is resized by the same code (PIL's resize and a tensor's differ in the last bits)."""
    if isinstance(image, str | os.PathLike):
        return read_rgb(image, fix="pass a readable image file")
    if isinstance(image, Image.Image):
        return to_rgb(upright(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise InputError(f"image array of {image.dtype} with shape {image.shape}: expected uint8 H×W×3 RGB "
                             "(from OpenCV's BGR: cv2.cvtColor(image, cv2.COLOR_BGR2RGB)) or H×W grey; pass "
                             "several images as a list")
        # A copy in C order: flipped views such as image[..., ::-1] (BGR to RGB) have negative strides.
        return to_rgb(Image.fromarray(np.ascontiguousarray(image)))
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or not (image.dtype == torch.uint8 or image.is_floating_point()):
            raise InputError(f"image tensor of {image.dtype} with shape {tuple(image.shape)}: expected 3×H×W RGB, "
                             "uint8 or float in [0, 1]; pass several images as a list")
        image = image.detach().cpu()
        if image.is_floating_point():
            low, high = image.aminmax()
            if not (low >= 0 and high <= 1):  # NaN fails both
                raise InputError(f"float image tensor with values in [{low:g}, {high:g}]: expected [0, 1] (as "
                                 "torchvision's to_tensor gives); divide 0..255 values by 255")
            # Scaled as torchvision's ToDtype(torch.uint8, scale=True): uint8 / 255 comes back exactly.
            image = F.to_dtype(image, torch.uint8, scale=True)
        return F.to_pil_image(image)
    raise InputError(f"image of type {type(image).__name__}: expected a file path, a PIL image, a uint8 H×W×3 "
                     "RGB NumPy array or a 3×H×W tensor")


def class_names(checkpoint: dict, names_json: str | os.PathLike | None, num_classes: int) -> dict[int, str]:
    """Names of the class ids: `names_json`'s categories, else those saved in the checkpoint, else COCO's for a
    91-class head, else none (with a warning)."""
    if names_json:
        return read_category_names(names_json, "--names_json")
    if checkpoint.get("category_names"):
        return checkpoint["category_names"]
    if num_classes == COCO_NUM_CLASSES:
        return COCO_CATEGORY_NAMES
    warnings.warn(f"the checkpoint names none of its {num_classes} classes; names are the category ids (pass "
                  "--names_json / names_json= with a COCO-format annotation file for names)", stacklevel=3)
    return {}


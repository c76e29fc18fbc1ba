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
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as F

from datasets.coco import category_names, load_coco, prepare_target
from datasets.images import read_rgb, to_rgb, upright
from datasets.transforms import make_transforms

from . import COCO_NUM_CLASSES, build_model
from .checkpoint import class_head_size, load_checkpoint, load_model_weights
from .coco_categories import COCO_CATEGORY_NAMES
from .errors import InputError

ImageInput = str | os.PathLike | Image.Image | Tensor
Detections = dict[str, Any]


class Detector:
    """A DETA model in eval mode with its evaluation preprocessing, post-processing and class names.

    Images are resized and normalised exactly as for evaluation, and each image's detections are
    independent of the others in its batch (`--eval_batching per_image`, the default).
    """

    def __init__(self, model: nn.Module, postprocess: nn.Module, args: argparse.Namespace,
                 class_names: dict[int, str]) -> None:
        self.model = model.eval()
        self.postprocess = postprocess
        self.args = args
        self.class_names = class_names
        self.device = next(model.parameters()).device
        self.transform = make_transforms(False, [], args.max_size, args.eval_size, args.bigger)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None, *,
                        names_json: str | os.PathLike | None = None, use_ema: bool = True, **flags: Any) -> Detector:
        """Load any checkpoint that `main.py --resume` reads: ours, official DETA, detrex or an HF model folder,
        by path, http(s) URL or model-zoo name (docs/MODEL_ZOO.md; downloaded once into torch's hub cache).
        The weights are the EMA's where the checkpoint has one (main.py --ema), saying so in a warning, unless
        `use_ema` is False.

        The model is the one of the arguments saved in the checkpoint. Keyword arguments are main.py flags by
        their argument names and override them (`eval_size=600`, `amp=True` for bf16 autocast, also on CPU);
        detrex checkpoints save none and need the model flags (`two_stage=True, with_box_refine=True,
        num_feature_levels=5, ...`). `device` ("cpu", "cuda", "cuda:1", ...) defaults to CUDA when
        available. Class names come from
        `names_json` (a COCO-format annotation file), else from the checkpoint (main.py saves the training
        set's), else COCO's for 91-class models.
        """
        from main import model_args  # main.py holds the flags, and itself imports deta
        from training.args_check import validate_args

        checkpoint = load_checkpoint(path)
        if checkpoint.get("args") is None and not flags:
            raise InputError(f"checkpoint {path}: it saves no model arguments; pass the main.py model flags, e.g. "
                             "two_stage=True, with_box_refine=True, num_feature_levels=5, ...")
        args = model_args({"args": checkpoint.get("args") or {}}, str(path), [])
        unknown = sorted(set(flags) - set(vars(args)))
        if unknown:
            raise InputError(f"unknown main.py flag(s) {', '.join(unknown)}; see python main.py --help")
        # bf16 is the caller's choice here, not the training run's.
        vars(args).update({"amp": False, **flags})
        if device is not None:
            args.device = str(device)
        if args.num_classes is None:
            args.num_classes = class_head_size(checkpoint["model"], f"checkpoint {path}", "num_classes=")
        validate_args(args)
        model, _, postprocessors = build_model(args)
        load_model_weights(model, _inference_weights(checkpoint, path, use_ema))
        model_device = next(model.parameters()).device
        if args.amp and model_device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise InputError(f"amp: {model_device} has no bf16 support; drop amp=True")
        return cls(model, postprocessors["bbox"], args, class_names(checkpoint, names_json, args.num_classes))

    def preprocess(self, image: ImageInput) -> tuple[Tensor, tuple[int, int]]:
        """An image as the model reads it: the normalised, resized 3×h×w float tensor, and the (H, W) of the
        image before resizing (what boxes are scaled back to). What an exported ONNX graph needs too."""
        picture = _as_rgb(image)
        tensor, _ = self.transform(picture, prepare_target([], 0, picture.width, picture.height))
        return tensor, (picture.height, picture.width)

    @torch.no_grad()
    def predict(self, images: ImageInput | Sequence[ImageInput], score_threshold: float = 0.0,
                batch_size: int = 4) -> Detections | list[Detections]:
        """Detections of one image (a dict) or of a list of images (a list of dicts, in order).

        Images are file paths (EXIF orientation applied, as viewers show photos), PIL images (likewise) or
        uint8 3×H×W RGB tensors. Up to `batch_size` images share a forward pass; the results do not depend on
        it (beyond the rounding of batched matrix products). Each dict holds, on the CPU, torchvision's
        detection fields `boxes` (N×4 float xyxy in the original image's pixels), `scores` (N, at least
        `score_threshold`, best first) and `labels` (N, int64 class ids), plus `names` (N class names, the id
        as text where the class has no name).
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
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise InputError(f"image tensor of {image.dtype} with shape {tuple(image.shape)}: expected uint8 "
                             "3×H×W RGB; pass several images as a list")
        return F.to_pil_image(image.cpu())
    raise InputError(f"image of type {type(image).__name__}: expected a file path, a PIL image or a uint8 "
                     "3×H×W tensor")


def class_names(checkpoint: dict, names_json: str | os.PathLike | None, num_classes: int) -> dict[int, str]:
    """Names of the class ids: `names_json`'s categories, else those saved in the checkpoint, else COCO's for a
    91-class head, else none (with a warning)."""
    if names_json:
        if not Path(names_json).is_file():
            raise InputError(f"--names_json: file {names_json} does not exist; pass a COCO-format annotation file")
        return category_names(load_coco(names_json))
    if checkpoint.get("category_names"):
        return checkpoint["category_names"]
    if num_classes == COCO_NUM_CLASSES:
        return COCO_CATEGORY_NAMES
    warnings.warn(f"the checkpoint names none of its {num_classes} classes; names are the category ids (pass "
                  "--names_json / names_json= with a COCO-format annotation file for names)", stacklevel=3)
    return {}


def main_flags(argv: list[str]) -> dict[str, Any]:
    """main.py flags on a command line (`--eval_size 600 --amp`) as the keyword arguments of `from_checkpoint`:
    only the flags given, by argument name."""
    from main import get_args_parser

    parser = get_args_parser()
    parser.exit_on_error = False
    unset = object()
    given = argparse.Namespace(**{action.dest: unset for action in parser._actions})
    try:
        given, unknown = parser.parse_known_args(argv, namespace=given)
    except argparse.ArgumentError as err:
        raise InputError(f"main.py flags after '--': {err}") from err
    if unknown:
        raise InputError(f"main.py flags after '--': unknown {' '.join(unknown)}; see python main.py --help")
    return {key: value for key, value in vars(given).items() if value is not unset}

"""Detect objects in images with a trained DETA; draw them and save them in the COCO results format.

    python scripts/predict.py --resume CKPT IMAGE_OR_DIR... --out DIR [--score_threshold 0.3]
                              [--names_json ANNOTATIONS.json] [--no_ema] [-- MAIN_PY_FLAGS...]

A command line over `deta.Detector`. Reads every checkpoint format that main.py reads, by path, URL or
model-zoo name, and the EMA weights of a main.py --ema checkpoint unless --no_ema. The model is the one
of the arguments saved in the checkpoint; main.py flags after '--' override them (e.g. -- --device cpu
--eval_size 600, or --amp for bf16) and are needed for a checkpoint that saves none. Images are resized as
for evaluation (--eval_size, --max_size); photos are turned upright by their EXIF orientation.

Writes DIR/NAME.png for each image, with the detections scoring at least the threshold drawn (class
name and score), DIR/detections.json with the same detections in the COCO results format, and
DIR/images.json with the image id, file, width and height of each image. Unreadable images are
reported by name and skipped. Each file is written whole or not at all (a full disk is a one-line error).
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deta.checkpoint import save_atomically, save_text_atomically
from deta.config import model_flags
from deta.errors import InputError, NoSpaceError, command_line_message
from deta.images import read_rgb
from deta.inference import Detector
from training.coco_eval import coco_detections
from training.cpu_memory import keep_freed_memory

# Distinct colours for up to 10 classes at a time; class ids pick one cyclically.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40))


def image_paths(inputs: list[str]) -> list[Path]:
    """The files named, and the image files (by suffix, sorted) of the folders named."""
    suffixes = set(Image.registered_extensions())
    paths = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        elif path.is_file():
            paths.append(path)
        else:
            raise InputError(f"{path}: no such file or folder; pass image files or folders of images")
    if not paths:
        raise InputError(f"no image files in {', '.join(inputs)}; pass image files or folders of images")
    return paths


def output_names(paths: list[Path]) -> list[str]:
    """`NAME.png` for each image; two images of the same name would overwrite each other's drawing."""
    names = [f"{path.stem}.png" for path in paths]
    seen: dict[str, Path] = {}
    for name, path in zip(names, paths, strict=True):
        if name in seen:
            raise InputError(f"{seen[name]} and {path} would both be drawn to {name}; predict them into "
                             "separate --out folders")
        seen[name] = path
    return names


def draw(image: Image.Image, detections: list[dict], names: dict[int, str]) -> Image.Image:
    """`image` with each detection's box (COCO xywh), class name and score."""
    if not detections:
        return image
    boxes = torch.tensor([d["bbox"] for d in detections])
    boxes[:, 2:] += boxes[:, :2]
    labels = [f"{names.get(d['category_id'], d['category_id'])} {d['score']:.2f}" for d in detections]
    colors = [PALETTE[d["category_id"] % len(PALETTE)] for d in detections]
    drawn = draw_bounding_boxes(F.pil_to_tensor(image), boxes, labels, colors, width=max(2, min(image.size) // 200),
                                label_colors="white", fill_labels=True)
    return F.to_pil_image(drawn)


def predict(checkpoint_path: str, inputs: list[str], out_dir: Path, score_threshold: float,
            names_json: str | None, overrides: list[str], use_ema: bool = True) -> None:
    """Write the drawings and JSON files into `out_dir`."""
    paths = image_paths(inputs)
    drawings = output_names(paths)
    with warnings.catch_warnings(record=True) as caught:  # a command line says them in one line each
        warnings.simplefilter("always")
        detector = Detector.from_checkpoint(checkpoint_path, names_json=names_json, use_ema=use_ema,
                                            **model_flags(overrides))
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if detector.device.type == "cpu":
        keep_freed_memory()

    out_dir.mkdir(parents=True, exist_ok=True)
    images, detections, unreadable = [], [], []
    progress = tqdm(list(zip(paths, drawings, strict=True)), unit="image")
    for image_id, (path, drawing) in enumerate(progress, start=1):
        try:
            image = read_rgb(path, fix="skipped")
        except InputError as err:
            tqdm.write(f"warning: {err}", file=sys.stderr)
            unreadable.append(path)
            continue
        kept = coco_detections(image_id, detector.predict(image, score_threshold))
        save_atomically(draw(image, kept, detector.class_names), out_dir / drawing,
                        lambda picture, file: picture.save(file, format="PNG"))
        images.append({"id": image_id, "file_name": str(path), "width": image.width, "height": image.height})
        detections += kept
    if not images:
        raise InputError(f"none of the {len(paths)} images could be read")
    save_text_atomically(json.dumps(detections), out_dir / "detections.json")
    save_text_atomically(json.dumps(images, indent=1), out_dir / "images.json")
    print(f"wrote {len(images)} drawings and {len(detections)} detections (score >= {score_threshold}) to {out_dir}"
          + (f"; skipped {len(unreadable)} unreadable: {', '.join(map(str, unreadable))}" if unreadable else ""))


def _output_folder(out: str) -> Path:
    """--out as a folder that can be created: not a file, nor inside one (checked before the model loads)."""
    path = Path(out)
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise InputError(f"--out {out}: {blocking} is a file, and --out is the folder the drawings and JSON files "
                         "go to; pass a folder (it is created if missing)")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="main.py flags after '--' override the checkpoint's model arguments")
    parser.add_argument("--resume", required=True, help="checkpoint of any supported format")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--score_threshold", default=0.3, type=float, help="least score drawn and saved")
    parser.add_argument("--no_ema", dest="use_ema", action="store_false",
                        help="the trained weights of a main.py --ema checkpoint, not (the default) their average")
    parser.add_argument("--names_json", default=None,
                        help="COCO-format annotation file whose categories name the classes (default: the names "
                             "saved in the checkpoint, else COCO's for 91-class models)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    options = parser.parse_intermixed_args(argv[:split])
    try:
        predict(options.resume, options.images, _output_folder(options.out), options.score_threshold,
                options.names_json, argv[split + 1:], options.use_ema)
    except InputError as err:
        print(f"error: {command_line_message(err)}", file=sys.stderr)
        sys.exit(2)
    except NoSpaceError as err:
        print(f"error: {err.retry_message()}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

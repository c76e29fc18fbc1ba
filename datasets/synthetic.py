"""A deterministic COCO-format data set of drawn shapes, small enough to train a tiny DETA on a CPU.

    python -m datasets.synthetic --out data/shapes --seed 0

writes DIR/{train,val}/*.png and DIR/annotations/{train,val}.json. Each class has its own shape and
colour; sizes, positions, colour jitter, overlaps and textured backgrounds keep the task from being
trivial. The same arguments give byte-identical files.
"""
import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from deta.errors import InputError

# (category id, name, RGB): every class differs from the others in shape and in colour.
CATEGORIES = (
    (1, "circle", (220, 50, 50)),
    (2, "square", (50, 90, 220)),
    (3, "triangle", (40, 180, 70)),
    (4, "ring", (235, 190, 30)),
    (5, "cross", (190, 60, 200)),
)
COLOUR_JITTER = 25  # per channel, so colour alone is a strong but not a perfect cue
NOISE_STD = 6.0  # pixel noise over the whole image
MAX_OVERLAP = 0.3  # of the smaller box's area: objects may overlap, but none is mostly hidden
PLACEMENT_TRIES = 10
SPLIT_CODES = {"train": 0, "val": 1}  # part of the per-image seed, so the splits differ


@dataclass
class DrawnObject:
    category_id: int
    bbox: list[int]  # COCO xywh, tight around `mask`
    mask: np.ndarray  # bool, image-sized: the pixels drawn for this object


def _shape_mask(name: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean height x width mask of one shape filling the patch."""
    patch = Image.new("1", (width, height))
    draw = ImageDraw.Draw(patch)
    right, bottom = width - 1, height - 1
    if name == "circle":
        draw.ellipse((0, 0, right, bottom), fill=1)
    elif name == "square":
        draw.rectangle((0, 0, right, bottom), fill=1)
    elif name == "triangle":
        apex, base = (0, bottom) if rng.random() < 0.5 else (bottom, 0)  # pointing up or down
        draw.polygon([(0, base), (right, base), (right / 2, apex)], fill=1)
    elif name == "ring":
        draw.ellipse((0, 0, right, bottom), outline=1, width=max(2, min(width, height) // 5))
    elif name == "cross":
        bar = max(2, min(width, height) // 3)
        left, top = (width - bar) // 2, (height - bar) // 2
        draw.rectangle((left, 0, left + bar - 1, bottom), fill=1)
        draw.rectangle((0, top, right, top + bar - 1), fill=1)
    else:
        raise ValueError(f"unknown shape {name!r}")
    return np.array(patch, dtype=bool)


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A greyish colour, so that the saturated objects stand out from the background."""
    return rng.uniform(50, 190) + rng.uniform(-25, 25, size=3)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32 height x width x 3: a gradient, stripes or smooth blotches between two muted colours."""
    angle = rng.uniform(0, np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    along = np.cos(angle) * xs + np.sin(angle) * ys
    kind = rng.integers(3)
    if kind == 0:
        mix = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    elif kind == 1:
        mix = 0.5 + 0.5 * np.sin(2 * np.pi * along / rng.uniform(6, 24) + rng.uniform(0, 2 * np.pi))
    else:
        coarse = rng.uniform(0, 255, size=(int(rng.integers(3, 8)), int(rng.integers(3, 8))))
        smooth = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.Resampling.BILINEAR)
        mix = np.asarray(smooth, dtype=np.float32) / 255
    low, high = _muted_colour(rng), _muted_colour(rng)
    return (low + mix[..., None] * (high - low)).astype(np.float32)


def _overlap(a: list[int], b: list[int]) -> float:
    """Intersection of two xywh boxes over the area of the smaller one (IoU would let a small object
    disappear inside a large one)."""
    inter_w = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    inter_h = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return inter_w * inter_h / min(a[2] * a[3], b[2] * b[3])


def render_image(rng: np.random.Generator, height: int, width: int, max_objects: int, object_size: tuple[int, int],
                 categories: tuple[tuple[int, str, tuple[int, int, int]], ...] = CATEGORIES,
                 ) -> tuple[np.ndarray, list[DrawnObject]]:
    """One uint8 height x width x 3 image with 1..max_objects shapes of `categories`, in drawing order (later on
    top)."""
    canvas = _background(rng, height, width)
    largest = min(object_size[1], height, width)
    objects: list[DrawnObject] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        category_id, name, colour = categories[rng.integers(len(categories))]
        size = int(rng.integers(object_size[0], largest + 1))
        obj_w = int(np.clip(round(size * rng.uniform(0.8, 1.25)), object_size[0], width))
        obj_h = int(np.clip(round(size * rng.uniform(0.8, 1.25)), object_size[0], height))
        for _ in range(PLACEMENT_TRIES):
            x, y = int(rng.integers(0, width - obj_w + 1)), int(rng.integers(0, height - obj_h + 1))
            if all(_overlap([x, y, obj_w, obj_h], other.bbox) <= MAX_OVERLAP for other in objects):
                break
        else:
            continue
        mask = np.zeros((height, width), dtype=bool)
        mask[y:y + obj_h, x:x + obj_w] = _shape_mask(name, obj_w, obj_h, rng)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        canvas[mask] = np.asarray(colour) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3)
        objects.append(DrawnObject(category_id, bbox, mask))
    canvas += rng.normal(0, NOISE_STD, size=canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects


def _write_split(out_dir: Path, split: str, count: int, seed: int, image_size: tuple[int, int],
                 object_size: tuple[int, int], max_objects: int,
                 categories: tuple[tuple[int, str, tuple[int, int, int]], ...]) -> Path:
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
        height, width = (int(side) for side in rng.integers(image_size[0], image_size[1] + 1, size=2))
        pixels, objects = render_image(rng, height, width, max_objects, object_size, categories)
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels).save(image_dir / file_name, format="PNG")
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": obj.category_id, "bbox": obj.bbox,
                                "area": int(obj.mask.sum()), "iscrowd": 0})
    coco = {
        "info": {"description": f"synthetic shapes, {split} split, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _ in categories],
    }
    ann_file = out_dir / "annotations" / f"{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(coco))
    return ann_file


def generate(out_dir: str | Path, seed: int = 0, num_train: int = 256, num_val: int = 64,
             image_size: tuple[int, int] = (128, 192), object_size: tuple[int, int] = (16, 64),
             max_objects: int = 6, classes: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Write the data set; return its paths keyed by main.py's flag names (train_json, train_images, ...).

    Image height and width are drawn from `image_size` (min, max), object sides from `object_size`. `classes`:
    the shapes to draw (names of CATEGORIES), ids 1..K in that order (a second data set with other classes, for
    fine-tuning); default all.
    """
    if not 0 < image_size[0] <= image_size[1]:
        raise InputError(f"--image_size: need 0 < MIN <= MAX, got {image_size[0]} {image_size[1]}")
    if not 0 < object_size[0] <= min(object_size[1], image_size[0]):
        raise InputError(f"--object_size: need 0 < MIN <= MAX and MIN <= the smallest image side "
                         f"{image_size[0]}, got {object_size[0]} {object_size[1]}")
    if max_objects < 1:
        raise InputError(f"--max_objects: need at least 1, got {max_objects}")
    categories = _chosen_categories(classes)
    out_dir = Path(out_dir)
    paths = {}
    for split, count in (("train", num_train), ("val", num_val)):
        paths[f"{split}_json"] = _write_split(out_dir, split, count, seed, image_size, object_size,
                                              max_objects, categories)
        paths[f"{split}_images"] = out_dir / split
    return paths


def _chosen_categories(classes: tuple[str, ...] | None) -> tuple[tuple[int, str, tuple[int, int, int]], ...]:
    if classes is None:
        return CATEGORIES
    by_name = {name: colour for _, name, colour in CATEGORIES}
    unknown = [name for name in classes if name not in by_name]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise InputError(f"--classes {','.join(classes)}: give distinct shape names out of {', '.join(by_name)}")
    return tuple((i + 1, name, by_name[name]) for i, name in enumerate(classes))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--num_train", default=256, type=int)
    parser.add_argument("--num_val", default=64, type=int)
    parser.add_argument("--image_size", default=(128, 192), type=int, nargs=2, metavar=("MIN", "MAX"),
                        help="range of image heights and widths")
    parser.add_argument("--object_size", default=(16, 64), type=int, nargs=2, metavar=("MIN", "MAX"),
                        help="range of object sides")
    parser.add_argument("--max_objects", default=6, type=int, help="objects per image: 1 to this")
    parser.add_argument("--classes", default=None, type=lambda text: tuple(text.split(",")),
                        help="comma-separated shapes to draw, category ids 1..K in this order (default: all)")
    args = parser.parse_args(argv)
    try:
        paths = generate(args.out, args.seed, args.num_train, args.num_val, tuple(args.image_size),
                         tuple(args.object_size), args.max_objects, args.classes)
    except InputError as err:
        parser.error(str(err))
    print(" ".join(f"--{flag} {path}" for flag, path in paths.items()))


if __name__ == "__main__":
    main()

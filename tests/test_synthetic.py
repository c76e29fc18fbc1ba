"""The synthetic shapes generator: determinism, valid COCO files, tight boxes."""
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from datasets.synthetic import CATEGORIES, generate, main, render_image
from deta.errors import InputError

SMALL = {"num_train": 6, "num_val": 3, "image_size": (64, 96), "object_size": (12, 40)}


def _files(root):
    return {path.relative_to(root): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return root, generate(root, seed=3, **SMALL)


def test_same_seed_gives_identical_bytes(shapes, tmp_path):
    root, _ = shapes
    generate(tmp_path / "again", seed=3, **SMALL)
    generate(tmp_path / "other", seed=4, **SMALL)
    first = _files(root)
    assert len(first) == 6 + 3 + 2
    assert _files(tmp_path / "again") == first
    other = _files(tmp_path / "other")
    assert other.keys() == first.keys() and other != first


def test_train_and_val_differ(shapes):
    root, _ = shapes
    assert (root / "train" / "000000.png").read_bytes() != (root / "val" / "000000.png").read_bytes()


def test_annotations_are_valid_coco(shapes):
    _, paths = shapes
    for split, count in (("train", 6), ("val", 3)):
        coco = COCO(str(paths[f"{split}_json"]))
        assert len(coco.imgs) == count
        assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == \
            {cid: name for cid, name, _ in CATEGORIES}
        assert all(1 <= len(coco.imgToAnns[image_id]) <= 6 for image_id in coco.imgs)
        for info in coco.imgs.values():
            with Image.open(paths[f"{split}_images"] / info["file_name"]) as image:
                assert image.size == (info["width"], info["height"])
                assert min(image.size) >= 64 and max(image.size) <= 96
            for ann in coco.imgToAnns[info["id"]]:
                x, y, w, h = ann["bbox"]
                assert ann["iscrowd"] == 0 and ann["category_id"] in coco.cats
                assert x >= 0 and y >= 0 and x + w <= info["width"] and y + h <= info["height"]
                assert 0 < ann["area"] <= w * h and min(w, h) >= 12


@pytest.mark.parametrize("seed", range(8))
def test_boxes_are_tight_and_objects_drawn_in_their_colour(seed):
    rng = np.random.default_rng(seed)
    pixels, objects = render_image(rng, 96, 128, max_objects=6, object_size=(12, 48))
    assert pixels.shape == (96, 128, 3) and pixels.dtype == np.uint8 and objects
    for obj in objects:
        x, y, w, h = obj.bbox
        inside = np.zeros_like(obj.mask)
        inside[y:y + h, x:x + w] = True
        assert not (obj.mask & ~inside).any()  # every drawn pixel lies in the box
        box = obj.mask[y:y + h, x:x + w]  # and the shape touches all four sides
        assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
    top = objects[-1]  # drawn last, so nothing covers it
    colour = dict((cid, rgb) for cid, _, rgb in CATEGORIES)[top.category_id]
    mean = pixels[top.mask].astype(float).mean(0)
    assert np.abs(mean - colour).max() < 25 + 3  # colour jitter plus a margin for the mean noise


def test_cli_writes_the_files_and_prints_the_flags(tmp_path, capsys):
    main(["--out", str(tmp_path), "--seed", "1", "--num_train", "2", "--num_val", "1",
          "--image_size", "64", "64", "--max_objects", "2"])
    printed = capsys.readouterr().out
    assert f"--train_json {tmp_path / 'annotations' / 'train.json'}" in printed
    assert f"--val_images {tmp_path / 'val'}" in printed
    data = json.loads((tmp_path / "annotations" / "val.json").read_text())
    assert [(i["height"], i["width"]) for i in data["images"]] == [(64, 64)]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["000000.png", "000001.png"]


@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"image_size": (96, 64)}, "--image_size"),
    ({"object_size": (80, 90)}, "--object_size"),
    ({"max_objects": 0}, "--max_objects"),
])
def test_bad_arguments_name_the_flag(tmp_path, kwargs, flag):
    with pytest.raises(InputError, match=flag):
        generate(tmp_path, **{**SMALL, **kwargs})

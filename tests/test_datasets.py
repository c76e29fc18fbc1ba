"""COCO-format data set, transforms, flag handling and input errors."""
import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from datasets import build_dataset, collate_fn, resolve_num_classes
from datasets.coco import CocoDetection, prepare_target
from datasets.synthetic import generate
from datasets.transforms import RandomSizeCrop, RemoveEmptyBoxes, make_transforms
from deta.box_ops import box_cxcywh_to_xyxy
from deta.errors import InputError
from deta.images import EXIF_ORIENTATION_TAG
from deta.preprocess import IMAGENET_MEAN, IMAGENET_STD, resized_shape
from training import coco_eval

# main.py's data flags, with sizes small enough for CPU tests
DEFAULTS = {"coco_path": None, "train_json": None, "train_images": None, "val_json": None, "val_images": None,
            "train_sizes": "64,80", "max_size": 128, "eval_size": 80, "bigger": False, "num_classes": None,
            "eval": False, "skip_mismatched_images": False}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return generate(root, seed=0, num_train=6, num_val=3, image_size=(64, 96), object_size=(12, 40))


def make_args(paths=None, splits=("train", "val"), **flags) -> argparse.Namespace:
    """Flags as main.py parses them; `paths` (from `generate`) fills the json/images flags of `splits`."""
    data = {f"{split}_{kind}": str(paths[f"{split}_{kind}"]) for split in splits
            for kind in ("json", "images")} if paths else {}
    return argparse.Namespace(**{**DEFAULTS, **data, **flags})


def assert_input_error(call, *needles):
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, (needle, message)


def write_coco(folder, images, annotations, categories=({"id": 1, "name": "thing"},)):
    """Grey PNGs of the given (file name, width, height) and their annotation file."""
    (folder / "images").mkdir(parents=True)
    for name, width, height in images:
        Image.new("RGB", (width, height), (128, 128, 128)).save(folder / "images" / name)
    data = {"images": [{"id": i + 1, "file_name": name, "width": w, "height": h}
                       for i, (name, w, h) in enumerate(images)],
            "annotations": [{"id": i + 1, "area": 1.0, "iscrowd": 0, **a} for i, a in enumerate(annotations)],
            "categories": list(categories)}
    (folder / "ann.json").write_text(json.dumps(data))
    return folder / "ann.json", folder / "images"


def pixel_boxes(target) -> torch.Tensor:
    height, width = target["size"].tolist()
    return box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([width, height, width, height])


# --- resize arithmetic ---------------------------------------------------------------------------

@pytest.mark.parametrize(("height", "width", "size", "max_size", "expected"), [
    (480, 640, 800, 1333, (800, 1066)),
    (427, 640, 800, 1333, (800, 1199)),
    (640, 427, 800, 1333, (1199, 800)),
    (500, 2000, 800, 1333, (333, 1332)),  # v2.Resize gives (333, 1333)
    (64, 96, 80, 128, (80, 120)),
    (64, 96, 80, 100, (67, 100)),  # size lowered to round(66.7)
    (10, 40, 50, 102, (26, 104)),  # the official rounding overshoots max_size for elongated images
    (80, 120, 80, None, (80, 120)),
    (3, 4000, 800, 1333, (1, 1333)),
    (3, 4000, 80, 128, (1, 128)),  # the official rounding gives a 0-pixel side (and PIL fails)
    (4000, 3, 80, 128, (128, 1)),
])
def test_resized_shape_matches_official_rounding(height, width, size, max_size, expected):
    assert resized_shape(height, width, size, max_size) == expected


def test_a_4000x3_image_evaluates_with_its_box(tmp_path):
    ann_file, image_dir = write_coco(tmp_path, [("strip.png", 4000, 3)],
                                     [{"image_id": 1, "bbox": [1000, 0, 2000, 3], "category_id": 1}])
    image, target = CocoDetection(image_dir, ann_file, make_transforms(False, [64], 128, 80))[0]
    assert image.shape == (3, 1, 128) and target["orig_size"].tolist() == [3, 4000]
    torch.testing.assert_close(pixel_boxes(target), torch.tensor([[32.0, 0.0, 96.0, 1.0]]))


def test_eval_transform_exact_size_and_values():
    image = Image.new("RGB", (96, 64), (128, 128, 128))
    target = prepare_target([{"bbox": [12, 8, 48, 32], "category_id": 3}], 7, 96, 64)
    tensor, out = make_transforms(False, [64], 128, 80)(image, target)
    assert tensor.shape == (3, 80, 120) and tensor.dtype == torch.float32 and type(tensor) is torch.Tensor
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(tensor, expected[:, None, None].expand(3, 80, 120), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.375, 0.375, 0.5, 0.5]]))
    assert out["boxes"].dtype == torch.float32 and type(out["boxes"]) is torch.Tensor
    assert out["size"].tolist() == [80, 120] and out["orig_size"].tolist() == [64, 96]
    assert out["area"].tolist() == [60 * 40] and out["labels"].tolist() == [3] and out["image_id"].item() == 7

    bigger, _ = make_transforms(False, [64], 128, 80, bigger=True)(image, target)
    assert bigger.shape == (3, 120, 180)


# --- training augmentation -----------------------------------------------------------------------

def test_flip_mirrors_boxes_exactly():
    target = prepare_target([{"bbox": [10, 5, 20, 20], "category_id": 2}], 1, 96, 64)
    _, out = v2.RandomHorizontalFlip(p=1.0)(Image.new("RGB", (96, 64)), target)
    assert out["boxes"].tolist() == [[66.0, 5.0, 86.0, 25.0]]
    assert out["labels"].tolist() == [2] and out["orig_size"].tolist() == [64, 96]


def test_crop_clips_boxes_and_drops_empty_ones():
    image = Image.new("RGB", (100, 100))
    # A 50x50 crop can hold the top-left or the bottom-right corner box, never both; the full box stays.
    target = prepare_target([{"bbox": [0, 0, 10, 10], "category_id": 1},
                             {"bbox": [90, 90, 10, 10], "category_id": 2},
                             {"bbox": [0, 0, 100, 100], "category_id": 3}], 1, 100, 100)
    crop = v2.Compose([RandomSizeCrop(50, 50), RemoveEmptyBoxes()])
    seen = set()
    torch.manual_seed(0)
    for _ in range(60):
        cropped, out = crop(image, target)
        labels = out["labels"].tolist()
        assert cropped.size == (50, 50) and labels[-1] == 3 and len(labels) <= 2
        assert len(out["boxes"]) == len(labels) == len(out["iscrowd"])
        assert out["boxes"][-1].tolist() == [0.0, 0.0, 50.0, 50.0]
        assert (out["boxes"][:, 2:] > out["boxes"][:, :2]).all()
        seen.add(tuple(labels))
    assert seen == {(3,), (1, 3), (2, 3)}


def test_crop_keeps_images_smaller_than_the_minimum_whole():
    target = prepare_target([{"bbox": [10, 5, 20, 20], "category_id": 1}], 1, 96, 64)
    cropped, out = RandomSizeCrop(384, 600)(Image.new("RGB", (96, 64)), target)
    assert cropped.size == (96, 64) and out["boxes"].tolist() == [[10.0, 5.0, 30.0, 25.0]]


def bright_box(mask: torch.Tensor) -> torch.Tensor:
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    return torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)


def test_train_boxes_follow_the_pixels():
    """Through flips, both resize branches and crops, each box stays on its drawn object."""
    image = Image.new("RGB", (96, 64))
    image.paste((255, 255, 255), (10, 10, 35, 40))  # label 1: white, left
    image.paste((255, 0, 0), (55, 20, 85, 50))  # label 2: red, right
    target = prepare_target([{"bbox": [10, 10, 25, 30], "category_id": 1},
                             {"bbox": [55, 20, 30, 30], "category_id": 2}], 1, 96, 64)
    transform = make_transforms(True, [64, 80], 128, 80)
    torch.manual_seed(0)
    shapes, orders = set(), set()
    for _ in range(40):
        tensor, out = transform(image, target)
        height, width = tensor.shape[-2:]
        shapes.add((height, width))
        assert out["size"].tolist() == [height, width] and min(height, width) in (64, 80)
        # thresholds midway between normalised 0 and 255 of each channel
        masks = {1: tensor[1] > 0.2, 2: (tensor[0] > 0.25) & (tensor[1] < 0.2)}
        boxes = dict(zip(out["labels"].tolist(), pixel_boxes(out), strict=True))
        for label, mask in masks.items():
            if label not in boxes:
                assert not mask.any()
            elif (boxes[label][2:] - boxes[label][:2]).min() >= 2:  # a crop can leave a faint sub-pixel sliver
                torch.testing.assert_close(boxes[label], bright_box(mask), atol=1.5, rtol=0)
        if len(boxes) == 2:
            orders.add(bool(boxes[1][0] < boxes[2][0]))
    assert len(shapes) > 3  # both branches and several scales were drawn
    assert orders == {True, False}  # seen flipped and not


def test_train_items_within_limits(shapes):
    dataset = build_dataset("train", make_args(shapes, ["train"]))
    torch.manual_seed(0)
    for _ in range(3):
        for index in range(len(dataset)):
            image, target = dataset[index]
            height, width = image.shape[-2:]
            assert image.shape[0] == 3 and min(height, width) in (64, 80) and max(height, width) <= 128
            assert target["size"].tolist() == [height, width]
            boxes = target["boxes"]
            assert boxes.dtype == torch.float32 and target["labels"].dtype == torch.int64
            assert len(boxes) == len(target["labels"]) == len(target["area"]) == len(target["iscrowd"])
            assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > 0).all()
            xyxy = box_cxcywh_to_xyxy(boxes)
            assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all()
            assert set(target["labels"].tolist()) <= {1, 2, 3, 4, 5}


def test_val_items_match_the_annotations(shapes):
    dataset = build_dataset("val", make_args(shapes))
    assert len(dataset) == 3 and dataset.coco is not None
    for index in range(len(dataset)):
        image, target = dataset[index]
        info = dataset.coco.imgs[dataset.ids[index]]
        assert target["image_id"].item() == info["id"] and target["image_id"].shape == ()
        assert target["orig_size"].tolist() == [info["height"], info["width"]]
        height, width = resized_shape(info["height"], info["width"], 80, 128)
        assert image.shape == (3, height, width) and target["size"].tolist() == [height, width]
        anns = dataset.coco.imgToAnns[info["id"]]
        expected = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        expected[:, 2:] += expected[:, :2]
        expected *= torch.tensor([width / info["width"], height / info["height"]] * 2)
        torch.testing.assert_close(pixel_boxes(target), expected, atol=1e-3, rtol=0)
        assert target["labels"].tolist() == [a["category_id"] for a in anns]


# --- annotation filtering ------------------------------------------------------------------------

def test_crowd_degenerate_and_outside_boxes_are_removed(tmp_path):
    ann_file, image_dir = write_coco(tmp_path, [("a.png", 96, 64), ("empty.png", 80, 64)], [
        {"image_id": 1, "bbox": [0, 0, 10, 10], "category_id": 1, "iscrowd": 1},
        {"image_id": 1, "bbox": [5, 5, 0, 10], "category_id": 1},
        {"image_id": 1, "bbox": [-5, 50, 20, 30], "category_id": 1},
        {"image_id": 1, "bbox": [100, 10, 5, 5], "category_id": 1},
        {"image_id": 1, "bbox": [10, 10, 20, 20], "category_id": 1},
    ])
    dataset = CocoDetection(image_dir, ann_file, make_transforms(False, [64], 1000, 64))
    _, target = dataset[0]
    assert pixel_boxes(target).tolist() == [[0.0, 50.0, 15.0, 64.0], [10.0, 10.0, 30.0, 30.0]]
    assert target["iscrowd"].tolist() == [0, 0]

    _, target = dataset[1]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    train = CocoDetection(image_dir, ann_file, make_transforms(True, [64, 80], 128, 80))
    torch.manual_seed(0)
    for _ in range(10):
        assert train[1][1]["boxes"].shape == (0, 4)


def test_summary_counts_each_dropped_box_once_by_reason(tmp_path):
    ann_file, image_dir = write_coco(tmp_path, [("a.png", 96, 64), ("b.png", 80, 64), ("c.png", 40, 40)], [
        {"image_id": 1, "bbox": [10, 10, 20, 20], "category_id": 1},
        {"image_id": 1, "bbox": [-5, 50, 20, 30], "category_id": 1},  # kept, clamped to the image
        {"image_id": 1, "bbox": [0, 0, 10, 10], "category_id": 1, "iscrowd": 1},
        {"image_id": 1, "bbox": [5, 5, 0, 10], "category_id": 1},
        {"image_id": 1, "bbox": [5, 5, 10, -1], "category_id": 1},
        {"image_id": 1, "bbox": [100, 10, 5, 5], "category_id": 1},
        {"image_id": 2, "bbox": [float("nan"), 1, 5, 5], "category_id": 1},
        {"image_id": 2, "bbox": [1, 1, float("inf"), 5], "category_id": 1},
        {"image_id": 9, "bbox": [1, 1, 5, 5], "category_id": 1},
        {"image_id": 3, "bbox": [1, 1, 5, 5], "category_id": 1, "iscrowd": 1},  # a crowd-only image
    ])
    dataset = CocoDetection(image_dir, ann_file, make_transforms(False, [64], 1000, 64))
    assert str(dataset.summary) == (
        "3 images, 2 boxes kept, 8 dropped (1 with an unknown image id, 2 crowd, 2 NaN/inf, 2 degenerate (width or "
        "height <= 0), 1 entirely outside the image), 2 images without boxes")  # b: NaN/inf only, c: crowd only
    assert sum(len(dataset[i][1]["boxes"]) for i in range(len(dataset))) == dataset.summary.boxes


def test_each_split_logs_its_summary(shapes, caplog):
    with caplog.at_level("INFO"):
        build_dataset("val", make_args(shapes))
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("val data")]
    assert line.startswith(f"val data {shapes['val_json']}: 3 images, ") and "images without boxes" in line


@pytest.mark.parametrize("split", ["train", "val"])
def test_no_usable_box_is_an_error(tmp_path, split):
    ann_file, image_dir = write_coco(tmp_path, [("a.png", 32, 32)], [
        {"image_id": 1, "bbox": [1, 1, 5, 5], "category_id": 1, "iscrowd": 1},
        {"image_id": 1, "bbox": [40, 1, 5, 5], "category_id": 1},
    ])
    args = make_args(**{f"{split}_json": str(ann_file), f"{split}_images": str(image_dir)}, num_classes=2)
    assert_input_error(lambda: build_dataset(split, args), f"--{split}_json", ann_file, "no usable box",
                       "1 crowd, 1 entirely outside the image")


def test_an_empty_data_set_says_so_not_batch_size(tmp_path):
    ann_file, image_dir = write_coco(tmp_path, [], [])
    args = make_args(train_json=str(ann_file), train_images=str(image_dir), num_classes=2)
    with pytest.raises(InputError, match="empty data set") as info:
        build_dataset("train", args)
    assert str(ann_file) in str(info.value) and "--batch_size" not in str(info.value)


def train_args(folder, data) -> argparse.Namespace:
    """Training flags for `data` written as folder/bad.json, with an empty image folder."""
    (folder / "bad.json").write_text(json.dumps(data))
    (folder / "images").mkdir()
    return make_args(train_json=str(folder / "bad.json"), train_images=str(folder / "images"), num_classes=2)


@pytest.mark.parametrize("bbox", [["1", 2, 3, 4], [1, 2, 3], None, "1,2,3,4", [1, 2, 3, True], {"x": 1}])
def test_malformed_bbox_names_the_file_and_the_annotation_id(tmp_path, bbox):
    data = {"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "area": 4.0, "bbox": bbox}]}
    assert_input_error(lambda: build_dataset("train", train_args(tmp_path, data)), tmp_path / "bad.json",
                       "annotation id 7", "[x, y, width, height] of 4 numbers")


@pytest.mark.parametrize(("entry", "needle"), [
    ({"width": "640"}, 'image id 1 (images[0]) has width "640"'),
    ({"height": float("inf")}, "image id 1 (images[0]) has height Infinity"),
    ({"width": 0}, "image id 1 (images[0]) has width 0"),
    ({"category_id": "1"}, 'annotation id 7 (annotations[0]) has category_id "1"'),
])
def test_malformed_sizes_and_category_ids_name_the_file_and_the_id(tmp_path, entry, needle):
    annotation = {"id": 7, "image_id": 1, "category_id": 1, "area": 4.0, "bbox": [1, 1, 2, 2]}
    image = {"id": 1, "file_name": "a.png", "width": 32, "height": 32}
    for key, value in entry.items():
        (annotation if key == "category_id" else image)[key] = value
    data = {"images": [image], "categories": [{"id": 1}], "annotations": [annotation]}
    assert_input_error(lambda: build_dataset("train", train_args(tmp_path, data)), tmp_path / "bad.json", needle)


# --- image frames: EXIF orientation and the JSON's size -------------------------------------------

def phone_photo(folder, json_size):
    """A 32x16 JPEG with EXIF orientation 6 (shown turned clockwise: 16x32, its red left side on top) and an
    annotation file giving `json_size` (or no size), with one box over the top of the displayed image."""
    (folder / "images").mkdir()
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    Image.fromarray(pixels).save(folder / "images" / "phone.jpg", exif=exif, quality=100)
    size = {"width": json_size[0], "height": json_size[1]} if json_size else {}
    data = {"images": [{"id": 1, "file_name": "phone.jpg", **size}], "categories": [{"id": 1}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "area": 128.0, "iscrowd": 0,
                             "bbox": [0, 0, 16, 8]}]}
    (folder / "ann.json").write_text(json.dumps(data))
    return folder / "ann.json", folder / "images"


@pytest.mark.parametrize(("json_size", "turned"), [((16, 32), True), (None, False), ((32, 16), False)])
def test_exif_orientation_is_applied_when_it_gives_the_json_size(tmp_path, json_size, turned):
    ann_file, image_dir = phone_photo(tmp_path, json_size)
    dataset = CocoDetection(image_dir, ann_file, make_transforms(False, [16], 1000, 16))
    image, target = dataset[0]
    assert str(dataset.summary) == "1 image, 1 box kept, 0 images without boxes" + (
        "" if json_size else "; 1 image without width/height in the JSON, whose size is not checked against the file")
    assert target["orig_size"].tolist() == ([32, 16] if turned else [16, 32])
    red = image[0] > 1.0  # normalised red channel: high only where the pixels are red
    if turned:  # the box lies on the red top of the displayed image
        assert red[:8].all() and not red[8:].any()
    else:
        assert red[:, :8].all() and not red[:, 8:].any()


def test_an_image_matching_neither_size_is_an_error_or_skipped(tmp_path, caplog):
    ann_file, image_dir = phone_photo(tmp_path, (40, 30))
    transforms = make_transforms(False, [16], 1000, 16)
    assert_input_error(lambda: CocoDetection(image_dir, ann_file, transforms)[0], image_dir / "phone.jpg",
                       "32x16 as stored", "16x32 as displayed", "40x30", ann_file, "--skip_mismatched_images")

    data = json.loads(ann_file.read_text())
    Image.new("RGB", (20, 10)).save(image_dir / "plain.png")
    data["images"].append({"id": 2, "file_name": "plain.png", "width": 20, "height": 10})
    data["annotations"].append({"id": 2, "image_id": 2, "category_id": 1, "area": 4.0, "bbox": [1, 1, 2, 2]})
    ann_file.write_text(json.dumps(data))
    args = make_args(val_json=str(ann_file), val_images=str(image_dir), num_classes=2, skip_mismatched_images=True)
    with caplog.at_level("INFO"):
        dataset = build_dataset("val", args)
    assert dataset.ids == [2] and dataset.skipped == ["phone.jpg"] and list(dataset.coco.imgs) == [2]
    assert dataset.summary.dropped == {"on skipped images": 1}
    assert any("--skip_mismatched_images: left out 1 val images" in r.getMessage() and "phone.jpg" in r.getMessage()
               for r in caplog.records)


def test_collate_keeps_lists_of_different_sizes(shapes):
    dataset = build_dataset("val", make_args(shapes))
    images, targets = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate_fn)))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 3
    assert len({image.shape for image in images}) > 1
    assert [t["image_id"].item() for t in targets] == [1, 2, 3]


# --- flags and class count -----------------------------------------------------------------------

def coco_layout(root, paths, extra_category):
    """A COCO 2017 folder layout over the synthetic files, with one more (unused) category id."""
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        data = json.loads(paths[f"{split}_json"].read_text())
        data["categories"].append({"id": extra_category, "name": "extra"})
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
        shutil.copytree(paths[f"{split}_images"], root / f"{split}2017")
    return root


def test_num_classes_resolution(shapes, tmp_path):
    assert resolve_num_classes(make_args(shapes)) == 6
    assert resolve_num_classes(make_args(shapes, ["train"], num_classes=10)) == 10
    root = coco_layout(tmp_path / "coco", shapes, extra_category=90)
    assert resolve_num_classes(make_args(coco_path=str(root))) == 91
    # explicit flags win over --coco_path
    assert resolve_num_classes(make_args(shapes, ["train"], coco_path=str(root))) == 6
    assert build_dataset("train", make_args(coco_path=str(root))).ids == [1, 2, 3, 4, 5, 6]
    # --eval without training annotations: the validation file decides
    val = json.loads(shapes["val_json"].read_text())
    val["categories"].append({"id": 12, "name": "extra"})
    (tmp_path / "val.json").write_text(json.dumps(val))
    args = make_args(eval=True, val_json=str(tmp_path / "val.json"), val_images=str(shapes["val_images"]))
    assert resolve_num_classes(args) == 13
    assert_input_error(lambda: resolve_num_classes(make_args(val_json=str(tmp_path / "val.json"))), "--coco_path")


# --- input errors --------------------------------------------------------------------------------

def test_missing_data_flags_and_paths(shapes, tmp_path):
    assert_input_error(lambda: build_dataset("train", make_args()), "--coco_path", "--train_json")
    assert_input_error(lambda: resolve_num_classes(make_args()), "--coco_path")
    missing = tmp_path / "nope.json"
    args = make_args(shapes, ["train"], train_json=str(missing))
    assert_input_error(lambda: build_dataset("train", args), "--train_json", missing)
    args = make_args(shapes, ["train"], train_images=str(tmp_path / "no_dir"))
    assert_input_error(lambda: build_dataset("train", args), "--train_images", tmp_path / "no_dir")
    args = make_args(train_json=str(shapes["train_json"]))
    assert_input_error(lambda: build_dataset("train", args), "--train_images")
    assert_input_error(lambda: build_dataset("val", make_args(coco_path=str(tmp_path))), "--coco_path",
                       tmp_path / "annotations" / "instances_val2017.json")


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps([1, 2]),
    json.dumps({"images": [], "categories": []}),
    json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "area": 4.0}]}),
    json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "area": 4.0, "bbox": [1, 2]}]}),
])
def test_not_coco_json_names_the_file(shapes, tmp_path, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    args = make_args(shapes, ["train"], train_json=str(bad), num_classes=6)
    assert_input_error(lambda: build_dataset("train", args), bad)


def test_corrupt_image_names_the_file(shapes, tmp_path):
    image_dir = tmp_path / "images"
    shutil.copytree(shapes["train_images"], image_dir)
    garbage, truncated = image_dir / "000001.png", image_dir / "000002.png"
    garbage.write_bytes(b"not an image at all")
    truncated.write_bytes(truncated.read_bytes()[:300])
    dataset = build_dataset("train", make_args(shapes, ["train"], train_images=str(image_dir)))
    dataset[0]
    assert_input_error(lambda: dataset[1], garbage)
    assert_input_error(lambda: dataset[2], truncated)


def test_category_ids_outside_the_class_head(shapes, tmp_path):
    args = make_args(shapes, ["train"], num_classes=3)
    assert_input_error(lambda: build_dataset("train", args),
                       shapes["train_json"], "category id 5", "--num_classes 6")
    ann_file, image_dir = write_coco(tmp_path, [("a.png", 32, 32)],
                                     [{"image_id": 1, "bbox": [1, 1, 5, 5], "category_id": -1}],
                                     categories=[{"id": -1, "name": "negative"}])
    args = make_args(train_json=str(ann_file), train_images=str(image_dir), num_classes=2)
    assert_input_error(lambda: build_dataset("train", args), ann_file, "-1", "--num_classes")


def test_bad_train_sizes_name_the_flag(shapes):
    for sizes in ("64,abc", "", "0,64"):
        args = make_args(shapes, ["train"], train_sizes=sizes)
        assert_input_error(lambda args=args: build_dataset("train", args), "--train_sizes")


@pytest.mark.parametrize(("section", "noun", "index"), [("images", "image", 2), ("annotations", "annotation", 1),
                                                        ("categories", "category", 0)])
def test_duplicated_ids_name_the_file_and_the_ids(shapes, tmp_path, section, noun, index):
    data = json.loads(shapes["train_json"].read_text())
    duplicated = data[section][index]["id"]
    data[section][index + 1]["id"] = duplicated
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    args = make_args(shapes, ["train"], train_json=str(bad), num_classes=6)
    assert_input_error(lambda: build_dataset("train", args), bad,
                       f"duplicated {noun} ids {duplicated} ({section}[{index}], {section}[{index + 1}]);")


def _strip(data: dict, *keys: str) -> dict:
    return {**data, "annotations": [{k: v for k, v in a.items() if k not in keys} for a in data["annotations"]]}


def test_annotations_without_area_or_iscrowd_are_filled_in_said_and_evaluated_so(shapes, tmp_path, caplog):
    data = json.loads(shapes["val_json"].read_text())
    boxed = {**data, "annotations": [{**a, "area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0}
                                     for a in data["annotations"]]}
    count = len(data["annotations"])
    (tmp_path / "boxed.json").write_text(json.dumps(boxed))
    (tmp_path / "bare.json").write_text(json.dumps(_strip(data, "area", "iscrowd")))
    (tmp_path / "no_area.json").write_text(json.dumps(_strip(boxed, "area")))
    datasets = {}
    for name in ("boxed", "bare", "no_area"):
        with caplog.at_level("INFO"):
            caplog.clear()
            datasets[name] = build_dataset("val", make_args(shapes, ["val"], val_json=str(tmp_path / f"{name}.json"),
                                                            num_classes=6))
        (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("val data ")]
        datasets[name].line = line
    assert "lacks" not in datasets["boxed"].line
    assert datasets["bare"].line.endswith(f"; the file lacks area in {count} annotations (given the box's area), "
                                          f"iscrowd in {count} annotations (given iscrowd 0)")
    assert datasets["no_area"].line.endswith(f"; the file lacks area in {count} annotations (given the box's area)")
    # Detections: the true boxes shifted by a few pixels, so that AP depends on each box's size.
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1 - 0.01 * i,
                   "bbox": [a["bbox"][0] + 3, a["bbox"][1] + 2, *a["bbox"][2:]]}
                  for i, a in enumerate(data["annotations"])]
    for backend in coco_eval.BACKENDS:
        reference = coco_eval.coco_box_stats(datasets["boxed"].coco, detections, backend)
        assert 0 < reference["AP"] < 1
        for name in ("bare", "no_area"):
            assert coco_eval.coco_box_stats(datasets[name].coco, detections, backend) == reference, (backend, name)

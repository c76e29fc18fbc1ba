"""scripts/convert_dataset.py: YOLO and Pascal VOC folders written here, converted to COCO JSON and read back."""
import json
import sys
from pathlib import Path

import hotcoco
import pytest
from PIL import Image

from datasets.coco import load_coco
from deta.images import follows_exif, header

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import convert_dataset

NAMES = ["cat", "dog", "bird"]


def _image(path: Path, width: int, height: int, orientation: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.new("RGB", (width, height), (90, 120, 150)).save(path, exif=exif)


def _convert(*argv: str | Path, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        convert_dataset.main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


# Pixel boxes (x, y, w, h) of each image in the frame a viewer shows; b.jpg is stored sideways (EXIF 6).
YOLO_IMAGES = {
    "a.png": ((97, 61), 1, [(1, (3.25, 7.5, 40.125, 20.0)), (0, (50.0, 0.0, 47.0, 61.0))]),
    "sub/b.jpg": ((45, 80), 6, [(2, (10.5, 12.25, 20.0, 30.5))]),  # displayed 45 x 80, stored 80 x 45
    "c.png": ((64, 64), 1, []),  # no label file: kept, without boxes
}


def _write_yolo(root: Path, names_file: str = "data.yaml") -> None:
    for name, ((width, height), orientation, boxes) in YOLO_IMAGES.items():
        stored = (height, width) if orientation == 6 else (width, height)
        _image(root / "images" / name, *stored, orientation=orientation)
        if boxes:
            label = (root / "labels" / name).with_suffix(".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("".join(f"{cls} {(x + w / 2) / width!r} {(y + h / 2) / height!r} {w / width!r} "
                                     f"{h / height!r}\n" for cls, (x, y, w, h) in boxes))
    if names_file == "data.yaml":
        (root / "data.yaml").write_text("names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(NAMES)))
    else:
        (root / "classes.txt").write_text("\n".join(NAMES) + "\n")


@pytest.mark.parametrize("names_file", ["data.yaml", "classes.txt"])
def test_yolo_round_trip(names_file: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_yolo(tmp_path / "yolo", names_file)
    code, out, err = _convert("yolo", tmp_path / "yolo", "--out", tmp_path / "train.json", capsys=capsys)
    assert code == 0, err
    assert out.strip().endswith(f"train with --train_json {tmp_path / 'train.json'} --train_images "
                                f"{tmp_path / 'yolo' / 'images'}")
    assert "3 images (1 without labels), 3 boxes, 3 classes" in out
    coco = load_coco(tmp_path / "train.json")  # what main.py reads
    assert [(c["id"], c["name"]) for c in coco.dataset["categories"]] == [(1, "cat"), (2, "dog"), (3, "bird")]
    by_name = {image["file_name"]: image for image in coco.dataset["images"]}
    assert sorted(by_name) == sorted(YOLO_IMAGES)
    for name, ((width, height), _, boxes) in YOLO_IMAGES.items():
        image = by_name[name]
        assert (image["width"], image["height"]) == (width, height)
        converted = [(a["category_id"] - 1, a["bbox"]) for a in coco.imgToAnns[image["id"]]]
        assert len(converted) == len(boxes)
        for (cls, bbox), (expected_cls, expected) in zip(converted, boxes, strict=True):
            assert cls == expected_cls and bbox == pytest.approx(expected, abs=1e-3)
    # the loader turns the sideways photo, whose labels follow its displayed frame
    size, orientation = header(tmp_path / "yolo" / "images" / "sub" / "b.jpg")
    assert follows_exif(size, orientation, (45, 80)) is True


def test_yolo_data_yaml_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "yolo"
    _image(root / "images" / "val" / "v.png", 50, 40)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "val" / "v.txt").write_text("1 0.5 0.5 0.2 0.5\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [cat, dog]\n")
    code, out, err = _convert("yolo", root, "--split", "val", "--out", tmp_path / "val.json", capsys=capsys)
    assert code == 0, err
    assert f"--val_json {tmp_path / 'val.json'} --val_images {root / 'images' / 'val'}" in out
    coco = json.loads((tmp_path / "val.json").read_text())
    assert coco["annotations"][0]["bbox"] == pytest.approx([20, 10, 10, 20]) and coco["annotations"][0][
        "category_id"] == 2


@pytest.mark.parametrize(("line", "problem"), [
    ("0 0.5 0.5 0.2", "a.txt:2: 4 numbers, expected 5 (class cx cy w h)"),
    ("3 0.5 0.5 0.2 0.2", "a.txt:2: class index 3 out of range: 3 classes (0..2)"),
])
def test_a_malformed_yolo_line_is_named_and_refused_or_skipped(line: str, problem: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    _write_yolo(tmp_path / "yolo")
    label = tmp_path / "yolo" / "labels" / "a.txt"
    first, second = label.read_text().splitlines()
    label.write_text(f"{first}\n{line}\n{second}\n")
    out_file = tmp_path / "train.json"
    code, _, err = _convert("yolo", tmp_path / "yolo", "--out", out_file, capsys=capsys)
    assert code == 2 and not out_file.exists()
    assert err == (f"error: 1 malformed label line(s) or file(s), the first: {label.parent}/{problem}; fix them, or "
                   "pass --skip_malformed to convert without them\n")
    code, out, err = _convert("yolo", tmp_path / "yolo", "--out", out_file, "--skip_malformed", capsys=capsys)
    assert code == 0 and err == f"skipped: {label.parent}/{problem}\n"
    assert "3 boxes" in out and "1 malformed skipped" in out  # the good lines around it are kept


VOC_XML = """<annotation>
  <filename>{name}</filename>{size}
  <object><name>dog</name><difficult>0</difficult>
    <bndbox><xmin>11</xmin><ymin>6</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object>
  <object><name>cat</name><difficult>1</difficult>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>{width}</xmax><ymax>{height}</ymax></bndbox></object>
</annotation>
"""


def _write_voc(root: Path, with_size: bool = True) -> None:
    (root / "Annotations").mkdir(parents=True)
    for name, (width, height) in {"p.jpg": (60, 45), "q.jpg": (48, 64)}.items():
        _image(root / "JPEGImages" / name, width, height)
        size = f"\n  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>" if with_size \
            else ""
        (root / "Annotations" / f"{Path(name).stem}.xml").write_text(
            VOC_XML.format(name=name, size=size, width=width, height=height))
    (root / "labels.txt").write_text("dog\ncat\n")


@pytest.mark.parametrize(("difficult", "crowds"), [("crowd", [0, 1]), ("keep", [0, 0]), ("drop", [0])])
def test_voc_round_trip(difficult: str, crowds: list[int], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_voc(tmp_path / "voc")
    out_file = tmp_path / "voc.json"
    code, _, err = _convert("voc", tmp_path / "voc", "--out", out_file, "--difficult", difficult, capsys=capsys)
    assert code == 0, err
    coco = load_coco(out_file)
    assert [(c["id"], c["name"]) for c in coco.dataset["categories"]] == [(1, "dog"), (2, "cat")]  # labels.txt
    p, q = coco.dataset["images"]
    assert (p["file_name"], p["width"], p["height"]) == ("p.jpg", 60, 45) and (q["width"], q["height"]) == (48, 64)
    annotations = coco.imgToAnns[p["id"]]
    assert [a["iscrowd"] for a in annotations] == crowds
    assert annotations[0]["bbox"] == [10, 5, 30, 25] and annotations[0]["category_id"] == 1
    if difficult != "drop":
        assert annotations[1]["bbox"] == [0, 0, 60, 45]  # the whole image: 1-based inclusive pixels
    # hotcoco (the pixel convention of Detectron2) reads the same boxes
    reference = hotcoco.COCO.from_voc(str(tmp_path / "voc")).dataset["annotations"]
    assert [a["bbox"] for a in reference if difficult != "drop" or not a["iscrowd"]] == \
        [a["bbox"] for a in coco.dataset["annotations"]]


def test_voc_without_size_takes_the_image_files_sizes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_voc(tmp_path / "voc", with_size=False)
    code, _, err = _convert("voc", tmp_path / "voc", "--out", tmp_path / "voc.json", capsys=capsys)
    assert code == 0, err
    images = json.loads((tmp_path / "voc.json").read_text())["images"]
    assert [(i["width"], i["height"]) for i in images] == [(60, 45), (48, 64)]


def test_a_bad_voc_file_is_named_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_voc(tmp_path / "voc")
    xml = tmp_path / "voc" / "Annotations" / "q.xml"
    xml.write_text(xml.read_text().replace("<xmax>40</xmax>", "<xmax>4O</xmax>"))
    code, _, err = _convert("voc", tmp_path / "voc", "--out", tmp_path / "voc.json", capsys=capsys)
    assert code == 2 and f"the first: {xml}:4: object without numeric <bndbox>" in err
    code, out, err = _convert("voc", tmp_path / "voc", "--out", tmp_path / "voc.json", "--skip_malformed",
                              capsys=capsys)
    assert code == 0 and err.startswith(f"skipped: {xml}:4:") and "1 images (0 without labels)" in out


@pytest.mark.parametrize(("fmt", "expected"), [
    ("yolo", "not a YOLO folder: expected images/ and labels/ (NAME.txt per image NAME.EXT) with data.yaml or "
             "classes.txt"),
    ("voc", "not a Pascal VOC folder: expected Annotations/*.xml and JPEGImages/"),
])
def test_a_folder_of_neither_format_says_the_layout_expected(fmt: str, expected: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    _image(tmp_path / "photos" / "x.jpg", 32, 32)
    code, _, err = _convert(fmt, tmp_path / "photos", "--out", tmp_path / "x.json", capsys=capsys)
    assert code == 2 and err.startswith(f"error: {tmp_path / 'photos'}: {expected}") and err.count("\n") == 1

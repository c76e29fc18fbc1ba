"""scripts/predict.py: drawings and COCO-format detections of a small model's checkpoint."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from test_main import fill_the_disk_at

from datasets.synthetic import CATEGORIES, generate
from deta.coco_categories import COCO_CATEGORY_NAMES
from deta.inference import class_names
from scripts import predict

NAMES = {category_id: name for category_id, name, _ in CATEGORIES}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two generated images and one file that is not an image."""
    paths = generate(tmp_path_factory.mktemp("shapes"), seed=2, num_train=0, num_val=2, image_size=(64, 96),
                     object_size=(24, 48), max_objects=2)
    folder = paths["val_images"]
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Path) -> Path:
    """A randomly initialised small model saved as main.py saves it: arguments and class names included."""
    return tiny_checkpoint


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_drawings_and_coco_results(images: Path, checkpoint: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    # A random model scores about 0.01 (the class prior), so threshold 0 keeps all 100 detections per image.
    predict.main(["--resume", str(checkpoint), str(images), "--out", str(tmp_path), "--score_threshold", "0",
                  "--", "--device", "cpu"])
    stderr = capsys.readouterr().err
    assert "broken.png: cannot read image" in stderr

    entries = json.loads((tmp_path / "images.json").read_text())
    assert [Path(e["file_name"]).name for e in entries] == ["000000.png", "000001.png"]
    for entry in entries:
        drawing = _pixels(tmp_path / Path(entry["file_name"]).with_suffix(".png").name)
        original = _pixels(Path(entry["file_name"]))
        assert drawing.shape == original.shape == (entry["height"], entry["width"], 3)
        assert (drawing != original).any()

    detections = json.loads((tmp_path / "detections.json").read_text())
    assert len(detections) == 2 * 100
    assert {d["category_id"] for d in detections} <= set(range(6))
    gt = COCO()
    gt.dataset = {"images": entries, "annotations": [],
                  "categories": [{"id": i, "name": str(i)} for i in range(6)]}
    gt.createIndex()
    results = gt.loadRes(str(tmp_path / "detections.json"))  # asserts every image id is one of images.json
    assert len(results.anns) == len(detections)


def test_threshold_above_every_score_leaves_images_unchanged(images: Path, checkpoint: Path,
                                                             tmp_path: Path) -> None:
    predict.main(["--resume", str(checkpoint), str(images / "000000.png"), "--out", str(tmp_path),
                  "--score_threshold", "1.01", "--", "--device", "cpu"])
    assert json.loads((tmp_path / "detections.json").read_text()) == []
    assert np.array_equal(_pixels(tmp_path / "000000.png"), _pixels(images / "000000.png"))


def test_class_names_come_from_the_flag_the_checkpoint_or_coco(images: Path) -> None:
    names_json = str(images.parent / "annotations" / "val.json")
    assert class_names({}, names_json, 6) == NAMES
    assert class_names({"category_names": {1: "a"}}, None, 6) == {1: "a"}
    assert class_names({}, None, 91) == COCO_CATEGORY_NAMES
    with pytest.warns(UserWarning, match="names none of its 6 classes"):
        assert class_names({}, None, 6) == {}


@pytest.mark.parametrize(("flags", "message"), [
    (["--names_json", "missing.json"], "error: --names_json: file missing.json does not exist"),
    (["nowhere.png"], "error: nowhere.png: no such file or folder"),
])
def test_bad_input_is_one_line_and_status_2(images: Path, checkpoint: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture, flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--resume", str(checkpoint), str(images), "--out", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith(message)


@pytest.mark.parametrize("inside", [False, True])
def test_out_naming_a_file_is_one_line_before_the_model_loads(images: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture, inside: bool) -> None:
    file = tmp_path / "result.png"
    file.write_bytes(b"an earlier drawing")
    out = file / "sub" if inside else file
    with pytest.raises(SystemExit) as exit_info:  # the checkpoint does not exist: it is never read
        predict.main(["--resume", str(tmp_path / "missing.pth"), str(images), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {out}: {file} is a file, and --out is the folder the drawings and JSON files go " \
                  "to; pass a folder (it is created if missing)\n"
    assert file.read_bytes() == b"an earlier drawing"


def test_a_checkpoint_without_class_names_is_one_warning_line(images: Path, checkpoint: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    saved = torch.load(checkpoint, weights_only=True)
    del saved["category_names"]
    unnamed = tmp_path / "unnamed.pth"
    torch.save(saved, unnamed)
    predict.main(["--resume", str(unnamed), str(images / "000000.png"), "--out", str(tmp_path / "out")])
    stderr = capsys.readouterr().err
    (line,) = [line for line in stderr.splitlines() if "names none" in line]
    assert line.startswith("warning: the checkpoint names none of its 6 classes; names are the category ids")
    assert "UserWarning" not in stderr and "from_checkpoint(" not in stderr  # no Python warning display


@pytest.mark.parametrize("name", ["000001.png", "detections.json"])
def test_a_full_disk_is_one_line_and_leaves_whole_files(images: Path, checkpoint: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                         name: str) -> None:
    (tmp_path / name).write_bytes(b"an earlier output")
    fill_the_disk_at(name, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--resume", str(checkpoint), str(images), "--out", str(tmp_path)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"error: no space left to write {name} in {tmp_path} (12.1 KiB free there); an earlier {name} "
                   "there is unchanged; free some space there and run it again")
    assert (tmp_path / name).read_bytes() == b"an earlier output"
    assert _pixels(tmp_path / "000000.png").shape == _pixels(images / "000000.png").shape  # whole, written before
    assert not list(tmp_path.glob(".*.tmp"))

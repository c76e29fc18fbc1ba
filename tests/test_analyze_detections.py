"""scripts/analyze_detections.py: PR curves, confusion matrix and TIDE PNGs of generated detections whose
confusions are known, so the confusion matrix's cells are known."""
import json
from pathlib import Path

import pytest

from scripts import analyze_detections

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """4 images (one without boxes), classes cat (id 1) and dog (id 3). Matched at IoU 1: a cat found as a cat,
    a dog found as a cat, a dog found as a dog; a cat found only by a detection scoring 0.3; a dog detection in
    the empty image; a crowd box nobody counts."""
    folder = tmp_path_factory.mktemp("analyze")
    boxes = {1: [10, 10, 40, 30], 2: [60, 40, 30, 30], 3: [5, 50, 40, 40], 4: [70, 5, 25, 25]}
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": boxes[1]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": boxes[2]},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": boxes[3]},
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": boxes[4]},
        {"id": 5, "image_id": 4, "category_id": 1, "bbox": [0, 0, 50, 50], "iscrowd": 1},
    ]
    for annotation in annotations:
        annotation.update(area=annotation["bbox"][2] * annotation["bbox"][3], iscrowd=annotation.get("iscrowd", 0))
    data = {"images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in range(1, 5)],
            "annotations": annotations, "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]}
    detections = [
        {"image_id": 1, "category_id": 1, "bbox": boxes[1], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": boxes[2], "score": 0.8},
        {"image_id": 2, "category_id": 3, "bbox": boxes[3], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": boxes[4], "score": 0.3},
        {"image_id": 3, "category_id": 3, "bbox": [20, 20, 30, 30], "score": 0.7},
    ]
    (folder / "val.json").write_text(json.dumps(data))
    (folder / "run").mkdir()
    (folder / "run" / "coco_results.json").write_text(json.dumps(detections))
    return folder / "run", folder / "val.json"


def test_plots_and_the_known_confusion_cells(run: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    results, annotations = run
    analyze_detections.main([str(results), str(annotations), "--out", str(tmp_path)])
    for name in ("pr_curves.png", "pr_curves/cat.png", "pr_curves/dog.png", "confusion_matrix.png", "tide.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC), name
    assert capsys.readouterr().out == f"wrote 6 files to {tmp_path}\n"
    matrix = json.loads((tmp_path / "confusion_matrix.json").read_text())
    assert matrix["classes"] == ["cat", "dog", "background"] and matrix["category_ids"] == [1, 3, None]
    assert matrix["counts"] == [[1, 0, 1],   # cat: found as a cat; missed (its detection scores below 0.5)
                                [1, 1, 0],   # dog: found as a cat, found as a dog
                                [0, 1, 0]]   # a dog detection where there is nothing


def test_the_thresholds_decide_the_cells(run: tuple[Path, Path], tmp_path: Path) -> None:
    results, annotations = run
    analyze_detections.main([str(results / "coco_results.json"), str(annotations), "--out", str(tmp_path),
                             "--score_threshold", "0.2"])
    matrix = json.loads((tmp_path / "confusion_matrix.json").read_text())
    assert matrix["counts"] == [[2, 0, 0], [1, 1, 0], [0, 1, 0]]  # the 0.3 detection now finds its cat


@pytest.mark.parametrize(("flags", "message"), [
    (["{missing}", "{annotations}"], "error: {missing}: no such file"),
    (["{annotations}", "{annotations}"], "error: {annotations}: not a COCO results file"),
    (["{results}", "{annotations}", "--iou_threshold", "0.3"], "error: --iou_threshold 0.3: must be one of COCO's"),
])
def test_bad_input_is_one_line(flags: list[str], message: str, run: tuple[Path, Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    results, annotations = run
    names = {"missing": tmp_path / "nowhere", "annotations": annotations, "results": results}
    with pytest.raises(SystemExit) as exit_info:
        analyze_detections.main([flag.format(**names) for flag in flags] + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(message.format(**names)) and err.count("\n") == 1, err

"""COCO evaluation: hotcoco gives pycocotools' 12 statistics and per-class AP; pycocotools stands in without it."""
import contextlib
import io
import logging

import pytest
from pycocotools.coco import COCO

from datasets.synthetic_detections import detection_set
from scripts import benchmark_coco_eval
from training import coco_eval


@pytest.fixture(scope="module")
def ground_truth_and_detections() -> tuple[COCO, list[dict]]:
    """300 images: empty ones, crowd boxes, COCO's sparse category ids, 100 detections per image."""
    data, detections = detection_set(num_images=300, seed=3)
    assert {a["iscrowd"] for a in data["annotations"]} == {0, 1}
    assert len({a["image_id"] for a in data["annotations"]}) < 300
    assert max(c["id"] for c in data["categories"]) == 90 and len(data["categories"]) == 80
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, detections


def test_hotcoco_gives_pycocotools_statistics_and_per_class_ap(ground_truth_and_detections):
    coco, detections = ground_truth_and_detections
    reference = coco_eval.coco_box_stats(coco, detections, "pycocotools")
    hot = coco_eval.coco_box_stats(coco, detections, "hotcoco")
    assert 0.05 < reference["AP"] < 0.9 and reference["APs"] > 0 and reference["APl"] > 0
    # per-class AP and AP50 of every class with ground truth, from pycocotools' precision array
    with_boxes = {coco.cats[a["category_id"]]["name"] for a in coco.dataset["annotations"]}
    assert {key for key in reference if "/" in key} == {f"{m}/{name}" for m in ("AP", "AP50") for name in with_boxes}
    assert hot.keys() == reference.keys()
    for name, value in reference.items():
        assert hot[name] == pytest.approx(value, abs=1e-12), name
    # hotcoco's own per-class AP (its report) is pycocotools' too
    report = coco_eval.hotcoco_eval(coco, detections)
    report.summarize()
    for name, values in report.report()["per_class"].items():
        if name in with_boxes:
            assert values["AP"] == pytest.approx(reference[f"AP/{name}"], abs=1e-12), name
    # evaluating again on the same data set gives the same (neither backend's edits of its input leak)
    assert coco_eval.coco_box_stats(coco, detections, "hotcoco") == hot
    assert coco_eval.coco_box_stats(coco, detections[:-3000], "pycocotools") == \
        pytest.approx(coco_eval.coco_box_stats(coco, detections[:-3000], "hotcoco"), abs=1e-12)


def test_per_class_table_has_a_row_per_class(ground_truth_and_detections, caplog):
    coco, detections = ground_truth_and_detections
    with caplog.at_level(logging.INFO, logger=coco_eval.__name__):
        stats = coco_eval.coco_box_stats(coco, detections, "hotcoco")
    table = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("per class:")).splitlines()
    assert table[1].split() == ["class", "gt", "boxes", "AP", "AP50"] and len(table) == 2 + len(coco.cats)
    row = next(line for line in table if line.startswith("person "))
    gt_boxes = sum(a["category_id"] == 1 and not a["iscrowd"] for a in coco.dataset["annotations"])
    assert row.split() == ["person", str(gt_boxes), f"{100 * stats['AP/person']:.1f}",
                           f"{100 * stats['AP50/person']:.1f}"]


def test_detections_of_undeclared_categories_count_alike(ground_truth_and_detections, capfd):
    """Class-head indices no category has (0, 12): pycocotools passes over them, hotcoco too, without a word."""
    coco, detections = ground_truth_and_detections
    strays = [{**d, "category_id": 0 if i % 2 else 12} for i, d in enumerate(detections[:400])]
    mixed = strays + detections[400:2000]
    reference = coco_eval.coco_box_stats(coco, mixed, "pycocotools")
    capfd.readouterr()
    assert coco_eval.coco_box_stats(coco, mixed, "hotcoco") == pytest.approx(reference, abs=1e-12)
    assert capfd.readouterr().err == ""


def test_without_detections_both_give_zeros(ground_truth_and_detections):
    coco, _ = ground_truth_and_detections
    assert coco_eval.coco_box_stats(coco, [], "hotcoco") == coco_eval.coco_box_stats(coco, [], "pycocotools")


def test_pycocotools_stands_in_with_one_warning(ground_truth_and_detections, monkeypatch, caplog):
    coco, detections = ground_truth_and_detections
    monkeypatch.setattr(coco_eval, "hotcoco", None)
    coco_eval.default_backend.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=coco_eval.__name__):
            first = coco_eval.coco_box_stats(coco, detections[:2000])
            coco_eval.coco_box_stats(coco, detections[:2000])
    finally:
        coco_eval.default_backend.cache_clear()
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "hotcoco is not installed; evaluating with pycocotools" in warnings[0]
    assert first == coco_eval.coco_box_stats(coco, detections[:2000], "pycocotools")


def test_benchmark_times_both_backends_on_the_same_data(capsys):
    ratio = benchmark_coco_eval.run(num_images=20, detections_per_image=10, repeats=1)
    out = capsys.readouterr().out
    assert out.startswith("20 images, ") and "pycocotools: " in out and "hotcoco: " in out
    assert f"hotcoco / pycocotools time: {ratio:.3f}" in out and out.rstrip().endswith("statistics equal")

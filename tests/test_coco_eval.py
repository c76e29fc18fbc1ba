"""COCO evaluation: faster-coco-eval gives pycocotools' 12 statistics; pycocotools stands in when it is missing."""
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


def test_faster_coco_eval_gives_pycocotools_statistics(ground_truth_and_detections):
    coco, detections = ground_truth_and_detections
    reference = coco_eval.coco_box_stats(coco, detections, "pycocotools")
    faster = coco_eval.coco_box_stats(coco, detections, "faster_coco_eval")
    assert 0.05 < reference["AP"] < 0.9 and reference["APs"] > 0 and reference["APl"] > 0
    assert faster.keys() == reference.keys()
    for name, value in reference.items():
        assert faster[name] == pytest.approx(value, abs=1e-12), name
    # evaluating again on the same data set gives the same (neither backend's edits of its input leak)
    assert coco_eval.coco_box_stats(coco, detections, "faster_coco_eval") == faster
    assert coco_eval.coco_box_stats(coco, detections[:-3000], "pycocotools") == \
        pytest.approx(coco_eval.coco_box_stats(coco, detections[:-3000], "faster_coco_eval"), abs=1e-12)


def test_without_detections_both_give_zeros(ground_truth_and_detections):
    coco, _ = ground_truth_and_detections
    assert coco_eval.coco_box_stats(coco, [], "faster_coco_eval") == coco_eval.coco_box_stats(coco, [], "pycocotools")


def test_pycocotools_stands_in_with_one_warning(ground_truth_and_detections, monkeypatch, caplog):
    coco, detections = ground_truth_and_detections
    monkeypatch.setattr(coco_eval, "faster_coco_eval", None)
    coco_eval.default_backend.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=coco_eval.__name__):
            first = coco_eval.coco_box_stats(coco, detections[:2000])
            coco_eval.coco_box_stats(coco, detections[:2000])
    finally:
        coco_eval.default_backend.cache_clear()
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "faster-coco-eval is not installed; evaluating with pycocotools" in warnings[0]
    assert first == coco_eval.coco_box_stats(coco, detections[:2000], "pycocotools")


def test_benchmark_times_both_backends_on_the_same_data(capsys):
    ratio = benchmark_coco_eval.run(num_images=20, detections_per_image=10, repeats=1)
    out = capsys.readouterr().out
    assert out.startswith("20 images, ") and "pycocotools: " in out and "faster_coco_eval: " in out
    assert f"faster_coco_eval / pycocotools time: {ratio:.3f}" in out and out.rstrip().endswith("statistics equal")

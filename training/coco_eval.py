"""COCO box AP over the detections of every process, with per-class results: hotcoco (Rust) or pycocotools.

hotcoco computes the same 12 statistics and precision array as pycocotools' COCOeval, about fifty times
faster (tests/test_coco_eval.py checks the equality, per class too; `scripts/benchmark_coco_eval.py` times
both). Annotations are still loaded and indexed by pycocotools' COCO (datasets.coco), whose dictionary
hotcoco reads. Per-class AP and AP50 are pycocotools' (and detectron2's): the mean of the precision
array's slice of the class, at area 'all' and 100 detections per image.
"""
import contextlib
import functools
import io
import logging
import math
from collections import Counter
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from training.distributed import all_gather_object

try:
    import hotcoco
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    hotcoco = None

log = logging.getLogger(__name__)

BACKENDS = ("hotcoco", "pycocotools")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
PER_CLASS = ("AP", "AP50")  # per-class metrics, as "AP/<class name>" and "AP50/<class name>" in the results


def coco_detections(image_id: int, result: dict[str, Tensor]) -> list[dict]:
    """One image's post-processed result (absolute xyxy boxes) in the COCO results format."""
    boxes = result["boxes"].float().cpu()
    boxes[:, 2:] -= boxes[:, :2]
    return [{"image_id": image_id, "category_id": int(label), "bbox": box, "score": score}
            for label, box, score in zip(result["labels"].tolist(), boxes.tolist(),
                                         result["scores"].float().tolist(), strict=True)]


def gather_detections(local: dict[int, list[dict]]) -> list[dict]:
    """Detections of all processes, sorted by image id, each image once.

    A DistributedSampler repeats images to give every process as many; keying by image id drops the repeats.
    """
    merged: dict[int, list[dict]] = {}
    for part in all_gather_object(local):
        merged.update(part)
    return [detection for image_id in sorted(merged) for detection in merged[image_id]]


@functools.cache
def default_backend() -> str:
    """hotcoco when it imports, else pycocotools (saying so once)."""
    if hotcoco is None:
        log.warning("warning: hotcoco is not installed; evaluating with pycocotools, about 50x slower "
                    "(pip install -r requirements.txt)")
        return "pycocotools"
    return "hotcoco"


def coco_box_stats(coco_gt: COCO, detections: list[dict], backend: str | None = None) -> dict[str, float]:
    """The 12 COCO box metrics of `detections` over every image of `coco_gt`, then "AP/<class>" and "AP50/<class>"
    for each class with ground truth; logs the AP table and the per-class table.

    `backend`: one of BACKENDS, default `default_backend()`.
    """
    evaluate = _hotcoco if (backend or default_backend()) == "hotcoco" else _pycocotools
    stats, table, precision, category_ids = evaluate(coco_gt, detections)
    per_class = per_class_ap(precision, len(category_ids))
    names = class_keys(coco_gt, category_ids)
    log.info("COCO box metrics:\n" + table.rstrip())
    log.info("per class:\n" + per_class_table(coco_gt, category_ids, per_class))
    results = dict(zip(STAT_NAMES, stats, strict=True))
    for metric, values in zip(PER_CLASS, per_class, strict=True):
        results.update({f"{metric}/{names[c]}": value for c, value in zip(category_ids, values, strict=True)
                        if not math.isnan(value)})
    return results


def per_class_ap(precision: np.ndarray | None, num_classes: int) -> tuple[list[float], list[float]]:
    """(AP, AP50) of each class from COCOeval's precision array (IoU × recall × class × area × max dets, -1
    where undefined): the mean over IoUs 0.5:0.95 and recalls, and at IoU 0.5, at area 'all' and the most
    detections; NaN for a class without ground truth."""
    def mean(values: np.ndarray) -> float:
        valid = values[values > -1]
        return float(valid.mean()) if valid.size else math.nan

    if precision is None or precision.size == 0:  # nothing was accumulated: no detections
        return [math.nan] * num_classes, [math.nan] * num_classes
    ap = [mean(precision[:, :, k, 0, -1]) for k in range(num_classes)]
    ap50 = [mean(precision[0, :, k, 0, -1]) for k in range(num_classes)]
    return ap, ap50


def class_keys(coco_gt: COCO, category_ids: list[int]) -> dict[int, str]:
    """The name of each category as a result key; with the id where two categories share a name."""
    names = {c: str(coco_gt.cats[c].get("name", c)) for c in category_ids}
    repeated = {name for name, count in Counter(names.values()).items() if count > 1}
    return {c: f"{name} ({c})" if name in repeated else name for c, name in names.items()}


def per_class_table(coco_gt: COCO, category_ids: list[int], per_class: tuple[list[float], list[float]]) -> str:
    """One row per class, as detectron2 logs it: name, ground-truth boxes (crowd boxes aside), AP and AP50 in %."""
    counts = Counter(a["category_id"] for a in coco_gt.dataset.get("annotations", []) if not a.get("iscrowd", 0))
    names = class_keys(coco_gt, category_ids)
    width = max([len("class"), *(len(name) for name in names.values())])
    lines = [f"{'class':<{width}}  {'gt boxes':>8}  {'AP':>5}  {'AP50':>5}"]
    for category_id, ap, ap50 in zip(category_ids, *per_class, strict=True):
        shown = [f"{100 * value:5.1f}" if not math.isnan(value) else f"{'-':>5}" for value in (ap, ap50)]
        lines.append(f"{names[category_id]:<{width}}  {counts[category_id]:>8}  {shown[0]}  {shown[1]}")
    return "\n".join(lines)


def hotcoco_eval(coco_gt: COCO, detections: list[dict]) -> Any:
    """hotcoco's COCOeval of `detections`, evaluated and accumulated, for its analyses (confusion matrix, TIDE,
    plots) too. It reads copies: the data set's own dicts stay as pycocotools left them.

    Detections of a category the annotations do not declare (a class-head index no category has, such as 0)
    are left out: COCOeval evaluates the declared categories only, so the results are the same, and hotcoco
    would print a warning about them at every evaluation."""
    dataset = coco_gt.dataset
    ground_truth = hotcoco.COCO()
    ground_truth.dataset = {**dataset, "annotations": [dict(a) for a in dataset.get("annotations", [])]}
    declared = set(coco_gt.cats)
    results = [dict(d) for d in detections if d["category_id"] in declared]
    coco_eval = hotcoco.COCOeval(ground_truth, ground_truth.load_res(results), "bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    return coco_eval


def _hotcoco(coco_gt: COCO, detections: list[dict]) -> tuple[list[float], str, Any, list[int]]:
    coco_eval = hotcoco_eval(coco_gt, detections)
    table = "\n".join(coco_eval.summary_lines())
    return ([float(value) for value in coco_eval.stats[:len(STAT_NAMES)]], table, coco_eval.eval["precision"],
            list(coco_eval.params.cat_ids))


def _pycocotools(coco_gt: COCO, detections: list[dict]) -> tuple[list[float], str, Any, list[int]]:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        # loadRes adds keys to the dicts it gets (hence copies) and rejects an empty list
        coco_dt = coco_gt.loadRes([dict(d) for d in detections]) if detections else COCO()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        coco_eval.summarize()
    return coco_eval.stats.tolist(), table.getvalue(), coco_eval.eval["precision"], list(coco_eval.params.catIds)

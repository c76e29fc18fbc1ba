"""COCO box AP over the detections of every process, with faster-coco-eval (C++) or pycocotools.

faster-coco-eval computes the same 12 statistics as pycocotools' COCOeval, about ten times faster
(tests/test_coco_eval.py checks the equality; `scripts/benchmark.py --eval_only` times both). Annotations
are still loaded and indexed by pycocotools' COCO (datasets.coco), whose dictionary faster-coco-eval reads.
"""
import contextlib
import functools
import io
import logging

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from training.distributed import all_gather_object

try:
    import faster_coco_eval
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    faster_coco_eval = None

log = logging.getLogger(__name__)

BACKENDS = ("faster_coco_eval", "pycocotools")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


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
    """faster_coco_eval when it imports, else pycocotools (saying so once)."""
    if faster_coco_eval is None:
        log.warning("warning: faster-coco-eval is not installed; evaluating with pycocotools, about 10x slower "
                    "(pip install -r requirements.txt)")
        return "pycocotools"
    return "faster_coco_eval"


def coco_box_stats(coco_gt: COCO, detections: list[dict], backend: str | None = None) -> dict[str, float]:
    """The 12 COCO box metrics of `detections` over every image of `coco_gt`; logs the AP table.

    `backend`: one of BACKENDS, default `default_backend()`.
    """
    evaluate = _faster_coco_eval if (backend or default_backend()) == "faster_coco_eval" else _pycocotools
    stats, table = evaluate(coco_gt, detections)
    log.info("COCO box metrics:\n" + table.rstrip())
    return dict(zip(STAT_NAMES, stats, strict=True))


def _pycocotools(coco_gt: COCO, detections: list[dict]) -> tuple[list[float], str]:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        # loadRes adds keys to the dicts it gets (hence copies) and rejects an empty list
        coco_dt = coco_gt.loadRes([dict(d) for d in detections]) if detections else COCO()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        coco_eval.summarize()
    return coco_eval.stats.tolist(), table.getvalue()


def _faster_coco_eval(coco_gt: COCO, detections: list[dict]) -> tuple[list[float], str]:
    # It adds keys to the annotation dicts it reads; the data set's own stay as pycocotools left them.
    dataset = coco_gt.dataset
    ground_truth = faster_coco_eval.COCO({**dataset, "annotations": [dict(a) for a in dataset["annotations"]]})
    coco_dt = ground_truth.loadRes([dict(d) for d in detections]) if detections else faster_coco_eval.COCO()
    lines: list[str] = []
    coco_eval = faster_coco_eval.COCOeval_faster(ground_truth, coco_dt, iouType="bbox", print_function=lines.append)
    coco_eval.evaluate()
    coco_eval.accumulate()
    lines.clear()  # keep only the table
    coco_eval.summarize()
    return [float(value) for value in coco_eval.stats[:len(STAT_NAMES)]], "\n".join(lines)

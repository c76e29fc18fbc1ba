"""COCO box AP with pycocotools, over the detections of every process."""
import contextlib
import io
import logging

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from training.distributed import all_gather_object

log = logging.getLogger(__name__)

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


def coco_box_stats(coco_gt: COCO, detections: list[dict]) -> dict[str, float]:
    """The 12 COCO box metrics of `detections` over every image of `coco_gt`; logs the AP table."""
    quiet = io.StringIO()  # pycocotools prints its progress
    with contextlib.redirect_stdout(quiet):
        # loadRes adds keys to the dicts it gets (hence copies) and rejects an empty list
        coco_dt = coco_gt.loadRes([dict(d) for d in detections]) if detections else COCO()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        coco_eval.summarize()
    log.info("COCO box metrics:\n" + table.getvalue().rstrip())
    return dict(zip(STAT_NAMES, coco_eval.stats.tolist(), strict=True))

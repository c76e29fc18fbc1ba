"""COCO-format ground truth and detections without images: for checking and timing COCO evaluation.

The default sizes are COCO val2017's as DETA is evaluated on it: 5000 images, about 37.7k boxes (2 % of
the images without any), and the 100 detections per image that DETA's NMS post-processing keeps.
"""
import numpy as np

from deta.coco_categories import COCO_CATEGORY_NAMES

CROWD_FRACTION = 0.01
EMPTY_IMAGE_FRACTION = 0.02  # COCO val2017 has 48 images without annotations
MATCHED_FRACTION = 0.3  # of the detections: jittered copies of a ground-truth box, the rest anywhere


def detection_set(num_images: int = 5000, boxes_per_image: float = 7.7, detections_per_image: int = 100,
                  seed: int = 0) -> tuple[dict, list[dict]]:
    """(ground truth as a COCO dict, detections in the COCO results format), the same for the same arguments.

    Ground truth: image sizes around 640x480, COCO's 80 sparse category ids, box sides from 2 to 400 px (all
    three COCO area ranges), some crowd boxes and some images without any box. Detections: a share are
    jittered copies of ground-truth boxes of the image (of its class or another), scored higher on average,
    the rest random boxes.
    """
    rng = np.random.default_rng(seed)
    category_ids = np.array(sorted(COCO_CATEGORY_NAMES))
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        width, height = int(rng.integers(480, 641)), int(rng.integers(360, 481))
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id:012d}.jpg"})
        count = 0 if rng.random() < EMPTY_IMAGE_FRACTION else int(rng.poisson(boxes_per_image))
        boxes = _random_boxes(rng, count, width, height)
        labels = rng.choice(category_ids, size=count)
        for box, label in zip(boxes, labels, strict=True):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": box.tolist(), "area": float(box[2] * box[3]),
                                "iscrowd": int(rng.random() < CROWD_FRACTION)})
        matched = int(detections_per_image * MATCHED_FRACTION) if count else 0
        picks = rng.integers(0, max(count, 1), size=matched)
        det_boxes = np.concatenate([_jittered(rng, boxes[picks]) if count else np.zeros((0, 4)),
                                    _random_boxes(rng, detections_per_image - matched, width, height)])
        same_class = rng.random(matched) < 0.8
        det_labels = np.concatenate([np.where(same_class, labels[picks] if count else 0,
                                              rng.choice(category_ids, size=matched)),
                                     rng.choice(category_ids, size=detections_per_image - matched)])
        scores = np.concatenate([rng.uniform(0.2, 1.0, size=matched), rng.uniform(0.0, 0.6,
                                                                                  size=detections_per_image - matched)])
        detections += [{"image_id": image_id, "category_id": label, "bbox": box, "score": score}
                       for box, label, score in zip(np.round(det_boxes, 2).tolist(), det_labels.tolist(),
                                                    np.round(scores, 5).tolist(), strict=True)]
    categories = [{"id": int(i), "name": COCO_CATEGORY_NAMES[int(i)]} for i in category_ids]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def _random_boxes(rng: np.random.Generator, count: int, width: int, height: int) -> np.ndarray:
    """(count, 4) COCO xywh boxes inside the image, sides log-uniform from 2 to 400 px."""
    sides = np.exp(rng.uniform(np.log(2), np.log(400), size=(count, 2)))
    sides = np.minimum(sides, [width, height])
    corners = rng.uniform(0, 1, size=(count, 2)) * ([width, height] - sides)
    return np.round(np.concatenate([corners, sides], 1), 2)


def _jittered(rng: np.random.Generator, boxes: np.ndarray) -> np.ndarray:
    """The boxes moved and resized by about a tenth of their size: IoUs with the originals from 0.3 to 1."""
    sides = boxes[:, 2:] * np.exp(rng.normal(0, 0.1, size=(len(boxes), 2)))
    corners = boxes[:, :2] + boxes[:, 2:] * rng.normal(0, 0.1, size=(len(boxes), 2))
    return np.concatenate([corners, sides], 1)

"""DETA: two-stage Deformable DETR trained with IoU assignment, with NMS at inference."""
from .build import build_model
from .coco_categories import COCO_NUM_CLASSES
from .detector import DETA
from .inference import Detector
from .optimize import optimize_for_inference

__all__ = ["COCO_NUM_CLASSES", "DETA", "Detector", "build_model", "optimize_for_inference"]

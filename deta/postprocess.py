"""Turn model outputs into per-image detections in absolute xyxy pixels."""
import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from .box_ops import box_cxcywh_to_xyxy


def absolute_xyxy(boxes: Tensor, target_sizes: Tensor) -> Tensor:
    """(B, N, 4) normalised cxcywh → absolute xyxy for images of (H, W) `target_sizes`."""
    height, width = target_sizes.unbind(1)
    scale = torch.stack([width, height, width, height], dim=1).to(boxes.dtype)
    return box_cxcywh_to_xyxy(boxes) * scale[:, None, :]


class PostProcess(nn.Module):
    """The best `num_detections` (query, class) pairs by sigmoid score, without NMS."""

    def __init__(self, num_detections: int = 100) -> None:
        super().__init__()
        self.num_detections = num_detections

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        scores, labels, boxes = self.detections(outputs["pred_logits"], outputs["pred_boxes"], target_sizes)
        return [{"scores": s, "labels": lb, "boxes": b} for s, lb, b in zip(scores, labels, boxes, strict=True)]

    def detections(self, logits: Tensor, boxes: Tensor, target_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The whole batch at once: scores (B, D), labels (B, D) and absolute xyxy boxes (B, D, 4)."""
        num_classes = logits.shape[-1]
        scores, flat_index = logits.sigmoid().flatten(1).topk(self.num_detections, dim=1)
        boxes = absolute_xyxy(boxes, target_sizes)
        boxes = torch.gather(boxes, 1, (flat_index // num_classes)[..., None].expand(-1, -1, 4))
        return scores, flat_index % num_classes, boxes


class NMSPostProcess(nn.Module):
    """DETA's inference: every (query, class) pair is a candidate; class-wise NMS; keep the best.

    At most `pre_nms_topk` pairs enter NMS, and `num_detections` survive; there is no score
    threshold, as COCO AP wants the full ranked list.
    """

    def __init__(self, num_detections: int = 100, pre_nms_topk: int = 10000, iou_threshold: float = 0.7) -> None:
        super().__init__()
        self.num_detections = num_detections
        self.pre_nms_topk = pre_nms_topk
        self.iou_threshold = iou_threshold

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        logits = outputs["pred_logits"]
        num_classes = logits.shape[-1]
        all_scores = logits.sigmoid().flatten(1)
        all_boxes = absolute_xyxy(outputs["pred_boxes"], target_sizes)
        results = []
        for scores, boxes in zip(all_scores, all_boxes, strict=True):
            if scores.numel() > self.pre_nms_topk:
                scores, pair_index = scores.topk(self.pre_nms_topk)
            else:
                pair_index = torch.arange(scores.numel(), device=scores.device)
            labels = pair_index % num_classes
            boxes = boxes[pair_index // num_classes]
            keep = batched_nms(boxes, scores, labels, self.iou_threshold)[:self.num_detections]
            results.append({"scores": scores[keep], "labels": labels[keep], "boxes": boxes[keep]})
        return results

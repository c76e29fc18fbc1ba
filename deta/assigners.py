"""IoU-based one-to-many assignment of DETA ("NMS Strikes Back", Ouyang-Zhang et al. 2022).

Stage 1 labels the encoder's anchors RPN-style, stage 2 labels the decoder's initial reference
boxes Fast R-CNN-style; both then keep at most k positives per ground-truth box. Labelling and
sampling follow detectron2's Matcher and subsample_labels, as the official DETA code does.

Random sampling: every torch.randperm call below (its order, size and device) is the one the
official code makes, so under the same seed the returned indices are the official ones exactly.
"""
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from deta.box_ops import box_cxcywh_to_xyxy, box_iou

IGNORE, NEGATIVE, POSITIVE = -1, 0, 1

Indices = list[tuple[Tensor, Tensor]]


def label_by_iou(
    iou: Tensor, thresholds: Sequence[float], labels: Sequence[int], allow_low_quality_matches: bool
) -> tuple[Tensor, Tensor]:
    """Match each prediction to its highest-IoU ground truth and label it by that IoU.

    Args:
        iou: (num_gt, num_pred) IoU matrix.
        thresholds: increasing IoU bounds; the interval [thresholds[i - 1], thresholds[i]) (open at
            -inf and +inf on the outside) gets labels[i], so len(labels) == len(thresholds) + 1.
        labels: IGNORE, NEGATIVE or POSITIVE per interval.
        allow_low_quality_matches: also make positive every prediction that has the highest IoU with
            some ground truth (ties included), so that each ground truth gets a positive. Its matched
            index stays its own best ground truth, as in detectron2.

    Returns:
        matched_gt: (num_pred,) int64 index of the best ground truth (0 when there is none).
        match_labels: (num_pred,) int8.
    """
    num_gt, num_pred = iou.shape
    if num_gt == 0:
        # Without ground truth every IoU counts as 0: the lowest interval.
        return (iou.new_zeros(num_pred, dtype=torch.int64),
                iou.new_full((num_pred,), labels[0], dtype=torch.int8))
    best_iou, matched_gt = iou.max(dim=0)
    bounds = torch.tensor(thresholds, dtype=iou.dtype, device=iou.device)
    interval = torch.bucketize(best_iou, bounds, right=True)
    match_labels = torch.tensor(labels, dtype=torch.int8, device=iou.device)[interval]
    if allow_low_quality_matches:
        # A ground truth that overlaps no prediction has best IoU 0, so every prediction it does not
        # overlap turns positive (matched to that prediction's own best ground truth). Detectron2 and
        # official DETA do the same; top-k per ground truth later keeps only k of them per box.
        is_best = (iou == iou.max(dim=1, keepdim=True).values).any(dim=0)
        match_labels[is_best] = POSITIVE
    return matched_gt, match_labels


def subsample_labels(labels: Tensor, num_samples: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """Randomly pick up to num_samples POSITIVE and NEGATIVE elements of labels, IGNORE ones never.

    At most int(num_samples * positive_fraction) positives are taken; negatives fill the remaining
    slots. Returns the indices of the sampled positives and of the sampled negatives.
    """
    positive = (labels == POSITIVE).nonzero().squeeze(1)
    negative = (labels == NEGATIVE).nonzero().squeeze(1)
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    pos_perm = torch.randperm(positive.numel(), device=positive.device)[:num_pos]
    neg_perm = torch.randperm(negative.numel(), device=negative.device)[:num_neg]
    return positive[pos_perm], negative[neg_perm]


def topk_per_gt(pred_idx: Tensor, gt_idx: Tensor, iou: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Replace the positives of each ground truth by its best predictions, at most k of them.

    A ground truth with c positive pairs gets its min(c, k) highest-IoU predictions over *all*
    predictions, which need not be the sampled ones (and, rarely, one prediction ends up paired with
    two ground truths). Pairs come out grouped by ground truth in increasing index, each group in
    decreasing IoU.
    """
    gt_ids, counts = gt_idx.unique(return_counts=True)
    k = min(k, iou.shape[1])
    top_pred = iou[gt_ids].topk(k, dim=1).indices
    keep = torch.arange(k, device=iou.device) < counts[:, None]
    return top_pred[keep], gt_ids[:, None].expand(-1, k)[keep]


class IoUAssigner(nn.Module):
    """Label predicted boxes by IoU with the ground truth, sample them, keep top-k positives per box.

    Returns, like the Hungarian matcher, one (pred_idx, gt_idx) pair of int64 tensors per image, with
    positives only: the classification loss treats every other prediction as background, so the
    sampled negatives are not needed.
    """

    def __init__(self, box_key: str, thresholds: Sequence[float], labels: Sequence[int], num_samples: int,
                 positive_fraction: float, k: int):
        super().__init__()
        self.box_key = box_key
        self.thresholds = list(thresholds)
        self.labels = list(labels)
        self.num_samples = num_samples
        self.positive_fraction = positive_fraction
        self.k = k

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> Indices:
        return [self.assign(boxes, t["boxes"]) for boxes, t in zip(outputs[self.box_key], targets, strict=True)]

    def assign(self, pred_boxes: Tensor, gt_boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Positive (pred_idx, gt_idx) pairs for one image; boxes are normalised cxcywh."""
        iou, _ = box_iou(box_cxcywh_to_xyxy(gt_boxes), box_cxcywh_to_xyxy(pred_boxes))
        matched_gt, match_labels = label_by_iou(iou, self.thresholds, self.labels,
                                                allow_low_quality_matches=True)
        pos_idx, _ = subsample_labels(match_labels, self.num_samples, self.positive_fraction)
        return topk_per_gt(pos_idx, matched_gt[pos_idx], iou, self.k)


class Stage1Assigner(IoUAssigner):
    """RPN-style assignment of the encoder anchors (`outputs["anchors"]`).

    IoU < t_low negative, t_low ≤ IoU < t_high ignored, IoU ≥ t_high positive; 256 samples per image,
    at most half of them positive.
    """

    def __init__(self, t_low: float = 0.3, t_high: float = 0.7, k: int = 4):
        super().__init__("anchors", (t_low, t_high), (NEGATIVE, IGNORE, POSITIVE), num_samples=256,
                         positive_fraction=0.5, k=k)

    def assign(self, pred_boxes: Tensor, gt_boxes: Tensor) -> tuple[Tensor, Tensor]:
        if len(gt_boxes) == 0:
            # Unlike stage 2, the official stage 1 draws no samples for an image without ground truth.
            empty = torch.empty(0, dtype=torch.int64, device=pred_boxes.device)
            return empty, empty
        return super().assign(pred_boxes, gt_boxes)


class Stage2Assigner(IoUAssigner):
    """Fast R-CNN-style assignment of the decoder queries by their initial reference boxes.

    Uses `outputs["init_reference"]`, the proposals the decoder starts from, so one assignment serves
    every decoder layer. IoU ≥ 0.6 positive, else negative; num_queries samples per image, at most a
    quarter of them positive. The official code labels negatives with a class id above any real one
    (400) before sampling; sampling the match labels directly picks the same sets with the same draws.
    """

    def __init__(self, num_queries: int, k: int = 4):
        super().__init__("init_reference", (0.6,), (NEGATIVE, POSITIVE), num_samples=num_queries,
                         positive_fraction=0.25, k=k)

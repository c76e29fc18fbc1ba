"""DETA training losses: focal classification, L1 and GIoU box regression, on every prediction stage.

The decoder's predictions are paired with the ground truth by the Hungarian matcher or, with
assign_second_stage, by the one-to-many Stage2Assigner; the encoder's proposals (two-stage) by the
matcher or, with assign_first_stage, by the Stage1Assigner, against class-agnostic targets.
"""
import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch import distributed as dist

from deta.assigners import Indices, Stage1Assigner, Stage2Assigner
from deta.box_ops import box_area, box_cxcywh_to_xyxy
from deta.matcher import HungarianMatcher

# Smallest union / enclosing area divided by in the box loss; see paired_generalized_box_iou.
_MIN_AREA = 1e-7


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = 2) -> Tensor:
    """Focal loss (Lin et al. 2017) of independent sigmoid classifiers, summed, divided by num_boxes.

    The official code averages over queries and multiplies by the number of queries again, which is
    this sum. A negative alpha turns the class-balancing weight off.
    """
    prob = logits.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.sum() / num_boxes


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of boxes1[i] with boxes2[i] (xyxy): the diagonal of generalized_box_iou, without the N × N matrix.

    The union and enclosing areas are clamped to 1e-7 because a zero-area target paired with a
    collapsed prediction would otherwise give 0 / 0 = NaN and poison the whole loss. That floor is
    a box of a third of a pixel squared on an 800 × 1333 image, so real boxes are not affected.
    """
    inter_wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    enclosing_wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    enclosing = enclosing_wh[:, 0] * enclosing_wh[:, 1]
    return inter / union.clamp(min=_MIN_AREA) - (enclosing - union) / enclosing.clamp(min=_MIN_AREA)


def _matched_prediction_index(indices: Indices) -> tuple[Tensor, Tensor]:
    """(batch_idx, query_idx) of every matched prediction, for advanced indexing."""
    batch_idx = torch.cat([torch.full_like(pred, i) for i, (pred, _) in enumerate(indices)])
    return batch_idx, torch.cat([pred for pred, _ in indices])


def _num_boxes(targets: list[dict[str, Tensor]], device: torch.device) -> float:
    """Ground-truth boxes per process, averaged over processes so that all ranks normalise alike; ≥ 1."""
    num_boxes = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        num_boxes /= dist.get_world_size()
    return num_boxes.clamp(min=1).item()


class SetCriterion(nn.Module):
    """Losses of the final decoder layer, of each earlier layer (`_i`) and of the encoder (`_enc`).

    Every stage yields loss_ce (focal), loss_bbox (L1), loss_giou and, for logging only,
    cardinality_error; the final layer also logs class_error. All are normalised by the same number
    of ground-truth boxes. `weight_dict` names the weighted terms whose sum is the training loss.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 focal_alpha: float = 0.25, num_queries: int = 300, assign_first_stage: bool = False,
                 assign_second_stage: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.stage1_assigner = Stage1Assigner() if assign_first_stage else None
        self.stage2_assigner = Stage2Assigner(num_queries) if assign_second_stage else None

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]],
                num_boxes: float | None = None) -> dict[str, Tensor]:
        """outputs: the model's output dict; targets: per image, int64 `labels` and cxcywh `boxes`; num_boxes:
        the normaliser, by default these targets' boxes averaged over the processes (with gradient accumulation
        the caller's, of the whole effective batch)."""
        # The stage-2 assignment depends only on the initial reference boxes, so all layers share it.
        if self.stage2_assigner is not None:
            indices = self.stage2_assigner(outputs, targets)
        else:
            indices = self.matcher(outputs, targets)
        if num_boxes is None:
            num_boxes = _num_boxes(targets, outputs["pred_logits"].device)

        losses = self._stage_losses(outputs, targets, indices, num_boxes, log=True)
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            if self.stage2_assigner is None:
                indices = self.matcher(aux_outputs, targets)
            aux_losses = self._stage_losses(aux_outputs, targets, indices, num_boxes, log=False)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})

        if "enc_outputs" in outputs:
            enc_outputs = outputs["enc_outputs"]
            # Proposals are class-agnostic: every box is class 0, which the encoder head uses as objectness.
            binary_targets = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
            assigner = self.stage1_assigner if self.stage1_assigner is not None else self.matcher
            indices = assigner(enc_outputs, binary_targets)
            enc_losses = self._stage_losses(enc_outputs, binary_targets, indices, num_boxes, log=False)
            losses.update({f"{k}_enc": v for k, v in enc_losses.items()})
        return losses

    def _stage_losses(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], indices: Indices,
                      num_boxes: float, log: bool) -> dict[str, Tensor]:
        idx = _matched_prediction_index(indices)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices, strict=True)])
        matched_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)])
        losses = {"loss_ce": self.loss_labels(outputs["pred_logits"], idx, matched_labels, num_boxes)}
        if log:
            losses["class_error"] = class_error(outputs["pred_logits"][idx], matched_labels)
        losses.update(loss_boxes(outputs["pred_boxes"][idx], matched_boxes, num_boxes))
        losses["cardinality_error"] = cardinality_error(outputs["pred_logits"], targets)
        return losses

    def loss_labels(self, logits: Tensor, idx: tuple[Tensor, Tensor], matched_labels: Tensor,
                    num_boxes: float) -> Tensor:
        """Focal loss against one-hot targets; unmatched predictions get an all-zero row."""
        # Built through a class index per query, as officially: a query paired with two ground truths
        # (possible after top-k per GT) gets one of their classes, not both.
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[idx] = matched_labels
        onehot = torch.zeros((*logits.shape[:2], self.num_classes + 1), dtype=logits.dtype, device=logits.device)
        onehot.scatter_(2, target_classes.unsqueeze(-1), 1)
        # The extra column is the "no object" index of unmatched queries; it is not a class.
        return sigmoid_focal_loss(logits, onehot[..., :-1], num_boxes, alpha=self.focal_alpha, gamma=2)


def loss_boxes(pred_boxes: Tensor, gt_boxes: Tensor, num_boxes: float) -> dict[str, Tensor]:
    """Summed L1 (cxcywh) and 1 − GIoU of matched box pairs, divided by num_boxes."""
    giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(gt_boxes))
    return {"loss_bbox": F.l1_loss(pred_boxes, gt_boxes, reduction="sum") / num_boxes,
            "loss_giou": (1 - giou).sum() / num_boxes}


@torch.no_grad()
def class_error(matched_logits: Tensor, matched_labels: Tensor) -> Tensor:
    """Top-1 error in percent of the matched predictions; 100 when nothing is matched, as officially."""
    if matched_labels.numel() == 0:
        return torch.tensor(100.0, device=matched_logits.device)
    correct = (matched_logits.argmax(-1) == matched_labels).float().sum()
    return 100 - correct * (100.0 / matched_labels.numel())


@torch.no_grad()
def cardinality_error(logits: Tensor, targets: list[dict[str, Tensor]]) -> Tensor:
    """Mean |number of predictions whose top class is not the last one − number of boxes|; logging only.

    Inherited from softmax DETR, where the last class means "no object". With sigmoid classifiers
    there is no such class, so it counts nearly every query; kept so logs compare with official runs.
    """
    num_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
    num_gt = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
    return F.l1_loss(num_pred.float(), num_gt.float())


def loss_weights(args: argparse.Namespace) -> dict[str, float]:
    """Weight of each loss term; with aux_loss the same weights for every `_i` layer and for `_enc`.

    Without aux_loss the encoder losses are still computed (two-stage) but carry no weight, as officially.
    """
    weights = {"loss_ce": args.cls_loss_coef, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    if not args.aux_loss:
        return weights
    suffixes = [f"_{i}" for i in range(args.dec_layers - 1)] + ["_enc"]
    return weights | {name + suffix: w for suffix in suffixes for name, w in weights.items()}


def build_criterion(args: argparse.Namespace, num_classes: int) -> SetCriterion:
    # The official matcher keeps alpha = 0.25 whatever --focal_alpha says; so does this one.
    matcher = HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                               cost_giou=args.set_cost_giou)
    return SetCriterion(num_classes, matcher, loss_weights(args), focal_alpha=args.focal_alpha,
                        num_queries=args.num_queries, assign_first_stage=args.assign_first_stage,
                        assign_second_stage=args.assign_second_stage)

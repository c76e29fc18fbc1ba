"""One-to-one Hungarian matching of predictions to ground truth (DETR, Carion et al. 2020)."""
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from deta.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def focal_class_cost(prob: Tensor, alpha: float, gamma: float) -> Tensor:
    """Focal-loss cost of labelling predictions as the class whose probabilities prob holds.

    The cost of the positive term minus that of the negative one, so that only the difference a
    match makes to the focal loss counts. The 1e-8 keeps the logarithms finite.
    """
    pos_cost = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    neg_cost = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
    return pos_cost - neg_cost


class HungarianMatcher(nn.Module):
    """Match each ground-truth box to a distinct prediction by minimum total cost.

    cost = cost_bbox · L1(cxcywh) + cost_class · focal class cost + cost_giou · (−GIoU). Returns, per
    image, (pred_idx, gt_idx) int64 CPU tensors of length min(num_queries, num_gt), sorted by pred_idx.
    """

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1,
                 focal_alpha: float = 0.25, gamma: float = 2):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0; give at least one a weight")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.gamma = gamma

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        batch_size, num_queries = outputs["pred_logits"].shape[:2]
        # Costs of the whole batch against all its targets at once: one device sync instead of one per image.
        prob = outputs["pred_logits"].flatten(0, 1).sigmoid()
        pred_boxes = outputs["pred_boxes"].flatten(0, 1)
        gt_labels = torch.cat([t["labels"] for t in targets])
        gt_boxes = torch.cat([t["boxes"] for t in targets])

        cost_class = focal_class_cost(prob[:, gt_labels], self.focal_alpha, self.gamma)
        cost_bbox = torch.cdist(pred_boxes, gt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(gt_boxes))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = cost.view(batch_size, num_queries, len(gt_boxes)).cpu()  # not -1: the batch may have no boxes

        sizes = [len(t["boxes"]) for t in targets]
        indices = [linear_sum_assignment(c[i]) for i, c in enumerate(cost.split(sizes, -1))]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
                for i, j in indices]

"""DETA's two NMS steps on whole batches with fixed shapes: the formulation that ONNX export traces.

The eager code runs them image by image (`proposals.select_with_nms`, `postprocess.NMSPostProcess`) on
tensors whose sizes depend on how many boxes survive, which an exported graph with a dynamic batch cannot
loop over. Here each image keeps fixed-size tensors and masks, and the one data-dependent step is
`nms_per_class`, which has ONNX NonMaxSuppression's semantics and is exported as that node. The results
equal the per-image code's (tests/test_fixed_shape_nms.py), up to the order of exactly equal scores.
"""
import torch
import torchvision
from torch import Tensor

from .box_ops import box_cxcywh_to_xyxy
from .postprocess import NMSPostProcess, absolute_xyxy

# Boxes take part in NMS where their score is above this, as ONNX NonMaxSuppression's score_threshold; an
# excluded box scores -inf.
SCORE_THRESHOLD = float(torch.finfo(torch.float32).min)


def _shifted_groups_max_coordinates(device: torch.device) -> int:
    """torchvision's batched_nms does not run NMS per group when there are few boxes: it shifts each group's
    boxes apart and runs one NMS (_batched_nms_coordinate_trick), which rounds the coordinates differently.
    The batched form does the same under the same condition: at most this many coordinates."""
    return 4000 if device.type == "cpu" else 100_000


@torch.library.custom_op("deta::nms_per_class", mutates_args=())
def nms_per_class(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS of each image's boxes, separately for each class, as ONNX NonMaxSuppression computes it.

    Args:
        boxes: (B, M, 4) xyxy. scores: (B, C, M); a box takes part in class c where its score is above
            SCORE_THRESHOLD (-inf excludes it).

    Returns:
        (K, 3) int64 rows (image, class, box) of the kept boxes.
    """
    kept = []
    for image, (image_boxes, image_scores) in enumerate(zip(boxes, scores, strict=True)):
        for label, label_scores in enumerate(image_scores):
            candidates = (label_scores > SCORE_THRESHOLD).nonzero()[:, 0]
            keep = candidates[torchvision.ops.nms(image_boxes[candidates], label_scores[candidates], iou_threshold)]
            kept.append(torch.stack([torch.full_like(keep, image), torch.full_like(keep, label), keep], 1))
    return torch.cat(kept) if kept else boxes.new_zeros((0, 3), dtype=torch.int64)


@nms_per_class.register_fake
def _nms_per_class_fake(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(), 3), dtype=torch.int64)


def _batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, num_groups: int, iou_threshold: float) -> Tensor:
    """torchvision's batched_nms for each image of a batch, as a (B, M) mask of the kept boxes.

    boxes: (B, M, 4) xyxy; scores, groups: (B, M). NMS runs within each group.
    """
    batch, num_boxes = scores.shape
    # A tensor condition, as M may be a symbolic size. Shifted, all boxes form one NMS "class".
    shifted = torch.full((), num_boxes * 4, device=boxes.device) <= _shifted_groups_max_coordinates(boxes.device)
    offsets = torch.where(shifted, groups.to(boxes.dtype) * (boxes.flatten(1).amax(1, keepdim=True) + 1), 0.0)
    rows = torch.arange(num_groups, device=groups.device)[None, :, None]
    in_row = (shifted & (rows == 0)) | (~shifted & (groups[:, None, :] == rows))  # ORT has no boolean Where
    kept = nms_per_class(boxes + offsets[..., None], torch.where(in_row, scores[:, None, :], -torch.inf),
                         iou_threshold)
    mask = torch.zeros((batch, num_boxes), dtype=torch.bool, device=boxes.device)
    return mask.index_put((kept[:, 0], kept[:, 2]), torch.ones_like(kept[:, 0], dtype=torch.bool))


def _first_true(mask: Tensor, count: int) -> Tensor:
    """(B, count) positions of the first `count` True entries of each row of `mask` (B, M), in order; rows
    with fewer continue with positions of False entries."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    rank = torch.where(mask, positions, positions + mask.shape[1])
    return rank.topk(count, dim=1, largest=False).indices


def top_indices(scores: Tensor, k: int) -> Tensor:
    """`proposals._top_indices` for each row of `scores` (B, S): the k best, cycling when S < k."""
    order = scores.topk(torch.sym_min(k, scores.shape[1]), dim=1).indices
    available = torch.full((), order.shape[1], device=scores.device)  # a tensor: the size may be symbolic
    return order[:, torch.arange(k, device=scores.device) % available]


def select_with_nms(logits: Tensor, boxes: Tensor, level_ids: Tensor, num_queries: int, num_levels: int,
                    pre_nms_topk: int = 1000, iou_threshold: float = 0.9) -> Tensor:
    """`proposals.select_with_nms` for each image of a batch whose tokens are all candidates.

    Args:
        logits: (B, S) objectness. boxes: (B, S, 4) cxcywh in [0, 1]. level_ids: (S,).

    Returns:
        (B, num_queries) token indices.
    """
    batch = logits.shape[0]
    boxes_xyxy = box_cxcywh_to_xyxy(boxes.float()).clamp(0, 1)
    scores = logits.sigmoid()
    k = torch.sym_min(pre_nms_topk, logits.shape[1])
    candidates = torch.cat([(scores * (level_ids == level)).topk(k, dim=1).indices for level in range(num_levels)], 1)
    candidate_levels = level_ids[candidates]
    candidate_logits = logits.gather(1, candidates)
    survived = _batched_nms(boxes_xyxy.gather(1, candidates[..., None].expand(-1, -1, 4)), candidate_logits,
                            candidate_levels, num_levels, iou_threshold)
    # Survivors first, by descending logit (batched_nms's order), then the suppressed candidates.
    order = torch.where(survived, candidate_logits, -torch.inf).sort(dim=1, descending=True).indices
    valid = survived.gather(1, order)
    levels = candidate_levels.gather(1, order)
    # Level balance: the best num_queries // num_levels of each level, then the best remaining survivors.
    is_level = (levels[:, None, :] == torch.arange(num_levels, device=levels.device)[None, :, None]) & valid[:, None]
    keep = (is_level & (is_level.cumsum(2) <= num_queries // num_levels)).any(1)
    shortfall = num_queries - keep.sum(1, keepdim=True)
    leftover = valid & ~keep
    keep = keep | (leftover & (leftover.cumsum(1) <= shortfall))
    # Q placeholder columns, so that fewer than Q candidates still give Q picks (replaced by the fallback).
    ordered = torch.cat([candidates.gather(1, order), candidates.new_zeros(batch, num_queries)], 1)
    keep = torch.cat([keep, keep.new_zeros(batch, num_queries)], 1)
    chosen = ordered.gather(1, _first_true(keep, num_queries))
    # Fewer survivors than queries: the plain top-k of the objectness.
    too_few = valid.sum(1, keepdim=True) < num_queries
    return torch.where(too_few, top_indices(logits, num_queries), chosen)


def nms_detections(postprocess: NMSPostProcess, logits: Tensor, boxes: Tensor,
                   target_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`postprocess` (NMSPostProcess) for a batch, padded to `postprocess.num_detections` per image.

    Args:
        logits: (B, Q, C). boxes: (B, Q, 4) normalised cxcywh. target_sizes: (B, 2) (H, W) of each image.

    Returns:
        scores (B, D), labels (B, D) int64 and boxes (B, D, 4) absolute xyxy, best first, zero past the
        detections of each image; and the number of detections (B,) int64.
    """
    batch, _, num_classes = logits.shape
    scores = logits.sigmoid().flatten(1)
    absolute = absolute_xyxy(boxes, target_sizes)
    if scores.shape[1] > postprocess.pre_nms_topk:
        scores, pairs = scores.topk(postprocess.pre_nms_topk, dim=1)
    else:
        pairs = torch.arange(scores.shape[1], device=scores.device).expand(batch, -1)
    labels = pairs % num_classes
    candidates = absolute.gather(1, (pairs // num_classes)[..., None].expand(-1, -1, 4))
    survived = _batched_nms(candidates, scores, labels, num_classes, postprocess.iou_threshold)
    count = min(postprocess.num_detections, scores.shape[1])
    best = torch.where(survived, scores, -torch.inf).topk(count, dim=1).indices
    valid = survived.gather(1, best)
    padding = postprocess.num_detections - count
    outputs = [torch.where(valid, scores.gather(1, best), 0.0), torch.where(valid, labels.gather(1, best), 0),
               torch.where(valid[..., None], candidates.gather(1, best[..., None].expand(-1, -1, 4)), 0.0)]
    outputs = [torch.nn.functional.pad(out, (0, 0, 0, padding) if out.dim() == 3 else (0, padding))
               for out in outputs]
    return (*outputs, valid.sum(1))

"""Two-stage proposals: one fixed box per encoder token, and DETA's NMS-based selection of queries."""
import torch
from torch import Tensor
from torchvision.ops import batched_nms

from . import fixed_shape_nms
from .box_ops import box_cxcywh_to_xyxy


def grid_proposals(padding_mask: Tensor, level_shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """A square box centred on every token, of side 0.05·2^level of the unpadded image.

    `level_shapes`: (H, W) of each level, as sizes (symbolic in export), not a tensor.

    Returns:
        proposals: (B, S, 4) cxcywh in logit space; +inf for padded tokens and for boxes whose
            coordinates leave (0.01, 0.99), which marks them unusable.
        valid: (B, S, 1) False where proposals are +inf.
        level_ids: (S,) level of each token.
    """
    batch = padding_mask.shape[0]
    proposals, level_ids = [], []
    start = 0
    for level, (height, width) in enumerate(level_shapes):
        mask = padding_mask[:, start:start + height * width].view(batch, height, width)
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        ys, xs = torch.meshgrid(
            torch.arange(height, dtype=torch.float32, device=mask.device),
            torch.arange(width, dtype=torch.float32, device=mask.device), indexing="ij")
        centres = torch.stack([xs, ys], -1)[None] + 0.5
        centres = centres / torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2)
        sizes = torch.full_like(centres, 0.05 * 2.0 ** level)
        proposals.append(torch.cat([centres, sizes], -1).view(batch, -1, 4))
        level_ids.append(torch.full((height * width,), level, dtype=torch.long, device=mask.device))
        start += height * width
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(padding_mask[..., None] | ~valid, float("inf"))
    return proposals, valid & ~padding_mask[..., None], torch.cat(level_ids)


def _top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the k best scores; cycles through them when there are fewer than k (tiny images)."""
    order = scores.topk(min(k, scores.numel())).indices
    return order.repeat((k + order.numel() - 1) // order.numel())[:k]


def select_with_nms(logits: Tensor, boxes: Tensor, level_ids: Tensor, num_queries: int, num_levels: int,
                    pre_nms_topk: int = 1000, iou_threshold: float = 0.9) -> Tensor:
    """DETA's proposal selection for one image: per-level top-k, per-level NMS, level-balanced top-Q.

    Args:
        logits: (S,) objectness logits. boxes: (S, 4) cxcywh in [0, 1]. level_ids: (S,).

    Returns:
        (num_queries,) token indices, in descending score order within the balanced set, then the
        best remaining survivors.
    """
    boxes_xyxy = box_cxcywh_to_xyxy(boxes.float()).clamp(0, 1)
    scores = logits.sigmoid()
    # Scores of other levels are zeroed rather than dropped: where a level has fewer tokens than
    # pre_nms_topk, zero-score tokens of other levels fill its list, as in the official code.
    k = min(pre_nms_topk, logits.numel())
    candidates = torch.cat([(scores * (level_ids == level)).topk(k).indices for level in range(num_levels)])
    survivors = candidates[batched_nms(boxes_xyxy[candidates], logits[candidates], level_ids[candidates],
                                       iou_threshold)]
    if survivors.numel() < num_queries:
        survivors = _top_indices(logits, num_queries)
    per_level = num_queries // num_levels
    is_level = level_ids[survivors][None] == torch.arange(num_levels, device=logits.device)[:, None]
    keep = (is_level & (is_level.cumsum(1) <= per_level)).any(0)
    shortfall = num_queries - int(keep.sum())
    if shortfall > 0:
        keep[(~keep).nonzero()[:shortfall, 0]] = True
    return survivors[keep]


def select_proposals(logits: Tensor, boxes: Tensor, level_ids: Tensor, candidate_mask: Tensor, num_queries: int,
                     num_levels: int, use_nms: bool) -> Tensor:
    """Pick num_queries tokens per image as decoder queries.

    Args:
        logits: (B, S) objectness. boxes: (B, S, 4) cxcywh. level_ids: (S,).
        candidate_mask: (B, S) tokens that may be chosen; selection runs on each image's
            candidates alone, so excluding padding makes the choice independent of the batch.
        use_nms: DETA's NMS selection; otherwise plain top-k of the objectness.

    Returns:
        (B, num_queries) token indices.

    In ONNX export, whose batches hold images of one size without padding, every token is a candidate and the
    selection runs on the whole batch at once (`fixed_shape_nms`), as a graph with dynamic shapes must.
    """
    if torch.onnx.is_in_onnx_export():
        if use_nms:
            return fixed_shape_nms.select_with_nms(logits, boxes, level_ids, num_queries, num_levels)
        return fixed_shape_nms.top_indices(logits, num_queries)
    chosen = []
    for image_logits, image_boxes, candidates in zip(logits, boxes, candidate_mask, strict=True):
        index = candidates.nonzero()[:, 0]
        if use_nms:
            picked = select_with_nms(image_logits[index], image_boxes[index], level_ids[index], num_queries,
                                     num_levels)
        else:
            picked = _top_indices(image_logits[index], num_queries)
        chosen.append(index[picked])
    return torch.stack(chosen)

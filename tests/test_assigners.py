"""Hand-computed cases for the IoU labelling, sampling and top-k pieces and the two DETA assigners.

Most boxes are stacked against the ground truth G = xyxy (0, 0, 0.4, 0.4): a box (0, 0, 0.4, h) lies
inside G, so its IoU with G is h / 0.4.
"""
import torch

from deta.assigners import (
    IGNORE,
    NEGATIVE,
    POSITIVE,
    Stage1Assigner,
    Stage2Assigner,
    label_by_iou,
    subsample_labels,
    topk_per_gt,
)
from deta.box_ops import box_xyxy_to_cxcywh

STAGE1 = dict(thresholds=(0.3, 0.7), labels=(NEGATIVE, IGNORE, POSITIVE))


def strip(*heights: float) -> list[list[float]]:
    """xyxy boxes inside G = (0, 0, 0.4, 0.4), as wide as G: IoU with G = height / 0.4."""
    return [[0.0, 0.0, 0.4, h] for h in heights]


def cxcywh(boxes: list[list[float]]) -> torch.Tensor:
    return box_xyxy_to_cxcywh(torch.tensor(boxes).reshape(-1, 4))


G = [0.0, 0.0, 0.4, 0.4]
G2 = [0.5, 0.5, 0.9, 0.9]
FAR = [0.6, 0.0, 0.9, 0.3]  # overlaps neither G nor G2


def assign(assigner, gt: list[list[float]], preds: list[list[float]]) -> tuple[list[int], list[int]]:
    pred_idx, gt_idx = assigner.assign(cxcywh(preds), cxcywh(gt))
    assert pred_idx.dtype == gt_idx.dtype == torch.int64
    return pred_idx.tolist(), gt_idx.tolist()


def test_label_by_iou_intervals_are_closed_below():
    iou = torch.tensor([[0.1, 0.3, 0.5, 0.7, 0.9]])
    matched, labels = label_by_iou(iou, **STAGE1, allow_low_quality_matches=False)
    assert labels.tolist() == [NEGATIVE, IGNORE, IGNORE, POSITIVE, POSITIVE]
    assert matched.tolist() == [0] * 5


def test_low_quality_match_rescues_best_prediction_but_keeps_its_gt():
    # GT 1's best prediction is 1 (IoU 0.4), which overlaps GT 0 more (0.5): positive, matched to GT 0.
    iou = torch.tensor([[0.8, 0.5, 0.0], [0.1, 0.4, 0.2]])
    _, labels = label_by_iou(iou, **STAGE1, allow_low_quality_matches=False)
    assert labels.tolist() == [POSITIVE, IGNORE, NEGATIVE]
    matched, labels = label_by_iou(iou, **STAGE1, allow_low_quality_matches=True)
    assert labels.tolist() == [POSITIVE, POSITIVE, NEGATIVE]
    assert matched.tolist() == [0, 0, 1]


def test_low_quality_match_includes_ties():
    _, labels = label_by_iou(torch.tensor([[0.5, 0.5, 0.2]]), **STAGE1, allow_low_quality_matches=True)
    assert labels.tolist() == [POSITIVE, POSITIVE, NEGATIVE]


def test_gt_overlapping_nothing_turns_zero_iou_predictions_positive():
    # detectron2 / official quirk: GT 1's best IoU is 0, and every prediction ties with it.
    iou = torch.tensor([[0.9, 0.0, 0.0], [0.0, 0.0, 0.0]])
    matched, labels = label_by_iou(iou, **STAGE1, allow_low_quality_matches=True)
    assert labels.tolist() == [POSITIVE] * 3
    assert matched.tolist() == [0, 0, 0]


def test_label_by_iou_without_gt_uses_lowest_interval():
    matched, labels = label_by_iou(torch.zeros(0, 3), **STAGE1, allow_low_quality_matches=True)
    assert labels.tolist() == [NEGATIVE] * 3 and matched.tolist() == [0] * 3


def test_subsample_labels_caps_positives_and_fills_with_negatives():
    labels = torch.tensor([POSITIVE] * 10 + [NEGATIVE] * 10 + [IGNORE] * 5, dtype=torch.int8)
    pos, neg = subsample_labels(labels, num_samples=8, positive_fraction=0.25)
    assert len(pos) == 2 and len(neg) == 6
    assert set(pos.tolist()) <= set(range(10)) and set(neg.tolist()) <= set(range(10, 20))
    assert len(set(neg.tolist())) == 6

    pos, neg = subsample_labels(labels[8:], num_samples=8, positive_fraction=0.5)
    assert sorted(pos.tolist()) == [0, 1] and len(neg) == 6

    pos, neg = subsample_labels(torch.tensor([POSITIVE, NEGATIVE, IGNORE]), num_samples=8, positive_fraction=0.5)
    assert pos.tolist() == [0] and neg.tolist() == [1]


def test_topk_per_gt_caps_at_k_and_takes_best_iou():
    iou = torch.tensor([[0.9, 0.8, 0.7, 0.75, 0.95, 0.72, 0.1],
                        [0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.6]])
    # GT 0 has 6 positives: keeps its 4 best. GT 1 has one (prediction 5, IoU 0.2): becomes its best, 6.
    pred_idx = torch.tensor([0, 1, 2, 3, 4, 5, 5])
    gt_idx = torch.tensor([0, 0, 0, 0, 0, 0, 1])
    pred, gt = topk_per_gt(pred_idx, gt_idx, iou, k=4)
    assert pred.tolist() == [4, 0, 1, 3, 6]
    assert gt.tolist() == [0, 0, 0, 0, 1]


def test_topk_per_gt_with_fewer_predictions_than_k():
    pred, gt = topk_per_gt(torch.tensor([1, 0]), torch.tensor([0, 0]), torch.tensor([[0.7, 0.9]]), k=4)
    assert pred.tolist() == [1, 0] and gt.tolist() == [0, 0]


def test_stage1_positive_negative_and_ignore_bands():
    # IoU with G: 0.75, 0, 1, 0.5 (ignored), 0.25 (negative).
    preds = [*strip(0.3), FAR, *strip(0.4, 0.2, 0.1)]
    assert assign(Stage1Assigner(), [G], preds) == ([2, 0], [0, 0])


def test_stage1_low_quality_match_rescues_gt_without_positive():
    # G2's best anchor has IoU 0.5 only (ignore band), so it becomes positive anyway.
    preds = [*strip(0.4), [0.5, 0.5, 0.9, 0.7], [0.5, 0.5, 0.9, 0.6]]
    assert assign(Stage1Assigner(), [G, G2], preds) == ([0, 1], [0, 1])


def test_stage1_keeps_four_best_anchors_per_gt():
    # IoU 0.8, 1, 0.9, 0.75, 0.95, 0.85: all positive, the four best survive in IoU order.
    preds = strip(0.32, 0.4, 0.36, 0.3, 0.38, 0.34)
    assert assign(Stage1Assigner(), [G], preds) == ([1, 4, 2, 5], [0, 0, 0, 0])


def test_stage1_without_gt_returns_nothing_and_draws_nothing():
    state = torch.get_rng_state()
    assert assign(Stage1Assigner(), [], strip(0.4, 0.3)) == ([], [])
    assert torch.equal(torch.get_rng_state(), state)


def test_stage2_threshold_and_low_quality_match():
    # IoU with G: 1, 0.75, 0.5 (below 0.6: negative), 0; G2's best query has IoU 0.5 and is rescued.
    preds = [*strip(0.4, 0.3, 0.2), FAR, [0.5, 0.5, 0.9, 0.7]]
    assert assign(Stage2Assigner(num_queries=100), [G, G2], preds) == ([0, 1, 4], [0, 0, 1])


def test_stage2_samples_at_most_a_quarter_then_takes_best():
    # 8 queries: int(8 · 0.25) = 2 of the 5 positives are sampled, whichever they are the top-2 per GT
    # step then picks the two best (IoU 1 and 0.95).
    preds = [*strip(0.32, 0.4, 0.36, 0.34, 0.38), FAR, FAR, FAR]
    for seed in range(5):
        torch.manual_seed(seed)
        assert assign(Stage2Assigner(num_queries=8), [G], preds) == ([1, 4], [0, 0])


def test_stage2_without_gt_returns_nothing_but_draws_like_official():
    state = torch.get_rng_state()
    assert assign(Stage2Assigner(num_queries=8), [], strip(0.4, 0.3)) == ([], [])
    assert not torch.equal(torch.get_rng_state(), state)


def test_assigners_on_a_batch_read_their_own_boxes():
    boxes = cxcywh([*strip(0.4, 0.3), FAR])
    targets = [{"labels": torch.tensor([5]), "boxes": cxcywh([G])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    batch = boxes.expand(2, -1, -1)
    stage1 = Stage1Assigner()({"anchors": batch}, targets)
    stage2 = Stage2Assigner(num_queries=8)({"init_reference": batch}, targets)
    for indices in (stage1, stage2):
        assert [(p.tolist(), g.tolist()) for p, g in indices] == [([0, 1], [0, 0]), ([], [])]

"""Hand-computed cases for the Hungarian matcher."""
import math

import torch

from deta.matcher import HungarianMatcher, focal_class_cost

NUM_CLASSES = 10


def outputs_for(boxes: list[list[float]], logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    pred_boxes = torch.tensor([boxes])
    if logits is None:
        logits = torch.zeros(1, len(boxes), NUM_CLASSES)
    return {"pred_logits": logits, "pred_boxes": pred_boxes}


def target(labels: list[int], boxes: list[list[float]]) -> dict[str, torch.Tensor]:
    return {"labels": torch.tensor(labels, dtype=torch.int64), "boxes": torch.tensor(boxes).reshape(-1, 4)}


def as_lists(indices) -> list[tuple[list[int], list[int]]]:
    for pred_idx, gt_idx in indices:
        assert pred_idx.dtype == gt_idx.dtype == torch.int64
    return [(p.tolist(), g.tolist()) for p, g in indices]


def test_focal_class_cost_at_even_odds():
    # p = 0.5: α(1−p)²·ln 2 − (1−α)p²·ln 2 = (0.25 − 0.75) · 0.25 · ln 2
    cost = focal_class_cost(torch.tensor([0.5]), alpha=0.25, gamma=2)
    assert math.isclose(cost.item(), -0.125 * math.log(2), rel_tol=1e-5)


def test_obvious_assignment():
    boxes = [[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.7, 0.3, 0.2]]
    logits = torch.full((1, 3, NUM_CLASSES), -5.0)
    logits[0, 0, 3] = logits[0, 2, 7] = 5.0
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    indices = matcher(outputs_for(boxes, logits), [target([7, 3], [boxes[2], boxes[0]])])
    assert as_lists(indices) == [([0, 2], [1, 0])]


def test_optimal_where_greedy_is_not():
    # L1 costs (boxes differ in cx only): q0–g0 0.1, q0–g1 0.2, q1–g0 0.15, q1–g1 0.45. Greedy takes
    # q0–g0 first and is left with q1–g1 (total 0.55); the optimum is q0–g1 + q1–g0 = 0.35.
    preds = [[0.5, 0.5, 0.2, 0.2], [0.75, 0.5, 0.2, 0.2]]
    gts = [[0.6, 0.5, 0.2, 0.2], [0.3, 0.5, 0.2, 0.2]]
    matcher = HungarianMatcher(cost_class=0, cost_bbox=1, cost_giou=0)
    assert as_lists(matcher(outputs_for(preds), [target([1, 1], gts)])) == [([0, 1], [1, 0])]


def test_class_cost_breaks_box_ties():
    box = [0.5, 0.5, 0.2, 0.2]
    logits = torch.zeros(1, 2, NUM_CLASSES)
    logits[0, 1, 4] = 3.0
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    assert as_lists(matcher(outputs_for([box, box], logits), [target([4], [box])])) == [([1], [0])]


def test_images_without_boxes_get_empty_indices():
    boxes = [[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]
    outputs = {k: v.expand(2, -1, -1) for k, v in outputs_for(boxes).items()}
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    assert as_lists(matcher(outputs, [target([], []), target([2], [boxes[1]])])) == [([], []), ([1], [0])]
    assert as_lists(matcher(outputs, [target([], []), target([], [])])) == [([], []), ([], [])]

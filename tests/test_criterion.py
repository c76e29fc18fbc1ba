"""Tests of the DETA losses: focal loss formula, finiteness, weights, and parity with official DETA.

Expected values in tests/data/official_criterion.pt were derived by running the official DETA
SetCriterion (github.com/jozhang97/DETA, commit f47e50e, models/deformable_detr.py with its
HungarianMatcher and Stage1/Stage2Assigner) on CPU on `make_inputs(...)` from this module, with
`torch.manual_seed(SEED)` right before the call, for each entry of CONFIGS.
"""
import argparse
import math
from pathlib import Path

import pytest
import torch
from torch import distributed as dist

from deta.box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from deta.criterion import build_criterion, loss_weights, paired_generalized_box_iou, sigmoid_focal_loss

SEED = 1234
NUM_CLASSES = 91
NUM_QUERIES = 30
NUM_TOKENS = 300
DEC_LAYERS = 3
OFFICIAL = Path(__file__).parent / "data" / "official_criterion.pt"

# name -> (assign_first_stage, assign_second_stage, aux_loss)
CONFIGS = {
    "assign_both": (True, True, False),
    "hungarian": (False, False, False),
    "assign_both_aux": (True, True, True),
    "hungarian_aux": (False, False, True),
}


def _jitter(boxes: torch.Tensor, scale: float, g: torch.Generator) -> torch.Tensor:
    """Shift centres by up to scale · size and rescale sizes by up to e^±scale."""
    centre, size = boxes[:, :2], boxes[:, 2:]
    centre = centre + scale * size * (2 * torch.rand(centre.shape, generator=g) - 1)
    size = size * torch.exp(scale * (2 * torch.rand(size.shape, generator=g) - 1))
    return torch.cat([centre, size], dim=1)


def _random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    centre = 0.15 + 0.7 * torch.rand(n, 2, generator=g)
    size = 0.03 + 0.4 * torch.rand(n, 2, generator=g)
    return torch.cat([centre, size], dim=1)


def make_inputs(aux: bool) -> tuple[dict, list[dict]]:
    """Two-stage model outputs and targets for a batch of 2: image 0 has 6 boxes, image 1 none.

    Queries and anchors are partly jittered copies of the boxes, so that the assigners find
    positives, ignored and low-quality matches, and more positives than they may sample; the last
    anchors are the (1, 1, 1, 1) boxes padded anchors become.
    """
    g = torch.Generator().manual_seed(SEED)
    gt_boxes = _random_boxes(6, g)
    targets = [
        {"labels": torch.tensor([1, 18, 62, 90, 1, 44]), "boxes": gt_boxes, "image_id": torch.tensor(7)},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4), "image_id": torch.tensor(8)},
    ]

    def per_image(near_gt: int, total: int, scale: float) -> torch.Tensor:
        near = _jitter(gt_boxes[torch.arange(near_gt) % len(gt_boxes)], scale, g)
        return torch.stack([torch.cat([near, _random_boxes(total - near_gt, g)]), _random_boxes(total, g)])

    init_reference = per_image(20, NUM_QUERIES, 0.15)
    layer_boxes = [_jitter(init_reference.flatten(0, 1), 0.1, g).view_as(init_reference) for _ in range(DEC_LAYERS)]
    layer_logits = [torch.randn(2, NUM_QUERIES, NUM_CLASSES, generator=g) * 2 - 3 for _ in range(DEC_LAYERS)]
    for logits in layer_logits:  # queries near a box mostly score its class highest
        logits[0, torch.arange(20), targets[0]["labels"][torch.arange(20) % len(gt_boxes)]] += 6

    anchors = per_image(180, NUM_TOKENS, 0.08)
    anchors[:, -10:] = 1.0
    enc_boxes = _jitter(anchors.flatten(0, 1), 0.1, g).view_as(anchors)

    outputs = {
        "pred_logits": layer_logits[-1],
        "pred_boxes": layer_boxes[-1],
        "init_reference": init_reference,
        "enc_outputs": {
            "pred_logits": torch.randn(2, NUM_TOKENS, NUM_CLASSES, generator=g) * 2 - 3,
            "pred_boxes": enc_boxes,
            "anchors": anchors,
        },
    }
    if aux:
        outputs["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b}
                                  for c, b in zip(layer_logits[:-1], layer_boxes[:-1], strict=True)]
    return outputs, targets


def _args(assign_first_stage: bool = True, assign_second_stage: bool = True,
          aux_loss: bool = True) -> argparse.Namespace:
    """The flags build_criterion reads, at main.py's defaults (not imported: main pulls in everything)."""
    return argparse.Namespace(
        num_queries=NUM_QUERIES, dec_layers=DEC_LAYERS, aux_loss=aux_loss, assign_first_stage=assign_first_stage,
        assign_second_stage=assign_second_stage, set_cost_class=2.0, set_cost_bbox=5.0, set_cost_giou=2.0,
        cls_loss_coef=2.0, bbox_loss_coef=5.0, giou_loss_coef=2.0, focal_alpha=0.25)


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_official_criterion(name):
    first, second, aux = CONFIGS[name]
    expected = torch.load(OFFICIAL, weights_only=True)[name]
    criterion = build_criterion(_args(first, second, aux), NUM_CLASSES)
    outputs, targets = make_inputs(aux)
    torch.manual_seed(SEED)  # the assigners' random sampling then draws what the official run drew
    losses = criterion(outputs, targets)
    assert list(losses) == list(expected)
    for key, value in losses.items():
        assert math.isclose(value.item(), expected[key], rel_tol=1e-5, abs_tol=1e-6), key


def test_the_fixture_keeps_every_assignment_decision_clear_of_ties():
    """The official losses above are compared exactly, so no assigner decision on make_inputs may hinge on
    float rounding (another CPU's): every best IoU lies 1e-3 or more from a threshold, and each ground truth's
    k-th best IoU 1e-3 or more above its (k+1)-th."""
    outputs, targets = make_inputs(aux=False)
    for key, thresholds in (("anchors", (0.3, 0.7)), ("init_reference", (0.6,))):
        boxes = outputs["enc_outputs"][key] if key == "anchors" else outputs[key]
        for image_boxes, target in zip(boxes, targets, strict=True):
            if len(target["boxes"]) == 0:
                continue
            iou, _ = box_iou(box_cxcywh_to_xyxy(target["boxes"]), box_cxcywh_to_xyxy(image_boxes))
            best = iou.max(0).values
            assert min((best - t).abs().min() for t in thresholds) > 1e-3, key
            ranked = iou.sort(1, descending=True).values
            assert (ranked[:, 3] - ranked[:, 4]).min() > 1e-3, key  # top-4 per ground truth
            assert (ranked[:, 0] - ranked[:, 1]).min() > 1e-3, key  # one best prediction per ground truth


def test_sigmoid_focal_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 4, generator=g) * 3
    targets = (torch.rand(3, 5, 4, generator=g) > 0.7).float()
    alpha, gamma, num_boxes = 0.25, 2.0, 2.5
    p = torch.sigmoid(logits.double())
    per_element = torch.where(targets.bool(), -alpha * (1 - p) ** gamma * p.log(),
                              -(1 - alpha) * p ** gamma * (1 - p).log())
    expected = per_element.sum() / num_boxes
    got = sigmoid_focal_loss(logits, targets, num_boxes, alpha=alpha, gamma=gamma)
    assert torch.allclose(got.double(), expected, rtol=1e-5)


def test_loss_weights_cover_every_stage():
    weights = loss_weights(_args(aux_loss=True))
    assert len(weights) == 3 * (1 + (DEC_LAYERS - 1) + 1)
    assert weights["loss_ce_1"] == 2 and weights["loss_bbox_enc"] == 5 and weights["loss_giou_0"] == 2
    assert set(loss_weights(_args(aux_loss=False))) == {"loss_ce", "loss_bbox", "loss_giou"}


def _assert_finite_with_grad(losses: dict, outputs: dict):
    assert all(torch.isfinite(v).all() for v in losses.values()), losses
    total = sum(v for k, v in losses.items() if k.startswith("loss_"))
    total.backward()
    for tensor in (outputs["pred_logits"], outputs["pred_boxes"]):
        assert torch.isfinite(tensor.grad).all()


@pytest.mark.parametrize("assign", [True, False])
def test_finite_without_boxes(assign):
    outputs, targets = make_inputs(aux=True)
    targets[0] = targets[1]
    for tensor in (outputs["pred_logits"], outputs["pred_boxes"]):
        tensor.requires_grad_(True)
    losses = build_criterion(_args(assign, assign), NUM_CLASSES)(outputs, targets)
    _assert_finite_with_grad(losses, outputs)
    assert losses["loss_bbox"] == 0 and losses["class_error"] == 100


@pytest.mark.parametrize("assign", [True, False])
def test_finite_with_degenerate_boxes(assign):
    outputs, targets = make_inputs(aux=True)
    # Zero-width, zero-area and sub-pixel boxes, as a careless annotation file may hold.
    tiny = torch.tensor([[0.5, 0.5, 0.0, 0.1], [0.2, 0.3, 0.0, 0.0], [0.8, 0.8, 1e-6, 1e-6]])
    targets[0] = {"labels": torch.tensor([3, 4, 5]), "boxes": tiny}
    outputs["pred_logits"].requires_grad_(True)
    outputs["pred_boxes"].requires_grad_(True)
    losses = build_criterion(_args(assign, assign), NUM_CLASSES)(outputs, targets)
    _assert_finite_with_grad(losses, outputs)


def test_paired_giou_is_the_diagonal_and_finite_for_collapsed_pairs():
    g = torch.Generator().manual_seed(0)
    boxes1, boxes2 = (box_cxcywh_to_xyxy(_random_boxes(5, g)) for _ in range(2))
    assert torch.allclose(paired_generalized_box_iou(boxes1, boxes2),
                          torch.diag(generalized_box_iou(boxes1, boxes2)))
    # Zero-area predictions on zero-area targets: union and enclosing area are 0.
    collapsed = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.2, 0.3, 0.2, 0.4]], requires_grad=True)
    targets = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.2, 0.1, 0.2, 0.2]])
    giou = paired_generalized_box_iou(collapsed, targets)
    giou.sum().backward()
    assert torch.isfinite(giou).all() and torch.isfinite(collapsed.grad).all()


def test_num_boxes_is_averaged_over_processes(tmp_path):
    outputs, targets = make_inputs(aux=False)
    criterion = build_criterion(_args(False, False, False), NUM_CLASSES)
    alone = criterion(outputs, targets)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        distributed = criterion(outputs, targets)
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(alone[k], distributed[k]) for k in alone)

import math

import torch

from deta.proposals import grid_proposals, select_proposals, select_with_nms


def test_grid_proposals_are_token_centred_squares_in_logit_space():
    shapes = [(2, 4), (1, 2)]
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, [3, 7]] = True  # last column of level 0 is padding
    proposals, valid, level_ids = grid_proposals(mask, shapes)
    assert level_ids.tolist() == [0] * 8 + [1] * 2
    boxes = proposals.sigmoid()[0]
    # Level 0 has 3 valid columns and 2 valid rows: token (row 1, col 2) is centred at (2.5/3, 1.5/2).
    torch.testing.assert_close(boxes[6], torch.tensor([2.5 / 3, 1.5 / 2, 0.05, 0.05]))
    torch.testing.assert_close(boxes[9], torch.tensor([1.5 / 2, 0.5, 0.1, 0.1]))
    assert math.isinf(proposals[0, 3, 0]) and not valid[0, 3, 0]
    assert valid[0, 6, 0] and valid.sum() == 8


def test_grid_proposals_mark_out_of_range_boxes_invalid():
    # A 1×60 level: the first centre is 0.5/60 < 0.01 and so unusable.
    proposals, valid, _ = grid_proposals(torch.zeros(1, 60, dtype=torch.bool), [(1, 60)])
    assert not valid[0, 0, 0] and valid[0, 1, 0] and not valid[0, 59, 0]
    assert torch.isinf(proposals[0, 0]).all()


def _boxes(centres_x, level_ids):
    centres_x = torch.tensor(centres_x)
    return torch.stack([centres_x, torch.full_like(centres_x, 0.5), torch.full_like(centres_x, 0.1),
                        torch.full_like(centres_x, 0.1)], -1), torch.tensor(level_ids)


def test_nms_selection_removes_duplicates_and_balances_levels():
    # Level 0: tokens 0 and 1 coincide (IoU 1), token 2 apart; level 1: tokens 3, 4 apart.
    boxes, level_ids = _boxes([0.2, 0.2, 0.6, 0.3, 0.7], [0, 0, 0, 1, 1])
    logits = torch.tensor([5.0, 4.0, 3.0, 1.0, 0.0])
    picked = select_with_nms(logits, boxes, level_ids, num_queries=4, num_levels=2)
    # Per level at most 4 // 2 = 2; the duplicate 1 is suppressed; order is by score.
    assert picked.tolist() == [0, 2, 3, 4]


def test_nms_selection_caps_a_level_then_pads_with_its_best_leftovers():
    boxes, level_ids = _boxes([0.1, 0.3, 0.5, 0.7, 0.9], [0, 0, 0, 0, 1])
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    picked = select_with_nms(logits, boxes, level_ids, num_queries=4, num_levels=2)
    # Level 0 keeps its best 2, level 1 its only token, then the best leftover (token 2) pads to 4.
    assert picked.tolist() == [0, 1, 2, 4]


def test_nms_selection_falls_back_to_top_k_when_too_few_survive():
    boxes, level_ids = _boxes([0.5, 0.5, 0.5], [0, 0, 0])
    logits = torch.tensor([1.0, 3.0, 2.0])
    assert select_with_nms(logits, boxes, level_ids, num_queries=2, num_levels=1).tolist() == [1, 2]


def test_selection_skips_excluded_tokens_and_repeats_when_an_image_is_tiny():
    logits = torch.tensor([[0.0, 9.0, 1.0, 2.0]])
    boxes = torch.rand(1, 4, 4) * 0.5 + 0.25
    candidates = torch.tensor([[True, False, True, True]])
    picked = select_proposals(logits, boxes, torch.zeros(4, dtype=torch.long), candidates, num_queries=4,
                              num_levels=1, use_nms=False)
    assert picked.tolist() == [[3, 2, 0, 3]]

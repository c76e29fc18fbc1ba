import math

import torch

from deta.position_encoding import PositionEmbeddingSine, proposal_position_embedding


def test_sine_encoding_values_follow_the_deformable_detr_convention():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[:, :, 3] = True  # one padded column
    pos = PositionEmbeddingSine(num_pos_feats=4, temperature=100.0)(mask)
    assert pos.shape == (1, 8, 3, 4)
    # Row 1 of 3 valid rows sits at (2 - 0.5) / 3 · 2π; feature pairs share frequencies 100^(0/4), 100^(2/4).
    y = (2 - 0.5) / (3 + 1e-6) * 2 * math.pi
    expected_y = torch.tensor([math.sin(y), math.cos(y), math.sin(y / 10), math.cos(y / 10)])
    torch.testing.assert_close(pos[0, :4, 1, 0], expected_y)
    x = (3 - 0.5) / (3 + 1e-6) * 2 * math.pi  # column 2 of 3 valid columns
    expected_x = torch.tensor([math.sin(x), math.cos(x), math.sin(x / 10), math.cos(x / 10)])
    torch.testing.assert_close(pos[0, 4:, 0, 2], expected_x)


def test_sine_encoding_of_a_pixel_ignores_padding_elsewhere():
    plain = PositionEmbeddingSine()(torch.zeros(1, 5, 6, dtype=torch.bool))
    padded_mask = torch.ones(1, 8, 9, dtype=torch.bool)
    padded_mask[:, :5, :6] = False
    padded = PositionEmbeddingSine()(padded_mask)
    torch.testing.assert_close(padded[..., :5, :6], plain)


def test_proposal_embedding_encodes_each_coordinate_in_turn():
    boxes_logit = torch.tensor([[[0.0, 1.0, -1.0, 2.0]]])
    emb = proposal_position_embedding(boxes_logit, num_feats=4, temperature=100.0)
    assert emb.shape == (1, 1, 16)
    angle = torch.sigmoid(torch.tensor(-1.0)).item() * 2 * math.pi  # w is the third coordinate
    torch.testing.assert_close(emb[0, 0, 8:12], torch.tensor([math.sin(angle), math.cos(angle),
                                                              math.sin(angle / 10), math.cos(angle / 10)]))

"""deta.fixed_shape_nms: DETA's NMS steps on whole batches give the per-image code's results exactly."""
import pytest
import torch
from torchvision.ops import batched_nms

from deta import fixed_shape_nms
from deta.postprocess import NMSPostProcess
from deta.proposals import _top_indices, select_with_nms

# Token grids of 5 levels: a 96×128 image (257 tokens: every level shorter than the 1000 pre-NMS candidates,
# 1285 candidates), a 64×96 one (129 tokens: few enough that torchvision shifts the levels apart instead of
# running NMS per level) and a 320×416 one (2777 tokens: level 0 has more than 1000).
LEVELS = {"96x128": [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)], "64x96": [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)],
          "320x416": [(40, 52), (20, 26), (10, 13), (5, 7), (3, 4)]}


def _proposals(levels: list[tuple[int, int]], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Objectness logits, cxcywh boxes in [0, 1] and level ids; boxes come in near-duplicate clusters (IoU around
    the 0.9 threshold), so that NMS removes many."""
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in levels)
    level_ids = torch.cat([torch.full((h * w,), level) for level, (h, w) in enumerate(levels)])
    logits = torch.randn(batch, tokens, generator=generator) * 3
    centres = torch.rand(batch, tokens // 4 + 1, 2, generator=generator)[:, torch.arange(tokens) // 4]
    jitter = torch.randn(batch, tokens, 2, generator=generator) * 0.004
    sizes = 0.1 + 0.2 * torch.rand(batch, tokens, 2, generator=generator)
    return logits, torch.cat([centres + jitter, sizes], -1).clamp(0, 1), level_ids


@pytest.mark.parametrize("levels", LEVELS.values(), ids=LEVELS.keys())
@pytest.mark.parametrize("num_queries", [20, 300])
def test_batched_proposal_selection_equals_the_per_image_one(levels, num_queries):
    logits, boxes, level_ids = _proposals(levels, batch=3, seed=num_queries)
    batched = fixed_shape_nms.select_with_nms(logits, boxes, level_ids, num_queries, len(levels))
    for image in range(3):
        expected = select_with_nms(logits[image], boxes[image], level_ids, num_queries, len(levels))
        assert torch.equal(batched[image], expected)


def test_batched_selection_falls_back_to_top_k_per_image():
    # Image 0 has one box repeated (one survivor per level: fewer than the queries), image 1 distinct boxes.
    logits, boxes, level_ids = _proposals(LEVELS["96x128"], batch=2, seed=0)
    boxes[0] = torch.tensor([0.5, 0.5, 0.2, 0.2])
    batched = fixed_shape_nms.select_with_nms(logits, boxes, level_ids, 20, 5)
    assert torch.equal(batched[0], _top_indices(logits[0], 20))
    assert torch.equal(batched[1], select_with_nms(logits[1], boxes[1], level_ids, 20, 5))


def test_top_indices_cycle_when_there_are_fewer_than_k():
    scores = torch.tensor([[0.0, 9.0, 1.0], [5.0, 4.0, 6.0]])
    assert fixed_shape_nms.top_indices(scores, 5).tolist() == [[1, 2, 0, 1, 2], [2, 0, 1, 2, 0]]
    assert torch.equal(fixed_shape_nms.top_indices(scores, 5)[0], _top_indices(scores[0], 5))


def test_nms_per_class_is_onnx_non_max_suppression():
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(2, 30, 2, generator=generator) * 50
    boxes = torch.cat([corners, corners + 10 + 20 * torch.rand(2, 30, 2, generator=generator)], -1)
    scores = torch.rand(2, 3, 30, generator=generator)
    scores[:, 1, ::2] = -torch.inf  # class 1: only the odd boxes take part
    kept = fixed_shape_nms.nms_per_class(boxes, scores, 0.5)
    for image in range(2):
        for label in range(3):
            rows = kept[(kept[:, 0] == image) & (kept[:, 1] == label), 2]
            candidates = scores[image, label].isfinite().nonzero()[:, 0]
            expected = candidates[batched_nms(boxes[image, candidates], scores[image, label, candidates],
                                              torch.zeros_like(candidates), 0.5)]
            assert rows.tolist() == expected.tolist()
    assert (kept[:, 1] == 1).any() and (kept[kept[:, 1] == 1, 2] % 2 == 1).all()


@pytest.mark.parametrize(("queries", "classes"), [(900, 91), (50, 7), (20, 6)],
                         ids=["pre-nms top-k", "all pairs", "pairs shifted apart"])
def test_padded_detections_equal_nms_postprocess(queries, classes):
    generator = torch.Generator().manual_seed(queries)
    logits = torch.randn(2, queries, classes, generator=generator) * 2
    # Clustered boxes, so that class-wise NMS (IoU 0.7) removes some.
    centres = torch.rand(2, queries // 3 + 1, 2, generator=generator)[:, torch.arange(queries) // 3]
    boxes = torch.cat([centres + 0.01 * torch.randn(2, queries, 2, generator=generator),
                       0.05 + 0.2 * torch.rand(2, queries, 2, generator=generator)], -1)
    sizes = torch.tensor([[480, 640], [600, 400]])
    postprocess = NMSPostProcess(num_detections=100)
    expected = postprocess({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    scores, labels, detected, count = fixed_shape_nms.nms_detections(postprocess, logits, boxes, sizes)
    assert scores.shape == labels.shape == (2, 100) and detected.shape == (2, 100, 4)
    for image, result in enumerate(expected):
        n = len(result["scores"])
        assert count[image] == n
        assert torch.equal(scores[image, :n], result["scores"]) and torch.equal(labels[image, :n], result["labels"])
        assert torch.equal(detected[image, :n], result["boxes"])
        assert not scores[image, n:].any() and not labels[image, n:].any() and not detected[image, n:].any()


def test_few_pairs_are_suppressed_as_torchvision_shifts_them():
    # With at most 1000 boxes, torchvision's batched_nms shifts each class apart and runs one NMS; the shifted
    # coordinates round differently. These two class-1 boxes have an IoU within rounding of 0.7: suppressed
    # per class, kept when shifted (as the eager post-processing does).
    logits = torch.full((1, 2, 2), -9.0)
    logits[0, :, 1] = torch.tensor([2.0, 1.0])
    boxes = torch.tensor([[[0.4, 0.5, 0.3125, 0.4], [0.4 + 0.05514706037364006, 0.5, 0.3125, 0.4]]])
    sizes = torch.tensor([[480, 640]])
    postprocess = NMSPostProcess()
    expected = postprocess({"pred_logits": logits, "pred_boxes": boxes}, sizes)[0]
    assert expected["labels"].tolist() == [1, 1, 0]
    scores, labels, _, count = fixed_shape_nms.nms_detections(postprocess, logits, boxes, sizes)
    assert count.tolist() == [3] and labels[0, :3].tolist() == [1, 1, 0]
    assert torch.equal(scores[0, :3], expected["scores"])

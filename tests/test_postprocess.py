import torch

from deta.postprocess import NMSPostProcess, PostProcess


def _outputs():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 0, 1] = 3.0  # query 0: class 1, strongly
    logits[0, 1, 1] = 2.0  # query 1: same class, same box → suppressed by NMS
    logits[0, 1, 2] = 1.0  # ... but as class 2 it survives (NMS is per class)
    logits[0, 2, 3] = 0.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 0.2, 0.4], [0.2, 0.2, 0.1, 0.1]]])
    return {"pred_logits": logits, "pred_boxes": boxes}


def test_nms_postprocess_is_class_aware_and_scales_to_pixels():
    result = NMSPostProcess(num_detections=3)(_outputs(), torch.tensor([[100, 200]]))[0]
    assert result["labels"].tolist() == [1, 2, 3]
    torch.testing.assert_close(result["scores"], torch.sigmoid(torch.tensor([3.0, 1.0, 0.0])))
    torch.testing.assert_close(result["boxes"][0], torch.tensor([80.0, 30.0, 120.0, 70.0]))


def test_nms_postprocess_pre_topk_limits_candidates():
    result = NMSPostProcess(num_detections=100, pre_nms_topk=2)(_outputs(), torch.tensor([[100, 200]]))[0]
    # The top-2 pairs are (0, 1) and (1, 1), which coincide: one survives.
    assert result["labels"].tolist() == [1] and len(result["scores"]) == 1


def test_topk_postprocess_keeps_best_pairs_without_nms():
    result = PostProcess(num_detections=2)(_outputs(), torch.tensor([[100, 200]]))[0]
    assert result["labels"].tolist() == [1, 1]
    torch.testing.assert_close(result["boxes"][0], result["boxes"][1])

"""scripts/export_onnx.py and deta.onnx_export: a small DETA in ONNX Runtime against PyTorch."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import deta
from datasets.synthetic import CATEGORIES
from deta.onnx_export import op_types
from deta.onnx_verify import _matched_order, verify_onnx
from scripts import export_onnx

# Each in its own ONNX Runtime call: two sizes at batch 1 (the first with a 1×1 coarsest level, smaller than
# the traced sizes), and a batch of two images of one size.
BATCHES = {"96x128": (1, 96, 128), "160x224": (1, 160, 224), "2 of 128x96": (2, 128, 96)}


@pytest.fixture(scope="module")
def detector(tiny_checkpoint: Path) -> deta.Detector:
    return deta.Detector.from_checkpoint(tiny_checkpoint, device="cpu")


def _images(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height))


def test_graph_is_standard_onnx_with_dynamic_inputs_and_fixed_detections(tiny_onnx: Path) -> None:
    model = onnx.load(tiny_onnx)
    onnx.checker.check_model(model)
    kinds = op_types(model)
    assert "GridSample" not in kinds and {"Gather", "NonMaxSuppression", "TopK"} <= kinds
    assert max(opset.version for opset in model.opset_import if opset.domain in ("", "ai.onnx")) == 18
    dims = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in [*model.graph.input, *model.graph.output]}
    batch, _, height, width = dims["images"]
    assert all(isinstance(d, str) for d in (batch, height, width)) and dims["orig_sizes"] == [batch, 2]
    assert dims["pred_logits"][1:] == [20, 6] and dims["pred_boxes"][1:] == [20, 4]
    assert dims["scores"] == dims["labels"] == [batch, 50] and dims["boxes"] == [batch, 50, 4]
    assert dims["num_valid"] == [batch]
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    assert json.loads(metadata["deta_class_names"]) == {str(category_id): name for category_id, name, _ in CATEGORIES}
    assert json.loads(metadata["deta_preprocess"])["shorter_side"] == 96


@pytest.mark.parametrize("shape", BATCHES.values(), ids=BATCHES.keys())
def test_onnx_runtime_matches_pytorch(tiny_onnx: Path, detector: deta.Detector, shape: tuple[int, int, int]) -> None:
    images = _images(*shape)
    sizes = torch.tensor([[480, 640]] * shape[0])
    result = verify_onnx(tiny_onnx, detector.model, detector.postprocess, images, sizes, "tiny")
    assert result.ok and result.detections == "equal", str(result)
    assert result.max_logit_difference < 1e-4 and result.max_box_difference < 1e-4


def _with_initializer(model: onnx.ModelProto, suffix: str, change) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    (tensor,) = [t for t in model.graph.initializer if t.name.endswith(suffix)]
    tensor.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(tensor)), tensor.name))
    return model


def _nms_thresholds(model: onnx.ModelProto) -> list[str]:
    """Names of the iou_threshold inputs of the NonMaxSuppression nodes (proposals, then post-processing)."""
    return [node.input[3] for node in model.graph.node if node.op_type == "NonMaxSuppression"]


def test_a_wrong_graph_fails_the_comparison(tiny_onnx: Path, detector: deta.Detector, tmp_path: Path) -> None:
    images, sizes = _images(*BATCHES["160x224"]), torch.tensor([[480, 640]])
    model = onnx.load(tiny_onnx)
    # A class bias off by 0.01: the logits are off.
    wrong = tmp_path / "bias.onnx"
    onnx.save(_with_initializer(model, "class_embed.0.bias", lambda bias: bias + 0.01), wrong)
    result = verify_onnx(wrong, detector.model, detector.postprocess, images, sizes, "bias")
    assert not result.ok and result.max_logit_difference > 1e-3
    # The post-processing's NMS at IoU 0.1 instead of 0.7: the same logits, other detections.
    threshold = _nms_thresholds(model)[-1]
    loose = onnx.ModelProto.FromString(model.SerializeToString())
    constants = [n for n in loose.graph.node if n.op_type == "Constant" and threshold in n.output]
    if constants:
        constants[0].attribute[0].t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(
            constants[0].attribute[0].t) * 0 + 0.1))
    else:
        loose = _with_initializer(loose, threshold, lambda value: value * 0 + 0.1)
    onnx.save(loose, wrong)
    result = verify_onnx(wrong, detector.model, detector.postprocess, images, sizes, "nms")
    assert result.max_logit_difference < 1e-4 and not result.ok and "not in" in result.detections


@pytest.mark.parametrize(("flags", "message"), [
    (["--out", "{checkpoint}"], "--out {checkpoint}: that is the checkpoint being exported"),
    (["--out", "{folder}"], "--out {folder}: a folder"),
    (["--out", "{folder}/x.onnx", "--opset", "17"], "opset 17: the exporter writes opset 18 or later"),
    (["--out", "{folder}/x.onnx", "--num_detections", "10"], "--num_detections: only the post-processing"),
    (["--out", "{folder}/x.onnx", "--", "--bogus"], "main.py flags after '--': unknown --bogus"),
])
def test_bad_input_is_one_line_and_status_2(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            flags: list[str], message: str) -> None:
    fill = {"checkpoint": tiny_checkpoint, "folder": tmp_path}
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main(["--resume", str(tiny_checkpoint), *[flag.format(**fill) for flag in flags]])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {message.format(**fill)}") and "\n" not in error
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*.tmp"))


def test_queries_may_swap_places_only_with_near_tied_objectness() -> None:
    boxes = np.random.default_rng(0).random((6, 4)).astype(np.float32)
    swapped = boxes[[0, 2, 1, 3, 4, 5]]
    objectness = np.array([5.0, 3.0, 3.0 + 1e-6, 2.0, 1.0, 0.0], dtype=np.float32)
    assert _matched_order(swapped, boxes, objectness, 1e-4).tolist() == [0, 2, 1, 3, 4, 5]
    objectness[2] = 2.5  # not a near tie: the graph's order is wrong
    assert _matched_order(swapped, boxes, objectness, 1e-4).tolist() == list(range(6))
    assert _matched_order(swapped, boxes, None, 1e-4).tolist() == list(range(6))  # learned queries never move

"""ONNX export of DETA: standard ONNX ops only, with a dynamic batch and image size.

The graph (see `export_onnx`) takes `images`, an N×3×H×W float32 batch normalised and resized as
`Detector.preprocess` does; the images of one batch share H×W and are not padded (images of other sizes
run in separate calls: zero padding without a mask would be read as image content). It returns
`pred_logits` (N×Q×C) and `pred_boxes` (N×Q×4, cxcywh normalised to the image), the model's outputs.
With post-processing it also takes `orig_sizes` (N×2 int64, the (H, W) to scale boxes to: the original
image's, or H×W itself for boxes in input pixels) and returns DETA's NMS post-processing, padded to a fixed
count D per image: `scores` (N×D, 0 past the detections), `labels` (N×D int64), `boxes` (N×D×4 xyxy) and
`num_valid` (N int64, the detections of each image).

How it exports: the dynamo exporter (torch.export + onnxscript) traces `DETA.forward` on a batch tensor.
Multi-scale deformable attention runs as `ops.ms_deform_attn_gather` (Gather-based bilinear sampling, no
GridSample); the two-stage proposal selection and the post-processing run as `deta.fixed_shape_nms`,
whose one data-dependent step becomes ONNX NonMaxSuppression. `deta.onnx_verify` checks a graph in ONNX
Runtime against the model.
"""
import copy
import os

import torch
from torch import Tensor, nn

from .checkpoint import save_atomically
from .detector import DETA
from .errors import InputError
from .fixed_shape_nms import SCORE_THRESHOLD, nms_detections
from .postprocess import NMSPostProcess, PostProcess

DEFAULT_OPSET = 18
# torch's exporter writes opset 18; its conversion of this graph to 17 fails (and leaves 18).
MIN_OPSET = 18
MODEL_OUTPUTS = ["pred_logits", "pred_boxes"]
DETECTION_OUTPUTS = ["scores", "labels", "boxes", "num_valid"]


class ExportedDETA(nn.Module):
    """What the ONNX graph computes: `model` on a batch of same-size images, optionally post-processed."""

    def __init__(self, model: DETA, postprocess: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.postprocess = postprocess

    def forward(self, images: Tensor, orig_sizes: Tensor | None = None) -> tuple[Tensor, ...]:
        outputs = self.model(images)
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if self.postprocess is None:
            return logits, boxes
        if isinstance(self.postprocess, NMSPostProcess):
            return logits, boxes, *nms_detections(self.postprocess, logits, boxes, orig_sizes)
        scores, labels, detected = self.postprocess.detections(logits, boxes, orig_sizes)
        return logits, boxes, scores, labels, detected, torch.full_like(labels[:, 0], labels.shape[1])


def export_onnx(model: DETA, path: str | os.PathLike, *, postprocess: nn.Module | None = None,
                num_detections: int | None = None, opset: int = DEFAULT_OPSET,
                metadata: dict[str, str] | None = None) -> None:
    """Write `model` (in eval mode, on the CPU) as an ONNX graph to `path`, atomically (see the module docstring).

    Args:
        postprocess: the model's post-processor (NMSPostProcess or PostProcess, from `build_model`) to
            include in the graph; None for the model's outputs alone.
        num_detections: detections per image after post-processing (default: the post-processor's).
        opset: ONNX opset, 18 or later (the file is checked to have it).
        metadata: key-value strings stored in the file (ONNX metadata_props).
    """
    if opset < MIN_OPSET:
        raise InputError(f"opset {opset}: the exporter writes opset {MIN_OPSET} or later")
    if postprocess is not None and num_detections is not None:
        if num_detections < 1:
            raise InputError(f"num_detections {num_detections}: must be at least 1")
        postprocess = copy.copy(postprocess)
        postprocess.num_detections = num_detections
    if not isinstance(postprocess, NMSPostProcess | PostProcess | None):
        raise TypeError(f"postprocess: expected NMSPostProcess or PostProcess, got {type(postprocess).__name__}")
    # On the CPU: the batched NMS reproduces torchvision's choices for the device it is traced on.
    exported = ExportedDETA(copy.deepcopy(model).cpu(), postprocess).eval()
    images, dynamic = _example_inputs(exported.model)
    inputs = (images,) if postprocess is None else (images, torch.tensor([[480, 640], [640, 480]]))
    dynamic_shapes = {"images": dynamic} if postprocess is None else {"images": dynamic,
                                                                     "orig_sizes": {0: dynamic[0]}}
    with torch.no_grad():
        program = torch.onnx.export(
            exported, inputs, dynamo=True, opset_version=opset, verbose=False, dynamic_shapes=dynamic_shapes,
            input_names=["images", "orig_sizes"][:len(inputs)],
            output_names=MODEL_OUTPUTS + (DETECTION_OUTPUTS if postprocess is not None else []),
            custom_translation_table=_translations())
    proto = program.model_proto
    written = max(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    if written != opset:
        raise InputError(f"opset {opset}: the exporter could not convert the graph to it (it wrote opset {written})")
    if "GridSample" in op_types(proto):
        raise RuntimeError("the exported graph contains GridSample; ms_deform_attn did not take its export path")
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=value)
    save_atomically(proto, path, lambda graph, file: file.write(graph.SerializeToString()))


def _example_inputs(model: DETA) -> tuple[Tensor, dict[int, torch.export.Dim]]:
    """Two random images, and the dynamic dimensions of the input (batch, height, width).

    Every level of the example is at least 2×2 and of distinct height and width, so that the trace assumes
    nothing of size 1 and no equal sides. The sizes declared to the exporter start above the coarsest stride
    (its map at least 2 wide); the graph also runs on smaller images (the tests run it at 96×128).
    """
    extra_levels = model.num_feature_levels - len(model.backbone.strides)
    coarsest = model.backbone.strides[-1] * 2 ** max(extra_levels, 0)
    images = torch.randn(2, 3, 2 * coarsest, 5 * coarsest // 2)
    return images, {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=coarsest + 1),
                    3: torch.export.Dim("width", min=coarsest + 1)}


def _translations() -> dict:
    """ONNX translations of the ops that torch.export keeps as they are."""
    from onnxscript import FLOAT, INT64
    from onnxscript import opset18 as op

    def nms_per_class_onnx(boxes: FLOAT, scores: FLOAT, iou_threshold: float) -> INT64:
        # fixed_shape_nms.nms_per_class has NonMaxSuppression's semantics; every box may be kept.
        return op.NonMaxSuppression(boxes, scores, op.Shape(boxes, start=1, end=2),
                                    op.Constant(value_floats=[iou_threshold]),
                                    op.Constant(value_floats=[SCORE_THRESHOLD]))

    return {torch.ops.deta.nms_per_class.default: nms_per_class_onnx}


def op_types(model_proto: object) -> set[str]:
    """Every operator type in an ONNX ModelProto: its graph, their subgraphs and its local functions."""
    found: set[str] = set()
    graphs = [model_proto.graph, *model_proto.functions]
    while graphs:
        for node in graphs.pop().node:
            found.add(node.op_type)
            for attribute in node.attribute:
                graphs += [attribute.g] if attribute.HasField("g") else []
                graphs += list(attribute.graphs)
    return found

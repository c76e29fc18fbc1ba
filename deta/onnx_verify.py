"""An exported DETA graph in ONNX Runtime against the PyTorch model it came from.

Two runtimes differ at float level (~1e-6), which keeps the model's continuous outputs within tolerance but
can flip a discrete choice between candidates whose scores are that close: two proposals of near-equal
objectness swap places among the queries (with random weights, a few per 900 queries), and two detections
of near-equal score swap ranks. The comparison allows exactly those flips.
"""
import copy
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .detector import DETA
from .onnx_export import MODEL_OUTPUTS

# Objectness logits this close may swap order: twice the drift the tolerance allows each side.
SELECTION_TIE = 2e-4


@dataclass
class Verification:
    """ONNX Runtime against PyTorch on one batch."""
    name: str
    max_logit_difference: float
    max_box_difference: float
    reordered: int  # queries that swapped places with one of near-tied objectness
    detections: str  # "equal", "n/a" (no post-processing in the graph), or what differs
    ok: bool

    def __str__(self) -> str:
        swaps = (f" (matching the {self.reordered} queries that swapped places with one of objectness within "
                 f"{SELECTION_TIE:g})" if self.reordered else "")
        return (f"{self.name}: max |Δ| pred_logits {self.max_logit_difference:.2e}, pred_boxes "
                f"{self.max_box_difference:.2e}{swaps}; detections {self.detections}; {'OK' if self.ok else 'FAILED'}")


def verify_onnx(path: str | os.PathLike, model: DETA, postprocess: nn.Module | None, images: Tensor,
                orig_sizes: Tensor, name: str, tolerance: float = 1e-4) -> Verification:
    """Run the graph at `path` in ONNX Runtime (CPU) on `images` (N×3×H×W) and compare with `model` in PyTorch.

    Every query's logits and box must agree within `tolerance`, in the same order except for queries of
    near-tied objectness (SELECTION_TIE). Where the graph post-processes (`orig_sizes` feeds it), its
    detections must be PyTorch's one to one: the same label, scores within `tolerance`, boxes within
    `tolerance` of the image size in pixels; only where the list was cut at the graph's count may the last
    places differ, among scores within `tolerance` of the last kept.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"images": images.numpy()}
    if "orig_sizes" in {graph_input.name for graph_input in session.get_inputs()}:
        feeds["orig_sizes"] = orig_sizes.numpy()
    actual = dict(zip([output.name for output in session.get_outputs()], session.run(None, feeds), strict=True))
    with torch.no_grad():
        outputs = model.eval()(list(images.to(next(model.parameters()).device)))
    expected = {key: outputs[key].float().cpu().numpy() for key in MODEL_OUTPUTS}
    logit_difference = box_difference = 0.0
    reordered = 0
    for image in range(len(images)):
        order = _matched_order(actual["pred_boxes"][image], expected["pred_boxes"][image],
                               _query_objectness(outputs, image), tolerance)
        logit_difference = max(logit_difference, np.abs(actual["pred_logits"][image]
                                                        - expected["pred_logits"][image][order]).max())
        box_difference = max(box_difference, np.abs(actual["pred_boxes"][image]
                                                    - expected["pred_boxes"][image][order]).max())
        reordered += int((order != np.arange(len(order))).sum())
    ok = logit_difference <= tolerance and box_difference <= tolerance
    detections = "n/a"
    if "scores" in actual and postprocess is not None:
        postprocess = copy.copy(postprocess)
        postprocess.num_detections = actual["scores"].shape[1]  # what the graph was exported with
        results = postprocess({key: torch.from_numpy(value) for key, value in expected.items()}, orig_sizes)
        problems = [_detection_mismatch(actual, image, result, tolerance * float(orig_sizes[image].max()), tolerance)
                    for image, result in enumerate(results)]
        problems = [problem for problem in problems if problem]
        detections = "; ".join(problems) if problems else "equal"
        ok = ok and not problems
    return Verification(name, float(logit_difference), float(box_difference), reordered, detections, ok)


def _query_objectness(outputs: dict, image: int) -> np.ndarray | None:
    """Each query's proposal objectness logit in a two-stage model (None otherwise): the query starts from the
    token whose encoder box is its initial reference."""
    if "enc_outputs" not in outputs:
        return None
    token_boxes = outputs["enc_outputs"]["pred_boxes"][image].float()
    references = outputs["init_reference"][image].float()
    tokens = torch.cat([torch.cdist(part, token_boxes, p=float("inf")).argmin(1) for part in references.split(100)])
    return outputs["enc_outputs"]["pred_logits"][image, tokens, 0].float().cpu().numpy()


def _matched_order(actual_boxes: np.ndarray, boxes: np.ndarray, objectness: np.ndarray | None,
                   tolerance: float) -> np.ndarray:
    """For each query of the graph, the PyTorch query it is: the one with the same box, where the two orders
    differ only between queries of near-tied objectness; else the queries in their own order."""
    identity = np.arange(len(boxes))
    match = np.abs(actual_boxes[:, None] - boxes[None]).max(-1).argmin(1)
    moved = match != identity
    if not moved.any() or objectness is None or len(set(match.tolist())) < len(match):
        return identity
    if (np.abs(objectness[match] - objectness)[moved] > SELECTION_TIE).any():
        return identity
    if np.abs(actual_boxes - boxes[match]).max() > tolerance:
        return identity
    return match


def _detection_mismatch(actual: dict[str, np.ndarray], image: int, expected: dict[str, Tensor],
                        box_tolerance: float, score_tolerance: float) -> str:
    """'' when image `image`'s detections in the graph's outputs match `expected`, else what differs."""
    count = int(actual["num_valid"][image])
    found = [(float(actual["scores"][image, i]), int(actual["labels"][image, i]), actual["boxes"][image, i])
             for i in range(count)]
    wanted = list(zip(expected["scores"].tolist(), expected["labels"].tolist(), expected["boxes"].numpy(),
                      strict=True))
    unmatched = []
    for score, label, box in wanted:
        match = next((i for i, (s, lb, b) in enumerate(found) if lb == label and abs(s - score) <= score_tolerance
                      and np.abs(b - box).max() <= box_tolerance), None)
        if match is None:
            unmatched.append(score)
        else:
            found.pop(match)
    # Where the list was cut at the graph's count, those within the tolerance of the last place may differ.
    cut = len(wanted) == actual["scores"].shape[1]
    last_place = min(score for score, _, _ in wanted) + score_tolerance if cut else -np.inf
    missing = [score for score in unmatched if score > last_place]
    extra = [score for score, _, _ in found if score > last_place]
    if not missing and not extra:
        return ""
    return (f"image {image}: {len(missing)} of PyTorch's {len(wanted)} not in the graph's {count}, "
            f"{len(extra)} of the graph's not in PyTorch's")

"""Comparing our DETA with a reference implementation's outputs, on any CPU.

Most of a forward pass is continuous: a float-level difference (another CPU's matmul kernels, another
vector ISA or thread count, another torch release) moves its outputs by ~1e-6. Two steps are discrete
decisions: which encoder tokens become decoder queries (top-k, NMS, level balance) and which
(query, class) pairs survive post-processing (top-k, NMS). With random weights many candidates tie to
1e-6, so end-to-end comparisons pass on one machine and fail on the next. Each comparison here checks
the continuous parts tightly and the decisions up to the reference's own near-ties:

1. encoder: objectness and box of every token of the reference (ENCODER_ATOL);
2. choice of queries: our tokens are the reference's, except swaps between tokens whose reference
   objectness logits lie within SELECTION_TIE of each other;
3. decoder, run on the reference's chosen tokens: every query's logits and boxes, of every layer (ATOL);
4. detections: the reference's (label, score, box) set, except swaps between detections whose reference
   scores lie within DETECTION_TIE (in rank, or as NMS twins), and the last ranks within DETECTION_TIE of
   the lowest score kept.

A real error (a norm off by 0.1 %, a sampling level shifted by a pixel, valid ratios off by a cell)
moves step 1 or 3 far beyond the tolerances; tests/test_parity_checks.py shows that each makes
`assert_matches` fail.
"""
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

import deta.transformer
from deta.box_ops import box_cxcywh_to_xyxy

ATOL = 1e-4
ENCODER_ATOL = 1e-4
# Twice the largest float-level drift the tolerances allow: only candidates this close can swap.
SELECTION_TIE = 2 * ENCODER_ATOL
DETECTION_TIE = 1e-4  # scores: sigmoid' <= 1/4 turns ATOL logits into at most 2.5e-5
NMS_IOU = 0.7  # of the post-processing, for recognising NMS twins


@dataclass
class ImageReference:
    """One image's reference outputs. Token indices count the tokens of `spatial_shapes` row-major, level by
    level: the reference's own layout, which may differ from ours (a batch padded to another size)."""
    spatial_shapes: list[list[int]]
    enc_logits: Tensor  # (S,) objectness (class 0 of the encoder head)
    enc_boxes: Tensor  # (S, 4) normalised cxcywh
    selected: Tensor  # (Q,) the token each query starts from
    pred_logits: Tensor  # (Q, C)
    pred_boxes: Tensor  # (Q, 4)
    detections: dict[str, Tensor]
    init_reference: Tensor | None = None  # (Q, 4)
    aux_pred_logits: Tensor | None = None  # (layers - 1, Q, C)
    aux_pred_boxes: Tensor | None = None  # (layers - 1, Q, 4)


def references_from_fixture(batch: dict) -> list[ImageReference]:
    """The images of one entry of tests/data/official_*.pt (a batch run by tests/make_official_fixtures.py)."""
    optional = ("init_reference", "aux_pred_logits", "aux_pred_boxes")
    references = []
    for index, detections in enumerate(batch["detections"]):
        extra = {key: batch[key][:, index] if key.startswith("aux") else batch[key][index]
                 for key in optional if key in batch}
        references.append(ImageReference(batch["spatial_shapes"], batch["enc_logits"][index],
                                         batch["enc_boxes"][index], batch["selected"][index],
                                         batch["pred_logits"][index], batch["pred_boxes"][index], detections,
                                         **extra))
    return references


def token_map(source_shapes: Sequence[Sequence[int]], target_shapes: Sequence[Sequence[int]]) -> Tensor:
    """Index in the `target_shapes` layout of every token of the `source_shapes` layout (same levels, each
    target map at least as large: the same image padded at the bottom and right)."""
    target_starts = torch.tensor([0, *[h * w for h, w in target_shapes]]).cumsum(0)
    parts = []
    for level, ((height, width), (_, target_width)) in enumerate(zip(source_shapes, target_shapes, strict=True)):
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        parts.append(target_starts[level] + ys.flatten() * target_width + xs.flatten())
    return torch.cat(parts)


@dataclass
class Run:
    """Our forward pass with the queries forced onto the references' tokens, and the tokens we chose."""
    outputs: dict
    chosen: Tensor  # (B, Q) in our layout
    spatial_shapes: list[list[int]]


@contextmanager
def _forced_selection(model: nn.Module, references: Sequence[ImageReference] | None,
                      record: dict) -> Iterator[None]:
    """Within: the model's proposal selection records its choice and, given references, returns theirs."""
    choose = deta.transformer.select_proposals

    def record_shapes(module: nn.Module, args: tuple) -> None:
        record["spatial_shapes"] = args[1].tolist()

    def select(*args, **kwargs) -> Tensor:
        record["chosen"] = choose(*args, **kwargs)
        if references is None:
            return record["chosen"]
        return torch.stack([token_map(ref.spatial_shapes, record["spatial_shapes"])[ref.selected]
                            for ref in references])

    hook = model.transformer.encoder.register_forward_pre_hook(record_shapes)
    deta.transformer.select_proposals = select
    try:
        yield
    finally:
        deta.transformer.select_proposals = choose
        hook.remove()


@torch.no_grad()
def run(model: nn.Module, images: list[Tensor], references: Sequence[ImageReference] | None = None) -> Run:
    """`model(images)`, its decoder started from the references' chosen tokens when given."""
    record: dict = {}
    with _forced_selection(model, references, record):
        outputs = model(images)
    return Run(outputs, record["chosen"], record["spatial_shapes"])


def own_references(model: nn.Module, images: list[Tensor], postprocess: nn.Module) -> list[ImageReference]:
    """References from our own model, each image run alone (for comparisons of one mode with another)."""
    references = []
    for image in images:
        result = run(model, [image])
        out = result.outputs
        aux = out.get("aux_outputs")
        references.append(ImageReference(
            result.spatial_shapes, out["enc_outputs"]["pred_logits"][0, :, 0], out["enc_outputs"]["pred_boxes"][0],
            result.chosen[0], out["pred_logits"][0], out["pred_boxes"][0],
            postprocess(out, torch.tensor([list(image.shape[-2:])]))[0], out["init_reference"][0],
            torch.stack([layer["pred_logits"][0] for layer in aux]) if aux else None,
            torch.stack([layer["pred_boxes"][0] for layer in aux]) if aux else None))
    return references


def assert_matches(model: nn.Module, images: list[Tensor], references: Sequence[ImageReference],
                   postprocess: nn.Module) -> None:
    """Steps 1-4 of the module docstring for every image of one forward pass of `model` over `images`."""
    result = run(model, images, references)
    out = result.outputs
    sizes = torch.tensor([list(image.shape[-2:]) for image in images])
    detections = postprocess(out, sizes)
    for index, ref in enumerate(references):
        where = token_map(ref.spatial_shapes, result.spatial_shapes)
        _assert_close(f"image {index} encoder objectness", out["enc_outputs"]["pred_logits"][index, where, 0],
                      ref.enc_logits, ENCODER_ATOL)
        _assert_close(f"image {index} encoder boxes", out["enc_outputs"]["pred_boxes"][index, where], ref.enc_boxes,
                      ENCODER_ATOL)
        assert_same_choice(result.chosen[index], where, out["enc_outputs"]["pred_logits"].shape[1], ref)
        _assert_decoder_matches(out, index, ref)
        height, width = sizes[index].tolist()
        their_boxes = box_cxcywh_to_xyxy(ref.pred_boxes) * torch.tensor([width, height, width, height])
        assert_same_detections(detections[index], ref.detections, their_boxes, ref.pred_logits.sigmoid(),
                               box_atol=ATOL * max(height, width))


def assert_same_choice(chosen: Tensor, where: Tensor, num_tokens: int, ref: ImageReference) -> None:
    """Our chosen tokens (indices among our `num_tokens`; `where` maps the reference's tokens to ours) are the
    reference's, up to swaps of near-tied objectness."""
    ref_index = torch.full((num_tokens,), -1, dtype=torch.long)
    ref_index[where] = torch.arange(len(where))
    ours = ref_index[chosen].tolist()
    assert -1 not in ours, "we chose a token that the reference does not have (padding)"
    only_ours, only_theirs = _multiset_difference(ours, ref.selected.tolist())
    gaps = (ref.enc_logits[only_ours].sort().values - ref.enc_logits[only_theirs].sort().values).abs()
    assert not len(gaps) or gaps.max() <= SELECTION_TIE, (
        f"{len(gaps)} chosen token(s) differ from the reference's, by up to {gaps.max():.3g} in objectness "
        f"(only swaps within {SELECTION_TIE} are ties)")


def _multiset_difference(ours: list[int], theirs: list[int]) -> tuple[list[int], list[int]]:
    remaining = list(theirs)
    only_ours = []
    for token in ours:
        if token in remaining:
            remaining.remove(token)
        else:
            only_ours.append(token)
    return only_ours, remaining


def _assert_decoder_matches(out: dict, index: int, ref: ImageReference) -> None:
    pairs = [("pred_logits", out["pred_logits"][index], ref.pred_logits),
             ("pred_boxes", out["pred_boxes"][index], ref.pred_boxes)]
    if ref.init_reference is not None:
        pairs.append(("init_reference", out["init_reference"][index], ref.init_reference))
    for key, name in (("aux_pred_logits", "pred_logits"), ("aux_pred_boxes", "pred_boxes")):
        if getattr(ref, key) is not None:
            ours = torch.stack([aux[name][index] for aux in out["aux_outputs"]])
            pairs.append((key, ours, getattr(ref, key)))
    for name, ours, theirs in pairs:
        _assert_close(f"image {index} {name}", ours, theirs, ATOL)


def _assert_close(what: str, ours: Tensor, theirs: Tensor, atol: float) -> None:
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol, msg=lambda message: f"{what}: {message}")


def assert_same_detections(ours: dict[str, Tensor], theirs: dict[str, Tensor], their_boxes: Tensor,
                           their_scores: Tensor, box_atol: float, tie: float = DETECTION_TIE) -> None:
    """Equal detection sets, each detection matched by label, score (within `tie`) and box (`box_atol`).

    `their_boxes` (Q, 4) and `their_scores` (Q, C) are the reference's candidates (every query's box in
    pixels and class scores). Unmatched detections are allowed only where float-level noise decides: within
    `tie` of the lowest reference score (the cut), and NMS twins: a reference detection replaced by another of
    the reference's candidates of its class, overlapping beyond NMS_IOU, with a score within `tie`.
    """
    matched_ours: set[int] = set()
    unmatched_theirs = []
    for j in range(len(theirs["scores"])):
        candidates = ((ours["labels"] == theirs["labels"][j]) & ((ours["scores"] - theirs["scores"][j]).abs() <= tie)
                      & ((ours["boxes"] - theirs["boxes"][j]).abs().amax(-1) <= box_atol)).nonzero()[:, 0].tolist()
        free = [i for i in candidates if i not in matched_ours]
        if free:
            matched_ours.add(free[0])
        else:
            unmatched_theirs.append(j)
    cut = float(theirs["scores"].min()) + tie if len(theirs["scores"]) else float("-inf")
    their_left = [j for j in unmatched_theirs if theirs["scores"][j] > cut]
    our_left = [i for i in range(len(ours["scores"])) if i not in matched_ours and ours["scores"][i] > cut]

    def is_their_candidate(i: int) -> bool:
        label = int(ours["labels"][i])
        return bool((((their_boxes - ours["boxes"][i]).abs().amax(-1) <= box_atol)
                     & ((their_scores[:, label] - ours["scores"][i]).abs() <= tie)).any())

    for j in list(their_left):
        twins = [i for i in our_left if ours["labels"][i] == theirs["labels"][j]
                 and abs(float(ours["scores"][i] - theirs["scores"][j])) <= tie
                 and box_iou(ours["boxes"][i:i + 1], theirs["boxes"][j:j + 1]).item() > NMS_IOU
                 and is_their_candidate(i)]
        if twins:
            their_left.remove(j)
            our_left.remove(twins[0])
    assert not their_left and not our_left, (
        f"detections differ beyond ties: reference's {_describe(theirs, their_left)} unmatched in ours, "
        f"ours {_describe(ours, our_left)} unmatched in the reference's")


def _describe(detections: dict[str, Tensor], indices: list[int]) -> str:
    shown = [f"#{i} (label {int(detections['labels'][i])}, score {float(detections['scores'][i]):.6f})"
             for i in indices[:5]]
    return "[" + ", ".join(shown) + (", ..." if len(indices) > 5 else "") + "]"

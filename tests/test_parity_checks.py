"""The parity comparison (tests/parity.py) fails on a model that is wrong by a little.

Each mutation is small enough to hide among the near-ties of random weights, and must make
`assert_matches` fail on the official tiny fixture, in the default mode as in the padded one: the first
three in the encoder check, then one in each later check: decoder, choice of queries, detections.
"""
import pytest
import torch
import torch.nn.functional as F
from parity import assert_matches, references_from_fixture
from test_official_parity import official_model

import deta.postprocess
import deta.proposals
import deta.transformer
import ops.attention
from official_fixture import make_images


def _scale_layer_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every LayerNorm's output x 1.001."""
    layer_norm = F.layer_norm
    monkeypatch.setattr(F, "layer_norm", lambda *args, **kwargs: layer_norm(*args, **kwargs) * 1.001)


def _shift_one_sampling_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deformable attention samples level 2 one pixel to the right of where it should."""
    attend = ops.attention.ms_deform_attn

    def shifted(value, spatial_shapes, level_start_index, locations, weights):
        locations = locations.clone()
        locations[..., 2, :, 0] += 1.0 / spatial_shapes[2, 1]
        return attend(value, spatial_shapes, level_start_index, locations, weights)

    monkeypatch.setattr(ops.attention, "ms_deform_attn", shifted)


def _valid_ratios_off_by_one_cell(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each level's valid ratio counts one row and one column too many."""
    valid_ratio = deta.transformer._valid_ratio

    def off_by_one(mask: torch.Tensor) -> torch.Tensor:
        height, width = mask.shape[-2:]
        return valid_ratio(mask) + torch.tensor([1.0 / width, 1.0 / height])

    monkeypatch.setattr(deta.transformer, "_valid_ratio", off_by_one)


def _scale_decoder_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decoder layer's output x 1.001 (the encoder, and with it the choice of queries, unchanged)."""
    forward = deta.transformer.DecoderLayer.forward
    monkeypatch.setattr(deta.transformer.DecoderLayer, "forward", lambda *args: forward(*args) * 1.001)


def _proposals_by_objectness_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Queries are the best tokens by objectness, without DETA's NMS and level balance (every number unchanged)."""
    monkeypatch.setattr(deta.proposals, "select_with_nms", lambda logits, boxes, level_ids, num_queries, num_levels:
                        deta.proposals._top_indices(logits, num_queries))


def _detections_half_a_pixel_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Post-processing scales boxes to pixels half a pixel off (the model unchanged)."""
    absolute = deta.postprocess.absolute_xyxy
    monkeypatch.setattr(deta.postprocess, "absolute_xyxy", lambda *args: absolute(*args) + 0.5)


MUTATIONS = [_scale_layer_norms, _shift_one_sampling_level, _valid_ratios_off_by_one_cell, _scale_decoder_outputs,
             _proposals_by_objectness_alone,
             _detections_half_a_pixel_off]


@pytest.fixture(scope="module", params=["per_image", "padded"])
def tiny(request):
    """Our model of the official tiny fixture in one batching mode, with that mode's references."""
    expected, model, postprocess = official_model("tiny", "--eval_batching", request.param)
    if request.param == "padded":
        references = references_from_fixture(expected["padded"])
    else:
        references = [references_from_fixture(alone)[0] for alone in expected["single_image"]]
    return model, postprocess, references


def test_the_unchanged_model_passes(tiny):
    model, postprocess, references = tiny
    assert_matches(model, make_images(0), references, postprocess)


@pytest.mark.parametrize("mutate", MUTATIONS, ids=lambda mutate: mutate.__name__.strip("_"))
def test_a_slightly_wrong_model_fails(mutate, tiny, monkeypatch):
    model, postprocess, references = tiny
    mutate(monkeypatch)
    with pytest.raises(AssertionError):
        assert_matches(model, make_images(0), references, postprocess)

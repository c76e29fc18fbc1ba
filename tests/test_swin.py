"""Our Swin-L backbone (timm's modules) against the official DETA Swin-L, number for number.

tests/data/official_swin_{shallow,full}.pt come from the official code (its models/swin.py), run on the CPU
by tests/make_official_fixtures.py with every float tensor set by `official_fixture.perturbed_state_dict`, on
the two images of `make_images(0)`, as one padded batch and image by image; tests/parity.py compares. "full"
is Swin-L (197M parameters, a slow test); "shallow", run by default, has Swin-L's widths, heads, window and key
structure with depths (2, 2, 2, 2).
"""
from pathlib import Path

import pytest
import torch
from parity import assert_matches, references_from_fixture

import deta
from deta import swin
from deta.checkpoint import from_official, load_model_weights, to_official
from deta.errors import InputError
from main import get_args_parser
from official_fixture import make_images, perturbed_state_dict

DATA = Path(__file__).parent / "data"
SHALLOW = (2, 2, 2, 2)


def _model_with_official_weights(expected: dict):
    """Our model from the official flags, loaded from an official-format checkpoint of the fixture weights."""
    args = get_args_parser().parse_args([*expected["flags"], "--pretrained_backbone", "none"])
    model, _, postprocessors = deta.build_model(args)
    official = to_official(model.state_dict(), args.two_stage, args.with_box_refine)
    assert {key: list(value.shape) for key, value in official.items()} == expected["state_dict_shapes"]
    floats = {key: tuple(value.shape) for key, value in official.items() if value.is_floating_point()}
    load_model_weights(model, from_official({**official, **perturbed_state_dict(floats, seed=0)}))
    return model.eval(), postprocessors["bbox"]


@pytest.fixture(scope="module", params=["shallow", pytest.param("full", marks=pytest.mark.slow)])
def official(request):
    """The official outputs (tests/data/official_swin_*.pt) and our model with the same weights."""
    expected = torch.load(DATA / f"official_swin_{request.param}.pt", weights_only=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(swin.SWIN_VARIANTS["swin_large"], "depths", tuple(expected["depths"]))
        return expected, *_model_with_official_weights(expected)


@pytest.fixture(scope="module")
def backbone():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(swin.SWIN_VARIANTS["swin_large"], "depths", SHALLOW)
        return swin.SwinBackbone("swin_large", train_backbone=True, pretrained="none")


def test_official_swin_checkpoint_reproduces_the_official_padded_batch(official, monkeypatch):
    expected, model, postprocess = official
    monkeypatch.setattr(model, "pad_in_inference", True)  # = --eval_batching padded
    assert_matches(model, make_images(0), references_from_fixture(expected["padded"]), postprocess)


def test_default_mode_swin_gives_each_image_its_official_single_image_output(official):
    expected, model, postprocess = official
    assert not model.pad_in_inference
    references = [references_from_fixture(alone)[0] for alone in expected["single_image"]]
    assert_matches(model, make_images(0), references, postprocess)


def test_swin_large_is_timm_swin_large_patch4_window12_384_with_three_outputs(backbone):
    assert (backbone.strides, backbone.num_channels) == ([8, 16, 32], [384, 768, 1536])
    features = backbone(torch.zeros(1, 3, 70, 90))  # padded to whole patches, windows and merges inside
    assert [tuple(f.shape) for f in features] == [(1, 384, 9, 12), (1, 768, 5, 6), (1, 1536, 3, 3)]
    attention = backbone.body["layers"][3].blocks[1]
    assert (attention.window_size, attention.shift_size) == ((12, 12), (6, 6))  # even on a 3×3 map


def test_swin_initialises_from_an_original_swin_release_file(backbone, tmp_path, monkeypatch):
    """--pretrained_backbone FILE takes the Swin release's layout, as the official code loads it."""
    body = {f"backbone.0.body.{key}": value for key, value in backbone.body.state_dict().items()}
    release = {key.removeprefix("backbone.0.body."): value.clone()
               for key, value in to_official(body, two_stage=False, with_box_refine=False).items()
               if not key.startswith("backbone.0.body.norm")}
    release.update({"norm.weight": torch.ones(1536), "norm.bias": torch.zeros(1536), "head.weight": torch.ones(5, 1536),
                    "head.bias": torch.ones(5), "layers.0.blocks.1.attn_mask": torch.zeros(1, 144, 144)})
    path = tmp_path / "swin_large_patch4_window12_384_22k.pth"
    torch.save({"model": release}, path)
    monkeypatch.setitem(swin.SWIN_VARIANTS["swin_large"], "depths", SHALLOW)
    loaded = swin.SwinBackbone("swin", train_backbone=True, pretrained=str(path)).body.state_dict()
    for key, value in backbone.body.state_dict().items():
        if not key.startswith("norm"):  # the output norms are DETA's own, as in the official code
            assert torch.equal(loaded[key], value), key


def test_a_file_of_other_weights_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(swin.SWIN_VARIANTS["swin_large"], "depths", SHALLOW)
    torch.save({"model": {"backbone.0.body.conv1.weight": torch.zeros(64, 3, 7, 7)}}, tmp_path / "r50.pth")
    with pytest.raises(InputError, match=r"r50\.pth': not Swin weights of this size; missing \d+ keys"):
        swin.SwinBackbone("swin", train_backbone=True, pretrained=str(tmp_path / "r50.pth"))


def test_swin_trains_through_gradient_checkpointing(backbone, monkeypatch):
    # The backbone trains with checkpointed stages (recomputed in backward, stochastic depth included):
    # every parameter gets the gradient that the same step without checkpointing gives.
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    gradients, block_calls = {}, []
    block = backbone.body["layers"][2].blocks[0]
    forward = block.forward  # counted by wrapping: checkpoint's recomputation does not run forward hooks
    monkeypatch.setattr(block, "forward", lambda x: block_calls.append(1) or forward(x))
    for checkpointing in (False, True):
        for stage in backbone.body["layers"]:
            stage.grad_checkpointing = checkpointing
        backbone.zero_grad()
        block_calls.clear()
        torch.manual_seed(0)  # the same drop-path draws in both runs
        sum(feature.square().mean() for feature in backbone.train()(images)).backward()
        gradients[checkpointing] = {name: p.grad.clone() for name, p in backbone.named_parameters()}
        assert len(block_calls) == (2 if checkpointing else 1)  # recomputed in backward when checkpointed
    for name, grad in gradients[True].items():
        assert grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(grad, gradients[False][name], rtol=1e-4, atol=1e-6, msg=name)

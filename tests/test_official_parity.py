"""Our DETA against the official implementation (jozhang97/DETA f47e50e), number for number.

tests/data/official_{tiny,full}.pt are written by tests/make_official_fixtures.py, which runs the official
code on the CPU (its PyTorch attention path) with every parameter set by `official_fixture.perturbed_state_dict`,
on the two differently sized images of `official_fixture.make_images(0)`: once as one padded batch and once
image by image. The comparisons (tests/parity.py) hold on any CPU: continuous outputs to 1e-4, the choice of
queries and the detections up to the reference's own near-ties.
"""
import argparse
from pathlib import Path

import pytest
import torch
from parity import assert_matches, references_from_fixture

import deta
from deta.checkpoint import convert_state_dict, load_checkpoint, load_model_weights, to_official
from main import get_args_parser
from official_fixture import make_images, perturbed_state_dict
from scripts import convert_checkpoint

DATA = Path(__file__).parent / "data"
CONFIGS = ["tiny", pytest.param("full", marks=pytest.mark.slow)]


def _model(flags: list[str], *extra: str):
    args = get_args_parser().parse_args([*flags, "--pretrained_backbone", "none", *extra])
    model, _, postprocessors = deta.build_model(args)
    return args, model.eval(), postprocessors["bbox"]


def official_model(config: str, *extra: str):
    """The fixture of `config`, and our model of its flags with the fixture's weights (converted from official)."""
    expected = torch.load(DATA / f"official_{config}.pt", weights_only=True)
    args, model, postprocess = _model(expected["flags"], *extra)
    official_keys = to_official(model.state_dict(), args.two_stage, args.with_box_refine)
    assert {k: list(v.shape) for k, v in official_keys.items()} == expected["state_dict_shapes"]
    state = perturbed_state_dict({key: tuple(value.shape) for key, value in official_keys.items()}, seed=0)
    load_model_weights(model, convert_state_dict(state, "official"))
    return expected, model, postprocess


@pytest.mark.parametrize("config", CONFIGS)
def test_converted_official_checkpoint_reproduces_the_official_padded_batch(config, tmp_path):
    expected = torch.load(DATA / f"official_{config}.pt", weights_only=True)
    args, model, postprocess = _model(expected["flags"], "--eval_batching", "padded")
    official_keys = to_official(model.state_dict(), args.two_stage, args.with_box_refine)
    state = perturbed_state_dict({key: tuple(value.shape) for key, value in official_keys.items()}, seed=0)
    torch.save({"model": state, "epoch": 11, "args": argparse.Namespace(**vars(args))}, tmp_path / "official.pth")

    convert_checkpoint.convert(str(tmp_path / "official.pth"), str(tmp_path / "ours.pth"), "official", "deta", [])
    converted = torch.load(tmp_path / "ours.pth", weights_only=False)
    assert converted["epoch"] == 11
    load_model_weights(model, converted["model"])
    assert_matches(model, make_images(0), references_from_fixture(expected["padded"]), postprocess)


@pytest.mark.parametrize("config", CONFIGS)
def test_default_mode_gives_each_image_of_a_batch_its_official_single_image_output(config):
    expected, model, postprocess = official_model(config)
    references = [references_from_fixture(alone)[0] for alone in expected["single_image"]]
    assert_matches(model, make_images(0), references, postprocess)


def test_ours_to_official_to_ours_round_trip_is_exact(tmp_path):
    flags = torch.load(DATA / "official_tiny.pt", weights_only=True)["flags"]
    args, model, _ = _model(flags)
    torch.save({"model": model.state_dict(), "args": args}, tmp_path / "ours.pth")
    convert_checkpoint.convert(str(tmp_path / "ours.pth"), str(tmp_path / "official.pth"), "deta", "official", [])
    official = torch.load(tmp_path / "official.pth", weights_only=False)["model"]
    assert torch.equal(official["transformer.decoder.class_embed.2.bias"], official["class_embed.2.bias"])
    convert_checkpoint.convert(str(tmp_path / "official.pth"), str(tmp_path / "back.pth"), "official", "deta", [])
    back = load_checkpoint(tmp_path / "back.pth")["model"]
    original = model.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[key], original[key]) for key in original)

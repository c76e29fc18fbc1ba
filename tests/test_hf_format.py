"""HuggingFace `DetaForObjectDetection` checkpoints → ours and back, output for output.

The HF models are built here from configs (no downloads) with transformers 4.57 (requirements-dev.txt),
filled with `official_fixture.perturbed_state_dict` so that every path carries signal, saved with
`save_pretrained` and converted by scripts/convert_checkpoint.py, whose arguments come from the
saved config.json. The way back (`--to hf`) is loaded with HF's own `from_pretrained`.
"""
from pathlib import Path

import pytest
import torch
from parity import ImageReference, assert_matches
from safetensors.torch import load_file

import deta
from deta import swin
from deta.checkpoint import convert_state_dict, detect_format, load_checkpoint, load_model_weights, save_atomically
from deta.errors import ArgumentError, InputError
from deta.formats.hf import config_json, model_args
from deta.postprocess import NMSPostProcess
from main import get_args_parser
from official_fixture import chosen_tokens, make_images, perturbed_state_dict
from scripts import convert_checkpoint

hf_deta = pytest.importorskip("transformers.models.deprecated.deta",
                              reason="needs transformers 4.57 (its DETA port), from requirements-dev.txt")
transformers = pytest.importorskip("transformers")


def _hf_model(backbone_config, **config) -> torch.nn.Module:
    """A DetaForObjectDetection with perturbed weights (tied head copies share their values)."""
    torch.manual_seed(0)
    model = hf_deta.DetaForObjectDetection(hf_deta.DetaConfig(backbone_config=backbone_config, **config))
    state = model.state_dict()
    floats = {key: tuple(value.shape) for key, value in state.items() if value.is_floating_point()}
    state.update(perturbed_state_dict(floats, seed=0))
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """ResNet-18 body, 2+2 layers of width 64, 7 classes, two_stage_num_proposals left at HF's 300;
    and the folder save_pretrained wrote it to (model.safetensors stores each tied head once)."""
    resnet18 = transformers.ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                         out_features=["stage2", "stage3", "stage4"])
    model = _hf_model(resnet18, d_model=64, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=128,
                      decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4, num_labels=7,
                      disable_custom_kernels=True)
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    return model, folder


def _ours_from_hf_folder(folder: Path, tmp_path: Path, *extra: str):
    convert_checkpoint.convert(str(folder), str(tmp_path / "ours.pth"), "hf", "deta", list(extra))
    checkpoint = torch.load(tmp_path / "ours.pth", weights_only=False)
    model, _, postprocess = deta.build_model(checkpoint["args"])
    load_model_weights(model, checkpoint["model"])
    return checkpoint["args"], model.eval(), postprocess["bbox"]


def _hf_references(hf_model: torch.nn.Module, pixel_values: torch.Tensor,
                   pixel_mask: torch.Tensor | None = None) -> list[ImageReference]:
    """HF's outputs and detections (its own post-processing) on a batch, as tests/parity.py references."""
    captured = {}

    def record_shapes(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured["spatial_shapes"] = kwargs["spatial_shapes"].tolist()

    hook = hf_model.model.encoder.register_forward_pre_hook(record_shapes, with_kwargs=True)
    with torch.no_grad():
        out = hf_model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    hook.remove()
    sizes = torch.tensor([pixel_values.shape[-2:]] * len(pixel_values)) if pixel_mask is None else \
        torch.stack([pixel_mask.any(2).sum(1), pixel_mask.any(1).sum(1)], 1)
    detections = hf_deta.DetaImageProcessor().post_process_object_detection(out, threshold=-1.0, target_sizes=sizes)
    enc_boxes = out.enc_outputs_coord_logits.sigmoid()
    selected = chosen_tokens(out.init_reference_points, enc_boxes)
    return [ImageReference(captured["spatial_shapes"], out.enc_outputs_class[i, :, 0], enc_boxes[i], selected[i],
                           out.logits[i], out.pred_boxes[i], detections[i], out.init_reference_points[i])
            for i in range(len(pixel_values))]


def _assert_matches_hf_image_by_image(ours: torch.nn.Module, hf_model: torch.nn.Module,
                                      images: list[torch.Tensor]) -> None:
    """Each image alone through HF, and all of them as one batch through ours (default, per-image mode)."""
    references = [_hf_references(hf_model, image[None])[0] for image in images]
    assert_matches(ours, images, references, NMSPostProcess())


def test_tiny_hf_model_converts_and_matches_image_by_image_and_as_a_padded_batch(tiny_hf, tmp_path):
    hf_model, folder = tiny_hf
    args, ours, postprocess = _ours_from_hf_folder(folder, tmp_path)
    assert (args.num_queries, args.num_classes, args.backbone) == (300, 7, "resnet18")
    images = make_images(0)
    _assert_matches_hf_image_by_image(ours, hf_model, images)

    # The official batching pads like HF; HF's pixel_mask is 1 on valid pixels.
    ours.pad_in_inference = True
    height, width = (max(sizes) for sizes in zip(*(image.shape[-2:] for image in images), strict=True))
    pixels = torch.zeros(len(images), 3, height, width)
    pixel_mask = torch.zeros(len(images), height, width, dtype=torch.long)
    for index, image in enumerate(images):
        pixels[index, :, :image.shape[1], :image.shape[2]] = image
        pixel_mask[index, :image.shape[1], :image.shape[2]] = 1
    assert_matches(ours, images, _hf_references(hf_model, pixels, pixel_mask), postprocess)


def test_pytorch_model_bin_and_safetensors_convert_alike(tiny_hf, tmp_path):
    hf_model, folder = tiny_hf
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")  # both copies of every tied head
    from_bin = load_checkpoint(tmp_path / "pytorch_model.bin")
    from_safetensors = load_checkpoint(folder / "model.safetensors")
    assert detect_format(hf_model.state_dict()) == "hf"
    assert from_bin["model"].keys() == from_safetensors["model"].keys()
    assert all(torch.equal(from_bin["model"][key], from_safetensors["model"][key]) for key in from_bin["model"])
    assert "args" not in from_bin and from_safetensors["args"]["num_queries"] == 300  # config.json only beside one


def test_missing_projection_part_and_unknown_keys_are_named(tiny_hf):
    state = tiny_hf[0].state_dict()
    broken = {key: value for key, value in state.items() if key != "model.decoder.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(InputError, match=r"model\.decoder\.layers\.1\.self_attn\.in_proj_bias cannot be formed, "
                                         r"its k part is missing"):
        convert_state_dict(broken, "hf")
    with pytest.raises(InputError, match=r"no rule maps model\.extra\.weight"):
        convert_state_dict({**state, "model.extra.weight": torch.zeros(1)}, "hf")


def test_hf_config_maps_to_our_arguments():
    config = {"model_type": "deta", "two_stage_num_proposals": 900, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048,
              "id2label": {str(i): str(i) for i in range(91)},
              "backbone_config": {"model_type": "swin", "embed_dim": 192, "depths": [2, 2, 18, 2],
                                  "num_heads": [6, 12, 24, 48], "window_size": 12}}
    args = model_args(config)
    assert (args["backbone"], args["num_queries"], args["num_classes"], args["dim_feedforward"]) == \
        ("swin_large", 900, 91, 2048)
    with pytest.raises(InputError, match="encoder_ffn_dim 2048 differs from decoder_ffn_dim 1024"):
        model_args({**config, "decoder_ffn_dim": 1024})
    with pytest.raises(InputError, match="none of the backbones we build"):
        model_args({**config, "backbone_config": {"model_type": "swin"}})


@pytest.mark.slow
def test_full_size_r50_hf_model_with_900_proposals_matches(tmp_path):
    """The configuration of jozhang97/deta-resnet-50 with official DETA's 900 decoder queries."""
    hf_model = _hf_model(transformers.ResNetConfig(out_features=["stage2", "stage3", "stage4"]),
                         decoder_ffn_dim=2048, two_stage_num_proposals=900, num_labels=91,
                         disable_custom_kernels=True)
    hf_model.save_pretrained(tmp_path / "hf")
    args, ours, _ = _ours_from_hf_folder(tmp_path / "hf", tmp_path)
    assert (args.backbone, args.hidden_dim, args.enc_layers, args.dec_layers, args.dim_feedforward,
            args.num_feature_levels, args.num_queries, args.num_classes) == ("resnet50", 256, 6, 6, 2048, 5, 900, 91)
    _assert_matches_hf_image_by_image(ours, hf_model, make_images(0)[:1])


@pytest.mark.slow
def test_hf_swin_large_converts_and_matches(tmp_path, monkeypatch):
    """Swin-L widths, heads and window with depths (2, 2, 2, 2) on both sides, to keep it fast. The image
    is over 384 px a side: on smaller ones HF shrinks the Swin window where official DETA does not."""
    depths = [2, 2, 2, 2]
    monkeypatch.setitem(swin.SWIN_VARIANTS["swin_large"], "depths", tuple(depths))
    swin_large = transformers.SwinConfig(embed_dim=192, depths=depths, num_heads=[6, 12, 24, 48], window_size=12,
                                         out_features=["stage2", "stage3", "stage4"])
    hf_model = _hf_model(swin_large, d_model=64, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=128,
                         decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4,
                         two_stage_num_proposals=100, num_labels=91, disable_custom_kernels=True)
    hf_model.save_pretrained(tmp_path / "hf")
    args, ours, _ = _ours_from_hf_folder(tmp_path / "hf", tmp_path)
    assert args.backbone == "swin_large"
    image = torch.nn.functional.interpolate(make_images(0)[0][None], size=(400, 424), mode="bilinear")[0]
    _assert_matches_hf_image_by_image(ours, hf_model, [image])
    # and back: the same tensors under HF's Swin names (split query/key/value), the same Swin config.
    convert_checkpoint.convert(str(tmp_path / "ours.pth"), str(tmp_path / "back"), "deta", "hf", [])
    back, original = load_file(tmp_path / "back" / "model.safetensors"), hf_model.state_dict()
    assert back.keys() == original.keys() and all(torch.equal(back[key], original[key]) for key in original)
    backbone = hf_deta.DetaConfig.from_pretrained(tmp_path / "back").backbone_config
    assert (backbone.embed_dim, backbone.depths, backbone.num_heads, backbone.window_size) == (192, depths,
                                                                                              [6, 12, 24, 48], 12)


def _our_tiny_checkpoint(path: Path, names: dict[int, str]) -> torch.nn.Module:
    """Our small DETA with perturbed weights, saved at `path` as main.py saves its checkpoints."""
    args = get_args_parser().parse_args([
        "--backbone", "resnet18", "--pretrained_backbone", "none", "--hidden_dim", "64", "--nheads", "4",
        "--enc_layers", "2", "--dec_layers", "2", "--dim_feedforward", "128", "--dropout", "0", "--num_queries", "40",
        "--num_feature_levels", "5", "--two_stage", "--with_box_refine", "--assign_first_stage",
        "--assign_second_stage", "--num_classes", "4", "--device", "cpu"])
    model, _, _ = deta.build_model(args)
    state = model.state_dict()
    state.update(perturbed_state_dict({key: tuple(v.shape) for key, v in state.items() if v.is_floating_point()},
                                      seed=1))
    model.load_state_dict(state)
    save_atomically({"model": state, "args": vars(args), "category_names": names}, path)
    return model.eval()


def test_our_checkpoint_exports_to_a_folder_that_hf_loads_and_runs_alike(tmp_path):
    names = {1: "circle", 2: "square", 3: "triangle"}
    ours = _our_tiny_checkpoint(tmp_path / "ours.pth", names)
    convert_checkpoint.convert(str(tmp_path / "ours.pth"), str(tmp_path / "hf"), "auto", "hf", [])
    hf_model, loading = hf_deta.DetaForObjectDetection.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(loading.values()), loading  # no missing, unexpected or mis-shaped key
    assert hf_model.config.id2label == {0: "N/A", **names}
    assert hf_model.config.two_stage_num_proposals == 40
    _assert_matches_hf_image_by_image(ours, hf_model.eval(), make_images(0))
    # ... and it comes back with its class names.
    args, _, _ = _ours_from_hf_folder(tmp_path / "hf", tmp_path)
    assert torch.load(tmp_path / "ours.pth", weights_only=False)["category_names"] == names
    assert (args.backbone, args.num_queries, args.num_classes) == ("resnet18", 40, 4)


def test_hf_to_ours_to_hf_gives_back_the_same_tensors_and_config(tiny_hf, tmp_path):
    hf_model, folder = tiny_hf
    convert_checkpoint.convert(str(folder), str(tmp_path / "ours.pth"), "hf", "deta", [])
    convert_checkpoint.convert(str(tmp_path / "ours.pth"), str(tmp_path / "back"), "deta", "hf", [])
    original, back = hf_model.state_dict(), load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == original.keys()
    assert all(torch.equal(back[key], original[key]) for key in original)
    config, original_config = (hf_deta.DetaConfig.from_pretrained(path) for path in (tmp_path / "back", folder))
    for key in ("d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim", "decoder_ffn_dim",
                "encoder_attention_heads", "num_feature_levels", "two_stage", "with_box_refine",
                "two_stage_num_proposals", "assign_first_stage", "assign_second_stage", "num_labels"):
        assert getattr(config, key) == getattr(original_config, key), key
    assert config.backbone_config.to_dict() == original_config.backbone_config.to_dict()


def test_what_hf_cannot_express_is_refused_before_writing(tmp_path):
    _our_tiny_checkpoint(tmp_path / "ours.pth", {})
    with pytest.raises(ArgumentError) as error:
        convert_checkpoint.convert(str(tmp_path / "ours.pth"), str(tmp_path / "hf"), "deta", "hf",
                                   ["--position_embedding_scale", "3.0"])
    assert error.value.on_command_line() == "HF's DETA cannot express --position_embedding_scale 3.0 (HF's is 2π)"
    assert not (tmp_path / "hf").exists()
    args = get_args_parser().parse_args(["--backbone", "resnet50", "--dilation", "--num_feature_levels", "1"])
    with pytest.raises(ArgumentError, match=r"cannot express dilation=True .*; num_feature_levels=1 "):
        config_json(args)
    with pytest.raises(ArgumentError, match=r"backbone='resnet152': HF's DETA has no such backbone"):
        config_json(get_args_parser().parse_args(["--backbone", "resnet152"]))

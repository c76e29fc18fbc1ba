"""detrex DETA checkpoints ↔ ours, on synthetic state dicts with the published checkpoints' names and shapes.

`detrex_keys` lists detrex's keys from its model definitions; the values come from
`official_fixture.perturbed_state_dict` (the decoder's head copies equal the heads, as in detrex).
"""

import pytest
import torch

import deta
from deta import swin
from deta.checkpoint import convert_state_dict, detect_format, state_dict_problems
from deta.errors import InputError
from deta.formats.detrex import COCO_CATEGORY_IDS, to_detrex
from deta.postprocess import PostProcess
from detrex_keys import deta_r50_shapes, deta_swin_large_shapes
from main import get_args_parser
from official_fixture import FULL_FLAGS, perturbed_state_dict
from scripts import convert_checkpoint

DETREX_R50 = perturbed_state_dict(deta_r50_shapes(), seed=1)


def _model(*flags: str) -> torch.nn.Module:
    return deta.build_model(get_args_parser().parse_args([*flags, "--pretrained_backbone", "none"]))[0]


def test_published_r50_checkpoint_converts_to_ours_and_back_exactly(tmp_path):
    torch.save({"model": DETREX_R50}, tmp_path / "converted_deta_r50_5scale_12ep.pth")
    convert_checkpoint.convert(str(tmp_path / "converted_deta_r50_5scale_12ep.pth"), str(tmp_path / "ours.pth"),
                               "auto", "deta", FULL_FLAGS)
    # convert() checked every key and shape against our model: it refuses to write otherwise.
    convert_checkpoint.convert(str(tmp_path / "ours.pth"), str(tmp_path / "back.pth"), "deta", "detrex", [])
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert back.keys() == {"model"}
    assert back["model"].keys() == DETREX_R50.keys()
    assert all(torch.equal(back["model"][key], value) for key, value in DETREX_R50.items())


def test_r50_tensors_land_where_detrex_uses_them():
    assert detect_format(DETREX_R50) == "detrex"
    ours = convert_state_dict(DETREX_R50, "detrex")
    same = {
        "backbone.0.body.conv1.weight": "backbone.stem.conv1.weight",
        "backbone.0.body.layer1.0.bn1.running_var": "backbone.res2.0.conv1.norm.running_var",
        "backbone.0.body.layer4.0.downsample.0.weight": "backbone.res5.0.shortcut.weight",
        "input_proj.2.0.weight": "neck.convs.2.conv.weight",
        "input_proj.3.0.weight": "neck.extra_convs.0.conv.weight",  # from the last backbone map
        "input_proj.4.1.bias": "neck.extra_convs.1.norm.bias",
        "transformer.level_embed": "transformer.level_embeds",
        "transformer.encoder.layers.5.linear2.weight": "transformer.encoder.layers.5.ffns.0.layers.1.weight",
        "transformer.decoder.layers.0.self_attn.in_proj_weight":
            "transformer.decoder.layers.0.attentions.0.attn.in_proj_weight",
        "transformer.decoder.layers.0.cross_attn.sampling_offsets.bias":
            "transformer.decoder.layers.0.attentions.1.sampling_offsets.bias",
        "transformer.decoder.layers.3.norm2.weight": "transformer.decoder.layers.3.norms.0.weight",  # after self-attn
        "transformer.decoder.layers.3.norm1.weight": "transformer.decoder.layers.3.norms.1.weight",  # after cross-attn
    }
    for our_key, detrex_key in same.items():
        assert torch.equal(ours[our_key], DETREX_R50[detrex_key]), our_key

    ids = torch.tensor(COCO_CATEGORY_IDS)
    for head in range(6):  # decoder heads: detrex class i is COCO category COCO_CATEGORY_IDS[i]
        assert torch.equal(ours[f"class_embed.{head}.weight"][ids], DETREX_R50[f"class_embed.{head}.weight"])
        unused = torch.ones(91, dtype=torch.bool).index_fill(0, ids, False)
        assert (ours[f"class_embed.{head}.bias"][unused] == -100).all()
    assert torch.equal(ours["class_embed.6.bias"][:80], DETREX_R50["class_embed.6.bias"])  # encoder: objectness row 0


def test_swin_large_checkpoint_converts_to_ours_and_back_exactly(monkeypatch):
    depths = (2, 2, 2, 2)  # Swin-L widths; the deep stage cut to 2 blocks to keep the test fast
    monkeypatch.setitem(swin.SWIN_VARIANTS["swin_large"], "depths", depths)
    shapes = deta_swin_large_shapes(depths)
    detrex = perturbed_state_dict({k: v for k, v in shapes.items() if "relative_position_index" not in k}, seed=1)
    detrex.update({key: torch.zeros(shape, dtype=torch.int64) for key, shape in shapes.items() if key not in detrex})
    ours = convert_state_dict(detrex, "auto")
    assert state_dict_problems(_model(*FULL_FLAGS, "--backbone", "swin"), ours) == []
    assert torch.equal(ours["backbone.0.body.layers.3.downsample.reduction.weight"],
                       detrex["backbone.layers.2.downsample.reduction.weight"])
    back = to_detrex(ours, two_stage=True, with_box_refine=True)
    assert back.keys() == detrex.keys() and all(torch.equal(back[key], value) for key, value in detrex.items())


def test_partial_or_foreign_checkpoints_are_refused_by_name(tmp_path):
    partial = {key: value for key, value in DETREX_R50.items() if key != "transformer.pix_trans.bias"}
    torch.save({"model": partial}, tmp_path / "partial.pth")
    with pytest.raises(InputError, match=r"1 problem: missing transformer\.pix_trans\.bias"):
        convert_checkpoint.convert(str(tmp_path / "partial.pth"), str(tmp_path / "out.pth"), "detrex", "deta",
                                   FULL_FLAGS)
    assert not (tmp_path / "out.pth").exists()
    with pytest.raises(InputError, match=r"no rule maps neck\.fpn\.weight"):
        convert_state_dict({**DETREX_R50, "neck.fpn.weight": torch.zeros(1)}, "detrex")
    with pytest.raises(InputError, match="transformer.decoder.class_embed.2.bias differs from class_embed.2.bias"):
        convert_state_dict({**DETREX_R50, "transformer.decoder.class_embed.2.bias": torch.zeros(80)}, "detrex")


def test_detrex_non_nms_evaluation_keeps_300_detections():
    args = get_args_parser().parse_args(["--two_stage", "--with_box_refine", "--backbone", "resnet18",
                                         "--pretrained_backbone", "none", "--device", "cpu"])
    args.num_detections = 300  # --num_detections 300, for converted_deta_improved_deformable_baseline.pth
    postprocess = deta.build_model(args)[2]["bbox"]
    assert isinstance(postprocess, PostProcess) and postprocess.num_detections == 300

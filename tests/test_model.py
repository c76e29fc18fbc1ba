"""Model structure: shapes, masks, batch invariance and the variants behind the flags."""
import pytest
import torch
from parity import assert_matches, own_references

import deta
from deta.detector import pad_images
from main import get_args_parser

SMALL = ["--backbone", "resnet18", "--pretrained_backbone", "none", "--enc_layers", "1", "--dec_layers", "2",
         "--hidden_dim", "64", "--nheads", "2", "--dim_feedforward", "64", "--num_queries", "30",
         "--num_feature_levels", "5", "--device", "cpu", "--num_classes", "7"]
DETA_FLAGS = ["--with_box_refine", "--two_stage", "--assign_first_stage", "--assign_second_stage"]


def _build(*flags: str):
    torch.manual_seed(0)
    model, criterion, postprocessors = deta.build_model(get_args_parser().parse_args([*SMALL, *flags]))
    return model.eval(), criterion, postprocessors


def _images():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(3, 96, 128, generator=generator), torch.randn(3, 120, 88, generator=generator)]


def test_pad_images_pads_bottom_right_with_mask():
    batch, mask = pad_images([torch.ones(3, 2, 3), torch.full((3, 4, 1), 2.0)])
    assert batch.shape == (2, 3, 4, 3) and mask.shape == (2, 4, 3)
    assert mask[0].tolist() == [[False] * 3, [False] * 3, [True] * 3, [True] * 3]
    assert mask[1, :, 0].tolist() == [False] * 4 and mask[1, :, 1:].all()
    assert batch[0, :, 2:].abs().sum() == 0 and batch[1, 0, :, 0].tolist() == [2.0] * 4


def test_deta_outputs_have_the_documented_shapes():
    model, _, postprocessors = _build(*DETA_FLAGS)
    with torch.no_grad():
        out = model(_images())
    assert out["pred_logits"].shape == (2, 30, 7) and out["pred_boxes"].shape == (2, 30, 4)
    assert out["init_reference"].shape == (2, 30, 4) and len(out["aux_outputs"]) == 1
    tokens = out["enc_outputs"]["pred_logits"].shape[1]
    # 5 levels at strides 8..128 over the padded 120×128 maps: 15×16 + 8×8 + 4×4 + 2×2 + 1×1.
    assert tokens == 240 + 64 + 16 + 4 + 1
    assert out["enc_outputs"]["anchors"].shape == (2, tokens, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    detections = postprocessors["bbox"](out, torch.tensor([[480, 640], [600, 440]]))
    assert len(detections) == 2 and detections[0]["boxes"].shape[1] == 4
    assert (detections[1]["boxes"][:, 2] <= 440 * 1.5).all()


def test_batch_invariant_mode_matches_images_run_alone():
    model, _, postprocessors = _build(*DETA_FLAGS)
    images = _images()
    assert_matches(model, images, own_references(model, images, postprocessors["bbox"]), postprocessors["bbox"])


def test_official_batching_depends_on_the_batch():
    model, _, _ = _build(*DETA_FLAGS, "--official_batching")
    images = _images()
    with torch.no_grad():
        batched = model(images)
        alone = model([images[1]])
    assert (batched["pred_logits"][1] - alone["pred_logits"][0]).abs().max() > 1e-3


def test_training_pads_the_batch_as_the_official_code_and_evaluation_does_not():
    """Default flags: training runs the official padded computation, evaluation each image on its own."""
    model, _, postprocessors = _build(*DETA_FLAGS, "--dropout", "0.0")
    padded, _, _ = _build(*DETA_FLAGS, "--dropout", "0.0", "--official_batching")
    per_image, _, _ = _build(*DETA_FLAGS, "--dropout", "0.0", "--train_batching", "per_image")
    images = _images()
    alone = own_references(model, images, postprocessors["bbox"])
    assert_matches(model, images, alone, postprocessors["bbox"])  # evaluation: each image as if alone
    with torch.no_grad():
        official = padded(images)
        evaluated = model(images)
        trained = model.train()(images)
        trained_per_image = per_image.train()(images)
    # The same computations, bit for bit: training pads as the official code; per_image trains as it evaluates.
    torch.testing.assert_close(trained["pred_logits"], official["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(trained_per_image["pred_logits"], evaluated["pred_logits"], rtol=0, atol=0)
    assert (trained["pred_logits"][1] - alone[1].pred_logits).abs().max() > 1e-3


@pytest.mark.parametrize("flags", [[], ["--with_box_refine"], ["--two_stage"], ["--with_box_refine", "--two_stage"]])
def test_deformable_detr_variants_run_and_keep_official_head_layout(flags):
    model, _, _ = _build(*flags, "--num_feature_levels", "4")
    with torch.no_grad():
        out = model(_images())
    assert out["pred_boxes"].shape == (2, 30, 4)
    assert ("enc_outputs" in out) == ("--two_stage" in flags)
    assert out["init_reference"].shape[-1] == (4 if "--two_stage" in flags else 2)
    keys = model.state_dict().keys()
    assert ("query_embed.weight" in keys) != ("--two_stage" in flags)
    heads = 3 if "--two_stage" in flags else 2
    assert f"class_embed.{heads - 1}.weight" in keys and f"class_embed.{heads}.weight" not in keys
    shared = "--with_box_refine" not in flags
    assert (model.class_embed[0] is model.class_embed[1]) == shared


def test_backbone_freezes_stem_and_layer1_and_knows_its_channels():
    model, _, _ = _build(*DETA_FLAGS)
    trainable = {name for name, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(any(f"layer{i}" in name for i in (2, 3, 4)) for name in trainable)
    assert model.backbone.num_channels == [128, 256, 512]
    frozen_all, _, _ = _build(*DETA_FLAGS, "--lr_backbone", "0")
    assert not any(p.requires_grad for p in frozen_all.backbone.parameters())


def test_gradients_reach_all_trainable_parameters():
    model, criterion, _ = _build(*DETA_FLAGS)
    model.train()
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
               {"labels": torch.tensor([5]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    losses = criterion(model(_images()), targets)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_encoder_feed_forward_in_token_slices_equals_one_pass(monkeypatch: pytest.MonkeyPatch):
    from deta import optimize, transformer

    torch.manual_seed(0)
    layer = transformer.EncoderLayer(32, 64, 0.0, n_levels=1, n_heads=2, n_points=2).eval()
    src, pos = torch.randn(2, 50, 32), torch.randn(2, 50, 32)
    shapes, start = torch.tensor([[5, 10]]), torch.tensor([0])
    reference_points, padding = torch.rand(2, 50, 1, 2), torch.zeros(2, 50, dtype=torch.bool)
    sliced_layer = optimize.optimize_for_inference(layer)
    assert isinstance(sliced_layer, optimize.SlicedEncoderLayer)
    slices = []
    sliced_layer.linear2.register_forward_hook(lambda module, inputs, output: slices.append(len(output)))
    monkeypatch.setattr(optimize, "FFN_SLICE_TOKENS", 16)
    with torch.no_grad():
        whole = layer(src, pos, reference_points, shapes, start, padding)
        sliced = sliced_layer(src, pos, reference_points, shapes, start, padding)
    assert slices == [16] * 6 + [4]  # 100 rows of the (batch·tokens, C) view, the last slice shorter
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)


def test_a_batch_tensor_is_the_list_of_its_images():
    # What ONNX export traces: images of one size as one (B, 3, H, W) tensor, in either batching mode.
    for flags in ([], ["--official_batching"]):
        model, _, _ = _build(*DETA_FLAGS, *flags)
        images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            batched, listed = model(images), model(list(images))
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(batched[key], listed[key], rtol=0, atol=0)

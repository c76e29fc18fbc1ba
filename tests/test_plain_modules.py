"""The model computes through its modules (hooks fire, swapped modules are used), and
`deta.optimize_for_inference` makes a faster copy with the same outputs that follows new weights when redone."""
import copy

import pytest
import torch
from test_main import TINY
from torch import nn

import deta
from deta.criterion import build_criterion
from main import get_args_parser

# Single-stage variants too: the learned queries' reference points have their own linear layer.
VARIANTS = {"two_stage": [], "single_stage": ["--num_feature_levels", "4"]}


def tiny_model(extra: list[str] = ()) -> tuple[nn.Module, object]:
    args = get_args_parser().parse_args([*TINY, "--num_classes", "6", *extra])
    if "--num_feature_levels" in extra:
        for flag in ("--two_stage", "--with_box_refine", "--assign_first_stage", "--assign_second_stage"):
            setattr(args, flag[2:], False)
    torch.manual_seed(0)
    model, _, _ = deta.build_model(args)
    # Random statistics for the frozen BatchNorms, so that folding them is not the identity.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, deta.backbone.FrozenBatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return model, args


def images(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 96, 128, generator=generator), torch.randn(3, 80, 96, generator=generator)]


def layers_called(model: nn.Module, training: bool) -> tuple[set[str], set[str]]:
    """Names of the nn.Linear and nn.Conv2d modules whose forward hooks fire in one forward, and all of them."""
    fired: set[str] = set()
    layers = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear | nn.Conv2d)}
    handles = [module.register_forward_hook(lambda *_, name=name: fired.add(name)) for name, module in layers.items()]
    model.train(training)
    with torch.set_grad_enabled(training):
        model(images())
    for handle in handles:
        handle.remove()
    return fired, set(layers)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval_no_grad"])
def test_forward_hooks_fire_on_every_linear_and_convolution(variant, training):
    model, _ = tiny_model(VARIANTS[variant])
    fired, layers = layers_called(model, training)
    # Single-stage mode has no proposal head: its encoder-level head copies are not built, so all are used.
    assert fired == layers
    assert any(".sampling_offsets" in name for name in fired) and any("bbox_embed" in name for name in fired)
    assert "transformer.decoder.layers.0.self_attn.out_proj" in fired
    assert "backbone.0.body.layer1.0.conv1" in fired


class CountingLinear(nn.Linear):
    """What LoRA, quantisation and pruning tools do: a module of their own in place of a layer."""
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CountingLinear.calls += 1
        return super().forward(x) * 0.5


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval_no_grad"])
def test_a_linear_swapped_in_is_called_and_changes_the_output(training):
    model, _ = tiny_model()
    model.train(training)
    with torch.set_grad_enabled(training):
        torch.manual_seed(1)
        before = model(images())["pred_logits"]
        layer = model.transformer.decoder.layers[0].linear2
        swapped = CountingLinear(layer.in_features, layer.out_features)
        swapped.load_state_dict(layer.state_dict())
        model.transformer.decoder.layers[0].linear2 = swapped
        CountingLinear.calls = 0
        torch.manual_seed(1)
        after = model(images())["pred_logits"]
    assert CountingLinear.calls == 1
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("variant", VARIANTS)
def test_optimized_model_equals_the_plain_one(variant):
    model, _ = tiny_model(VARIANTS[variant])
    model.eval()
    optimized = deta.optimize_for_inference(model)
    assert model.backbone[0].body.bn1.__class__.__name__ == "FrozenBatchNorm2d"  # the original is left alone
    assert any(isinstance(m, deta.optimize.FusedLinear) for m in optimized.modules())
    with torch.no_grad():
        expected, got = model(images()), optimized(images())
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4)


def test_the_equality_check_fails_on_a_wrongly_folded_batchnorm(monkeypatch):
    """The comparison above is sharp enough to see a fold that forgets eps."""
    from deta import folded_resnet

    model, _ = tiny_model()
    model.eval()
    real = folded_resnet.fuse_conv_bn_weights
    monkeypatch.setattr(folded_resnet, "fuse_conv_bn_weights", lambda w, b, rm, rv, eps, *rest: real(w, b, rm, rv, 0.05,
                                                                                                  *rest))
    optimized = deta.optimize_for_inference(model)
    with torch.no_grad():
        expected, got = model(images()), optimized(images())
    assert not torch.allclose(got["pred_boxes"], expected["pred_boxes"], rtol=1e-4, atol=1e-4)


def test_optimized_evaluation_after_a_training_step_sees_the_new_weights():
    model, args = tiny_model()
    criterion = build_criterion(args, 6)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.6, 0.2, 0.2]])}]
    before = deta.optimize_for_inference(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    losses = criterion(model(images()), targets)
    sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()
    optimizer.step()
    model.eval()
    after = deta.optimize_for_inference(model)
    with torch.no_grad():
        plain, stale, fresh = model(images()), before(images()), after(images())
    torch.testing.assert_close(fresh["pred_boxes"], plain["pred_boxes"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(stale["pred_boxes"], plain["pred_boxes"], rtol=1e-4, atol=1e-4)


def test_optimized_model_compiles_and_keeps_gradients_off():
    model, _ = tiny_model()
    optimized = deta.optimize_for_inference(copy.deepcopy(model).eval())
    assert not any(p.requires_grad for p in optimized.parameters())
    assert any(p.requires_grad for p in model.parameters())
    batch = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected = optimized(batch)["pred_boxes"]
        compiled = torch.compile(optimized, backend="eager", dynamic=False)(batch)["pred_boxes"]
    torch.testing.assert_close(compiled, expected, rtol=1e-4, atol=1e-4)

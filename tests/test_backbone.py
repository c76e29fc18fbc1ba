"""--pretrained_backbone: torchvision's cache, a local file, or nothing, without network in tests."""
import copy

import pytest
import torch
import torchvision

from deta.backbone import FrozenBatchNorm2d, ResNetBackbone, load_pretrained_backbone
from deta.errors import ArgumentError, InputError
from deta.folded_resnet import fold_resnet_body


def _resnet18_weights() -> dict:
    torch.manual_seed(3)
    return torchvision.models.resnet18().state_dict()


def test_default_reads_torchvisions_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    weights = _resnet18_weights()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "checkpoints").mkdir()
    torch.save(weights, tmp_path / "checkpoints" / url.rsplit("/", 1)[1])
    backbone = ResNetBackbone("resnet18", train_backbone=True, multi_scale=True, dilation=False)
    load_pretrained_backbone(backbone, "resnet18", "default")
    torch.testing.assert_close(backbone.body.layer3[0].conv1.weight, weights["layer3.0.conv1.weight"])
    torch.testing.assert_close(backbone.body.bn1.running_var, weights["bn1.running_var"])


def test_default_without_cache_or_network_names_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network unreachable")))
    backbone = ResNetBackbone("resnet18", train_backbone=True, multi_scale=True, dilation=False)
    with pytest.raises(ArgumentError, match="pass 'none' or a local file path") as error:
        load_pretrained_backbone(backbone, "resnet18", "default")
    assert "\n" not in str(error.value)
    assert str(error.value).startswith("pretrained_backbone='default': could not load torchvision's resnet18")
    assert error.value.on_command_line().startswith("--pretrained_backbone default: could not load")


def test_path_loads_a_local_file_and_rejects_other_weights(tmp_path):
    weights = _resnet18_weights()
    torch.save(weights, tmp_path / "r18.pth")
    backbone = ResNetBackbone("resnet18", train_backbone=True, multi_scale=True, dilation=False)
    load_pretrained_backbone(backbone, "resnet18", str(tmp_path / "r18.pth"))
    torch.testing.assert_close(backbone.body.layer4[1].conv2.weight, weights["layer4.1.conv2.weight"])
    resnet50 = ResNetBackbone("resnet50", train_backbone=True, multi_scale=True, dilation=False)
    with pytest.raises(InputError, match="not resnet50 weights"):
        load_pretrained_backbone(resnet50, "resnet50", str(tmp_path / "r18.pth"))
    with pytest.raises(InputError, match="no such file"):
        load_pretrained_backbone(backbone, "resnet18", str(tmp_path / "missing.pth"))


def test_unknown_backbone_is_a_clear_error_about_the_value_and_names_the_flag_on_the_command_line():
    with pytest.raises(ArgumentError, match="^backbone='resnet42': expected one of resnet18,") as error:
        ResNetBackbone("resnet42", train_backbone=True, multi_scale=True, dilation=False)
    assert error.value.on_command_line().startswith("--backbone resnet42: expected one of resnet18,")


def test_frozen_batchnorm_matches_batchnorm_in_eval_and_drops_num_batches_tracked():
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(4).eval()
    reference.running_mean.normal_()
    reference.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(4)
    frozen.load_state_dict(reference.state_dict())
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(frozen(x), reference(x))


def test_frozen_batchnorm_keeps_the_dtype_of_its_input():
    # Under bf16 autocast, fp32 statistics must not turn the activations back into fp32.
    assert FrozenBatchNorm2d(4)(torch.randn(1, 4, 2, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_dilation_of_a_basic_block_resnet_is_a_clear_error():
    with pytest.raises(ArgumentError, match=r"^dilation=True: resnet18's basic blocks cannot be dilated") as error:
        ResNetBackbone("resnet18", train_backbone=True, multi_scale=True, dilation=True)
    assert error.value.on_command_line().startswith("--dilation: resnet18's basic blocks cannot be dilated; use")


def _backbone_with_statistics(name: str, dilation: bool = False) -> ResNetBackbone:
    """A backbone whose frozen BatchNorms are not the identity, so that folding them matters."""
    torch.manual_seed(0)
    backbone = ResNetBackbone(name, train_backbone=True, multi_scale=True, dilation=dilation).eval()
    for module in backbone.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.running_var.uniform_(0.5, 1.5)
            module.running_mean.normal_(0, 0.1)
            module.weight.normal_(1, 0.1)
            module.bias.normal_(0, 0.1)
    return backbone


@pytest.mark.parametrize(("name", "dilation"), [("resnet18", False), ("resnet50", False), ("resnet50", True)])
def test_folding_removes_the_batchnorms_and_gives_the_same_features(name, dilation, monkeypatch):
    backbone = _backbone_with_statistics(name, dilation)
    images = torch.randn(2, 3, 96, 128)
    folded = copy.deepcopy(backbone)
    fold_resnet_body(folded.body)
    with torch.no_grad():
        expected = backbone(images)
        calls = []
        monkeypatch.setattr(FrozenBatchNorm2d, "forward", lambda *args: calls.append(1))
        got = folded(images)
    assert not calls  # no BatchNorm runs: they are folded into the convolutions
    for ours, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())

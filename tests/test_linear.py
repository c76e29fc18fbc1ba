"""ops.linear: oneDNN's fused bias and ReLU at CPU inference equal F.linear; training keeps autograd."""
import pytest
import torch
import torch.nn.functional as F

from ops import linear as linear_module
from ops.linear import linear


@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 16), (1, 300, 16)])
@pytest.mark.parametrize("relu", [False, True])
def test_inference_equals_f_linear(shape, relu, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    weight, bias = torch.randn(32, 16, generator=generator), torch.randn(32, generator=generator)
    expected = F.linear(x, weight, bias)
    expected = expected.relu() if relu else expected
    calls = []
    fused = linear_module._FUSED_LINEAR
    if fused is not None:
        monkeypatch.setattr(linear_module, "_FUSED_LINEAR", lambda *args: calls.append(1) or fused(*args))
    with torch.no_grad():
        torch.testing.assert_close(linear(x, weight, bias, relu=relu), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x.transpose(0, -1).contiguous().transpose(0, -1), weight, None, relu=relu),
                                   expected - bias if not relu else F.linear(x, weight).relu(), rtol=1e-5, atol=1e-5)
    assert len(calls) == (2 if fused is not None else 0)


def test_training_keeps_gradients():
    x = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(3, 8, requires_grad=True)
    bias = torch.randn(3, requires_grad=True)
    linear(x, weight, bias, relu=True).sum().backward()
    expected = [tensor.grad.clone() for tensor in (x, weight, bias)]
    for tensor in (x, weight, bias):
        tensor.grad = None
    F.linear(x, weight, bias).relu().sum().backward()
    for got, tensor in zip(expected, (x, weight, bias), strict=True):
        torch.testing.assert_close(got, tensor.grad)

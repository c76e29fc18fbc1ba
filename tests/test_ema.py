"""training.ema: the average follows decay * (1 - exp(-updates / warmup)) and saves and loads exactly."""
import math

import pytest
import torch
from torch import nn

from training.ema import ModelEMA


def test_the_average_follows_the_warmed_up_decay() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9, warmup=4)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(1, 6):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        model.train()(torch.randn(4, 3))  # moves the BatchNorm statistics and its integer counter
        ema.update(model)
        decay = 0.9 * (1 - math.exp(-step / 4))
        for key, value in model.state_dict().items():
            expected[key] = decay * expected[key] + (1 - decay) * value if value.is_floating_point() else value.clone()
    assert ema.updates == 5 and ema.decay_at(1) == pytest.approx(0.9 * (1 - math.exp(-0.25)))
    for key, value in ema.module.state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-6, rtol=0), key
    assert ema.module.state_dict()["1.num_batches_tracked"] == 5
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_saved_and_loaded_it_continues_bit_for_bit() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    first = ModelEMA(model, decay=0.99, warmup=3)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        first.update(model)
    second = ModelEMA(nn.Linear(3, 2), decay=0.99, warmup=3)
    second.load_state_dict(first.state_dict())
    first.update(model)
    second.update(model)
    assert second.updates == 4
    assert all(torch.equal(a, b) for a, b in zip(first.module.state_dict().values(),
                                                 second.module.state_dict().values(), strict=True))

"""training.best_checkpoint: checkpoint_best.pth on every AP improvement (model or EMA), and --patience."""
import logging
from pathlib import Path

import pytest
import torch

from training.best_checkpoint import BestCheckpoint


def weights(which: str) -> dict:
    return {"model": {"w": torch.tensor(1.0 if which == "model" else 2.0)}}


def test_an_improvement_is_saved_with_its_epoch_and_ap(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    best = BestCheckpoint(tmp_path, patience=2)
    with caplog.at_level(logging.INFO):
        best.update(0, {"AP": 0.1, "ema_AP": 0.05}, weights)
        saved = torch.load(tmp_path / "checkpoint_best.pth", weights_only=True)
        assert (saved["epoch"], saved["AP"], saved["weights"], saved["model"]["w"].item()) == (0, 0.1, "model", 1.0)
        best.update(1, {"AP": 0.2, "ema_AP": 0.3}, weights)  # the EMA is better: its weights are kept
        saved = torch.load(tmp_path / "checkpoint_best.pth", weights_only=True)
        assert (saved["epoch"], saved["AP"], saved["weights"], saved["model"]["w"].item()) == (1, 0.3, "ema", 2.0)
    assert "epoch 1: AP 0.3000 of the EMA weights is the best so far; saved to" in caplog.text
    best.update(2, {"AP": 0.3, "ema_AP": 0.25}, weights)  # equal is no improvement
    assert torch.load(tmp_path / "checkpoint_best.pth", weights_only=True)["epoch"] == 1
    assert not best.should_stop
    best.update(3, {"AP": 0.1}, weights)
    assert best.should_stop and best.stale == 2
    assert best.stop_message(3).startswith("--patience 2: no AP improvement in the 2 evaluations since epoch 1 "
                                           "(best AP 0.3000, in checkpoint_best.pth); stopping after epoch 3")
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_log_s_history_counts(tmp_path: Path) -> None:
    history = [{"epoch": 0, "test_AP": 0.4}, {"epoch": 1, "test_AP": 0.3, "test_ema_AP": 0.35}]
    best = BestCheckpoint(tmp_path, patience=2, history=history)
    assert (best.ap, best.epoch, best.stale) == (0.4, 0, 1) and not (tmp_path / "checkpoint_best.pth").exists()
    best.update(2, {"AP": 0.2}, weights)
    assert best.should_stop


def test_other_processes_count_nothing(tmp_path: Path) -> None:
    best = BestCheckpoint(None, patience=1)
    best.update(0, {}, weights)
    assert not best.should_stop and best.epoch is None

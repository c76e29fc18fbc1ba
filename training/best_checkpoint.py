"""The best checkpoint of a run, and early stopping (`--patience`).

After every evaluation the validation AP of the model, and of its EMA with `--ema`, are compared with the
best so far: an improvement writes `checkpoint_best.pth` (the better of the two weights, with its epoch and
AP) and says so; `patience` evaluations in a row without one stop the run. The history is the run's
log.txt, so a resumed run continues counting where it stopped.
"""
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from deta.checkpoint import save_atomically

log = logging.getLogger(__name__)

BEST_NAME = "checkpoint_best.pth"
# The evaluated weights and their AP in the test stats of an evaluation (the EMA's with --ema).
CANDIDATES = {"model": "AP", "ema": "ema_AP"}


class BestCheckpoint:
    """Tracks the best AP of a run (the main process writes; every process may ask `should_stop`)."""

    def __init__(self, output_dir: Path | None, patience: int | None, history: Iterable[dict[str, Any]] = ()) -> None:
        """`history`: the run's earlier log.txt records ({"epoch", "test_AP", "test_ema_AP"?, ...}), in order."""
        self.path = output_dir / BEST_NAME if output_dir is not None else None
        self.patience = patience
        self.ap, self.epoch, self.weights = -math.inf, None, None
        self.stale = 0  # evaluations since the last improvement
        for record in history:
            self._compare(record["epoch"], {key[len("test_"):]: value for key, value in record.items()
                                            if key.startswith("test_")})

    def update(self, epoch: int, stats: dict[str, float], checkpoint: Callable[[str], dict[str, Any]]) -> None:
        """Compare `epoch`'s evaluation `stats`; on an improvement write `checkpoint(weights)` ("model" or "ema")
        with the epoch and AP to checkpoint_best.pth. Empty `stats` (processes other than the main one) count
        nothing."""
        if not stats or not self._compare(epoch, stats) or self.path is None:
            return
        save_atomically({**checkpoint(self.weights), "epoch": epoch, "AP": self.ap, "weights": self.weights},
                        self.path)
        which = "the EMA weights" if self.weights == "ema" else "the model"
        log.info(f"epoch {epoch}: AP {self.ap:.4f} of {which} is the best so far; saved to {self.path}")

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def stop_message(self, epoch: int) -> str:
        return (f"--patience {self.patience}: no AP improvement in the {self.stale} evaluations since epoch "
                f"{self.epoch} (best AP {self.ap:.4f}, in {BEST_NAME}); stopping after epoch {epoch}. The last "
                "checkpoint resumes the run (--resume with a larger --patience)")

    def _compare(self, epoch: int, stats: dict[str, float]) -> bool:
        """Whether `stats` improve on the best AP (then recorded)."""
        scored = [(stats[key], weights) for weights, key in CANDIDATES.items() if key in stats]
        if not scored:
            return False
        ap, weights = max(scored, key=lambda item: item[0])
        if ap > self.ap:
            self.ap, self.epoch, self.weights, self.stale = ap, epoch, weights, 0
            return True
        self.stale += 1
        return False

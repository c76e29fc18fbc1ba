"""Running averages of the logged scalars, and a progress line every few iterations."""
import datetime
import logging
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


class SmoothedValue:
    """Mean over the last `window` updates (for the progress line) and over all of them (for the log)."""

    def __init__(self, window: int = 20) -> None:
        self.recent: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float) -> None:
        self.recent.append(value)
        self.total += value
        self.count += 1

    @property
    def smoothed(self) -> float:
        return sum(self.recent) / len(self.recent)

    @property
    def global_avg(self) -> float:
        return self.total / self.count


class Progress:
    """Meters of one pass over a data loader; `track` logs a line every `print_freq` iterations.

    The line shows speed, ETA and the meters named in `shown` (all meters go into `averages`).
    """

    def __init__(self, header: str, print_freq: int, shown: tuple[str, ...] = ()) -> None:
        self.header = header
        self.print_freq = max(print_freq, 1)
        self.shown = shown
        self.meters: dict[str, SmoothedValue] = {}

    def update(self, **values: float) -> None:
        for name, value in values.items():
            self.meters.setdefault(name, SmoothedValue()).update(value)

    def averages(self) -> dict[str, float]:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def track(self, loader: DataLoader) -> Iterator[Any]:
        total = len(loader)
        step_time = SmoothedValue()
        start = last = time.perf_counter()
        for i, item in enumerate(loader):
            yield item
            now = time.perf_counter()
            step_time.update(now - last)
            last = now
            if (i + 1) % self.print_freq == 0 or i + 1 == total:
                self._log_line(i + 1, total, step_time)
        elapsed = time.perf_counter() - start
        log.info(f"{self.header} done in {datetime.timedelta(seconds=round(elapsed))} "
                 f"({elapsed / max(total, 1):.3f} s/it)")

    def _log_line(self, done: int, total: int, step_time: SmoothedValue) -> None:
        eta = datetime.timedelta(seconds=round(step_time.global_avg * (total - done)))
        parts = [f"{self.header} [{done:{len(str(total))}d}/{total}]", f"eta {eta}",
                 f"{1 / step_time.smoothed:.2f} it/s"]
        parts += [_format(name, self.meters[name]) for name in self.shown if name in self.meters]
        log.info("  ".join(parts))


def _format(name: str, meter: SmoothedValue) -> str:
    if name == "lr":
        return f"lr {meter.recent[-1]:.2e}"
    return f"{name} {meter.smoothed:.4f} ({meter.global_avg:.4f})"

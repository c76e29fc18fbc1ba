"""A run's log.txt: one JSON line per finished epoch, its training means and evaluation metrics.

The line is what marks an epoch finished. The checkpoint is written before evaluation, so a run stopped
during evaluation leaves an epoch with a checkpoint and no line, which `--resume` evaluates first. The file
is rewritten whole through a temporary file: a kill leaves it as it was or with the new line, never half a line.
"""
import json
from pathlib import Path

from deta.checkpoint import save_text_atomically

LOG_NAME = "log.txt"


def logged_records(output_dir: Path) -> list[dict]:
    """The epoch records of output_dir/log.txt, in order (lines that are not such records are passed over)."""
    path = output_dir / LOG_NAME
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def logged_epochs(output_dir: Path) -> set[int]:
    """Epochs with a line in output_dir/log.txt."""
    return {record["epoch"] for record in logged_records(output_dir)}


def log_epoch(output_dir: Path, epoch: int, train_stats: dict[str, float], test_stats: dict[str, float]) -> None:
    """Add {"epoch", "train_*", "test_*"} as a line of output_dir/log.txt."""
    path = output_dir / LOG_NAME
    before = path.read_text() if path.is_file() else ""
    record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
              **{f"test_{k}": v for k, v in test_stats.items()}}
    save_text_atomically(before + ("\n" if before and not before.endswith("\n") else "") + json.dumps(record) + "\n",
                         path)

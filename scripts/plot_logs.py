"""Plot the training losses and the COCO AP per epoch of one or more main.py runs, from their log.txt.

    python scripts/plot_logs.py OUTPUT_DIR... [--out logs.png]

One panel per quantity, one line per run, labelled by its folder as given; quantities that no run
logged are left out.
"""
import argparse
import json
import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deta.errors import InputError

# (log.txt key, panel title): the weighted training terms of the last decoder layer, and the test AP.
PANELS = (
    ("train_loss", "training loss (all terms)"),
    ("train_loss_ce", "classification loss"),
    ("train_loss_bbox", "L1 box loss"),
    ("train_loss_giou", "GIoU loss"),
    ("test_AP", "COCO box AP"),
)
PANEL_SIZE = (4.0, 3.5)  # inches
DPI = 100


def read_log(run: Path) -> list[dict]:
    """The per-epoch records of a run folder's log.txt (or of a log file named directly)."""
    path = run / "log.txt" if run.is_dir() else run
    if not path.is_file():
        raise InputError(f"{path}: no such file; pass the --output_dir of a main.py run, or its log.txt")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: not a JSON line ({err}); is this a main.py log.txt?") from err
        if not isinstance(record, dict) or "epoch" not in record:
            raise InputError(f"{path}:{number}: a record without 'epoch'; is this a main.py log.txt?")
        records.append(record)
    if not records:
        raise InputError(f"{path}: no epochs logged yet")
    return records


def plot(runs: dict[str, list[dict]]) -> Figure:
    """A row of panels, one per quantity that some run logged, with a line per run."""
    panels = [(key, title) for key, title in PANELS if any(key in r for records in runs.values() for r in records)]
    if not panels:
        raise InputError(f"none of {', '.join(key for key, _ in PANELS)} is in the logs; is this a main.py log.txt?")
    figure = Figure(figsize=(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1]), dpi=DPI, layout="constrained")
    for axes, (key, title) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for name, records in runs.items():
            points = [(r["epoch"], r[key]) for r in records if key in r]
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    figure.axes[0].legend(fontsize="small")
    return figure


def _check_out(out: Path) -> None:
    """--out names a PNG file in an existing folder (checked before the logs are read)."""
    if out.is_dir():
        raise InputError(f"--out {out}: a folder; pass the PNG file to write")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist; create it, or pass a path in an "
                         "existing folder")


def _save(figure: Figure, out: Path) -> None:
    try:
        figure.savefig(out)
    except OSError as err:
        raise InputError(f"--out {out}: cannot write it ({err.strerror or err}); pass a path you can write to") \
            from err


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="main.py output folders (or their log.txt files)")
    parser.add_argument("--out", default="logs.png", help="PNG to write")
    options = parser.parse_args(argv)
    out = Path(options.out)
    try:
        _check_out(out)
        _save(plot({run: read_log(Path(run)) for run in options.runs}), out)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

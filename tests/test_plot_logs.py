"""scripts/plot_logs.py: a PNG of the loss and AP curves of main.py runs."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts import plot_logs


def _write_log(run: Path, epochs: int, with_ap: bool = True) -> Path:
    run.mkdir()
    lines = [{"epoch": e, "train_loss": 10.0 / (e + 1), "train_loss_ce": 1.0 / (e + 1), "train_loss_bbox": 0.5,
              "train_loss_giou": 0.4, "train_lr": 2e-4, **({"test_AP": 0.1 * e} if with_ap else {})}
             for e in range(epochs)]
    (run / "log.txt").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def test_two_runs_render_one_panel_per_quantity(tmp_path: Path) -> None:
    runs = [_write_log(tmp_path / "a", 3), _write_log(tmp_path / "b", 2, with_ap=False)]
    out = tmp_path / "curves.png"
    plot_logs.main([*map(str, runs), "--out", str(out)])
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = plot_logs.PANEL_SIZE
        assert image.size == (round(width * plot_logs.DPI * len(plot_logs.PANELS)), round(height * plot_logs.DPI))
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # lines, labels and legend, not a blank canvas


def test_runs_without_a_quantity_drop_its_panel(tmp_path: Path) -> None:
    figure = plot_logs.plot({"a": plot_logs.read_log(_write_log(tmp_path / "a", 2, with_ap=False))})
    assert [axes.get_title() for axes in figure.axes] == [title for key, title in plot_logs.PANELS if key != "test_AP"]


@pytest.mark.parametrize(("content", "message"), [
    (None, "log.txt: no such file"),
    ('{"epoch": 0}\nnot json\n', "log.txt:2: not a JSON line"),
    ("", "no epochs logged yet"),
])
def test_bad_logs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture, content: str | None,
                                      message: str) -> None:
    if content is not None:
        (tmp_path / "log.txt").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        plot_logs.main([str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(("out", "message"), [
    ("missing/curves.png", "--out {tmp}/missing/curves.png: folder {tmp}/missing does not exist; create it"),
    (".", "--out {tmp}: a folder; pass the PNG file to write"),
])
def test_bad_out_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture, out: str, message: str) -> None:
    run = _write_log(tmp_path / "run", 2)
    with pytest.raises(SystemExit) as exit_info:
        plot_logs.main([str(run), "--out", str((tmp_path / out).resolve() if out == "." else tmp_path / out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(tmp=tmp_path)) and err.count("\n") == 1, err
    assert not (tmp_path / "missing").exists()

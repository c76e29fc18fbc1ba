"""Tests import the repo's top-level modules (main, engine, deta, ...) and the fixtures beside them."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised small DETA (test_main.TINY, 6 classes) saved as main.py saves it, with the class
    names of datasets.synthetic."""
    from test_main import TINY

    import deta
    from datasets.synthetic import CATEGORIES
    from main import get_args_parser

    args = get_args_parser().parse_args([*TINY, "--num_classes", "6"])
    torch.manual_seed(0)
    model, _, _ = deta.build_model(args)
    path = tmp_path_factory.mktemp("tiny_checkpoint") / "checkpoint.pth"
    names = {category_id: name for category_id, name, _ in CATEGORIES}
    torch.save({"model": model.state_dict(), "args": vars(args), "category_names": names}, path)
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_checkpoint` exported by the command line with post-processing (50 detections): once per session,
    as an export takes a minute."""
    from scripts import export_onnx

    out = tmp_path_factory.mktemp("tiny_onnx") / "tiny.onnx"
    export_onnx.main(["--resume", str(tiny_checkpoint), "--out", str(out), "--postprocess", "--num_detections", "50"])
    return out


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A folder on its own 256 KiB tmpfs, to fill up for real (skipped where mounting is not permitted)."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)

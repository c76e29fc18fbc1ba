"""`pip install .` and `pip install -e .` install `deta` and `ops` alone, beside HuggingFace `datasets`.

The virtual environment is built offline: this interpreter's packages (torch, ...) are reached through a .pth
file, HF `datasets` comes from the wheel that scripts/setup.sh downloads into WHEELS, and the kernels' ahead-of-time
build is skipped (DETA_BUILD_KERNELS=0).
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WHEELS = Path(os.environ.get("DETA_TEST_WHEELS", Path.home() / ".cache" / "deta-nms" / "wheels"))
TRAINING_CODE = ("main", "engine", "training", "scripts")
# Run in the venv from another folder: what resolves where, and a checkpoint loaded through the installed deta.
CHECK = """
import importlib.util, json, sys
import deta
detector = deta.Detector.from_checkpoint(sys.argv[1], device="cpu")
spec = {name: getattr(importlib.util.find_spec(name), "origin", None)
        for name in ("datasets", "deta", "ops", "main", "engine", "training", "scripts")}
print(json.dumps({"spec": spec, "num_classes": detector.args.num_classes, "deta": deta.__file__}))
"""


def _pip(venv_python: Path, *args: str, cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv_python), "--disable-pip-version-check",
                             *args], cwd=cwd, env={**os.environ, "DETA_BUILD_KERNELS": "0"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _check(venv_python: Path, checkpoint: Path, cwd: Path) -> dict:
    result = subprocess.run([str(venv_python), "-c", CHECK, str(checkpoint)], cwd=cwd, capture_output=True, text=True,
                            timeout=300, env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def _is_hf_datasets(folder: Path) -> bool:
    """HuggingFace's package whole, none of ours written over or beside it."""
    return (folder / "arrow_dataset.py").is_file() and not (folder / "coco.py").exists()


@pytest.mark.slow
def test_install_and_editable_install_add_deta_and_ops_alone(tiny_checkpoint: Path, tmp_path: Path) -> None:
    wheels = sorted(WHEELS.glob("datasets-*.whl"))
    assert wheels, f"no HuggingFace datasets wheel in {WHEELS}: run scripts/setup.sh once (it downloads it)"
    # A copy of the repository: the build writes build/ and *.egg-info beside the sources.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "tests", "build", "*.egg-info",
                                                                "__pycache__", "outputs", "exps", "data", "*.so"))
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "running_interpreter.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _pip(python, "install", "--no-index", "--no-deps", str(wheels[-1]), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    _pip(python, "install", "--no-index", "--no-deps", "--no-build-isolation", str(source), cwd=tmp_path)
    installed = {path.name for path in site.iterdir()}
    assert {"deta", "ops"} <= installed and not installed & {"main.py", "engine.py", "training", "scripts"}
    assert (site / "ops" / "csrc" / "ms_deform_attn_cpu.cpp").is_file()  # for the kernels' build on first use
    assert (site / "deta" / "formats" / "hf.py").is_file()
    found = _check(python, tiny_checkpoint, elsewhere)
    assert found["deta"] == str(site / "deta" / "__init__.py") and found["num_classes"] == 6
    assert found["spec"]["datasets"] == str(site / "datasets" / "__init__.py")
    assert _is_hf_datasets(site / "datasets")
    assert all(found["spec"][name] is None for name in TRAINING_CODE)

    _pip(python, "uninstall", "-y", "deta-nms", cwd=tmp_path)
    assert _is_hf_datasets(site / "datasets") and not (site / "deta").exists()
    _pip(python, "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(source), cwd=tmp_path)
    found = _check(python, tiny_checkpoint, elsewhere)
    assert found["deta"] == str(source / "deta" / "__init__.py") and found["num_classes"] == 6
    assert found["spec"]["datasets"] == str(site / "datasets" / "__init__.py")
    assert all(found["spec"][name] is None for name in TRAINING_CODE)

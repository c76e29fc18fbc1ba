"""scripts/finetune_demo.sh, the tiny version of docs/FINETUNING.md: train, fine-tune on other classes, evaluate."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.test_main import ENV, REPO, TINY


def test_finetune_demo_trains_finetunes_on_other_classes_and_evaluates(tmp_path: Path) -> None:
    env = {**ENV, "PYTHON": sys.executable, "OUT": str(tmp_path), "NUM_TRAIN": "4", "NUM_VAL": "2",
           "IMAGE_SIZE": "64 96"}
    result = subprocess.run(["bash", str(REPO / "scripts" / "finetune_demo.sh"), *TINY, "--epochs", "1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "--finetune: re-initialised" in result.stdout

    base, finetuned = (torch.load(tmp_path / name / "checkpoint.pth", map_location="cpu", weights_only=True)
                       for name in ("base", "finetuned"))
    assert base["category_names"] == {1: "circle", 2: "square", 3: "triangle"} and base["args"]["num_classes"] == 4
    assert finetuned["category_names"] == {1: "ring", 2: "cross"} and finetuned["args"]["num_classes"] == 3
    heads = [k for k in finetuned["model"] if k.startswith("class_embed.") and k.endswith(".bias")]
    assert heads and all(finetuned["model"][k].shape == (3,) and base["model"][k].shape == (4,) for k in heads)
    # the rest started from the base model: one step of fine-tuning moves it little (a new init would not be near)
    first_conv = "backbone.0.body.conv1.weight"
    assert torch.allclose(finetuned["model"][first_conv], base["model"][first_conv], atol=1e-2)

    stats = json.loads((tmp_path / "eval" / "coco_stats.json").read_text())
    assert 0 <= stats["AP"] <= 1
    results = json.loads((tmp_path / "eval" / "coco_results.json").read_text())
    assert results and {d["category_id"] for d in results} <= {0, 1, 2}  # the new 3-way head (id 0 unused)

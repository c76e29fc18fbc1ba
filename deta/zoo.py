"""Published DETA checkpoints by name: where their files are, and the model flags a file does not save.

docs/MODEL_ZOO.md lists the same names with their COCO AP. `deta.hub.checkpoint_file(name)` downloads one.
detrex's files hold only the weights, so their entry carries the main.py model arguments of the official
recipe (docs/MODEL_ZOO.md, "detrex checkpoints"); HF model folders come with a config.json that gives them.
"""
from dataclasses import dataclass, field
from typing import Any

_DETREX = "https://github.com/IDEA-Research/detrex-storage/releases/download"
_HF = "https://huggingface.co"

# The official recipe's model flags as main.py argument names (docs/MODEL_ZOO.md, $BASE, $DETA and $SWIN).
_BASE = {"with_box_refine": True, "two_stage": True, "num_feature_levels": 5, "num_queries": 900,
         "dim_feedforward": 2048, "dropout": 0.0, "cls_loss_coef": 1.0}
_DETA = {**_BASE, "assign_first_stage": True, "assign_second_stage": True}
_SWIN = {**_DETA, "backbone": "swin_large", "bigger": True}


@dataclass(frozen=True)
class ZooEntry:
    """`files`: name in the cache → URL. One file is a checkpoint; several are an HF model folder.
    `sha256`: file name → published SHA-256 (or a prefix of it), where the publisher gives one.
    `args`: main.py model arguments for a file that saves none."""

    files: dict[str, str]
    description: str
    args: dict[str, Any] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)


def _detrex(release: str, file: str, description: str, args: dict[str, Any]) -> ZooEntry:
    return ZooEntry({file: f"{_DETREX}/{release}/{file}"}, description, args)


def _hf(repo: str, weights: str, description: str) -> ZooEntry:
    return ZooEntry({name: f"{_HF}/{repo}/resolve/main/{name}" for name in ("config.json", weights)}, description)


ZOO: dict[str, ZooEntry] = {
    "deta_r50_5scale_12ep_bs8": _detrex("v0.4.0", "deta_r50_5scale_12ep_bs8.pth",
                                        "DETA R50 12 ep trained in detrex, 50.0 AP", _DETA),
    "converted_deta_r50_5scale_12ep": _detrex("v0.3.0", "converted_deta_r50_5scale_12ep.pth",
                                              "official DETA R50 12 ep, 50.1 AP", _DETA),
    "converted_deta_improved_deformable_baseline": _detrex(
        "v0.3.0", "converted_deta_improved_deformable_baseline.pth",
        "official Improved Deformable DETR R50 50 ep, 49.8 AP with 300 detections",
        {**_BASE, "num_detections": 300}),
    "converted_deta_swin_o365_finetune": _detrex("v0.3.0", "converted_deta_swin_o365_finetune.pth",
                                                 "official DETA Swin-L, O365 then COCO, 62.9 AP", _SWIN),
    "jozhang97/deta-resnet-50": _hf("jozhang97/deta-resnet-50", "model.safetensors",
                                    "HF port of the official R50 12 ep, 50.1 AP"),
    "jozhang97/deta-resnet-50-24-epochs": _hf("jozhang97/deta-resnet-50-24-epochs", "model.safetensors",
                                              "HF port of the official R50 24 ep, 51.1 AP"),
    "jozhang97/deta-swin-large": _hf("jozhang97/deta-swin-large", "pytorch_model.bin",
                                     "HF port of the official Swin-L COCO, 62.9 AP"),
    "jozhang97/deta-swin-large-o365": _hf("jozhang97/deta-swin-large-o365", "pytorch_model.bin",
                                          "HF port of the official Swin-L Objects365 (366 labels)"),
}

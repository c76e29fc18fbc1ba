"""engine.py and its training/ helpers, in one process on a tiny model and a tiny synthetic data set."""
import argparse
import math

import pytest
import torch
from parity import assert_matches, own_references
from test_main import TINY
from torch import nn
from torch.utils.data import DataLoader

from datasets import build_dataset, collate_fn
from datasets.synthetic import generate
from deta import build_model
from engine import NonFiniteLossError, evaluate, train_one_epoch
from main import get_args_parser
from training.coco_eval import coco_box_stats, coco_detections
from training.optim import build_optimizer, param_groups

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_args(tmp_path_factory: pytest.TempPathFactory) -> argparse.Namespace:
    paths = generate(tmp_path_factory.mktemp("shapes"), seed=0, num_train=2, num_val=3, image_size=(64, 96),
                     object_size=(24, 48), max_objects=2)
    flags = [f"--{flag}={path}" for flag, path in paths.items()]
    args = get_args_parser().parse_args([*TINY, *flags, "--lr", "1e-3"])
    args.num_classes = 6
    return args


@pytest.fixture(scope="module")
def overfit(tiny_args: argparse.Namespace) -> tuple[nn.Module, dict, list[float]]:
    """A tiny model trained on two fixed (un-augmented) images; its post-processors and epoch losses."""
    torch.manual_seed(0)
    model, criterion, postprocessors = build_model(tiny_args)
    images = build_dataset("val", tiny_args)
    images.ids = images.ids[:2]
    loader = DataLoader(images, batch_size=2, collate_fn=collate_fn)
    optimizer = build_optimizer(model, tiny_args)
    losses = [train_one_epoch(model, criterion, loader, optimizer, CPU, epoch)["loss"] for epoch in range(25)]
    return model, postprocessors, losses


def test_loss_falls_when_overfitting(overfit: tuple[nn.Module, dict, list[float]]) -> None:
    losses = overfit[2]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses


def test_evaluation_does_not_depend_on_batch_size(tiny_args: argparse.Namespace,
                                                  overfit: tuple[nn.Module, dict, list[float]]) -> None:
    model, postprocessors, _ = overfit
    dataset = build_dataset("val", tiny_args)
    images = [dataset[i][0] for i in range(len(dataset))]
    assert len({tuple(image.shape) for image in images}) > 1  # so batches are padded
    model.eval()
    alone = own_references(model, images, postprocessors["bbox"])
    for start in range(0, len(images), 2):  # the batches of --batch_size 2
        assert_matches(model, images[start:start + 2], alone[start:start + 2], postprocessors["bbox"])


def test_amp_runs_the_model_in_bf16_and_the_loss_in_fp32(tiny_args: argparse.Namespace) -> None:
    model, criterion, _ = build_model(tiny_args)
    dtypes = []
    model.class_embed[0].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    forward = criterion.forward

    def recording_forward(outputs: dict, targets: list, num_boxes: float | None = None) -> dict:
        dtypes.append(outputs["pred_logits"].dtype)
        return forward(outputs, targets, num_boxes)

    criterion.forward = recording_forward
    images = build_dataset("val", tiny_args)
    images.ids = images.ids[:2]
    loader = DataLoader(images, batch_size=2, collate_fn=collate_fn)
    stats = train_one_epoch(model, criterion, loader, build_optimizer(model, tiny_args), CPU, 0, amp=True)
    assert dtypes == [torch.bfloat16, torch.float32] and math.isfinite(stats["loss"])


def test_evaluate_writes_coco_results(tiny_args: argparse.Namespace, tmp_path,
                                      overfit: tuple[nn.Module, dict, list[float]]) -> None:
    model, postprocessors, _ = overfit
    dataset = build_dataset("val", tiny_args)
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_fn)
    stats = evaluate(model, postprocessors, loader, dataset.coco, CPU, output_dir=tmp_path)
    assert 0.0 <= stats["AP"] <= 1.0 and stats["AP50"] >= stats["AP75"]
    results = dataset.coco.loadRes(str(tmp_path / "coco_results.json"))  # the standard results format
    assert set(results.getImgIds()) == set(dataset.ids)
    assert (tmp_path / "coco_stats.json").is_file()


def test_perfect_detections_score_ap_one(tiny_args: argparse.Namespace) -> None:
    coco = build_dataset("val", tiny_args).coco
    detections = []
    for image_id in coco.getImgIds():
        annotations = coco.imgToAnns[image_id]
        xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)])
        result = {"boxes": xyxy, "labels": torch.tensor([a["category_id"] for a in annotations]),
                  "scores": torch.ones(len(annotations))}
        detections += coco_detections(image_id, result)
    stats = coco_box_stats(coco, detections)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert coco_box_stats(coco, [])["AP"] == 0.0  # no detections at all is a valid (bad) result


class _Poisoned(nn.Module):
    """A criterion whose box loss is NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.weight_dict = {"loss_ce": 1.0, "loss_bbox": 5.0}

    def forward(self, outputs: dict, targets: list, num_boxes: float | None = None) -> dict[str, torch.Tensor]:
        return {"loss_ce": outputs["pred"].sum(), "loss_bbox": outputs["pred"].sum() * math.nan}


class _Linear(nn.Linear):
    def forward(self, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"pred": super().forward(torch.stack(images).flatten(1))}


def test_non_finite_loss_stops_before_the_step() -> None:
    model = _Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    one_box = {"labels": torch.zeros(1, dtype=torch.int64)}  # counted for the loss normaliser
    loader = DataLoader([(torch.ones(3, 1, 1), one_box)] * 4, batch_size=2, collate_fn=collate_fn)
    with pytest.raises(NonFiniteLossError, match=r"at epoch 3, iteration 0/2 \(loss_bbox=nan\)"):
        train_one_epoch(model, _Poisoned(), loader, torch.optim.AdamW(model.parameters()), CPU, epoch=3)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_param_groups_follow_the_official_split() -> None:
    model = nn.ModuleDict({
        "backbone": nn.ModuleList([nn.Linear(1, 1)]),  # backbone.0.*
        "sampling_offsets": nn.Linear(1, 1),
        "head": nn.Linear(1, 1),
        "frozen": nn.Linear(1, 1).requires_grad_(False),
    })
    args = get_args_parser().parse_args(["--lr", "1e-3", "--lr_backbone", "1e-4", "--lr_linear_proj_mult", "0.5"])
    groups = param_groups(model, args)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4, 5e-4]
    assert [{id(p) for p in g["params"]} for g in groups] == [
        {id(p) for p in model["head"].parameters()},
        {id(p) for p in model["backbone"].parameters()},
        {id(p) for p in model["sampling_offsets"].parameters()},
    ]
    args.lr_backbone_names = ["backbone.0", "sampling_offsets"]  # overlapping lists: backbone wins, no duplicate
    assert len(build_optimizer(model, args).param_groups[2]["params"]) == 0

"""deta.Detector: the Python inference API, and that predict.py writes exactly its detections."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_main import TINY
from torchvision.transforms.v2 import functional as F

import deta
from datasets.synthetic import CATEGORIES, generate
from deta.checkpoint import from_ours, save_hf_folder, to_official
from deta.config import model_parser
from deta.errors import InputError
from deta.formats.hf import config_json
from deta.images import EXIF_ORIENTATION_TAG, read_rgb
from scripts import predict
from training.coco_eval import coco_detections

NAMES = {category_id: name for category_id, name, _ in CATEGORIES}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two generated PNGs of different sizes, and a JPEG photo stored sideways (EXIF orientation 6)."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for seed, size in ((0, (64, 96)), (1, (100, 120))):
        generated = generate(folder / str(seed), seed=seed, num_train=0, num_val=1, image_size=size,
                             object_size=(20, 40), max_objects=2)
        paths.append(next(generated["val_images"].iterdir()).rename(folder / f"shapes{seed}.png"))
    with Image.open(paths[0]) as picture:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION_TAG] = 6
        picture.transpose(Image.Transpose.ROTATE_90).save(folder / "sideways.jpg", exif=exif, quality=95)
    return [*paths, folder / "sideways.jpg"]


@pytest.fixture(scope="module")
def detector(tiny_checkpoint: Path) -> deta.Detector:
    return deta.Detector.from_checkpoint(tiny_checkpoint, device="cpu")


def test_pil_image_path_and_tensor_give_exactly_what_predict_writes(images: list[Path], tiny_checkpoint: Path,
                                                                     detector: deta.Detector, tmp_path: Path) -> None:
    predict.main(["--resume", str(tiny_checkpoint), *map(str, images), "--out", str(tmp_path),
                  "--score_threshold", "0"])
    written = json.loads((tmp_path / "detections.json").read_text())
    for image_id, path in enumerate(images, start=1):
        expected = [d for d in written if d["image_id"] == image_id]
        assert len(expected) == 100
        with Image.open(path) as picture:  # as stored: sideways for the JPEG, turned by its EXIF tag
            inputs = {"PIL image": picture.copy(), "path": path, "tensor": F.pil_to_tensor(read_rgb(path))}
        for kind, image in inputs.items():
            assert coco_detections(image_id, detector.predict(image)) == expected, f"{path.name} as a {kind}"
    # The photo's stored pixels, not turned by EXIF, are another image.
    with Image.open(images[2]) as stored:
        sideways = detector.predict(F.pil_to_tensor(stored.convert("RGB")))
    assert coco_detections(3, sideways) != [d for d in written if d["image_id"] == 3]


def test_results_follow_torchvision_and_do_not_depend_on_the_batch(images: list[Path],
                                                                   detector: deta.Detector) -> None:
    single = detector.predict(images[0], score_threshold=0.012)
    assert isinstance(single, dict) and list(single) == ["boxes", "scores", "labels", "names"]
    assert single["boxes"].dtype == torch.float32 and single["labels"].dtype == torch.int64
    assert single["boxes"].shape == (len(single["scores"]), 4) and (single["scores"] >= 0.012).all()
    assert single["names"] == [NAMES.get(label, str(label)) for label in single["labels"].tolist()]
    one_by_one = detector.predict(images, batch_size=1)
    together = detector.predict(images, batch_size=3)
    assert isinstance(together, list) and len(together) == 3
    for alone, batched in zip(one_by_one, together, strict=True):
        # Per-image evaluation: batched matmuls may round differently, nothing else changes.
        assert alone["labels"].tolist() == batched["labels"].tolist()
        torch.testing.assert_close(batched["scores"], alone["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(batched["boxes"], alone["boxes"], rtol=0, atol=1e-3)


def test_flags_bf16_and_class_names_of_an_official_checkpoint(images: list[Path], tiny_checkpoint: Path,
                                                              tmp_path: Path) -> None:
    ours = torch.load(tiny_checkpoint, weights_only=True)
    official = tmp_path / "official.pth"
    torch.save({"model": to_official(ours["model"], two_stage=True, with_box_refine=True),
                "args": argparse.Namespace(**ours["args"])}, official)
    names_json = next(images[0].parent.glob("0/annotations/*.json"))
    detector = deta.Detector.from_checkpoint(official, device="cpu", names_json=names_json, eval_size=64, amp=True)
    assert detector.args.amp and detector.class_names == NAMES
    tensor, size = detector.preprocess(images[0])
    with Image.open(images[0]) as picture:
        assert size == (picture.height, picture.width) and min(tensor.shape[1:]) == 64
    result = detector.predict(images[0])
    assert result["scores"].dtype == torch.float32 and len(result["scores"]) == 100


def test_an_hf_model_folder_gives_the_same_detections(images: list[Path], tiny_checkpoint: Path,
                                                      detector: deta.Detector, tmp_path: Path) -> None:
    ours = torch.load(tiny_checkpoint, weights_only=True)
    args = argparse.Namespace(**ours["args"])
    save_hf_folder(from_ours(ours["model"], "hf", two_stage=True, with_box_refine=True),
                   config_json(args, ours["category_names"]), tmp_path / "hf")
    from_hf = deta.Detector.from_checkpoint(tmp_path / "hf", device="cpu", eval_size=args.eval_size,
                                            max_size=args.max_size)
    assert from_hf.class_names == NAMES
    expected, actual = detector.predict(images[1]), from_hf.predict(images[1])
    assert actual["labels"].tolist() == expected["labels"].tolist()
    torch.testing.assert_close(actual["boxes"], expected["boxes"])


def test_a_checkpoint_without_arguments_needs_the_model_flags(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bare = tmp_path / "detrex.pth"
    torch.save({"model": torch.load(tiny_checkpoint, weights_only=True)["model"]}, bare)
    with pytest.raises(InputError, match="saves no model arguments"):
        deta.Detector.from_checkpoint(bare)
    flags = vars(model_parser().parse_known_args(TINY)[0])  # the model flags of the training command
    with pytest.warns(UserWarning, match="names none of its 6 classes"):
        detector = deta.Detector.from_checkpoint(bare, **{k: v for k, v in flags.items() if k != "num_classes"})
    assert detector.args.num_classes == 6 and detector.class_names == {}  # head size read from the weights


def test_numpy_arrays_and_float_tensors_give_what_the_file_gives(images: list[Path], detector: deta.Detector) -> None:
    expected = detector.predict(images[0])
    rgb = np.array(read_rgb(images[0]))
    bgr = np.ascontiguousarray(rgb[..., ::-1])  # as cv2.imread gives it
    inputs = {"H×W×3 uint8 RGB array": rgb, "OpenCV's BGR flipped to RGB (a negative-stride view)": bgr[..., ::-1],
              "float tensor in [0, 1]": torch.from_numpy(rgb).permute(2, 0, 1) / 255}
    for kind, image in inputs.items():
        actual = detector.predict(image)
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(actual[key], expected[key]), kind
    assert not torch.equal(detector.predict(bgr)["scores"], expected["scores"])  # channel order matters
    grey = np.asarray(read_rgb(images[0]).convert("L"))
    from_pil = detector.predict(Image.fromarray(grey))
    assert torch.equal(detector.predict(grey)["scores"], from_pil["scores"])


@pytest.mark.parametrize(("image", "message"), [
    (torch.full((3, 8, 8), 255.0), r"float image tensor with values in \[255, 255\]: expected \[0, 1\]"),
    (torch.full((3, 8, 8), torch.nan), r"values in \[nan, nan\]"),
    (torch.zeros(3, 8, 8, dtype=torch.int32), "image tensor of torch.int32"),
    (np.zeros((8, 8, 4), dtype=np.uint8), r"image array of uint8 with shape \(8, 8, 4\): expected uint8 H×W×3 RGB"),
    (np.zeros((8, 8, 3)), "image array of float64"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "pass several images as a list"),
    ("missing.png", "missing.png: cannot read image"),
    (3, "image of type int"),
])
def test_bad_images_are_input_errors(detector: deta.Detector, image: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        detector.predict(image)


def test_unknown_flags_are_input_errors(tiny_checkpoint: Path) -> None:
    with pytest.raises(InputError, match="unknown main.py flag"):
        deta.Detector.from_checkpoint(tiny_checkpoint, eval_sise=600)


def test_the_ema_weights_of_a_checkpoint_are_read_by_default_and_said(images: list[Path], tiny_checkpoint: Path,
                                                                      tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    saved = torch.load(tiny_checkpoint, weights_only=True)
    average = {key: value + 0.01 if value.is_floating_point() else value for key, value in saved["model"].items()}
    path = tmp_path / "with_ema.pth"
    torch.save({**saved, "ema": {"model": average, "updates": 7, "decay": 0.9997, "warmup": 2000}}, path)
    with pytest.warns(UserWarning, match=r"using its EMA weights \(the moving average of 7 training steps"):
        detector = deta.Detector.from_checkpoint(path, device="cpu", optimize=False)
    assert all(torch.equal(detector.model.state_dict()[key], value) for key, value in average.items())
    trained = deta.Detector.from_checkpoint(path, device="cpu", use_ema=False, optimize=False)
    assert all(torch.equal(trained.model.state_dict()[key], value) for key, value in saved["model"].items())
    # predict.py says it in one line, and --no_ema reads the trained weights
    predict.main(["--resume", str(path), str(images[0]), "--out", str(tmp_path / "ema")])
    assert "warning: checkpoint " + str(path) + ": using its EMA weights" in capsys.readouterr().err
    predict.main(["--resume", str(path), str(images[0]), "--out", str(tmp_path / "trained"), "--no_ema"])
    assert "EMA" not in capsys.readouterr().err
    expected = coco_detections(1, trained.predict(images[0], 0.3))
    assert json.loads((tmp_path / "trained" / "detections.json").read_text()) == pytest.approx(expected)

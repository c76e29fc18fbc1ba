"""Export a trained DETA to ONNX, and check the graph in ONNX Runtime against PyTorch.

    python scripts/export_onnx.py --resume CKPT --out model.onnx [--postprocess] [--num_detections N]
                                  [--opset 18] [--verify [HxW ...]] [--names_json ANNOTATIONS.json] [--no_ema]
                                  [-- MAIN_PY_FLAGS...]

Reads every checkpoint format that main.py reads, by path, URL or model-zoo name; the EMA weights of a
main.py --ema checkpoint unless --no_ema. The model is the one of the checkpoint's saved arguments,
and main.py flags after '--' override them (needed for detrex checkpoints, which save none). The graph takes
`images` (N×3×H×W float32, resized and normalised as `deta.Detector.preprocess` does; N, H and W dynamic;
the images of one call share their size, unpadded) and returns `pred_logits` and `pred_boxes`. With
--postprocess it also takes `orig_sizes` (N×2 int64 (H, W) that boxes are scaled to) and returns DETA's NMS
post-processing padded to --num_detections per image: `scores` (0 for padding), `labels`, `boxes` (xyxy)
and `num_valid`. The file's metadata holds the class names and the preprocessing (deta_* keys). The file
is written atomically; the checkpoint itself is never overwritten.

--verify runs the graph in ONNX Runtime (CPU) on random images of each size (batch 1 each, then a batch of 2
of the first size) and prints how far it is from the PyTorch model; default sizes 800x1333 and 1066x800.
The exit status is 1 when a check fails.
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deta.checkpoint import input_file_at
from deta.config import model_flags
from deta.errors import InputError, NoSpaceError, command_line_message
from deta.inference import Detector
from deta.onnx_export import DEFAULT_OPSET, export_onnx
from deta.onnx_verify import verify_onnx
from deta.preprocess import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_VERIFY_SIZES = ["800x1333", "1066x800"]


def image_size(text: str) -> tuple[int, int]:
    """'800x1333' -> (800, 1333)."""
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW, e.g. 800x1333") from None
    return height, width


def metadata(detector: Detector) -> dict[str, str]:
    """What a runtime needs beside the graph: class names and the preprocessing of `images`."""
    resize = detector.transform.transforms[0]  # the evaluation resize (--eval_size, --max_size, --bigger)
    return {"deta_class_names": json.dumps({str(k): v for k, v in detector.class_names.items()}),
            "deta_preprocess": json.dumps({"shorter_side": resize.sizes[0], "max_size": resize.max_size,
                                           "rgb_mean": IMAGENET_MEAN, "rgb_std": IMAGENET_STD, "scale": "1/255"})}


def export(checkpoint: str, out: Path, postprocess: bool, num_detections: int | None, opset: int,
           verify_sizes: list[tuple[int, int]] | None, names_json: str | None, overrides: list[str],
           use_ema: bool = True) -> bool:
    """Export, then verify if asked; True unless a check failed."""
    if num_detections is not None and not postprocess:
        raise InputError("--num_detections: only the post-processing has a detection count; add --postprocess")
    if out.is_dir():
        raise InputError(f"--out {out}: a folder; pass the path of the .onnx file to write")
    if input_file_at(out, checkpoint) is not None:
        raise InputError(f"--out {out}: that is the checkpoint being exported (or a link to it); choose another "
                         "output file")
    with warnings.catch_warnings(record=True) as caught:  # a command line says them in one line each
        warnings.simplefilter("always")
        detector = Detector.from_checkpoint(checkpoint, names_json=names_json, use_ema=use_ema,
                                            **{**model_flags(overrides), "device": "cpu"})
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    export_onnx(detector.model, out, postprocess=detector.postprocess if postprocess else None,
                num_detections=num_detections, opset=opset, metadata=metadata(detector))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, opset {opset}"
          + (", with post-processing" if postprocess else "") + ")", flush=True)
    if not verify_sizes:
        return True
    generator = torch.Generator().manual_seed(0)
    batches = [(f"{h}x{w}, batch 1", torch.randn(1, 3, h, w, generator=generator)) for h, w in verify_sizes]
    height, width = verify_sizes[0]
    batches.append((f"{height}x{width}, batch 2", torch.randn(2, 3, height, width, generator=generator)))
    ok = True
    for name, images in batches:
        sizes = torch.tensor([images.shape[-2:]] * len(images))  # boxes in input pixels
        result = verify_onnx(out, detector.model, detector.postprocess, images, sizes, name)
        print(result, flush=True)
        ok = ok and result.ok
    return ok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="main.py flags after '--' override the checkpoint's model arguments")
    parser.add_argument("--resume", required=True, help="checkpoint of any supported format")
    parser.add_argument("--out", required=True, help="ONNX file to write")
    parser.add_argument("--postprocess", action="store_true",
                        help="include DETA's NMS post-processing (outputs scores, labels, boxes, num_valid)")
    parser.add_argument("--num_detections", type=int, default=None,
                        help="detections per image with --postprocess (default: the model's --num_detections, 100)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (18 or later)")
    parser.add_argument("--verify", type=image_size, nargs="*", default=None, metavar="HxW",
                        help="compare ONNX Runtime with PyTorch at these image sizes (default: "
                             f"{' and '.join(DEFAULT_VERIFY_SIZES)})")
    parser.add_argument("--no_ema", dest="use_ema", action="store_false",
                        help="the trained weights of a main.py --ema checkpoint, not (the default) their average")
    parser.add_argument("--names_json", default=None,
                        help="COCO-format annotation file whose categories name the classes (stored in the file)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    options = parser.parse_args(argv[:split])
    verify = options.verify
    if verify == []:
        verify = [image_size(size) for size in DEFAULT_VERIFY_SIZES]
    try:
        ok = export(options.resume, Path(options.out), options.postprocess, options.num_detections, options.opset,
                    verify, options.names_json, argv[split + 1:], options.use_ema)
    except InputError as err:
        print(f"error: {command_line_message(err)}", file=sys.stderr)
        sys.exit(2)
    except NoSpaceError as err:
        print(f"error: {err.retry_message()}", file=sys.stderr)
        sys.exit(1)
    if not ok:
        print("error: ONNX Runtime and PyTorch disagree (see above)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

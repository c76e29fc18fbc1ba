"""Convert a YOLO or Pascal VOC data set to COCO-format JSON for main.py; the images stay where they are.

    python scripts/convert_dataset.py yolo data/my_yolo --out data/my_yolo/train.json
    python scripts/convert_dataset.py yolo data/my_yolo --split val --out data/my_yolo/val.json   # data.yaml's val:
    python scripts/convert_dataset.py voc VOCdevkit/VOC2012 --out voc2012.json [--difficult crowd|keep|drop]

Layouts and conventions: datasets/converters.py. A malformed label line or XML file refuses the conversion,
naming file and line; --skip_malformed converts without them (each listed). The last line says the main.py
flags that train on the result (--train_json/--train_images, or the --val_ pair).
"""
import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: import the repository's packages
    sys.path.insert(0, str(REPO))

from datasets.converters import DIFFICULT, voc_to_coco, yolo_to_coco  # noqa: E402
from deta.checkpoint import save_text_atomically  # noqa: E402
from deta.errors import InputError  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("format", choices=("yolo", "voc"))
    parser.add_argument("src", type=Path, help="the data set's folder")
    parser.add_argument("--out", required=True, type=Path, help="COCO-format JSON to write")
    parser.add_argument("--split", default=None,
                        help="yolo: the data.yaml entry (train, val, test) naming the image folder; default: "
                             "SRC/images")
    parser.add_argument("--difficult", default="crowd", choices=DIFFICULT,
                        help="voc: objects marked difficult become iscrowd regions (ignored in training and "
                             "evaluation, as COCO's crowds), ordinary boxes, or nothing")
    parser.add_argument("--skip_malformed", action="store_true",
                        help="leave out malformed label lines and files (each is listed) instead of refusing")
    return parser


def convert(args: argparse.Namespace) -> str:
    """Write args.out; returns the summary line."""
    if args.out.suffix.lower() != ".json":
        raise InputError(f"--out {args.out}: give a .json file name (COCO-format annotations)")
    if args.format == "yolo":
        conversion = yolo_to_coco(args.src, args.split)
    else:
        if args.split is not None:
            raise InputError("--split: only for yolo (a VOC folder's split is its Annotations/ files)")
        conversion = voc_to_coco(args.src, args.difficult)
    if conversion.problems and not args.skip_malformed:
        raise InputError(f"{len(conversion.problems)} malformed label line(s) or file(s), the first: "
                         f"{conversion.problems[0]}; fix them, or pass --skip_malformed to convert without them")
    for problem in conversion.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    coco = conversion.coco
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_text_atomically(json.dumps(coco), args.out)
    unlabelled = len({image["id"] for image in coco["images"]} - {a["image_id"] for a in coco["annotations"]})
    split = "val" if args.split == "val" else "train"
    return (f"wrote {args.out}: {len(coco['images'])} images ({unlabelled} without labels), "
            f"{len(coco['annotations'])} boxes, {len(coco['categories'])} classes"
            f"{f', {len(conversion.problems)} malformed skipped' if conversion.problems else ''}; train with "
            f"--{split}_json {args.out} --{split}_images {conversion.images_dir}")


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    try:
        print(convert(args))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

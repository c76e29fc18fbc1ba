"""Plots of a run's detections against the annotations: per-class precision-recall curves, a confusion matrix
with a background row and column, and the TIDE error breakdown, as PNGs (drawn by hotcoco).

    python scripts/analyze_detections.py DETECTIONS ANNOTATIONS --out DIR [--score_threshold 0.5]
                                         [--iou_threshold 0.5]

DETECTIONS is a COCO results file (a main.py run's coco_results.json or ema_coco_results.json, predict.py's
detections.json) or a run's --output_dir (its coco_results.json); ANNOTATIONS the COCO-format annotation file
of the same images. Writes into DIR:

- pr_curves.png (the classes with the highest AP) and pr_curves/<class>.png: precision against recall at
  --iou_threshold, 100 detections per image, as COCO's AP integrates them;
- confusion_matrix.png and confusion_matrix.json: boxes of each ground-truth class (rows) matched at
  --iou_threshold by detections scoring at least --score_threshold of each class (columns); the last column
  counts the boxes no detection found (missed), the last row the detections that found no box (false);
- tide.png: the AP at --iou_threshold each TIDE error type costs (classification, localisation, both,
  duplicate, background, missed).
"""
import argparse
import json
import logging
import re
import sys
from pathlib import Path

import matplotlib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.coco import load_coco
from deta.errors import InputError
from training.coco_eval import class_keys, hotcoco, hotcoco_eval

RESULTS_NAME = "coco_results.json"


def analyze(detections_path: str, annotations_path: str, out: Path, score_threshold: float,
            iou_threshold: float) -> list[Path]:
    """Write the PNGs (and confusion_matrix.json) into `out`; returns the files written."""
    if hotcoco is None:
        raise InputError("hotcoco is not installed; pip install -r requirements.txt")
    if not 0 <= score_threshold <= 1:
        raise InputError(f"--score_threshold {score_threshold}: must be in [0, 1]")
    if not 0.5 <= iou_threshold <= 0.95:
        raise InputError(f"--iou_threshold {iou_threshold}: must be one of COCO's, 0.5 to 0.95")
    matplotlib.use("Agg")  # files only, also without a display
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # hotcoco's preferred fonts may be missing
    import matplotlib.pyplot as plt
    from hotcoco import plot

    if not Path(annotations_path).is_file():
        raise InputError(f"{annotations_path}: no such file; pass the COCO-format annotation file of the images")
    coco_gt = load_coco(annotations_path)
    detections = _read_detections(Path(detections_path), set(coco_gt.imgs))
    out.mkdir(parents=True, exist_ok=True)
    coco_eval = hotcoco_eval(coco_gt, detections)
    coco_eval.summary_lines()  # the statistics the plots read, without printing them
    names = class_keys(coco_gt, list(coco_eval.params.cat_ids))
    with_boxes = sorted({a["category_id"] for a in coco_gt.dataset["annotations"] if not a.get("iscrowd", 0)})
    written = []

    def save(figure_and_axes: tuple, path: Path) -> None:
        plt.close(figure_and_axes[0])
        written.append(path)

    save(plot.pr_curve(coco_eval, iou_thr=iou_threshold, top_n=10, save_path=out / "pr_curves.png"),
         out / "pr_curves.png")
    (out / "pr_curves").mkdir(exist_ok=True)
    for category_id in with_boxes:
        path = out / "pr_curves" / f"{_file_name(names[category_id])}.png"
        save(plot.pr_curve(coco_eval, cat_id=category_id, iou_thr=iou_threshold, save_path=path), path)

    confusion = confusion_matrix(coco_eval, score_threshold, iou_threshold)
    (out / "confusion_matrix.json").write_text(json.dumps(confusion, indent=1) + "\n")
    written.append(out / "confusion_matrix.json")
    raw = coco_eval.confusion_matrix(iou_thr=iou_threshold, min_score=score_threshold)
    save(plot.confusion_matrix(raw, normalize=False, save_path=out / "confusion_matrix.png"),
         out / "confusion_matrix.png")
    tide = coco_eval.tide_errors(pos_thr=iou_threshold)
    save(plot.tide_errors(tide, save_path=out / "tide.png"), out / "tide.png")
    return written


def confusion_matrix(coco_eval: object, score_threshold: float, iou_threshold: float) -> dict:
    """hotcoco's confusion matrix as JSON: `classes` (the row and column names, "background" last) and `counts`
    (rows: ground-truth class, columns: detected class)."""
    matrix = coco_eval.confusion_matrix(iou_thr=iou_threshold, min_score=score_threshold)
    return {"classes": [*matrix["cat_names"], "background"], "category_ids": [*matrix["cat_ids"], None],
            "counts": matrix["matrix"].astype(int).tolist(), "score_threshold": score_threshold,
            "iou_threshold": iou_threshold}


def _read_detections(path: Path, image_ids: set[int]) -> list[dict]:
    if path.is_dir():
        path = path / RESULTS_NAME
    if not path.is_file():
        raise InputError(f"{path}: no such file; pass a COCO results file (a run's {RESULTS_NAME}) or a run folder")
    try:
        detections = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a JSON file ({err})") from err
    keys = {"image_id", "category_id", "bbox", "score"}
    if not isinstance(detections, list) or not all(isinstance(d, dict) and keys <= d.keys() for d in detections):
        raise InputError(f"{path}: not a COCO results file (a list of {{image_id, category_id, bbox, score}})")
    unknown = {d["image_id"] for d in detections} - image_ids
    if unknown:
        raise InputError(f"{path}: detections of {len(unknown)} image id(s) the annotations do not have (e.g. "
                         f"{min(unknown)}); pass the annotation file of the evaluated images")
    return detections


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("detections", help="COCO results file, or a main.py run folder (its coco_results.json)")
    parser.add_argument("annotations", help="COCO-format annotation file of the evaluated images")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--score_threshold", type=float, default=0.5,
                        help="least score of the detections the confusion matrix counts")
    parser.add_argument("--iou_threshold", type=float, default=0.5,
                        help="IoU of a match, for the confusion matrix, the curves and TIDE")
    options = parser.parse_args(argv)
    try:
        written = analyze(options.detections, options.annotations, Path(options.out), options.score_threshold,
                          options.iou_threshold)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {len(written)} files to {options.out}")


if __name__ == "__main__":
    main()

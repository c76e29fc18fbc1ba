"""Time COCO box evaluation with hotcoco against pycocotools, in one run on the same data.

    python scripts/benchmark_coco_eval.py [--num_images 5000] [--detections_per_image 100] [--repeats 1]

The data set is datasets.synthetic_detections' (COCO val2017's size by default: 5000 images, ~37.7k boxes,
100 detections per image as DETA's post-processing keeps). Each backend runs what main.py's evaluation runs
(training.coco_eval.coco_box_stats: loading the results, evaluate, accumulate, summarize); the best of
`--repeats` runs counts. Prints both times, their ratio and whether the 12 statistics and the per-class APs agree.
"""
import argparse
import contextlib
import io
import logging
import sys
import time
from pathlib import Path

from pycocotools.coco import COCO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.synthetic_detections import detection_set
from deta.errors import InputError
from training import coco_eval


def seconds_and_stats(backend: str, coco_gt: COCO, detections: list[dict], repeats: int) -> tuple[float, dict]:
    best, stats = float("inf"), {}
    for _ in range(repeats):
        start = time.perf_counter()
        stats = coco_eval.coco_box_stats(coco_gt, detections, backend)
        best = min(best, time.perf_counter() - start)
    return best, stats


def run(num_images: int, detections_per_image: int, repeats: int) -> float:
    """Prints the comparison; returns hotcoco's time over pycocotools'."""
    if num_images < 1 or detections_per_image < 1 or repeats < 1:
        raise InputError("--num_images, --detections_per_image and --repeats must be at least 1")
    if coco_eval.hotcoco is None:
        raise InputError("hotcoco is not installed; pip install -r requirements.txt")
    data, detections = detection_set(num_images, detections_per_image=detections_per_image)
    coco_gt = COCO()
    coco_gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    print(f"{len(data['images'])} images, {len(data['annotations'])} boxes, {len(detections)} detections; "
          f"best of {repeats}", flush=True)
    times, stats = {}, {}
    for backend in ("pycocotools", "hotcoco"):
        times[backend], stats[backend] = seconds_and_stats(backend, coco_gt, detections, repeats)
        print(f"{backend}: {times[backend]:.2f} s (AP {stats[backend]['AP']:.3f})", flush=True)
    ratio = times["hotcoco"] / times["pycocotools"]
    same = all(abs(stats["hotcoco"][name] - value) <= 1e-12 for name, value in stats["pycocotools"].items())
    print(f"hotcoco / pycocotools time: {ratio:.3f} ({1 / ratio:.1f}x faster); "
          f"statistics {'equal' if same else 'DIFFER'}")
    return ratio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=5000)
    parser.add_argument("--detections_per_image", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)  # the AP tables stay quiet
    try:
        run(options.num_images, options.detections_per_image, options.repeats)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

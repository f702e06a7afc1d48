"""Time the COCO checks (prunestudy.coco.lint) on a synthetic file the size of train2017.

The file has train2017's counts (118,287 images, 860,001 annotations, 80 categories) and its
records' shape (segmentation polygons included, so the json is of a realistic size); it is written
to a temporary folder and read back, so the parse is timed too. What is timed, each once:

- json.load of the file (what any reader pays);
- lint: every record's fields and types, duplicate ids and file names (the new checks);
- shared_images: train against a val2017-sized file (5,000 images);
- index (pycocotools createIndex) and sanitize (boxes clipped to their image): what the data stage
  did before the checks, for scale.

Run: `.venv/bin/python benchmarks/bench_coco_lint.py [--annotations N]` (figures: benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from prunestudy import coco


def synthetic(n_images: int, n_annotations: int, first_id: int = 1, seed: int = 0) -> dict:
    rng = random.Random(seed)
    images = [{"license": 3, "file_name": f"{first_id + i:012d}.jpg", "coco_url": "", "height": 480, "width": 640,
               "date_captured": "2013-11-14 11:18:45", "flickr_url": "", "id": first_id + i} for i in range(n_images)]
    annotations = []
    for k in range(n_annotations):
        x, y = rng.uniform(0, 500), rng.uniform(0, 350)
        w, h = rng.uniform(1, 140), rng.uniform(1, 130)
        poly = [round(rng.uniform(0, 600), 2) for _ in range(24)]
        annotations.append({"segmentation": [poly], "area": round(w * h * 0.6, 4), "iscrowd": 0,
                            "image_id": first_id + rng.randrange(n_images), "bbox": [round(x, 2), round(y, 2),
                            round(w, 2), round(h, 2)], "category_id": 1 + rng.randrange(80), "id": k + 1})
    categories = [{"supercategory": "thing", "id": i + 1, "name": f"class{i + 1}"} for i in range(80)]
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def write(path: Path, n_images: int, n_annotations: int) -> None:
    path.write_text(json.dumps(synthetic(n_images, n_annotations), separators=(",", ":")))


def timed(label: str, fn):
    start = time.perf_counter()
    out = fn()
    print(f"{label:<44s} {time.perf_counter() - start:7.2f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=118_287)
    ap.add_argument("--annotations", type=int, default=860_001)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "instances_train2017.json"
        timed("generate and write json", lambda: write(path, args.images, args.annotations))
        print(f"file: {path.stat().st_size / 1e6:.0f} MB, {args.images:,} images, {args.annotations:,} annotations")
        dataset = timed("json.load (read_json)", lambda: coco.read_json(path))
        checked = timed("lint (fields, types, duplicate ids and names)", lambda: coco.lint(dataset, path, 0.01))
        assert not checked.errors and not checked.skipped, (checked.errors, checked.skipped)
        val = synthetic(5_000, 36_781, first_id=10**7, seed=1)
        found = timed("shared_images (train vs a val2017-sized file)",
                      lambda: coco.shared_images(dataset, val, path, Path("instances_val2017.json")))
        assert not found
        index = timed("index (pycocotools createIndex)", lambda: coco.index(dataset))
        timed("sanitize (boxes clipped to their image)", lambda: coco.sanitize(index))


if __name__ == "__main__":
    main()

"""Data stage speed and memory against a naive baseline, on the same images, in one run.

    python benchmarks/bench_data.py [--root COCO_ROOT] [--repeat K] [--classes top:10]

Root: ../shared/coco-sample by default, or any COCO 2017 root. ``--repeat K`` first builds a
K-times larger root beside it (each image linked K times under new names, annotations copied
with new ids) so that time and memory can be read against the number of images.

Each variant runs in its own process, so its peak resident memory (ru_maxrss) is its own:

- baseline: per box, open the JPEG, decode it fully, convert to RGB, crop the square (padded),
  resize to 64x64; one process. Only this crop loop is timed (the box list comes from the
  manifest of our build): no annotation parsing, no writing, so the ratio is conservative.
- ours, 1 worker and all cores: ``prunestudy.data.build_dataset`` end to end (annotation
  parsing, selection, cropping, writing the .npy files and manifests).

Prints boxes/s, images/s, the ratios to the baseline, and peak memory. Goal (issue 3): at least
3x the baseline on one core, near-linear in cores, peak memory independent of the number of
images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parent.parent / "shared" / "coco-sample"


def _child_ours(root: str, out: str, workers: int, classes: str) -> dict:
    from prunestudy import data

    start = time.perf_counter()
    info = data.build_dataset(root, out, classes=classes, workers=workers, min_per_class=1,
                              max_bad_fraction=1.0, show_progress=False)
    seconds = time.perf_counter() - start
    boxes = info["train_size"] + info["test_size"]
    images = sum(info["num_images"].values())
    return {"seconds": seconds, "boxes": boxes, "images": images}


def _child_baseline(root: str, built: str) -> dict:
    import numpy as np
    from PIL import Image

    from prunestudy import data

    rows = []
    for split, folder in data.SPLITS.items():
        m = data.read_manifest(built, split)
        rows += [(Path(root) / folder / r.file_name, (r.crop_x0, r.crop_y0, r.crop_x1, r.crop_y1))
                 for r in m.itertuples()]
    size = data.read_info(built)["image_size"]
    start = time.perf_counter()
    out = np.empty((len(rows), size, size, 3), np.uint8)
    for i, (path, crop) in enumerate(rows):
        with Image.open(path) as im:  # one full decode per box
            rgb = im.convert("RGB")
        x0, y0, x1, y1 = crop
        square = Image.new("RGB", (x1 - x0, y1 - y0), data.PAD_RGB)
        square.paste(rgb.crop((max(x0, 0), max(y0, 0), min(x1, rgb.width), min(y1, rgb.height))),
                     (max(x0, 0) - x0, max(y0, 0) - y0))
        resample = Image.Resampling.LANCZOS if x1 - x0 > size else Image.Resampling.BILINEAR
        out[i] = np.asarray(square.resize((size, size), resample))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "boxes": len(rows), "images": len({p for p, _ in rows})}


def _child_parse(root: str) -> dict:
    """Only what the data stage holds for the annotations: both files parsed and indexed."""
    from prunestudy import data

    start = time.perf_counter()
    cocos = [data._load_coco(data._annotation_path(Path(root), split)) for split in data.SPLITS]
    return {"seconds": time.perf_counter() - start, "annotations": sum(len(c.anns) for c in cocos)}


def child(args) -> None:
    if args.child == "ours":
        res = _child_ours(args.root, args.out, args.workers, args.classes)
    elif args.child == "parse":
        res = _child_parse(args.root)
    else:
        res = _child_baseline(args.root, args.out)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


def run_child(*extra: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"benchmark child {extra} failed:\n{out.stderr[-3000:]}")
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def enlarge(root: Path, k: int, dest: Path) -> Path:
    """A COCO root with every image of ``root`` present k times (links, new names and ids)."""
    for split in ("train2017", "val2017"):
        d = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        (dest / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        step_i = max(i["id"] for i in d["images"]) + 1
        step_a = max(a["id"] for a in d["annotations"]) + 1
        for c in range(k):
            for im in d["images"]:
                name = f"{c:02d}_{im['file_name']}"
                link = dest / split / name
                if not link.exists():
                    link.symlink_to((root / split / im["file_name"]).resolve())
                images.append({**im, "id": im["id"] + c * step_i, "file_name": name})
            anns += [{**a, "id": a["id"] + c * step_a, "image_id": a["image_id"] + c * step_i}
                     for a in d["annotations"]]
        (dest / "annotations").mkdir(exist_ok=True)
        (dest / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({**d, "images": images, "annotations": anns}))
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(SAMPLE), help="COCO root (default: ../shared/coco-sample)")
    p.add_argument("--repeat", type=int, default=1, help="also measure a root with every image K times")
    p.add_argument("--classes", default="top:10")
    p.add_argument("--child", choices=("ours", "baseline", "parse"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    root = Path(args.root)
    if not (root / "annotations" / "instances_train2017.json").is_file():
        raise SystemExit(f"no COCO root at {root}: pass --root /path/to/coco (official layout)")
    from prunestudy.machine import cpu_name  # here: the children time their own imports

    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cpu_name()}, {cores} cores usable; python {platform.python_version()}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        roots = [(1, root)] + ([(args.repeat, enlarge(root, args.repeat, tmp / f"x{args.repeat}"))]
                               if args.repeat > 1 else [])
        for k, r in roots:
            one = run_child("--child", "ours", "--root", str(r), "--out", str(tmp / f"o1_{k}"), "--workers", "1",
                            "--classes", args.classes)
            base = run_child("--child", "baseline", "--root", str(r), "--out", str(tmp / f"o1_{k}"))
            allc = run_child("--child", "ours", "--root", str(r), "--out", str(tmp / f"oN_{k}"), "--workers",
                             str(cores), "--classes", args.classes)
            print(f"\nroot x{k}: {one['images']} images, {one['boxes']} boxes ({r})")
            print(f"{'variant':28s} {'seconds':>8s} {'boxes/s':>9s} {'images/s':>9s} {'vs baseline':>11s} "
                  f"{'peak MiB':>9s}")
            for name, res in (("baseline (per box, 1 proc)", base), ("ours, 1 worker", one),
                              (f"ours, {cores} workers", allc)):
                print(f"{name:28s} {res['seconds']:8.2f} {res['boxes'] / res['seconds']:9.1f} "
                      f"{res['images'] / res['seconds']:9.1f} {base['seconds'] / res['seconds']:10.2f}x "
                      f"{res['peak_rss_mib']:9.1f}")
            ratio1 = base["seconds"] / one["seconds"]
            scaling = one["seconds"] / allc["seconds"]
            print(f"goal >= 3x baseline on one core: {'PASS' if ratio1 >= 3 else 'MISS'} ({ratio1:.2f}x); "
                  f"scaling 1 -> {cores} workers: {scaling:.2f}x ({scaling / cores:.0%} of linear)")
            parse = run_child("--child", "parse", "--root", str(r))
            arrays = one["boxes"] * 64 * 64 * 3 / 2**20
            print(f"memory: crop arrays written {arrays:.1f} MiB; peak of the 1-worker build "
                  f"{one['peak_rss_mib']:.1f} MiB, of which parsing the annotation files alone "
                  f"{parse['peak_rss_mib']:.1f} MiB; cropping adds "
                  f"{one['peak_rss_mib'] - parse['peak_rss_mib']:.1f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

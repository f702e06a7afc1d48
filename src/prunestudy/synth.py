"""Synthetic stand-in for COCO 2017: cluttered scenes of ten shape categories.

The real COCO 2017 is ~19 GB; the study's default data is this small synthetic
dataset written in the *exact* COCO 2017 layout::

    root/annotations/instances_train2017.json
    root/annotations/instances_val2017.json
    root/train2017/000000000001.jpg ...
    root/val2017/000000001501.jpg ...
    root/prunestudy-synth.json          (marker: params + format version, written last)

so the data pipeline cannot tell it from the real thing.  Each image is an RGB
JPEG scene with a textured / gradient / noisy background, unannotated distractor
strokes, lines, arcs and blobs, and 2-6 annotated shapes (random size, colour --
sometimes barely distinguishable from the background --, rotation, aspect ratio,
fill style, partial transparency), which may overlap: later shapes partly cover
earlier ones, whose annotation still describes their full (image-clipped) shape.
A few shapes are tiny (< 16 px box) and some images hold a *crowd*: a cluster of
small same-category shapes annotated as one ``iscrowd: 1`` region whose
segmentation lists one polygon per member.  The whole image is finally blurred
slightly, given sensor noise and JPEG-compressed.

Annotations follow the COCO ``instances`` format: ``bbox`` is ``[x, y, w, h]``
(floats, 2 decimals), the tight bounds of the segmentation polygon(s);
``area`` is the polygon area (sum over polygons for crowds); polygons are clipped
to the image.  Image and annotation ids are unique across both splits (val ids
follow the train ids).

Determinism: every image draws from its own ``numpy.random.Generator`` seeded by
``SeedSequence([seed, split, index])`` (separate streams per split, independent of
generation order), nothing depends on time or ``hash()``, so the same parameters
give byte-identical JSON and images (for a given Pillow/libjpeg build).

This module holds the public API, parameter checks, the split writer, markers and the
worker pool; the drawing code and the scene composer live in :mod:`prunestudy.synth_scene`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import multiprocessing
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

from . import crops, machine
from .config import default
from .synth_scene import CATEGORIES, _scene

__all__ = ["CATEGORIES", "FORMAT_VERSION", "MARKER_NAME", "DEFAULT_PARAMS", "generate", "ensure"]

#: Bumped whenever the generator's output changes for the same parameters.
FORMAT_VERSION = 2
#: Marker file written last into a complete dataset.
MARKER_NAME = "prunestudy-synth.json"
#: The embedded set's size and seed: the schema's `data.embedded` (the study's own default).
DEFAULT_PARAMS: dict[str, int] = default("data.embedded")

_SPLITS = ("train2017", "val2017")
_MAX_IMAGES = 1_000_000  # per split; keeps file names at 12 digits with lots of room
_MAX_IMAGE_SIZE = 2048

_INFO_DATE = "2017/09/01"
_LICENSES = [
    {"id": 1, "name": "CC0 1.0 Universal (synthetic data)", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
]


# --------------------------------------------------------------------------- dataset


def _check_params(params: dict[str, Any]) -> dict[str, int]:
    unknown = sorted(set(params) - set(DEFAULT_PARAMS))
    if unknown:
        raise ValueError(
            f"unknown synthetic-dataset parameter(s) {unknown}; the valid parameters are {sorted(DEFAULT_PARAMS)}"
        )
    out = dict(DEFAULT_PARAMS)
    out.update(params)
    for name, value in out.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(
                f"{name} must be an int, got {value!r} ({type(value).__name__}); "
                f"pass e.g. {name}={DEFAULT_PARAMS[name]}"
            )
        out[name] = int(value)
    if out["seed"] < 0:
        raise ValueError(f"seed must be a non-negative int, got {out['seed']}; pass e.g. seed=0")
    for name in ("train_images", "val_images"):
        if not 1 <= out[name] <= _MAX_IMAGES:
            raise ValueError(
                f"{name} must be a positive int <= {_MAX_IMAGES}, got {out[name]}; "
                f"pass e.g. {name}={DEFAULT_PARAMS[name]}"
            )
    if not 64 <= out["image_size"] <= _MAX_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be an int in [64, {_MAX_IMAGE_SIZE}] (square images, in pixels), "
            f"got {out['image_size']}; "
            f"pass e.g. image_size={DEFAULT_PARAMS['image_size']}"
        )
    return out


def _date_captured(seed: int, image_id: int) -> str:
    # deterministic pseudo-date in 2017, derived from seed and id only (no clock, no hash())
    sec = (seed * 2_654_435_761 + image_id * 40_503 + 12_345) % (365 * 86_400)
    return (_dt.datetime(2017, 1, 1) + _dt.timedelta(seconds=sec)).strftime("%Y-%m-%d %H:%M:%S")


def _render_one(job: tuple[str, int, int, int, int, int]) -> list[dict[str, Any]]:
    """Render and save one image; return its annotations (without ids).  Runs in workers."""
    img_dir, seed, split_code, index, image_id, size = job
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_code, index]))
    img, anns = _scene(rng, size)
    img.save(os.path.join(img_dir, f"{image_id:012d}.jpg"), format="JPEG", quality=int(rng.integers(84, 96)))
    return anns


def _workers(n_images: int) -> int:
    """Worker processes for n_images: 1 (in-process) for small jobs or where fork is unavailable.

    ``PRUNESTUDY_SYNTH_WORKERS`` overrides (1 = no subprocesses).  The output does not depend
    on the number of workers: every image has its own random stream.
    """
    env = os.environ.get("PRUNESTUDY_SYNTH_WORKERS", "").strip()
    if env:
        try:
            want = int(env)
        except ValueError:
            raise ValueError(
                f"PRUNESTUDY_SYNTH_WORKERS must be a positive int, got {env!r}; unset it or set e.g. 1"
            ) from None
        if want < 1:
            raise ValueError(f"PRUNESTUDY_SYNTH_WORKERS must be a positive int, got {env!r}; unset it or set e.g. 1")
    else:
        want = min(machine.usable_cpus(), 8, n_images // 100)
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(want, n_images))


def _write_split(
    out_dir: pathlib.Path,
    split_code: int,
    split: str,
    n_images: int,
    first_image_id: int,
    first_ann_id: int,
    p: dict[str, int],
    pool: Any = None,
) -> dict[str, Any]:
    size = p["image_size"]
    img_dir = out_dir / split
    img_dir.mkdir(parents=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    ann_id = first_ann_id
    jobs = [(str(img_dir), p["seed"], split_code, i, first_image_id + i, size) for i in range(n_images)]
    if pool is None:
        results = map(_render_one, jobs)
    else:
        results = pool.imap(_render_one, jobs, chunksize=8)  # ordered: ids stay deterministic
    for index, anns in enumerate(results):
        image_id = first_image_id + index
        file_name = f"{image_id:012d}.jpg"
        images.append(
            {
                "license": 1,
                "file_name": file_name,
                "coco_url": "",
                "height": size,
                "width": size,
                "date_captured": _date_captured(p["seed"], image_id),
                "flickr_url": "",
                "id": image_id,
            }
        )
        for a in anns:
            annotations.append(
                {
                    "segmentation": a["segmentation"],
                    "area": a["area"],
                    "iscrowd": a["iscrowd"],
                    "image_id": image_id,
                    "bbox": a["bbox"],
                    "category_id": a["category_id"],
                    "id": ann_id,
                }
            )
            ann_id += 1
    return {
        "info": {
            "description": f"prunestudy synthetic shapes in COCO 2017 layout ({split}, seed {p['seed']})",
            "url": "",
            "version": f"synth-{FORMAT_VERSION}",
            "year": 2017,
            "contributor": "prunestudy.synth",
            "date_created": _INFO_DATE,
        },
        "licenses": _LICENSES,
        "images": images,
        "annotations": annotations,
        "categories": [{"supercategory": "shape", "id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)],
    }


def _marker(p: dict[str, int], counts: dict[str, int]) -> dict[str, Any]:
    return {"generator": "prunestudy.synth", "format_version": FORMAT_VERSION, "params": p, "images": counts}


def _read_marker(root: pathlib.Path) -> dict[str, Any] | None:
    try:
        with open(root / MARKER_NAME, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("generator") == "prunestudy.synth" else None


def _is_complete(root: pathlib.Path, marker: dict[str, Any]) -> bool:
    """The marker is written last, but also check that the files it promises exist."""
    counts = marker.get("images")
    if not isinstance(counts, dict):
        return False
    for split in _SPLITS:
        if not (root / "annotations" / f"instances_{split}.json").is_file():
            return False
        d = root / split
        if not d.is_dir() or sum(1 for e in os.scandir(d) if e.name.endswith(".jpg")) != counts.get(split):
            return False
    return True


def _build(tmp: pathlib.Path, p: dict[str, int]) -> None:
    (tmp / "annotations").mkdir()
    first_image_id, first_ann_id = 1, 1
    counts: dict[str, int] = {}
    workers = _workers(p["train_images"] + p["val_images"])
    with contextlib.ExitStack() as stack:
        pool = None
        if workers > 1:
            # fork: workers need only numpy/PIL, this module and synth_scene; nothing is re-imported
            pool = stack.enter_context(crops.quiet_pool(multiprocessing.get_context("fork"), workers))  # Ctrl-C
        for code, split in enumerate(_SPLITS):
            n = p["train_images"] if split == "train2017" else p["val_images"]
            coco = _write_split(tmp, code, split, n, first_image_id, first_ann_id, p, pool)
            with open(tmp / "annotations" / f"instances_{split}.json", "w", encoding="utf-8") as f:
                f.write(json.dumps(coco, separators=(",", ":")))  # dumps: C encoder, much faster than dump
            first_image_id += n
            first_ann_id += len(coco["annotations"])
            counts[split] = n
    with open(tmp / MARKER_NAME, "w", encoding="utf-8") as f:  # written last
        json.dump(_marker(p, counts), f, indent=2, sort_keys=True)
        f.write("\n")


def _generate(root: pathlib.Path, p: dict[str, int]) -> pathlib.Path:
    if root.exists() and not root.is_dir():
        raise ValueError(f"root {str(root)!r} exists and is not a directory; choose another root")
    if root.is_dir() and any(root.iterdir()) and _read_marker(root) is None:
        raise ValueError(
            f"root {str(root)!r} is a non-empty directory that was not made by prunestudy.synth "
            f"(no {MARKER_NAME}); refusing to overwrite it: choose another root or empty it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    trash: pathlib.Path | None = None
    try:
        _build(tmp, p)
        if root.is_dir() and any(root.iterdir()):
            # replace an older dataset of ours: move it aside, move the new one in
            trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.rename(root, trash / "old")
        try:
            os.replace(tmp, root)  # atomic; also fine onto an empty directory
        except OSError:
            # lost a race with a concurrent generator: accept its result if it matches
            m = _read_marker(root)
            if (
                m is not None
                and m.get("params") == p
                and m.get("format_version") == FORMAT_VERSION
                and _is_complete(root, m)
            ):
                return root
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return root


def generate(
    root: str | os.PathLike[str],
    *,
    seed: int = DEFAULT_PARAMS["seed"],
    train_images: int = DEFAULT_PARAMS["train_images"],
    val_images: int = DEFAULT_PARAMS["val_images"],
    image_size: int = DEFAULT_PARAMS["image_size"],
) -> pathlib.Path:
    """Write the dataset under root (created), atomically: build into a temporary sibling
    folder, then rename into place, so an interrupted run never leaves a half dataset that
    looks complete. Returns root.

    An existing dataset made by this module at ``root`` is replaced; any other non-empty
    directory at ``root`` makes this raise ValueError rather than overwrite it.
    """
    p = _check_params(dict(seed=seed, train_images=train_images, val_images=val_images, image_size=image_size))
    return _generate(pathlib.Path(root), p)


def ensure(root: str | os.PathLike[str], **params: Any) -> pathlib.Path:
    """Generate only if root does not already hold a complete dataset made with the same
    params (stored, with a format version, in root/prunestudy-synth.json, written last).

    Params are those of :func:`generate` (missing ones take its defaults).  If root holds a
    dataset with *different* params (or an older format version), raise ValueError naming
    both and the fix.  If root exists, is non-empty and is not ours (no marker), raise
    rather than overwrite.  Returns root.
    """
    p = _check_params(params)
    root = pathlib.Path(root)
    if root.exists():
        if not root.is_dir():
            raise ValueError(f"root {str(root)!r} exists and is not a directory; choose another root")
        m = _read_marker(root)
        if m is None:
            if any(root.iterdir()):
                raise ValueError(
                    f"root {str(root)!r} is a non-empty directory without {MARKER_NAME}, so it is not a "
                    "prunestudy synthetic dataset (or an incomplete one); refusing to overwrite it: "
                    "delete the folder or choose another root"
                )
        else:
            have = {"format_version": m.get("format_version"), **(m.get("params") or {})}
            want = {"format_version": FORMAT_VERSION, **p}
            if have != want:
                raise ValueError(
                    f"root {str(root)!r} holds a synthetic dataset made with {have}, but {want} was "
                    "requested; delete the folder (it will be regenerated) or choose another root"
                )
            if _is_complete(root, m):
                return root
    return _generate(root, p)

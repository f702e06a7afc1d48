"""COCO 2017 object crops as a 10-class classification dataset, at full scale.

Reads COCO-format instance annotations (parsed with ``json``, indexed by pycocotools) and
turns each selected object box (``label_mode='crop'``) or each image (``label_mode='image'``)
into a square ``image_size x image_size`` RGB crop stored as uint8. Training samples come
from ``train2017``, test samples from ``val2017``.

Speed and memory (all of train2017 is 118k images and 860k boxes):

- each image is decoded once for all of its crops; when every crop of an image is being
  downscaled by 2x or more, Pillow's JPEG draft mode decodes it at 1/2, 1/4 or 1/8 scale
  (the manifest records the scale used in ``decode_scale``);
- images are cropped by ``workers`` processes (default: all cores) in chunks of consecutive
  images, so each chunk fills a contiguous block of rows;
- rows go straight into a preallocated ``.npy`` file by positional writes: resident memory
  does not grow with the number of images.

What real data holds, and what each case gets:

- a missing root, annotation file or image folder: FileNotFoundError showing the layout;
- malformed JSON: :class:`DataError` naming the file, line and column;
- malformed records, duplicate ids or file names, images in both splits: checked like a linter by
  :mod:`prunestudy.coco` (skipped and counted, or a :class:`DataError` naming file and record);
- no test sample at all: :class:`DataError` (nothing could be measured);
- a missing, truncated or corrupt image, or one whose size differs from the json's: skipped,
  counted under ``skipped`` and listed with its reason in ``<split>_rejects.csv``; a
  :class:`DataError` only if more than ``max_bad_fraction`` of a split's images are bad;
- grayscale, CMYK, palette or EXIF-rotated images: RGB crops in the json's frame;
- boxes reaching more than a pixel outside the image: clipped to it (counted in ``clipped``);
  boxes with no area left: skipped as ``invalid_box``; annotations naming an image id the file
  does not list: skipped as ``no_image``;
- an unknown class name: ValueError listing the valid names; fewer than 2 classes: ValueError; a
  class with fewer than ``min_per_class`` training samples: :class:`DataError` saying which and
  how many.

Crop rule (see :func:`prunestudy.crops.crop_square`): a square of side ``max(w, h) * (1 + 2 * context)``
centred on the box centre, rounded to whole pixels; parts outside the image are filled with
the constant :data:`PAD_RGB`; the square is resized to ``image_size`` with LANCZOS when
downscaling and BILINEAR when upscaling. In ``image`` mode the square is the whole image,
letterboxed with :data:`PAD_RGB`, and the label is that of its largest eligible box.

Output files in ``out_dir``::

    train_images.npy  uint8 (N, S, S, 3)     test_images.npy
    train_labels.npy  int64 (N,)             test_labels.npy
    train_manifest.csv                       test_manifest.csv
    train_rejects.csv (images skipped, why)  test_rejects.csv
    data.json         written last: its presence marks a complete build
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from pycocotools.coco import COCO

from . import atomic, paths, progress
from . import coco as coco_files
from .coco import CLIP_TOLERANCE, EXPECTED_LAYOUT, SPLITS, DataError, check_layout  # noqa: F401
from .config import default
from .crops import (  # noqa: F401  (load_image, crop_and_resize: part of this module's API)
    DOWNSCALE_FILTER,
    DRAFT_SCALES,
    PAD_RGB,
    UPSCALE_FILTER,
    _chunks,
    _map_chunks,
    crop_and_resize,
    crop_square,
    default_workers,
    image_square,
    load_image,
)

__all__ = [
    "build_dataset", "load_split", "read_manifest", "read_rejects", "read_info", "check_layout",
    "choose_classes", "select_annotations", "crop_square", "load_image", "crop_and_resize",
    "DataError", "PAD_RGB", "SPLITS", "MANIFEST_COLUMNS", "REJECT_COLUMNS", "LABEL_MODES", "SKIP_REASONS",
]

log = logging.getLogger(__name__)

LABEL_MODES = ("crop", "image")

MANIFEST_COLUMNS = [
    "index", "image_id", "ann_id", "category_id", "category", "label", "file_name",
    "bbox_x", "bbox_y", "bbox_w", "bbox_h",
    "crop_x0", "crop_y0", "crop_x1", "crop_y1", "clipped", "decode_scale",
]
REJECT_COLUMNS = ["image_id", "file_name", "boxes", "reason", "detail"]

# every reason a box is counted under in data.json's "skipped" (a column of the report's data table),
# in a few words: this module's selection, the records prunestudy.coco skips, the images crops.py cannot read
SKIP_REASONS = {
    "iscrowd": "a crowd region (COCO iscrowd), not one object",
    "no_image": "names an image the annotation file does not list",
    "invalid_box": "no area left once clipped to its image",
    "small": "shorter side below data.min_box px",
    "other_class": "a category not among the classes studied",
    "not_largest": "not its image's largest box (label_mode image)",
    "capped": "over the class's cap (data.max_per_class, data.max_test_per_class), left out at random",
    "malformed": "an annotation record the checks could not use",
    "unknown_category": "a category id the file does not define",
    "bad_image_record": "its image's record was malformed",
    "missing_file": "its image file is missing",
    "corrupt_image": "its image file could not be decoded",
    "size_mismatch": "its image's size differs from the annotation file's",
}

INFO_FILE = paths.DATA_INFO

# the COCO files' layout, reading and checks live in prunestudy.coco; these names stay here too
_annotation_path, _image_dir, _load_coco, _sanitize = (coco_files.annotation_path, coco_files.image_dir,
                                                       coco_files.load_coco, coco_files.sanitize)


def _skip_reason(ann: dict, min_box: float) -> str | None:
    """'iscrowd', 'no_image', 'invalid_box', 'small' (shorter side < min_box) or None."""
    if ann.get("iscrowd", 0):
        return "iscrowd"
    if ann.get("_reason"):
        return ann["_reason"]
    if min(ann["_box"][2], ann["_box"][3]) < min_box:
        return "small"
    return None


# --------------------------------------------------------------------------- classes

def _eligible_counts(coco: COCO, min_box: float) -> Counter:
    """category_id -> number of annotations left after the box filters."""
    return Counter(a["category_id"] for a in coco.dataset["annotations"] if _skip_reason(a, min_box) is None)


def choose_classes(coco: COCO, classes, min_box: float) -> list[tuple[int, str]]:
    """[(category_id, name)] in label order.

    ``classes`` is a list of COCO category names (label order = list order) or
    ``"top:K"``: the K categories with most boxes in ``coco`` after the box filters,
    most frequent first, ties broken by category id. Raises ValueError for an unknown
    name, a malformed spec or a class with zero samples after filtering.
    """
    name_to_id = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    id_to_name = {i: n for n, i in name_to_id.items()}
    counts = _eligible_counts(coco, min_box)
    if isinstance(classes, str):
        cat_ids = _top_k(classes, counts, sorted(id_to_name))
    else:
        names = list(classes)
        unknown = [n for n in names if n not in name_to_id]
        if unknown:
            raise ValueError(f"unknown COCO categories {unknown}; valid names: {sorted(name_to_id)}")
        if len(set(names)) != len(names) or len(names) < 2:
            raise ValueError(f"classes must be a list of at least 2 distinct names (a study of one class measures "
                             f"nothing), got {names}")
        cat_ids = [name_to_id[n] for n in names]
    empty = [id_to_name[i] for i in cat_ids if counts[i] == 0]
    if empty:
        raise ValueError(f"classes with zero training samples after filtering (min_box={min_box}): {empty}")
    return [(i, id_to_name[i]) for i in cat_ids]


def _top_k(spec: str, counts: Counter, all_ids: list[int]) -> list[int]:
    prefix, _, k = spec.partition(":")
    if prefix != "top" or not k.isdigit() or not 2 <= int(k) <= len(all_ids):
        raise ValueError(f"classes must be a list of names or 'top:K' with 2 <= K <= {len(all_ids)} (the "
                         f"categories of the file), got {spec!r}")
    return sorted(all_ids, key=lambda i: (-counts[i], i))[: int(k)]


# --------------------------------------------------------------------------- selection

def select_annotations(coco: COCO, cat_ids: list[int], min_box: float, cap: int | None, seed: int,
                       label_mode: str = "crop") -> tuple[list[dict], dict]:
    """Annotations kept for ``cat_ids``, sorted by (image_id, ann_id), and skip counts.

    Skip reasons are counted per annotation in this order: iscrowd, no_image, invalid_box,
    small, other_class, then (``image`` mode) not_largest for eligible boxes that are not
    their image's largest, then capped. With a cap, each over-full class keeps ``cap`` samples
    drawn without replacement by one ``numpy.random.default_rng(seed)``, classes visited in
    ``cat_ids`` order, candidates in ann-id order.
    """
    if "_box" not in (coco.dataset["annotations"] or [{}])[0] and coco.dataset["annotations"]:
        _sanitize(coco)
    wanted = set(cat_ids)
    skipped = Counter({"iscrowd": 0, "small": 0, "other_class": 0, "capped": 0})
    eligible = []
    for ann in coco.dataset["annotations"]:
        reason = _skip_reason(ann, min_box)
        if reason is None and ann["category_id"] not in wanted:
            reason = "other_class"
        if reason:
            skipped[reason] += 1
        else:
            eligible.append(ann)
    if label_mode == "image":
        largest = {}
        for ann in sorted(eligible, key=lambda a: a["id"]):
            best = largest.get(ann["image_id"])
            if best is None or _area(ann) > _area(best):
                largest[ann["image_id"]] = ann
        skipped["not_largest"] = len(eligible) - len(largest)
        eligible = list(largest.values())
    by_class = defaultdict(list)
    for ann in eligible:
        by_class[ann["category_id"]].append(ann)
    rng = np.random.default_rng(seed)
    kept = []
    for cid in cat_ids:
        anns = sorted(by_class[cid], key=lambda a: a["id"])
        if cap is not None and len(anns) > cap:
            keep = np.sort(rng.choice(len(anns), size=cap, replace=False))
            skipped["capped"] += len(anns) - cap
            anns = [anns[i] for i in keep]
        kept.extend(anns)
    kept.sort(key=lambda a: (a["image_id"], a["id"]))
    return kept, dict(skipped)


def _area(ann: dict) -> float:
    return ann["_box"][2] * ann["_box"][3]


# --------------------------------------------------------------------------- geometry & pixels


# --------------------------------------------------------------------------- workers


# --------------------------------------------------------------------------- one split

def _build_split(coco: COCO, image_dir: Path, anns: list[dict], classes: list[tuple[int, str]], out: Path,
                 split: str, image_size: int, context: float, label_mode: str, workers: int,
                 show_progress: bool) -> dict:
    """Crop every sample of ``anns`` (sorted by image) into ``out/<split>_images.npy``.

    Returns {'manifest': DataFrame of kept rows, 'labels': array, 'rejects': DataFrame,
    'num_images': int, 'images_seen': int}. Rows of unreadable images are dropped.
    """
    label_of = {cid: i for i, (cid, _) in enumerate(classes)}
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in anns:
        by_image[ann["image_id"]].append(ann)
    tasks, rows, labels = [], [], []
    for image_id, items in by_image.items():
        meta = coco.imgs[image_id]
        crops = [image_square(meta["width"], meta["height"]) if label_mode == "image"
                 else crop_square(a["_box"], context) for a in items]
        tasks.append((image_id, str(image_dir / meta["file_name"]), meta["width"], meta["height"], crops))
        for a, c in zip(items, crops):
            rows.append([len(rows), image_id, a["id"], a["category_id"], classes[label_of[a["category_id"]]][1],
                         label_of[a["category_id"]], meta["file_name"], *a["bbox"], *c, int(a["_clipped"]), 1])
            labels.append(label_of[a["category_id"]])
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    n = len(manifest)
    path = out / paths.images(split)
    tmp = out / f".{paths.images(split)}.building"
    offset = _preallocate(tmp, (n, image_size, image_size, 3))
    scales = np.ones(n, dtype=np.int8)
    keep = np.ones(n, dtype=bool)
    bad_rows = []
    row_bytes = image_size * image_size * 3
    chunks = list(_chunks(tasks, image_size))
    images_at = {c[0]: len(c[3]) for c in chunks}
    with open(tmp, "r+b") as f, progress.bar(len(tasks), f"data {split}", unit="img",
                                              show=show_progress) as bar:
        for start, block, block_scales, bad in _map_chunks(chunks, workers):
            os.pwrite(f.fileno(), block.tobytes(), offset + start * row_bytes)
            scales[start : start + len(block)] = block_scales
            for image_id, first, count, reason, detail in bad:
                keep[start + first : start + first + count] = False
                meta = coco.imgs[image_id]
                bad_rows.append([image_id, meta["file_name"], count, reason, detail])
            bar.update(images_at[start])
    manifest["decode_scale"] = scales
    if keep.all():
        os.replace(tmp, path)
    else:
        _compact(tmp, path, keep, offset, row_bytes, (image_size, image_size, 3))
        tmp.unlink()
        manifest = manifest[keep].reset_index(drop=True)
        manifest["index"] = np.arange(len(manifest))
    rejects = pd.DataFrame(sorted(bad_rows), columns=REJECT_COLUMNS)
    return {"manifest": manifest, "labels": manifest["label"].to_numpy(np.int64), "rejects": rejects,
            "num_images": len(tasks) - len(rejects), "images_seen": len(tasks)}


def _preallocate(path: Path, shape: tuple) -> int:
    """Create an .npy file of zeros of ``shape`` (sparse on disk); return the data offset."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    offset = arr.offset
    del arr
    return offset


def _compact(src: Path, dst: Path, keep: np.ndarray, offset: int, row_bytes: int, row_shape: tuple) -> None:
    """Copy the kept rows of ``src`` into a new .npy ``dst``, in blocks (bounded memory)."""
    tmp = dst.with_name(f".{dst.name}.compact")
    out_offset = _preallocate(tmp, (int(keep.sum()), *row_shape))
    block = 4096
    with open(src, "rb") as fin, open(tmp, "r+b") as fout:
        written = 0
        for s in range(0, len(keep), block):
            data = os.pread(fin.fileno(), row_bytes * min(block, len(keep) - s), offset + s * row_bytes)
            rows = np.frombuffer(data, np.uint8).reshape(-1, row_bytes)[keep[s : s + block]]
            os.pwrite(fout.fileno(), rows.tobytes(), out_offset + written * row_bytes)
            written += len(rows)
    os.replace(tmp, dst)


# --------------------------------------------------------------------------- writing

def _write_npy(path: Path, array: np.ndarray) -> None:
    atomic.atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _csv_bytes(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False, lineterminator="\n").encode("utf-8")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- public API

def _check_params(image_size, context, min_box, max_per_class, max_test_per_class, label_mode,
                  min_per_class, max_bad_fraction, workers, seed) -> None:
    if isinstance(seed, bool) or not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"seed must be an integer >= 0 (numpy's generators take no negative seed), got {seed!r}")
    if not (isinstance(image_size, int) and image_size >= 1):
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not context >= 0:
        raise ValueError(f"context must be >= 0, got {context!r}")
    if not min_box >= 0:
        raise ValueError(f"min_box must be >= 0, got {min_box!r}")
    for name, cap in (("max_per_class", max_per_class), ("max_test_per_class", max_test_per_class)):
        if cap is not None and not (isinstance(cap, int) and cap >= 1):
            raise ValueError(f"{name} must be None or a positive int, got {cap!r}")
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    if not (isinstance(min_per_class, int) and min_per_class >= 1):
        raise ValueError(f"min_per_class must be a positive int, got {min_per_class!r}")
    if not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
    if workers is not None and not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"workers must be None (all cores) or a positive int, got {workers!r}")


def build_dataset(root, out_dir, *, classes=default("data.classes"), image_size=default("data.image_size"),
                  context=default("data.context"), min_box=default("data.min_box"),
                  max_per_class=default("data.max_per_class"), max_test_per_class=default("data.max_test_per_class"),
                  seed=default("seed"), label_mode=default("data.label_mode"),
                  min_per_class=default("data.min_per_class"), max_bad_fraction=default("data.max_bad_fraction"),
                  workers=default("data.workers"), show_progress=None) -> dict:
    """Build train (train2017) and test (val2017) crop sets; return the data.json dict.

    Classes are chosen on train2017 (see :func:`choose_classes`); the test split uses the
    same classes and may have zero samples for some of them. ``workers`` processes crop the
    images (None = all cores); the result does not depend on it. Any old ``data.json`` in
    ``out_dir`` is removed first, so an interrupted rebuild is never mistaken for a complete one.
    """
    params = dict(classes=classes if isinstance(classes, str) else list(classes), image_size=image_size,
                  context=context, min_box=min_box, max_per_class=max_per_class,
                  max_test_per_class=max_test_per_class, seed=seed, label_mode=label_mode,
                  min_per_class=min_per_class, max_bad_fraction=max_bad_fraction)
    _check_params(image_size, context, min_box, max_per_class, max_test_per_class, label_mode,
                  min_per_class, max_bad_fraction, workers, seed)
    workers = workers or default_workers()
    show_progress = "auto" if show_progress is None else show_progress
    root = Path(os.path.abspath(root))
    check_layout(root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INFO_FILE).unlink(missing_ok=True)

    cocos, checked = coco_files.load_splits(root, max_bad_fraction)   # every record checked (DataError)
    clipped = {split: _sanitize(coco)["clipped"] for split, coco in cocos.items()}
    chosen = choose_classes(cocos["train"], params["classes"], min_box)
    _check_test_categories(cocos["test"], chosen, root)
    caps = {"train": max_per_class, "test": max_test_per_class}
    selected = {split: select_annotations(coco, [i for i, _ in chosen], min_box, caps[split], seed, label_mode)
                for split, coco in cocos.items()}
    for split, (_, skipped) in selected.items():   # the records the checks skipped, with the other skips
        skipped.update(checked[split].skipped)
    _check_min_per_class(selected["train"][0], chosen, min_per_class)
    _check_test_not_empty(len(selected["test"][0]), selected["test"][1], chosen, root)
    info = {"classes": [n for _, n in chosen], "category_ids": [i for i, _ in chosen],
            "train_size": 0, "test_size": 0, "image_size": image_size, "label_mode": label_mode,
            "counts": {}, "skipped": {}, "clipped": clipped, "rejected": {}, "num_images": {},
            "root": str(root), "annotation_files": {}, "params": params, "manifest_sha256": {},
            "records_skipped": {split: c.as_dict() for split, c in checked.items()},
            "crop": {"pad_rgb": list(PAD_RGB), "downscale_filter": DOWNSCALE_FILTER.name,
                     "upscale_filter": UPSCALE_FILTER.name, "jpeg_draft_scales": list(DRAFT_SCALES)}}
    for split, coco in cocos.items():
        anns, skipped = selected[split]
        log.info("%s: cropping %d samples", split, len(anns))
        built = _build_split(coco, _image_dir(root, split), anns, chosen, out, split, image_size, context,
                             label_mode, workers, show_progress)
        rejects = built["rejects"]
        atomic.write_bytes(out / paths.rejects(split), _csv_bytes(rejects))
        for reason, boxes in rejects.groupby("reason")["boxes"].sum().items():
            skipped[reason] = int(boxes)
        _check_bad_fraction(split, rejects, built["images_seen"], max_bad_fraction, out)
        labels = built["labels"]
        _write_npy(out / paths.labels(split), labels)
        manifest_bytes = _csv_bytes(built["manifest"])
        atomic.write_bytes(out / paths.manifest(split), manifest_bytes)
        ann_path = _annotation_path(root, split)
        info[f"{split}_size"] = len(labels)
        info["counts"][split] = {n: int((labels == i).sum()) for i, n in enumerate(info["classes"])}
        info["skipped"][split] = skipped
        info["rejected"][split] = {"images": len(rejects), "examples": rejects.head(20).to_dict("records")}
        info["num_images"][split] = built["num_images"]
        info["annotation_files"][split] = {"path": str(ann_path.relative_to(root)), "sha256": sha256_file(ann_path)}
        info["manifest_sha256"][split] = hashlib.sha256(manifest_bytes).hexdigest()
    _check_min_per_class_after_rejects(info, min_per_class)
    if not info["test_size"]:
        _check_test_not_empty(0, info["skipped"]["test"], chosen, root, after_rejects=True)
    atomic.write_bytes(out / INFO_FILE, (json.dumps(info, indent=2, default=_plain) + "\n").encode("utf-8"))
    return info


def _plain(o):
    return o.item() if hasattr(o, "item") else str(o)


def _check_min_per_class(anns: list[dict], chosen: list[tuple[int, str]], min_per_class: int) -> None:
    counts = Counter(a["category_id"] for a in anns)
    short = {name: counts[cid] for cid, name in chosen if counts[cid] < min_per_class}
    if short:
        raise DataError(f"classes with fewer than data.min_per_class={min_per_class} training samples: "
                        + ", ".join(f"{n} ({c})" for n, c in short.items())
                        + "; choose other classes, lower data.min_per_class or data.min_box")


def _check_min_per_class_after_rejects(info: dict, min_per_class: int) -> None:
    short = {n: c for n, c in info["counts"]["train"].items() if c < min_per_class}
    if short:
        raise DataError(f"after skipping unreadable images, classes with fewer than data.min_per_class="
                        f"{min_per_class} training samples: " + ", ".join(f"{n} ({c})" for n, c in short.items()))


def _check_bad_fraction(split: str, rejects: pd.DataFrame, seen: int, limit: float, out: Path) -> None:
    if seen and len(rejects) / seen > limit:
        examples = "; ".join(f"{r.file_name}: {r.reason}" for r in rejects.head(3).itertuples())
        raise DataError(f"{len(rejects)} of {seen} {split} images ({len(rejects) / seen:.1%}) could not be "
                        f"read, more than data.max_bad_fraction={limit}; e.g. {examples}. The full list is in "
                        f"{out / paths.rejects(split)}. Repair or re-download those files, or raise "
                        f"data.max_bad_fraction to accept skipping them")


def _check_test_categories(coco: COCO, chosen: list[tuple[int, str]], root: Path) -> None:
    test_names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    bad = [f"{n!r} (id {i}: {test_names[i]!r} in val)" if i in test_names else f"{n!r} (id {i}: not in val)"
           for i, n in chosen if test_names.get(i) != n]
    if bad:
        raise DataError(f"categories {', '.join(bad)} differ between {_annotation_path(root, 'train')} and "
                        f"{_annotation_path(root, 'test')}: both files must list the same categories (ids and "
                        "names); are they from the same dataset?")


def _check_test_not_empty(n: int, skipped: dict, chosen: list[tuple[int, str]], root: Path,
                          after_rejects: bool = False) -> None:
    """Zero test samples is always an error: nothing could be measured (evaluation would divide by 0)."""
    if n:
        return
    path = _annotation_path(root, "test")
    why = ", ".join(f"{reason} {k:,}" for reason, k in sorted(skipped.items()) if k) or "it has none"
    names = ", ".join(repr(name) for _, name in chosen)
    where = ("every test image holding one could not be read (see test_rejects.csv)" if after_rejects
             else f"{path} has no usable annotation of them (annotations skipped: {why})")
    raise DataError(f"the test split is empty: no test sample of the classes {names}; {where}. Nothing could be "
                    f"measured on it: check that {path.name} is the val2017 file of the same dataset as "
                    "instances_train2017.json and that its images are under val2017/, or choose classes it holds")


def read_info(out_dir) -> dict:
    """The data.json of a completed build in ``out_dir``."""
    path = Path(out_dir) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the data stage has not run (or did not finish) "
                                f"for {str(out_dir)!r}; run build_dataset first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def load_split(out_dir, split, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N,S,S,3, labels int64 N) for split 'train' or 'test' (images memory-mapped if asked)."""
    _check_split(split)
    info = read_info(out_dir)
    images = np.load(Path(out_dir) / paths.images(split), allow_pickle=False, mmap_mode="r" if mmap else None)
    labels = np.load(Path(out_dir) / paths.labels(split), allow_pickle=False)
    if len(images) != len(labels) or len(labels) != info[f"{split}_size"]:
        raise ValueError(f"{out_dir}: {split} arrays ({len(images)}, {len(labels)}) do not match "
                         f"data.json {split}_size {info[f'{split}_size']}")
    return images, labels


def read_manifest(out_dir, split) -> pd.DataFrame:
    """The manifest of ``split`` ('train' or 'test') as a DataFrame."""
    _check_split(split)
    read_info(out_dir)
    return pd.read_csv(Path(out_dir) / paths.manifest(split),
                       dtype={"category": str, "file_name": str}, keep_default_na=False)


def read_rejects(out_dir, split) -> pd.DataFrame:
    """Images of ``split`` that were skipped as unreadable, with the reason."""
    _check_split(split)
    read_info(out_dir)
    return pd.read_csv(Path(out_dir) / paths.rejects(split), dtype={"file_name": str, "detail": str},
                       keep_default_na=False)

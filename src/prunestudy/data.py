"""COCO 2017 object crops as a 10-class classification dataset.

Reads COCO-format instance annotations with pycocotools and turns each selected
object box into a square ``image_size x image_size`` RGB crop stored as uint8.
Training samples come from ``train2017``, test samples from ``val2017``.

Every sample traces back to its source through a manifest (image id, annotation
id, category, original COCO box, crop square in image coordinates), and
``data.json`` records the classes, counts, skip reasons, parameters and the
sha256 of the inputs and manifests.  ``data.json`` is written last: its presence
marks a complete build.

Crop rule (see :func:`crop_square`): a square of side
``max(w, h) * (1 + 2 * context)`` centred on the box centre, rounded to whole
pixels; parts outside the image are filled with the constant :data:`PAD_RGB`;
the square is resized to ``image_size`` with LANCZOS when downscaling and
BILINEAR when upscaling.

Output files in ``out_dir``::

    train_images.npy  uint8 (N, S, S, 3)     test_images.npy
    train_labels.npy  int64 (N,)             test_labels.npy
    train_manifest.csv                       test_manifest.csv
    data.json
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import ExifTags, Image, ImageOps
from pycocotools.coco import COCO

from . import store

__all__ = [
    "build_dataset",
    "load_split",
    "read_manifest",
    "read_info",
    "check_layout",
    "choose_classes",
    "select_annotations",
    "crop_square",
    "load_image",
    "crop_and_resize",
    "PAD_RGB",
    "SPLITS",
    "MANIFEST_COLUMNS",
]

log = logging.getLogger(__name__)

#: split name -> COCO image folder (and annotation file stem).
SPLITS = {"train": "train2017", "test": "val2017"}

#: Constant fill for the parts of a crop square outside the image: the ImageNet
#: mean colour (0.485, 0.456, 0.406) * 255, rounded.  Image-independent, so a
#: crop never leaks global image statistics.
PAD_RGB = (124, 116, 104)

DOWNSCALE_FILTER = Image.Resampling.LANCZOS
UPSCALE_FILTER = Image.Resampling.BILINEAR

MANIFEST_COLUMNS = [
    "index", "image_id", "ann_id", "category_id", "category", "label", "file_name",
    "bbox_x", "bbox_y", "bbox_w", "bbox_h",
    "crop_x0", "crop_y0", "crop_x1", "crop_y1",
]

INFO_FILE = "data.json"

EXPECTED_LAYOUT = """expected COCO 2017 layout:
  <root>/
    annotations/instances_train2017.json
    annotations/instances_val2017.json
    train2017/*.jpg
    val2017/*.jpg"""


# --------------------------------------------------------------------------- layout

def _annotation_path(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{SPLITS[split]}.json"


def _image_dir(root: Path, split: str) -> Path:
    return root / SPLITS[split]


def check_layout(root) -> None:
    """Raise FileNotFoundError naming the expected COCO layout and what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"COCO root {str(root)!r} is not a directory.\n{EXPECTED_LAYOUT}")
    missing = []
    for split in SPLITS:
        if not _annotation_path(root, split).is_file():
            missing.append(str(_annotation_path(root, split)))
        if not _image_dir(root, split).is_dir():
            missing.append(str(_image_dir(root, split)) + "/")
    if missing:
        raise FileNotFoundError(
            f"COCO root {str(root)!r} is incomplete; missing: {', '.join(missing)}\n{EXPECTED_LAYOUT}"
        )


def _load_coco(path: Path) -> COCO:
    """pycocotools COCO object, without its progress prints on stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


# --------------------------------------------------------------------------- classes

def _skip_reason(ann: dict, min_box: float) -> str | None:
    """'iscrowd', 'small' (shorter side < min_box, or an empty box) or None."""
    if ann.get("iscrowd", 0):
        return "iscrowd"
    w, h = ann["bbox"][2], ann["bbox"][3]
    if min(w, h) < min_box or w <= 0 or h <= 0:
        return "small"
    return None


def _eligible_counts(coco: COCO, min_box: float) -> Counter:
    """category_id -> number of annotations left after the iscrowd/small filters."""
    return Counter(a["category_id"] for a in coco.dataset["annotations"]
                   if _skip_reason(a, min_box) is None)


def choose_classes(coco: COCO, classes, min_box: float) -> list[tuple[int, str]]:
    """[(category_id, name)] in label order.

    ``classes`` is a list of COCO category names (label order = list order) or
    ``"top:K"``: the K categories with most annotations in ``coco`` after the
    iscrowd/small filters, most frequent first, ties broken by category id.
    Raises ValueError for an unknown name, a malformed spec or a class with zero
    samples after filtering.
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
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"classes must be a non-empty list of distinct names, got {names}")
        cat_ids = [name_to_id[n] for n in names]
    empty = [id_to_name[i] for i in cat_ids if counts[i] == 0]
    if empty:
        raise ValueError(f"classes with zero training samples after filtering (min_box={min_box}): {empty}")
    return [(i, id_to_name[i]) for i in cat_ids]


def _top_k(spec: str, counts: Counter, all_ids: list[int]) -> list[int]:
    prefix, _, k = spec.partition(":")
    if prefix != "top" or not k.isdigit() or not 1 <= int(k) <= len(all_ids):
        raise ValueError(f"classes must be a list of names or 'top:K' with 1 <= K <= {len(all_ids)}, got {spec!r}")
    return sorted(all_ids, key=lambda i: (-counts[i], i))[: int(k)]


# --------------------------------------------------------------------------- selection

def select_annotations(coco: COCO, cat_ids: list[int], min_box: float,
                       cap: int | None, seed: int) -> tuple[list[dict], dict]:
    """Annotations kept for ``cat_ids``, sorted by (image_id, ann_id), and skip counts.

    Skip reasons are counted in this order: iscrowd, small, other_class, capped.
    With a cap, each over-full class keeps ``cap`` annotations drawn without
    replacement by one ``numpy.random.default_rng(seed)``, classes visited in
    ``cat_ids`` order, candidates in ann-id order.
    """
    wanted = set(cat_ids)
    skipped = {"iscrowd": 0, "small": 0, "other_class": 0, "capped": 0}
    by_class = defaultdict(list)
    for ann in coco.dataset["annotations"]:
        reason = _skip_reason(ann, min_box)
        if reason is None and ann["category_id"] not in wanted:
            reason = "other_class"
        if reason:
            skipped[reason] += 1
        else:
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
    return kept, skipped


# --------------------------------------------------------------------------- geometry & pixels

def crop_square(bbox, context: float) -> tuple[int, int, int, int]:
    """Integer square (x0, y0, x1, y1), x1/y1 exclusive, around a COCO box [x, y, w, h].

    Side ``max(w, h) * (1 + 2 * context)`` rounded to whole pixels (at least 1),
    centred on the box centre (top-left rounded half up).  May extend beyond the image.
    """
    x, y, w, h = (float(v) for v in bbox)
    side = max(1, math.floor(max(w, h) * (1 + 2 * context) + 0.5))
    x0 = math.floor(x + w / 2 - side / 2 + 0.5)
    y0 = math.floor(y + h / 2 - side / 2 + 0.5)
    return x0, y0, x0 + side, y0 + side


def load_image(path, width: int, height: int) -> Image.Image:
    """Decode an image file as RGB in the frame of the json's ``width`` x ``height``.

    EXIF orientation is applied (``ImageOps.exif_transpose``) unless that makes the
    size differ from the json's, in which case the image is kept as stored (COCO
    boxes refer to the json's frame).  Any mode (L, CMYK, P, RGBA, ...) becomes
    RGB; transparent pixels are composited onto :data:`PAD_RGB`.  Raises
    ValueError if neither frame matches the json's size.
    """
    with Image.open(path) as raw:
        raw.load()
        img = raw
        if raw.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            turned = ImageOps.exif_transpose(raw)
            if turned.size == (width, height):
                img = turned
        if img.size != (width, height):
            raise ValueError(f"{path}: image is {img.size[0]}x{img.size[1]} but the annotation "
                             f"file says {width}x{height}")
        return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        background = Image.new("RGBA", img.size, PAD_RGB + (255,))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def crop_and_resize(img: Image.Image, crop: tuple[int, int, int, int], size: int) -> np.ndarray:
    """uint8 (size, size, 3) array of the square ``crop`` of an RGB image.

    Parts of the square outside the image are :data:`PAD_RGB`.  Resized with
    LANCZOS when the square is larger than ``size``, BILINEAR otherwise.
    """
    x0, y0, x1, y1 = crop
    side = x1 - x0
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x1, img.width), min(y1, img.height)
    if (ix0, iy0, ix1, iy1) == (x0, y0, x1, y1):
        square = img.crop(crop)
    else:
        square = Image.new("RGB", (side, side), PAD_RGB)
        if ix1 > ix0 and iy1 > iy0:
            square.paste(img.crop((ix0, iy0, ix1, iy1)), (ix0 - x0, iy0 - y0))
    if side != size:
        square = square.resize((size, size), DOWNSCALE_FILTER if side > size else UPSCALE_FILTER)
    return np.asarray(square, dtype=np.uint8)


# --------------------------------------------------------------------------- one split

def _build_split(coco: COCO, image_dir: Path, anns: list[dict], classes: list[tuple[int, str]],
                 image_size: int, context: float) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, dict]:
    """Crop every annotation in ``anns`` (sorted by image), decoding each image once."""
    label_of = {cid: i for i, (cid, _) in enumerate(classes)}
    name_of = dict(classes)
    images = np.empty((len(anns), image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(len(anns), dtype=np.int64)
    rows = []
    by_image = defaultdict(list)
    for index, ann in enumerate(anns):
        by_image[ann["image_id"]].append((index, ann))
    for image_id, items in by_image.items():
        meta = coco.loadImgs(image_id)[0]
        path = image_dir / meta["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image {path} (image_id {image_id}) listed in the annotations is missing")
        img = load_image(path, meta["width"], meta["height"])
        for index, ann in items:
            crop = crop_square(ann["bbox"], context)
            images[index] = crop_and_resize(img, crop, image_size)
            labels[index] = label_of[ann["category_id"]]
            rows.append([index, image_id, ann["id"], ann["category_id"], name_of[ann["category_id"]],
                         labels[index], meta["file_name"], *ann["bbox"], *crop])
    manifest = pd.DataFrame(sorted(rows, key=lambda r: r[0]), columns=MANIFEST_COLUMNS)
    return images, labels, manifest, {"num_images": len(by_image)}


# --------------------------------------------------------------------------- writing

def _write_npy(path: Path, array: np.ndarray) -> None:
    store.atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _manifest_bytes(manifest: pd.DataFrame) -> bytes:
    return manifest.to_csv(index=False, lineterminator="\n").encode("utf-8")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- public API

def _check_params(image_size, context, min_box, max_per_class, max_test_per_class) -> None:
    if not (isinstance(image_size, int) and image_size >= 1):
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not context >= 0:
        raise ValueError(f"context must be >= 0, got {context!r}")
    if not min_box >= 0:
        raise ValueError(f"min_box must be >= 0, got {min_box!r}")
    for name, cap in (("max_per_class", max_per_class), ("max_test_per_class", max_test_per_class)):
        if cap is not None and not (isinstance(cap, int) and cap >= 1):
            raise ValueError(f"{name} must be None or a positive int, got {cap!r}")


def build_dataset(root, out_dir, *, classes="top:10", image_size=64, context=0.2, min_box=16,
                  max_per_class=None, max_test_per_class=None, seed=0) -> dict:
    """Build train (train2017) and test (val2017) crop sets; return the data.json dict.

    Classes are chosen on train2017 (see :func:`choose_classes`); the test split
    uses the same classes and may have zero samples for some of them.  Any old
    ``data.json`` in ``out_dir`` is removed first, so an interrupted rebuild is
    never mistaken for a complete one.
    """
    params = dict(classes=classes if isinstance(classes, str) else list(classes), image_size=image_size,
                  context=context, min_box=min_box, max_per_class=max_per_class,
                  max_test_per_class=max_test_per_class, seed=seed)
    _check_params(image_size, context, min_box, max_per_class, max_test_per_class)
    root = Path(os.path.abspath(root))
    check_layout(root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INFO_FILE).unlink(missing_ok=True)

    cocos = {split: _load_coco(_annotation_path(root, split)) for split in SPLITS}
    chosen = choose_classes(cocos["train"], params["classes"], min_box)
    _check_test_categories(cocos["test"], chosen)
    caps = {"train": max_per_class, "test": max_test_per_class}
    info = {"classes": [n for _, n in chosen], "category_ids": [i for i, _ in chosen],
            "train_size": 0, "test_size": 0, "image_size": image_size,
            "counts": {}, "skipped": {}, "num_images": {}, "root": str(root),
            "annotation_files": {}, "params": params, "manifest_sha256": {},
            "crop": {"pad_rgb": list(PAD_RGB), "downscale_filter": DOWNSCALE_FILTER.name,
                     "upscale_filter": UPSCALE_FILTER.name}}
    manifests = {}
    for split, coco in cocos.items():
        anns, skipped = select_annotations(coco, info["category_ids"], min_box, caps[split], seed)
        log.info("%s: cropping %d boxes", split, len(anns))
        images, labels, manifests[split], stats = _build_split(
            coco, _image_dir(root, split), anns, chosen, image_size, context)
        _write_npy(out / f"{split}_images.npy", images)
        _write_npy(out / f"{split}_labels.npy", labels)
        ann_path = _annotation_path(root, split)
        info[f"{split}_size"] = len(labels)
        info["counts"][split] = {n: int((labels == i).sum()) for i, n in enumerate(info["classes"])}
        info["skipped"][split] = skipped
        info["num_images"][split] = stats["num_images"]
        info["annotation_files"][split] = {"path": str(ann_path.relative_to(root)),
                                           "sha256": _sha256_file(ann_path)}
    for split, manifest in manifests.items():
        data = _manifest_bytes(manifest)
        store.write_bytes(out / f"{split}_manifest.csv", data)
        info["manifest_sha256"][split] = hashlib.sha256(data).hexdigest()
    store.write_bytes(out / INFO_FILE, (json.dumps(info, indent=2) + "\n").encode("utf-8"))
    return info


def _check_test_categories(coco: COCO, chosen: list[tuple[int, str]]) -> None:
    test_names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    bad = [n for i, n in chosen if test_names.get(i) != n]
    if bad:
        raise ValueError(f"categories {bad} differ between the train and val annotation files")


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


def load_split(out_dir, split) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N,S,S,3, labels int64 N) for split 'train' or 'test'."""
    _check_split(split)
    info = read_info(out_dir)
    images = np.load(Path(out_dir) / f"{split}_images.npy", allow_pickle=False)
    labels = np.load(Path(out_dir) / f"{split}_labels.npy", allow_pickle=False)
    if len(images) != len(labels) or len(labels) != info[f"{split}_size"]:
        raise ValueError(f"{out_dir}: {split} arrays ({len(images)}, {len(labels)}) do not match "
                         f"data.json {split}_size {info[f'{split}_size']}")
    return images, labels


def read_manifest(out_dir, split) -> pd.DataFrame:
    """The manifest of ``split`` ('train' or 'test') as a DataFrame."""
    _check_split(split)
    read_info(out_dir)
    return pd.read_csv(Path(out_dir) / f"{split}_manifest.csv",
                       dtype={"category": str, "file_name": str}, keep_default_na=False)

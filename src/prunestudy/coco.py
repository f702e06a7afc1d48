"""COCO instance files: the expected layout, reading them, and checking them like a linter.

Every record is checked, in one pass per list, before pycocotools indexes what is usable (so no
bare KeyError or TypeError ever comes out of a malformed record):

| list | required fields and types | a problem there gets |
| --- | --- | --- |
| categories | id (int), name (non-empty string) | DataError (labels would be ambiguous) |
| images | id (int), file_name (non-empty string), width, height (positive ints) | record skipped |
| annotations | id, image_id, category_id (int), bbox (4 numbers) | skipped as `malformed` |

(iscrowd, 0 or 1, and area, a number, are optional; the boxes of a skipped image record are
skipped as `bad_image_record`); and, what would corrupt the study, a :class:`DataError`: an image
id, annotation id, category id or category name used twice in a file; a file name used by two
images of a split (the boxes of one photo would be cut from another); an image (same id or same
file name) in both train2017 and val2017 (test crops would be copies of training crops); skipped
records above ``max_bad_fraction`` of a file's images or annotations (not the COCO format this
reads). Annotations of an unknown category are skipped as `unknown_category`, of an unknown image as `no_image`
(:func:`sanitize`). Each problem names the file, the record (its list, index and id) and the fix;
all of them are reported at once.

On a file of train2017's size (860k annotations) the checks take under 2 s, a fraction of the
json parse itself (benchmarks/bench_coco_lint.py, benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pycocotools.coco import COCO

log = logging.getLogger(__name__)

#: split name -> COCO image folder (and annotation file stem).
SPLITS = {"train": "train2017", "test": "val2017"}

CLIP_TOLERANCE = 1.0  # px a box may reach beyond the image (COCO float rounding) before it is clipped
LISTED = 8            # problems of one kind named one by one in a message; the others counted
EXAMPLES = 20         # skipped records kept as examples (data.json)

EXPECTED_LAYOUT = """expected COCO 2017 layout:
  <root>/
    annotations/instances_train2017.json
    annotations/instances_val2017.json
    train2017/*.jpg
    val2017/*.jpg"""

_NUMBER = (int, float)


class DataError(ValueError):
    """The input data cannot make a usable dataset; the message says what and how to fix it."""


# --------------------------------------------------------------------------- layout

def annotation_path(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{SPLITS[split]}.json"


def image_dir(root: Path, split: str) -> Path:
    return Path(root) / SPLITS[split]


def check_layout(root) -> None:
    """Raise FileNotFoundError naming the expected COCO layout and what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"COCO root {str(root)!r} is not a directory.\n{EXPECTED_LAYOUT}")
    missing = []
    for split in SPLITS:
        if not annotation_path(root, split).is_file():
            missing.append(str(annotation_path(root, split)))
        if not image_dir(root, split).is_dir():
            missing.append(str(image_dir(root, split)) + "/")
    if missing:
        raise FileNotFoundError(
            f"COCO root {str(root)!r} is incomplete; missing: {', '.join(missing)}\n{EXPECTED_LAYOUT}"
        )


# --------------------------------------------------------------------------- reading

def read_json(path: Path) -> dict:
    """The parsed annotation file, with errors that name the file and the place."""
    try:
        with open(path, "rb") as f:
            dataset = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno} "
                        f"(byte {e.pos}); the file is damaged or incomplete: download it again") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 JSON ({e}); download the annotation file again") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(dataset, dict)
               or not isinstance(dataset.get(k), list)]
    if missing:
        raise DataError(f"{path} is not a COCO instances file: no list {missing} at the top level")
    return dataset


def index(dataset: dict) -> COCO:
    """pycocotools' index of a checked dataset (its lists hold only usable records)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_coco(path: Path) -> COCO:
    """One annotation file read, checked (:func:`lint`, no skipping tolerance: every malformed
    record is an error) and indexed."""
    dataset = read_json(path)
    checked = lint(dataset, path, max_bad_fraction=0.0)
    if checked.errors:
        raise DataError(_errors_message([checked]))
    return index(dataset)


def load_splits(root: Path, max_bad_fraction: float) -> tuple[dict[str, COCO], dict[str, Checked]]:
    """Both annotation files of a COCO root read, checked one by one and against each other, and
    indexed: ({split: COCO}, {split: Checked}). One DataError lists every problem found."""
    datasets = {split: read_json(annotation_path(root, split)) for split in SPLITS}
    checked = {split: lint(d, annotation_path(root, split), max_bad_fraction) for split, d in datasets.items()}
    cross = shared_images(datasets["train"], datasets["test"], annotation_path(root, "train"),
                          annotation_path(root, "test"))
    if cross or any(c.errors for c in checked.values()):
        raise DataError(_errors_message(list(checked.values()), cross))
    for c in checked.values():
        if c.examples:
            log.warning("%s: %s", c.path, c.summary())
    return {split: index(d) for split, d in datasets.items()}, checked


def _errors_message(checked: list[Checked], cross: list[str] = ()) -> str:
    problems = [e for c in checked for e in c.errors] + list(cross)
    head = f"{len(problems)} problem{'s' * (len(problems) != 1)} in the COCO annotation files"
    return head + ":\n" + "\n".join(f"  - {p}" for p in problems)


# --------------------------------------------------------------------------- the checks

@dataclass
class Checked:
    """What :func:`lint` found in one annotation file."""

    path: Path
    images: int = 0                                   # image records in the file
    annotations: int = 0                              # annotation records in the file
    bad_images: int = 0                               # image records skipped
    skipped: Counter = field(default_factory=Counter)  # annotations skipped, by reason
    examples: list[dict] = field(default_factory=list)  # the first skipped records: where, id, problem, fix
    errors: list[str] = field(default_factory=list)     # what makes the file unusable

    first: dict = field(default_factory=dict)         # kind -> its first example

    def skip(self, kind: str, where: str, rid, problem: str, fix: str) -> None:
        example = {"file": self.path.name, "record": where, "id": rid, "problem": problem, "fix": fix}
        self.first.setdefault(kind, example)
        if len(self.examples) < EXAMPLES:
            self.examples.append(example)

    def summary(self) -> str:
        parts = []
        if self.bad_images:
            parts.append(f"{self.bad_images} malformed image record{'s' * (self.bad_images != 1)}")
        for reason, n in sorted(self.skipped.items()):
            parts.append(f"{n} annotation{'s' * (n != 1)} skipped as {reason}")
        first = self.examples[0]
        return (", ".join(parts) + f" (e.g. {first['record']}{_id(first['id'])}: {first['problem']}); "
                "all counted in data.json")

    def as_dict(self) -> dict:
        return {"file": self.path.name, "image_records_skipped": self.bad_images,
                "annotations_skipped": dict(self.skipped), "examples": self.examples}


def _id(rid) -> str:
    return "" if rid is None else f" (id {rid!r})"


def _positive_int(v) -> bool:
    return (type(v) is int and v > 0) or (type(v) is float and v > 0 and v.is_integer())


def _listed(items: list[str], what: str) -> list[str]:
    """The first LISTED items, and one line counting the others."""
    more = [f"... and {len(items) - LISTED} more {what}"] if len(items) > LISTED else []
    return items[:LISTED] + more


def _duplicates(owners: dict, name: str, path: Path, what: str, fix: str) -> list[str]:
    """One line per value used by more than one record: value -> [record descriptions]."""
    dups = [f"{path}: {name} {value!r} is used by {' and '.join(records[:3])}"
            + (f" (and {len(records) - 3} more)" if len(records) > 3 else "") + f": {fix}"
            for value, records in owners.items() if len(records) > 1]
    return _listed(dups, what)


def lint(dataset: dict, path: Path, max_bad_fraction: float) -> Checked:
    """Check every record of one annotation file; remove the ones to skip from its lists (in place).

    Returns what was found: ``errors`` (a DataError's lines: the file cannot be used) and the
    skipped records, counted and with examples. Image ``width``/``height`` given as integral floats
    become ints."""
    path = Path(path)
    c = Checked(path, images=len(dataset["images"]), annotations=len(dataset["annotations"]))
    cat_ids = _check_categories(dataset, c)
    bad_image_ids = _check_images(dataset, c)
    _check_annotations(dataset, c, cat_ids, bad_image_ids)
    for kind, what, bad, total in (("image", "image records", c.bad_images, c.images),
                                   ("malformed", "annotations", c.skipped["malformed"], c.annotations)):
        if total and bad / total > max_bad_fraction:
            e = c.first[kind]
            c.errors.append(f"{path}: {bad:,} of {total:,} {what} ({bad / total:.1%}) are malformed, more than "
                            f"data.max_bad_fraction={max_bad_fraction}; e.g. {e['record']}{_id(e['id'])}: "
                            f"{e['problem']}. Is this a COCO instances file? Fix those records (or the tool that "
                            "wrote them), or raise data.max_bad_fraction to skip them")
    return c


def _check_categories(dataset: dict, c: Checked) -> set:
    ids, names, problems = {}, {}, []
    fix = "give each category an integer 'id' and a non-empty 'name' (a category cannot be skipped: labels hang on it)"
    for i, cat in enumerate(dataset["categories"]):
        where = f"categories[{i}]"
        if type(cat) is not dict:
            problems.append(f"{c.path}: {where} is not an object (got {type(cat).__name__}): {fix}")
            continue
        cid, name = cat.get("id"), cat.get("name")
        if type(cid) is not int:
            problems.append(f"{c.path}: {where}{_id(cid)}: " + ("no 'id'" if "id" not in cat else
                            f"'id' is {type(cid).__name__}, not an integer") + f": {fix}")
        elif type(name) is not str or not name:
            problems.append(f"{c.path}: {where} (id {cid}): " + ("no 'name'" if "name" not in cat else
                            f"'name' {name!r} is not a non-empty string") + f": {fix}")
        else:
            ids.setdefault(cid, []).append(f"{where} ({name!r})")
            names.setdefault(name, []).append(f"{where} (id {cid})")
    c.errors += _listed(problems, "malformed categories")
    c.errors += _duplicates(ids, "category id", c.path, "duplicate category ids",
                            "each category needs its own id (two files merged? keep one category list)")
    c.errors += _duplicates(names, "category name", c.path, "duplicate category names",
                            "class names must be unique: rename or merge the categories")
    return set(ids)


def _check_images(dataset: dict, c: Checked) -> set:
    """Skip malformed image records; errors for duplicate ids and file names. Returns the ids of
    the skipped records that had a usable id (their boxes are skipped as bad_image_record)."""
    kept, bad_ids, ids, files = [], set(), {}, {}
    fix = "give it an integer 'id', a 'file_name' and positive integer 'width' and 'height'"
    images = dataset["images"]
    for i, im in enumerate(images):
        problem = _image_problem(im)
        if problem is not None:
            rid = im.get("id") if type(im) is dict else None
            if type(rid) is int:
                bad_ids.add(rid)
            c.bad_images += 1
            c.skip("image", f"images[{i}]", rid, problem, fix)
            continue
        if type(im["width"]) is float or type(im["height"]) is float:
            im["width"], im["height"] = int(im["width"]), int(im["height"])
        kept.append(im)
        ids.setdefault(im["id"], []).append(i)
        files.setdefault(im["file_name"], []).append(i)
    dataset["images"] = kept
    if len(ids) != len(kept):
        owners = {v: [f"images[{i}] ({images[i]['file_name']})" for i in at] for v, at in ids.items() if len(at) > 1}
        c.errors += _duplicates(owners, "image id", c.path, "duplicate image ids",
                                "each image needs its own id, or the boxes of one photo are cut from another "
                                "(two files merged? renumber one subset's images and its annotations' image_id)")
    if len(files) != len(kept):
        owners = {v: [f"images[{i}] (id {images[i]['id']})" for i in at] for v, at in files.items() if len(at) > 1}
        c.errors += _duplicates(owners, "file name", c.path, "duplicate file names",
                                "one photo listed twice under two ids: keep one record and point its "
                                "annotations' image_id at it")
    return bad_ids - set(ids)


def _image_problem(im) -> str | None:
    if type(im) is not dict:
        return f"not an object (got {type(im).__name__})"
    rid, name, w, h = im.get("id"), im.get("file_name"), im.get("width"), im.get("height")
    if type(rid) is int and type(name) is str and name and _positive_int(w) and _positive_int(h):
        return None
    for key, ok, want in (("id", type(rid) is int, "an integer"), ("file_name", type(name) is str and bool(name),
                          "a non-empty string"), ("width", _positive_int(w), "a positive integer"),
                          ("height", _positive_int(h), "a positive integer")):
        if not ok:
            return f"no '{key}'" if key not in im else f"'{key}' is {im[key]!r}, not {want}"
    return None  # pragma: no cover - one of the above failed


def _check_annotations(dataset: dict, c: Checked, cat_ids: set, bad_image_ids: set) -> None:
    kept, ids, dup = [], set(), []
    fix = ("give it integer 'id', 'image_id' and 'category_id' and a 'bbox' of 4 numbers [x, y, w, h] "
           "('iscrowd' 0 or 1 and 'area' a number, when present)")
    for i, a in enumerate(dataset["annotations"]):
        if type(a) is dict:
            aid, iid, cid, box = a.get("id"), a.get("image_id"), a.get("category_id"), a.get("bbox")
            if (type(aid) is int and type(iid) is int and type(cid) is int and type(box) is list and len(box) == 4
                    and type(box[0]) in _NUMBER and type(box[1]) in _NUMBER and type(box[2]) in _NUMBER
                    and type(box[3]) in _NUMBER and a.get("iscrowd", 0) in (0, 1)
                    and type(a.get("area", 0.0)) in _NUMBER):
                if cid not in cat_ids:
                    c.skipped["unknown_category"] += 1
                    c.skip("annotation", f"annotations[{i}]", aid, f"category_id {cid} is not a category of the file",
                           "add the category, or correct the annotation's category_id")
                    continue
                if iid in bad_image_ids:
                    c.skipped["bad_image_record"] += 1
                    continue
                if aid in ids:
                    dup.append(aid)
                ids.add(aid)
                kept.append(a)
                continue
        c.skipped["malformed"] += 1
        c.skip("malformed", f"annotations[{i}]", a.get("id") if type(a) is dict else None, _annotation_problem(a), fix)
    if dup:
        dup = set(dup)
        owners = {}
        for i, a in enumerate(dataset["annotations"]):
            if type(a) is dict and a.get("id") in dup:
                owners.setdefault(a["id"], []).append(f"annotations[{i}] (image_id {a.get('image_id')!r})")
        c.errors += _duplicates(owners, "annotation id", c.path, "duplicate annotation ids",
                                "each annotation needs its own id (two files merged? renumber one subset's "
                                "annotations; the manifest traces every crop by it)")
    dataset["annotations"] = kept


def _annotation_problem(a) -> str:
    if type(a) is not dict:
        return f"not an object (got {type(a).__name__})"
    for key in ("id", "image_id", "category_id"):
        if key not in a:
            return f"no '{key}'"
        if type(a[key]) is not int:
            return f"'{key}' is {a[key]!r}, not an integer"
    box = a.get("bbox")
    if box is None:
        return "no 'bbox'"
    if type(box) is not list or len(box) != 4 or any(type(v) not in _NUMBER for v in box):
        return f"'bbox' is {box!r:.60}, not 4 numbers [x, y, w, h]"
    if a.get("iscrowd", 0) not in (0, 1):
        return f"'iscrowd' is {a['iscrowd']!r}, not 0 or 1"
    return f"'area' is {a['area']!r:.40}, not a number"


def shared_images(train: dict, test: dict, train_path: Path, test_path: Path) -> list[str]:
    """Problems: images of val2017 that are also in train2017, by id or by file name."""
    train_ids = {im["id"]: im["file_name"] for im in train["images"]}
    train_files = {im["file_name"]: im["id"] for im in train["images"]}
    same_id = [f"id {im['id']} ({im['file_name']} in val, {train_ids[im['id']]} in train)"
               for im in test["images"] if im["id"] in train_ids]
    same_file = [f"{im['file_name']} (id {im['id']} in val, {train_files[im['file_name']]} in train)"
                 for im in test["images"] if im["file_name"] in train_files and im["id"] not in train_ids]
    if not same_id and not same_file:
        return []
    found = same_id + same_file
    shown = "; ".join(found[:LISTED]) + (f"; ... and {len(found) - LISTED} more" if len(found) > LISTED else "")
    return [f"{len(found)} image{'s' * (len(found) != 1)} of {test_path} also in {train_path} (same id or same file "
            f"name): {shown}. Their test crops would be copies of training crops: remove them from one of the two "
            "files (a merged subset? keep each image in one split)"]


# --------------------------------------------------------------------------- box hygiene

def sanitize(coco: COCO) -> dict:
    """Give each annotation a usable box (``_box``), clipped to its image; count what was changed.

    Sets ``ann['_box']`` (the box crops are made from) and ``ann['_clipped']``; returns
    {'clipped': n}. Annotations without a box left keep ``_box = None`` and their reason in
    ``_reason`` ('no_image', 'invalid_box'): they are skipped later. The records have passed
    :func:`lint` (every field present, of the right type).
    """
    counts = Counter()
    for ann in coco.dataset["annotations"]:
        ann["_box"], ann["_clipped"], ann["_reason"] = None, False, None
        meta = coco.imgs.get(ann["image_id"])
        if meta is None:
            ann["_reason"] = "no_image"
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        W, H = meta["width"], meta["height"]
        if not all(map(math.isfinite, (x, y, w, h))) or w <= 0 or h <= 0:
            ann["_reason"] = "invalid_box"
            continue
        if x < -CLIP_TOLERANCE or y < -CLIP_TOLERANCE or x + w > W + CLIP_TOLERANCE or y + h > H + CLIP_TOLERANCE:
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
            if x1 <= x0 or y1 <= y0:
                ann["_reason"] = "invalid_box"
                continue
            x, y, w, h = x0, y0, x1 - x0, y1 - y0
            ann["_clipped"] = True
            counts["clipped"] += 1
        ann["_box"] = [x, y, w, h]
    return counts

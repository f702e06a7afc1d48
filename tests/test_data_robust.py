"""What real COCO data holds, and what each case gets (issue: real COCO 2017 at full scale).

Most tests alter a copy of ../shared/coco-sample (files are symlinks; a test replaces the ones
it changes) and check the outcome against values computed from the raw json and images.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from test_data import reference_crop  # the independent reference crop (numpy pad + PIL resize)

from prunestudy import cache, data, stages

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "coco-sample"
PAD = (124, 116, 104)
S = 64
DRAFT_TOL = 5.0

pytestmark = pytest.mark.skipif(
    not (SAMPLE / "annotations" / "instances_train2017.json").is_file(),
    reason=f"real COCO sample not found at {SAMPLE} (../shared/coco-sample from the repo root)",
)
TWO = ["person", "car"]  # two well-populated classes keep each build small


def copy_sample(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    shutil.copytree(SAMPLE, root, copy_function=lambda s, d: Path(d).symlink_to(s))
    return root


def raw(root: Path, split: str = "train") -> dict:
    name = {"train": "train2017", "test": "val2017"}[split]
    return json.loads((root / "annotations" / f"instances_{name}.json").read_text())


def write_json(root: Path, split: str, obj) -> None:
    name = {"train": "train2017", "test": "val2017"}[split]
    path = root / "annotations" / f"instances_{name}.json"
    path.unlink()
    path.write_text(json.dumps(obj))


def images_with(root: Path, names=TWO, split="train") -> list[dict]:
    """Images of the split holding an eligible box of one of ``names``, in id order."""
    d = raw(root, split)
    ids = {c["id"] for c in d["categories"] if c["name"] in names}
    keep = {a["image_id"] for a in d["annotations"]
            if a["category_id"] in ids and not a["iscrowd"] and min(a["bbox"][2:]) >= 16}
    return sorted((i for i in d["images"] if i["id"] in keep), key=lambda i: i["id"])


def replace_file(path: Path, content: bytes) -> None:
    path.unlink()
    path.write_bytes(content)


def build(root, out, **kw):
    kw.setdefault("classes", TWO)
    kw.setdefault("show_progress", False)
    kw.setdefault("min_per_class", 1)   # the sample's small classes; the default (20) is tested on its own
    return data.build_dataset(root, out, **kw)


# --------------------------------------------------------------------------- annotation files

def test_malformed_json_names_file_and_place(tmp_path):
    root = copy_sample(tmp_path)
    path = root / "annotations" / "instances_val2017.json"
    text = path.read_text()
    path.unlink()
    path.write_text(text.replace('"width":', '"width"', 1))  # a missing colon, early in line 1
    with pytest.raises(data.DataError) as err:
        build(root, tmp_path / "out")
    msg = str(err.value)
    byte = text.index('"width":') + len('"width"')
    assert "instances_val2017.json" in msg and "download it again" in msg
    where = re.search(r"Expecting ':' delimiter at line 1, column (\d+) \(byte (\d+)\)", msg)
    assert where and byte <= int(where[2]) <= byte + 2 and int(where[1]) == int(where[2]) + 1
    assert not (tmp_path / "out" / "data.json").exists()


def test_truncated_json_is_named(tmp_path):
    root = copy_sample(tmp_path)
    path = root / "annotations" / "instances_train2017.json"
    text = path.read_bytes()
    replace_file(path, text[: len(text) // 2])
    with pytest.raises(data.DataError, match="instances_train2017.json is not valid JSON"):
        build(root, tmp_path / "out")


def test_json_that_is_not_coco_is_named(tmp_path):
    root = copy_sample(tmp_path)
    write_json(root, "train", {"images": [], "annotations": []})
    with pytest.raises(data.DataError, match=r"not a COCO instances file.*categories"):
        build(root, tmp_path / "out")


# --------------------------------------------------------------------------- unreadable images

def break_three(root: Path) -> dict[str, str]:
    """One missing, one truncated and one garbage JPEG among the train images used; name -> reason."""
    imgs = images_with(root)
    missing, truncated, garbage = (imgs[i]["file_name"] for i in (3, 10, 20))
    (root / "train2017" / missing).unlink()
    jpeg = (SAMPLE / "train2017" / truncated).read_bytes()
    replace_file(root / "train2017" / truncated, jpeg[: len(jpeg) // 3])
    replace_file(root / "train2017" / garbage, b"\xff\xd8\xff\xe0 this is not a jpeg" * 50)
    return {missing: "missing_file", truncated: "corrupt_image", garbage: "corrupt_image"}


def test_bad_images_are_skipped_counted_and_listed(tmp_path):
    root = copy_sample(tmp_path)
    broken = break_three(root)
    out = tmp_path / "out"
    info = build(root, out, max_bad_fraction=0.1)
    rejects = data.read_rejects(out, "train")
    assert dict(zip(rejects["file_name"], rejects["reason"])) == broken
    m = data.read_manifest(out, "train")
    assert not set(m["file_name"]) & set(broken)
    # counts: every box of the broken images is skipped under its reason, the rest kept
    clean = build(SAMPLE, tmp_path / "clean")
    mc = data.read_manifest(tmp_path / "clean", "train")
    lost = mc[mc["file_name"].isin(broken)]
    assert info["train_size"] == clean["train_size"] - len(lost)
    by_reason = Counter()
    for name, reason in broken.items():
        by_reason[reason] += int((lost["file_name"] == name).sum())
    assert {k: info["skipped"]["train"].get(k, 0) for k in by_reason} == dict(by_reason)
    assert info["rejected"]["train"]["images"] == 3
    assert set(rejects["boxes"]) == {int((lost["file_name"] == n).sum()) for n in broken}
    # the kept crops are exactly the clean build's, in order
    x, y = data.load_split(out, "train")
    xc, yc = data.load_split(tmp_path / "clean", "train")
    keep = ~mc["file_name"].isin(broken).to_numpy()
    assert np.array_equal(x, xc[keep]) and np.array_equal(y, yc[keep])
    assert m["index"].tolist() == list(range(len(m)))
    assert info["num_images"]["train"] == clean["num_images"]["train"] - 3


def test_too_many_bad_images_is_an_error_that_keeps_the_list(tmp_path):
    root = copy_sample(tmp_path)
    broken = break_three(root)
    out = tmp_path / "out"
    with pytest.raises(data.DataError) as err:
        build(root, out)  # default max_bad_fraction 0.01
    msg = str(err.value)
    assert "3 of" in msg and "max_bad_fraction=0.01" in msg and "train_rejects.csv" in msg
    listed = (out / "train_rejects.csv").read_text()
    assert all(name in listed for name in broken)
    assert not (out / "data.json").exists()


def test_image_whose_size_differs_from_the_json_is_rejected(tmp_path):
    root = copy_sample(tmp_path)
    name = images_with(root)[5]["file_name"]
    with Image.open(SAMPLE / "train2017" / name) as im:
        small = im.resize((im.width // 2, im.height // 2))
    buf = io.BytesIO()
    small.save(buf, "JPEG")
    replace_file(root / "train2017" / name, buf.getvalue())
    build(root, tmp_path / "out", max_bad_fraction=0.1)
    rejects = data.read_rejects(tmp_path / "out", "train")
    assert rejects["reason"].tolist() == ["size_mismatch"] and "annotation file says" in rejects["detail"][0]


# --------------------------------------------------------------------------- image modes

def test_exif_rotated_image_gives_the_same_crops(tmp_path):
    """Pixels stored turned, with an EXIF tag saying how to turn them upright (json = upright)."""
    root = copy_sample(tmp_path)
    name = images_with(root)[2]["file_name"]
    with Image.open(SAMPLE / "train2017" / name) as im:
        stored = im.transpose(Image.Transpose.ROTATE_90)  # orientation 6 undoes this
        exif = Image.Exif()
        exif[0x0112] = 6
        buf = io.BytesIO()
        stored.save(buf, "JPEG", quality=98, exif=exif.tobytes())
    replace_file(root / "train2017" / name, buf.getvalue())
    build(root, tmp_path / "out")
    m = data.read_manifest(tmp_path / "out", "train")
    rows = m[m["file_name"] == name]
    assert len(rows) >= 1
    x, _ = data.load_split(tmp_path / "out", "train")
    with Image.open(root / "train2017" / name) as im:  # turned upright independently, by PIL itself
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    with Image.open(SAMPLE / "train2017" / name) as im:
        assert upright.shape == np.asarray(im).shape
    for r in rows.itertuples():
        assert r.decode_scale == 1
        ref = reference_crop(upright, r.crop_x0, r.crop_y0, r.crop_x1, r.crop_y1)
        assert np.abs(ref.astype(int) - x[r.index]).max() <= 1


# --------------------------------------------------------------------------- boxes

def test_degenerate_outside_and_orphan_boxes(tmp_path):
    root = copy_sample(tmp_path)
    d = raw(root)
    person = next(c["id"] for c in d["categories"] if c["name"] == "person")
    img = images_with(root, ["person"])[0]
    W, H = img["width"], img["height"]
    base = max(a["id"] for a in d["annotations"]) + 1
    extra = [
        {"id": base, "image_id": img["id"], "category_id": person, "iscrowd": 0, "area": 0, "bbox": [10, 10, 0, 50]},
        {"id": base + 1, "image_id": img["id"], "category_id": person, "iscrowd": 0, "area": 1,
         "bbox": [10, 10, -5, 40]},
        {"id": base + 2, "image_id": img["id"], "category_id": person, "iscrowd": 0, "area": 1,
         "bbox": [W + 5, 10, 30, 30]},  # entirely outside: nothing left after clipping
        {"id": base + 3, "image_id": img["id"], "category_id": person, "iscrowd": 0, "area": 1,
         "bbox": [W - 40, H - 50, 100, 120]},  # reaches 60 px right and 70 px below the image
        {"id": base + 4, "image_id": 10**12, "category_id": person, "iscrowd": 0, "area": 1, "bbox": [0, 0, 50, 50]},
    ]
    d["annotations"] += extra
    write_json(root, "train", d)
    info = build(root, tmp_path / "out", classes=["person", "car"])
    skipped = info["skipped"]["train"]
    assert skipped["invalid_box"] == 3 and skipped["no_image"] == 1
    assert info["clipped"]["train"] == 1
    m = data.read_manifest(tmp_path / "out", "train")
    assert set(m["ann_id"]) & {e["id"] for e in extra} == {base + 3}
    r = m[m["ann_id"] == base + 3].iloc[0]
    assert r.clipped == 1 and [r.bbox_x, r.bbox_y, r.bbox_w, r.bbox_h] == [W - 40, H - 50, 100, 120]
    # the crop is made around the clipped box [W-40, H-50, 40, 50]: side round(50 * 1.4) = 70
    assert (r.crop_x1 - r.crop_x0, r.crop_y1 - r.crop_y0) == (70, 70)
    assert abs((r.crop_x0 + r.crop_x1) / 2 - (W - 20)) <= 1 and abs((r.crop_y0 + r.crop_y1) / 2 - (H - 25)) <= 1


# --------------------------------------------------------------------------- classes and modes

def test_class_with_too_few_samples_says_which_and_how_many(tmp_path):
    d = raw(SAMPLE)
    cats = {c["id"]: c["name"] for c in d["categories"]}
    n = Counter(a["category_id"] for a in d["annotations"] if not a["iscrowd"] and min(a["bbox"][2:]) >= 16)
    few = next(cats[i] for i, k in sorted(n.items(), key=lambda t: t[1]) if 2 <= k < 20)
    with pytest.raises(data.DataError) as err:
        build(SAMPLE, tmp_path / "out", classes=["person", few], min_per_class=20)
    assert f"{few} ({n[next(i for i, v in cats.items() if v == few)]})" in str(err.value)
    assert "person" not in str(err.value).split("samples:")[1]


def test_image_label_mode_one_sample_per_image_by_largest_box(tmp_path):
    names = ["person", "car", "bottle"]
    info = build(SAMPLE, tmp_path / "out", classes=names, label_mode="image")
    assert info["label_mode"] == "image"
    d = raw(SAMPLE)
    ids = {c["name"]: c["id"] for c in d["categories"]}
    wanted = {ids[n]: k for k, n in enumerate(names)}
    best = {}
    for a in sorted(d["annotations"], key=lambda a: a["id"]):
        if a["category_id"] in wanted and not a["iscrowd"] and min(a["bbox"][2:]) >= 16:
            if (a["image_id"] not in best
                    or a["bbox"][2] * a["bbox"][3] > best[a["image_id"]]["bbox"][2] * best[a["image_id"]]["bbox"][3]):
                best[a["image_id"]] = a
    m = data.read_manifest(tmp_path / "out", "train")
    x, y = data.load_split(tmp_path / "out", "train")
    assert m["image_id"].tolist() == sorted(best) and len(set(m["image_id"])) == len(m)
    assert m["ann_id"].tolist() == [best[i]["id"] for i in sorted(best)]
    assert y.tolist() == [wanted[best[i]["category_id"]] for i in sorted(best)]
    images = {i["id"]: i for i in d["images"]}
    for r in m.head(6).itertuples():  # the whole image, letterboxed, in the output
        w, h = images[r.image_id]["width"], images[r.image_id]["height"]
        side = max(w, h)
        assert (r.crop_x0, r.crop_y0, r.crop_x1 - r.crop_x0) == ((w - side) // 2, (h - side) // 2, side)
        with Image.open(SAMPLE / "train2017" / r.file_name) as im:
            canvas = Image.new("RGB", (side, side), PAD)
            canvas.paste(im.convert("RGB"), (-r.crop_x0, -r.crop_y0))
        ref = np.asarray(canvas.resize((S, S), Image.Resampling.LANCZOS), float)
        assert np.abs(ref - x[r.index]).mean() <= DRAFT_TOL


def test_workers_do_not_change_the_result(tmp_path):
    a = build(SAMPLE, tmp_path / "one", classes="top:10", workers=1)
    b = build(SAMPLE, tmp_path / "two", classes="top:10", workers=2)
    assert a == b
    for split in ("train", "test"):
        for u, v in zip(data.load_split(tmp_path / "one", split), data.load_split(tmp_path / "two", split)):
            assert np.array_equal(u, v)
        name = f"{split}_manifest.csv"
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_jpeg_draft_decodes_at_a_fraction_only_when_asked(tmp_path):
    name = images_with(SAMPLE)[0]["file_name"]
    with Image.open(SAMPLE / "train2017" / name) as im:
        w, h = im.size
    full = data.load_image(SAMPLE / "train2017" / name, w, h)
    eighth = data.load_image(SAMPLE / "train2017" / name, w, h, reduce=9.5)
    half = data.load_image(SAMPLE / "train2017" / name, w, h, reduce=3.9)
    assert full.info["decode_scale"] == 1 and full.size == (w, h)
    assert eighth.info["decode_scale"] == 8 and eighth.size == (-(-w // 8), -(-h // 8))
    assert half.info["decode_scale"] == 2 and half.size == (-(-w // 2), -(-h // 2))
    png = tmp_path / "x.png"
    full.save(png)
    assert data.load_image(png, w, h, reduce=8).info["decode_scale"] == 1  # only JPEG has draft mode


# --------------------------------------------------------------------------- cache

def test_cache_reuses_links_and_clears(tmp_path, monkeypatch, _crop_cache):
    monkeypatch.setenv("PRUNESTUDY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(cache.ENV)   # the default place: the project's data/cache
    root = copy_sample(tmp_path)
    kw = dict(root=str(root), classes=TWO, min_per_class=1)
    logs = []
    info1 = stages.run_data(tmp_path / "run1", log=logs.append, **kw)
    info2 = stages.run_data(tmp_path / "run2", log=logs.append, **kw)
    assert info1 == {**info2, "cache": info1["cache"]} and info1["cache"] == info2["cache"]
    assert "building crop set" in logs[0] and "found in the cache" in logs[-1]
    entry = Path(info1["cache"]["entry"])
    assert entry.parent == tmp_path / "home" / "data" / "cache" / "crops"
    for run in ("run1", "run2"):  # hard links to the one copy, not copies
        assert os.path.samefile(tmp_path / run / "data" / "train_images.npy", entry / "train_images.npy")
    # another data parameter, or changed annotations: another entry
    info3 = stages.run_data(tmp_path / "run3", log=logs.append, **{**kw, "context": 0.3})
    assert info3["cache"]["key"] != info1["cache"]["key"]
    d = raw(root, "test")
    d["annotations"] = d["annotations"][:-1]
    write_json(root, "test", d)
    info4 = stages.run_data(tmp_path / "run4", log=logs.append, **kw)
    assert info4["cache"]["key"] not in (info1["cache"]["key"], info3["cache"]["key"])
    assert len(cache.entries()) == 3
    # clearing the cache leaves run folders usable
    out = subprocess.run([sys.executable, "-m", "prunestudy.cli", "cache", "clear"], capture_output=True,
                         text=True, env={**os.environ, "PRUNESTUDY_HOME": str(tmp_path / "home")})
    assert out.returncode == 0 and "MiB freed" in out.stdout
    assert cache.entries() == [] and not entry.exists()
    x, y = data.load_split(tmp_path / "run1" / "data", "train")
    assert len(x) == len(y) == info1["train_size"]
    # PRUNESTUDY_CACHE puts the crop sets elsewhere, for the stage and for `prunestudy cache`
    monkeypatch.setenv(cache.ENV, str(tmp_path / "scratch"))
    info5 = stages.run_data(tmp_path / "run5", log=logs.append, **kw)
    assert Path(info5["cache"]["entry"]).parent == tmp_path / "scratch" / "crops"
    listed = subprocess.run([sys.executable, "-m", "prunestudy.cli", "cache", "list"], capture_output=True, text=True)
    assert info5["cache"]["key"] in listed.stdout
    assert not (tmp_path / "home" / "data" / "cache" / "crops").exists() or \
        not list((tmp_path / "home" / "data" / "cache" / "crops").iterdir())


def test_progress_in_log_mode_is_a_few_lines(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PRUNESTUDY_PROGRESS", "log")
    data.build_dataset(SAMPLE, tmp_path / "out", classes="top:10", min_per_class=1, show_progress=True)
    err = capfd.readouterr().err
    updates = err.replace("\r", "\n").splitlines()
    train = [u for u in updates if u.startswith("data train")]
    assert train and "img/s" in train[-1] and "100%" in train[-1]
    assert len(train) <= 4  # start and end (and at most one update per 15 s), not one per chunk

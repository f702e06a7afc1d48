"""Tests for prunestudy.data: COCO object crops as a classification dataset.

Expectations are computed independently from the raw json (plain ``json``) and
the original images (plain PIL/numpy), not with the module's own helpers.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prunestudy import data

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "coco-sample"
PAD = (124, 116, 104)
S = 64
MIN_BOX = 16
CONTEXT = 0.2
DRAFT_TOL = 5.0  # mean |difference| (of 255) allowed between a draft-decoded crop and the reference

needs_sample = pytest.mark.skipif(
    not (SAMPLE / "annotations" / "instances_train2017.json").is_file(),
    reason=f"real COCO sample not found at {SAMPLE} (../shared/coco-sample from the repo root)",
)


# --------------------------------------------------------------------------- helpers

def raw_json(split: str, root: Path = SAMPLE) -> dict:
    name = {"train": "train2017", "test": "val2017"}[split]
    with open(root / "annotations" / f"instances_{name}.json") as f:
        return json.load(f)


def eligible(ann: dict, min_box: float = MIN_BOX) -> bool:
    w, h = ann["bbox"][2:]
    return not ann["iscrowd"] and min(w, h) >= min_box


def expected_top(split_json: dict, k: int, min_box: float = MIN_BOX) -> list[int]:
    counts = Counter(a["category_id"] for a in split_json["annotations"] if eligible(a, min_box))
    ids = sorted(c["id"] for c in split_json["categories"])
    return sorted(ids, key=lambda i: (-counts[i], i))[:k]


def filter_for(side: int):
    return Image.Resampling.LANCZOS if side > S else Image.Resampling.BILINEAR


def reference_crop(rgb: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Square crop of an HxWx3 array, padded with PAD outside the image, resized to S."""
    h, w = rgb.shape[:2]
    m = max(0, -x0, -y0, x1 - w, y1 - h)
    padded = np.stack([np.pad(rgb[..., c], m, constant_values=PAD[c]) for c in range(3)], axis=-1)
    square = Image.fromarray(padded[y0 + m:y1 + m, x0 + m:x1 + m])
    return np.asarray(square.resize((S, S), filter_for(x1 - x0)))


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def linked_copy(tmp_path: Path) -> Path:
    """Copy of the sample whose files are symlinks (cheap); replace files to modify."""
    root = tmp_path / "coco"
    shutil.copytree(SAMPLE, root, copy_function=lambda s, d: Path(d).symlink_to(s))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("top10")
    info = data.build_dataset(SAMPLE, out, min_per_class=1, classes="top:10", min_box=MIN_BOX)
    return out, info


# --------------------------------------------------------------------------- real sample: content

@needs_sample
def test_shapes_dtypes_and_labels(built):
    out, info = built
    assert data.read_info(out) == info
    for split in ("train", "test"):
        x, y = data.load_split(out, split)
        assert x.dtype == np.uint8 and x.shape == (info[f"{split}_size"], S, S, 3)
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert len(x) > 0 and y.min() >= 0 and y.max() < 10
        assert sum(info["counts"][split].values()) == len(y)
        assert [info["counts"][split][n] for n in info["classes"]] == np.bincount(y, minlength=10).tolist()
    assert info["image_size"] == S and len(info["classes"]) == 10
    assert Path(info["root"]).is_absolute()
    assert set(info["annotation_files"]) == {"train", "test"}


@needs_sample
def test_top10_classes_match_raw_json(built):
    _, info = built
    train = raw_json("train")
    names = {c["id"]: c["name"] for c in train["categories"]}
    top = expected_top(train, 10)
    assert info["category_ids"] == top
    assert info["classes"] == [names[i] for i in top]
    # no cap: every eligible box of the chosen classes is kept, in both splits
    for split in ("train", "test"):
        raw = raw_json(split)
        counts = Counter(a["category_id"] for a in raw["annotations"] if eligible(a))
        assert info["counts"][split] == {names[i]: counts[i] for i in top}
        anns = raw["annotations"]
        assert info["skipped"][split] == {
            "iscrowd": sum(a["iscrowd"] for a in anns),
            "small": sum(not a["iscrowd"] and min(a["bbox"][2:]) < MIN_BOX for a in anns),
            "other_class": sum(eligible(a) and a["category_id"] not in top for a in anns),
            "capped": 0,
        }


@needs_sample
def test_manifest_traces_to_real_annotations(built):
    out, info = built
    for split in ("train", "test"):
        raw = raw_json(split)
        anns = {a["id"]: a for a in raw["annotations"]}
        images = {i["id"]: i for i in raw["images"]}
        names = {c["id"]: c["name"] for c in raw["categories"]}
        m = data.read_manifest(out, split)
        _, y = data.load_split(out, split)
        assert list(m.columns) == data.MANIFEST_COLUMNS
        assert len(m) == len(y) and m["index"].tolist() == list(range(len(y)))
        assert m["label"].tolist() == y.tolist()
        keys = list(zip(m["image_id"], m["ann_id"]))
        assert keys == sorted(keys) and len(set(m["ann_id"])) == len(m)
        for r in m.itertuples():
            a = anns[r.ann_id]
            assert a["image_id"] == r.image_id and a["category_id"] == r.category_id
            assert [r.bbox_x, r.bbox_y, r.bbox_w, r.bbox_h] == a["bbox"]
            assert r.category == names[a["category_id"]] == info["classes"][r.label]
            assert r.file_name == images[r.image_id]["file_name"]
            assert not a["iscrowd"] and min(a["bbox"][2:]) >= MIN_BOX
        wanted = {a["id"] for a in raw["annotations"] if eligible(a) and a["category_id"] in info["category_ids"]}
        assert set(m["ann_id"]) == wanted


def pick_samples(m, images: dict) -> list[int]:
    """A few rows of each kind: square beyond the image, upscaled (side < S), large."""
    side = m["crop_x1"] - m["crop_x0"]
    w = m["image_id"].map(lambda i: images[i]["width"])
    h = m["image_id"].map(lambda i: images[i]["height"])
    outside = (m["crop_x0"] < 0) | (m["crop_y0"] < 0) | (m["crop_x1"] > w) | (m["crop_y1"] > h)
    picks = []
    for mask in (outside, side < S, side > 3 * S, ~outside):
        picks += m.index[mask].tolist()[::7][:3]
    return sorted(set(picks))


@needs_sample
def test_crops_match_their_boxes(built):
    out, info = built
    for split, folder in (("train", "train2017"), ("test", "val2017")):
        images = {i["id"]: i for i in raw_json(split)["images"]}
        m = data.read_manifest(out, split)
        x, _ = data.load_split(out, split)
        picks = pick_samples(m, images)
        assert len(picks) >= 8
        for i in picks:
            r = m.iloc[i]
            bx, by, bw, bh = r.bbox_x, r.bbox_y, r.bbox_w, r.bbox_h
            # geometry: a square of side max(w,h)*(1+2c) centred on the box (to rounding)
            side = r.crop_x1 - r.crop_x0
            assert r.crop_y1 - r.crop_y0 == side
            assert abs(side - max(bw, bh) * (1 + 2 * CONTEXT)) <= 0.5
            assert abs((r.crop_x0 + r.crop_x1) / 2 - (bx + bw / 2)) <= 1
            assert abs((r.crop_y0 + r.crop_y1) / 2 - (by + bh / 2)) <= 1
            # the longer side of the box spans the expected central band of the output
            u0, u1 = (bx - r.crop_x0) * S / side, (bx + bw - r.crop_x0) * S / side
            v0, v1 = (by - r.crop_y0) * S / side, (by + bh - r.crop_y0) * S / side
            margin = CONTEXT / (1 + 2 * CONTEXT) * S
            long0, long1 = (u0, u1) if bw >= bh else (v0, v1)
            tol = 0.6 * S / side + 0.01
            assert abs(long0 - margin) <= tol and abs(long1 - (S - margin)) <= tol
            assert abs((u0 + u1) / 2 - S / 2) <= tol and abs((v0 + v1) / 2 - S / 2) <= tol
            # pixels: recomputed from the original JPEG
            with Image.open(SAMPLE / folder / r.file_name) as im:
                rgb = np.asarray(im.convert("RGB"))
            ref = reference_crop(rgb, r.crop_x0, r.crop_y0, r.crop_x1, r.crop_y1)
            if r.decode_scale == 1:  # full decode: the same pixels as the reference, to rounding
                assert max_diff(ref, x[i]) <= 1, (split, i)
            else:  # JPEG draft decode at 1/2..1/8: a different low-pass filter, same picture
                assert side / r.decode_scale >= S and r.decode_scale in (2, 4, 8)
                assert np.abs(ref.astype(float) - x[i]).mean() <= DRAFT_TOL, (split, i)
            # the box itself, resampled straight from the image, is what fills the centre
            a0, a1, b0, b1 = math.ceil(u0), math.floor(u1), math.ceil(v0), math.floor(v1)
            src = (r.crop_x0 + a0 * side / S, r.crop_y0 + b0 * side / S,
                   r.crop_x0 + a1 * side / S, r.crop_y0 + b1 * side / S)
            box_ref = Image.fromarray(rgb).resize((a1 - a0, b1 - b0), filter_for(side), box=src)
            diff = np.abs(np.asarray(box_ref, float) - x[i, b0:b1, a0:a1]).mean()
            assert diff <= (2.0 if r.decode_scale == 1 else DRAFT_TOL), (split, i, diff)


@needs_sample
def test_padding_outside_image_is_constant(built):
    out, _ = built
    m = data.read_manifest(out, "train")
    x, _ = data.load_split(out, "train")
    rows = m[m["crop_x0"] <= -(m["crop_x1"] - m["crop_x0"]) // 8]
    if rows.empty:
        pytest.skip("no crop reaches far enough beyond the left image border in the sample")
    for i in rows.index[:5]:
        r = m.iloc[i]
        cols = int(-r.crop_x0 * S / (r.crop_x1 - r.crop_x0)) - 2  # output columns fully outside
        assert cols >= 1
        assert (x[i, :, :cols] == PAD).all()


# --------------------------------------------------------------------------- image modes

def inside_rows_cols(r, shape) -> tuple[slice, slice]:
    """Output rows/columns whose pixels come only from inside an image of ``shape``."""
    side = r.crop_x1 - r.crop_x0
    h, w = shape[:2]

    k = math.ceil(3 * max(1, S / side))  # reach of the LANCZOS / BILINEAR kernel in output pixels

    def band(lo, hi, size):
        return slice(math.ceil((max(lo, 0) - lo) * S / side) + k, math.floor((min(hi, size) - lo) * S / side) - k)

    return band(r.crop_y0, r.crop_y1, h), band(r.crop_x0, r.crop_x1, w)


def converted_copy(tmp_path, built):
    """Sample copy with one train image as grayscale JPEG and one as CMYK JPEG."""
    out, _ = built
    m = data.read_manifest(out, "train")
    names = m.drop_duplicates("image_id")["file_name"].tolist()[:2]
    root = linked_copy(tmp_path)
    for name, mode in zip(names, ("L", "CMYK")):
        path = root / "train2017" / name
        path.unlink()
        with Image.open(SAMPLE / "train2017" / name) as im:
            im.convert(mode).save(path, "JPEG", quality=95)
    return root, dict(zip(names, ("L", "CMYK")))


@needs_sample
def test_grayscale_and_cmyk_images_give_rgb_crops(tmp_path, built):
    root, modes = converted_copy(tmp_path, built)
    m0 = data.read_manifest(built[0], "train")
    classes = sorted(set(m0.loc[m0["file_name"].isin(modes), "category"]) | {"person", "car"})  # a study: 2+ classes
    out = tmp_path / "out"
    data.build_dataset(root, out, min_per_class=1, classes=classes, min_box=MIN_BOX)
    m = data.read_manifest(out, "train")
    x, _ = data.load_split(out, "train")
    for name, mode in modes.items():
        rows = m[m["file_name"] == name]
        assert len(rows) >= 1
        with Image.open(root / "train2017" / name) as im:
            assert im.mode == mode
            rgb = np.asarray(im.convert("RGB"))
        with Image.open(SAMPLE / "train2017" / name) as im:
            original = np.asarray(im.convert("L" if mode == "L" else "RGB").convert("RGB"))
        for r in rows.itertuples():
            got = x[r.index]
            ref = reference_crop(rgb, r.crop_x0, r.crop_y0, r.crop_x1, r.crop_y1)
            if r.decode_scale == 1:
                assert max_diff(ref, got) <= 1
            else:
                assert np.abs(ref.astype(float) - got).mean() <= DRAFT_TOL
            if mode == "L":  # grey wherever the square lies inside the image (padding is coloured)
                inside = got[inside_rows_cols(r, rgb.shape)]
                assert inside.size and (inside[..., 0] == inside[..., 1]).all()
                assert (inside[..., 1] == inside[..., 2]).all()
            near = reference_crop(original, r.crop_x0, r.crop_y0, r.crop_x1, r.crop_y1)
            assert np.abs(near.astype(float) - got).mean() < 4 + (DRAFT_TOL if r.decode_scale > 1 else 0)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16"])
def test_load_image_any_mode_to_rgb(tmp_path, mode):
    rgb = np.zeros((12, 20, 3), np.uint8)
    rgb[:, 10:] = (200, 60, 30)
    im = Image.fromarray(rgb)
    im = im.convert("L").convert("I;16") if mode == "I;16" else im.convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    im.save(path)
    out = data.load_image(path, 20, 12)
    assert out.mode == "RGB" and out.size == (20, 12)


def exif_image(tmp_path, orientation: int) -> Path:
    """40x20 PNG, left half black, right half white, tagged with an EXIF orientation."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    Image.fromarray(arr).save(path, exif=exif.tobytes())
    return path


def test_exif_rotation_that_breaks_json_size_is_not_applied(tmp_path):
    img = data.load_image(exif_image(tmp_path, 6), 40, 20)  # json frame = as stored
    assert img.size == (40, 20)
    assert np.asarray(img)[0, 0].tolist() == [0, 0, 0]


def test_exif_rotation_matching_json_size_is_applied(tmp_path):
    img = data.load_image(exif_image(tmp_path, 6), 20, 40)  # json frame = upright
    assert img.size == (20, 40)
    arr = np.asarray(img)
    assert arr[0, 0].tolist() == [0, 0, 0] and arr[-1, 0].tolist() == [255, 255, 255]
    flipped = np.asarray(data.load_image(exif_image(tmp_path, 3), 40, 20))  # 180 deg, same size
    assert flipped[0, 0].tolist() == [255, 255, 255]


def test_image_size_mismatch_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="40x20"):
        data.load_image(exif_image(tmp_path, 1), 30, 30)


# --------------------------------------------------------------------------- classes and caps

@needs_sample
def test_named_class_list_sets_label_order(tmp_path):
    info = data.build_dataset(SAMPLE, tmp_path, min_per_class=1, classes=["car", "person"], min_box=MIN_BOX,
                              max_per_class=8, max_test_per_class=8)
    assert info["classes"] == ["car", "person"] and info["category_ids"] == [3, 1]
    for split in ("train", "test"):
        m = data.read_manifest(tmp_path, split)
        assert set(zip(m["category"], m["label"])) == {("car", 0), ("person", 1)}


@needs_sample
def test_unknown_class_name_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="unicorn") as err:
        data.build_dataset(SAMPLE, tmp_path, min_per_class=1, classes=["person", "unicorn"])
    assert "toothbrush" in str(err.value) and "person" in str(err.value)
    assert not (tmp_path / "data.json").exists()


@needs_sample
def test_class_without_training_samples_is_named(tmp_path):
    train = raw_json("train")
    counts = Counter(a["category_id"] for a in train["annotations"] if eligible(a))
    empty = [c["name"] for c in train["categories"] if counts[c["id"]] == 0]
    if not empty:
        pytest.skip("every category has a training box in the sample")
    with pytest.raises(ValueError, match=empty[0]):
        data.build_dataset(SAMPLE, tmp_path, min_per_class=1, classes=["person", empty[0]])


@pytest.mark.parametrize("spec", ["top:0", "top:81", "top10", "best:3"])
@needs_sample
def test_bad_top_k_spec(tmp_path, spec):
    with pytest.raises(ValueError, match="top:K"):
        data.build_dataset(SAMPLE, tmp_path, min_per_class=1, classes=spec)


@needs_sample
def test_cap_is_reproducible_per_seed(tmp_path):
    kw = dict(classes=["person", "bottle"], min_box=MIN_BOX, max_per_class=10, max_test_per_class=5)
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        info = data.build_dataset(SAMPLE, tmp_path / name, min_per_class=1, seed=seed, **kw)
        runs[name] = (info, data.read_manifest(tmp_path / name, "train"), data.read_manifest(tmp_path / name, "test"))
    info = runs["a"][0]
    assert info["counts"] == {"train": {"person": 10, "bottle": 10}, "test": {"person": 5, "bottle": 5}}
    train = raw_json("train")
    n = Counter(a["category_id"] for a in train["annotations"] if eligible(a))
    assert info["skipped"]["train"]["capped"] == n[1] - 10 + n[44] - 10
    assert runs["a"][1].equals(runs["b"][1]) and runs["a"][2].equals(runs["b"][2])
    assert set(runs["a"][1]["ann_id"]) != set(runs["c"][1]["ann_id"])
    assert info["params"]["max_per_class"] == 10 and info["params"]["seed"] == 0


# --------------------------------------------------------------------------- layout errors

def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for name in ("train2017", "val2017"):
        (root / name).mkdir()
        (root / "annotations" / f"instances_{name}.json").write_text("{}")
    return root


@pytest.mark.parametrize("remove", ["annotations/instances_train2017.json",
                                    "annotations/instances_val2017.json", "train2017", "val2017"])
def test_missing_layout_part_is_named(tmp_path, remove):
    root = fake_root(tmp_path)
    data.check_layout(root)
    target = root / remove
    target.rmdir() if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match="expected COCO 2017 layout") as err:
        data.build_dataset(root, tmp_path / "out", min_per_class=1)
    assert remove.split("/")[-1] in str(err.value)
    assert "instances_val2017.json" in str(err.value)  # the layout itself is shown


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected COCO 2017 layout"):
        data.check_layout(tmp_path / "nope")


def test_read_info_before_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="has not run"):
        data.read_info(tmp_path)
    with pytest.raises(FileNotFoundError, match="has not run"):
        data.load_split(tmp_path, "train")


# --------------------------------------------------------------------------- determinism

@needs_sample
def test_build_twice_is_identical(tmp_path, built):
    out1, info1 = built
    info2 = data.build_dataset(SAMPLE, tmp_path, min_per_class=1, classes="top:10", min_box=MIN_BOX)
    assert info1 == info2
    for split in ("train", "test"):
        for a, b in zip(data.load_split(out1, split), data.load_split(tmp_path, split)):
            assert np.array_equal(a, b)
        name = f"{split}_manifest.csv"
        assert (out1 / name).read_bytes() == (tmp_path / name).read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))

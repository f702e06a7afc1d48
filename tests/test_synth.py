"""Tests for prunestudy.synth: COCO-format validity, determinism, ensure() and argument checks."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from prunestudy import synth

pycocotools_coco = pytest.importorskip("pycocotools.coco")

SPLITS = ("train2017", "val2017")
SMALL = dict(train_images=6, val_images=3, image_size=96)


def _load(path: pathlib.Path):
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
        return pycocotools_coco.COCO(str(path))


def _shoelace(flat: list[float]) -> float:
    p = np.asarray(flat, dtype=float).reshape(-1, 2)
    x, y = p[:, 0], p[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("synth") / "coco"
    out = synth.generate(root, seed=3, train_images=160, val_images=40)
    assert out == root
    return root


def _tree_bytes(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- layout and format


def test_layout(dataset):
    assert (dataset / "annotations" / "instances_train2017.json").is_file()
    assert (dataset / "annotations" / "instances_val2017.json").is_file()
    assert (dataset / synth.MARKER_NAME).is_file()
    assert len(list((dataset / "train2017").glob("*.jpg"))) == 160
    assert len(list((dataset / "val2017").glob("*.jpg"))) == 40
    # no temporary siblings left behind
    assert [p.name for p in dataset.parent.iterdir()] == [dataset.name]


def test_categories_constant():
    assert len(synth.CATEGORIES) == 10
    assert len(set(synth.CATEGORIES)) == 10


def test_coco_json_valid(dataset):
    seen_img, seen_ann = set(), set()
    cats_used = set()
    for split in SPLITS:
        path = dataset / "annotations" / f"instances_{split}.json"
        raw = json.loads(path.read_text())
        assert set(raw) >= {"info", "licenses", "images", "annotations", "categories"}
        assert raw["categories"] == [
            {"supercategory": "shape", "id": i + 1, "name": n} for i, n in enumerate(synth.CATEGORIES)
        ]
        coco = _load(path)  # pycocotools must accept it
        assert sorted(coco.getCatIds()) == list(range(1, 11))
        img_ids = {im["id"] for im in raw["images"]}
        ann_ids = {a["id"] for a in raw["annotations"]}
        assert len(img_ids) == len(raw["images"]) and len(ann_ids) == len(raw["annotations"])
        assert not (img_ids & seen_img), "image ids collide across splits"
        assert not (ann_ids & seen_ann), "annotation ids collide across splits"
        seen_img |= img_ids
        seen_ann |= ann_ids
        license_ids = {lic["id"] for lic in raw["licenses"]}

        sizes = {}
        for im in raw["images"]:
            assert im["file_name"] == f"{im['id']:012d}.jpg"
            assert im["license"] in license_ids
            assert isinstance(im["date_captured"], str) and im["date_captured"].startswith("2017-")
            f = dataset / split / im["file_name"]
            with Image.open(f) as pil:
                assert pil.format == "JPEG" and pil.mode == "RGB"
                assert pil.size == (im["width"], im["height"]) == (160, 160)
            sizes[im["id"]] = (im["width"], im["height"])

        for a in raw["annotations"]:
            assert a["image_id"] in sizes
            assert 1 <= a["category_id"] <= 10
            assert a["iscrowd"] in (0, 1)
            w_img, h_img = sizes[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert all(isinstance(v, float) for v in a["bbox"])
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= w_img + 1e-6 and y + h <= h_img + 1e-6
            segs = a["segmentation"]
            assert isinstance(segs, list) and segs
            if a["iscrowd"] == 0:
                assert len(segs) == 1
            else:
                assert len(segs) >= 3  # a group of small shapes
            pts = np.concatenate([np.asarray(s, dtype=float).reshape(-1, 2) for s in segs])
            for s in segs:
                assert len(s) >= 6 and len(s) % 2 == 0
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            np.testing.assert_allclose([x, y, x + w, y + h], [lo[0], lo[1], hi[0], hi[1]], atol=0.011)
            assert a["area"] == pytest.approx(sum(_shoelace(s) for s in segs), abs=0.011)
            assert 0 < a["area"] <= w * h + 1e-6
            cats_used.add(a["category_id"])
    assert cats_used == set(range(1, 11))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_masks_agree_with_areas(dataset):
    coco = _load(dataset / "annotations" / "instances_val2017.json")
    anns = [a for a in coco.dataset["annotations"] if a["area"] > 400][:20]
    assert anns
    for a in anns:
        m = coco.annToMask(a)
        assert m.shape == (160, 160)
        assert m.sum() == pytest.approx(a["area"], rel=0.15)


def test_statistics(dataset):
    anns = []
    for split in SPLITS:
        anns += json.loads((dataset / "annotations" / f"instances_{split}.json").read_text())["annotations"]
    n = len(anns)
    per_image = n / 200
    assert 2.5 < per_image < 6
    crowd = sum(a["iscrowd"] for a in anns)
    tiny = sum(max(a["bbox"][2:]) < 16 for a in anns if not a["iscrowd"])
    assert 1 <= crowd <= 0.05 * n
    assert 0.02 * n <= tiny <= 0.25 * n
    counts = np.bincount([a["category_id"] for a in anns if not a["iscrowd"]], minlength=11)[1:]
    assert counts.min() >= 0.4 * counts.max()  # mildly unbalanced at most


def test_images_not_trivial(dataset):
    # cluttered: backgrounds are not flat, and the images use many colours
    with Image.open(next((dataset / "val2017").glob("*.jpg"))) as pil:
        arr = np.asarray(pil, dtype=float)
    assert arr.std() > 5
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 1000


def test_marker(dataset):
    m = json.loads((dataset / synth.MARKER_NAME).read_text())
    assert m["format_version"] == synth.FORMAT_VERSION
    assert m["params"] == {"seed": 3, "train_images": 160, "val_images": 40, "image_size": 160}


# --------------------------------------------------------------------------- determinism


def test_deterministic(tmp_path):
    a = synth.generate(tmp_path / "a", seed=7, **SMALL)
    b = synth.generate(tmp_path / "b", seed=7, **SMALL)
    c = synth.generate(tmp_path / "c", seed=8, **SMALL)
    ta, tb, tc = _tree_bytes(a), _tree_bytes(b), _tree_bytes(c)
    assert ta == tb
    assert ta.keys() == tc.keys()
    assert ta["annotations/instances_train2017.json"] != tc["annotations/instances_train2017.json"]
    assert ta["train2017/000000000001.jpg"] != tc["train2017/000000000001.jpg"]
    # val ids follow train ids
    assert "val2017/000000000007.jpg" in ta


def test_worker_processes_do_not_change_output(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESTUDY_SYNTH_WORKERS", "1")
    a = synth.generate(tmp_path / "w1", seed=5, **SMALL)
    monkeypatch.setenv("PRUNESTUDY_SYNTH_WORKERS", "2")
    assert synth._workers(9) == 2
    b = synth.generate(tmp_path / "w2", seed=5, **SMALL)
    assert _tree_bytes(a) == _tree_bytes(b)
    monkeypatch.setenv("PRUNESTUDY_SYNTH_WORKERS", "zero")
    with pytest.raises(ValueError, match="PRUNESTUDY_SYNTH_WORKERS"):
        synth.generate(tmp_path / "w3", seed=5, **SMALL)


def test_splits_are_different_streams(tmp_path):
    root = synth.generate(tmp_path / "d", seed=0, train_images=2, val_images=2, image_size=64)
    assert ((root / "train2017" / "000000000001.jpg").read_bytes()
            != (root / "val2017" / "000000000003.jpg").read_bytes())


def test_other_image_sizes(tmp_path):
    root = synth.generate(tmp_path / "s", seed=1, train_images=4, val_images=2, image_size=64)
    raw = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    for im in raw["images"]:
        assert (im["width"], im["height"]) == (64, 64)
        with Image.open(root / "train2017" / im["file_name"]) as pil:
            assert pil.size == (64, 64)
    for a in raw["annotations"]:
        x, y, w, h = a["bbox"]
        assert x + w <= 64 + 1e-6 and y + h <= 64 + 1e-6


# --------------------------------------------------------------------------- ensure()


def test_ensure_reuses(tmp_path):
    root = tmp_path / "e"
    assert synth.ensure(root, seed=1, **SMALL) == root
    marker = root / synth.MARKER_NAME
    ann = root / "annotations" / "instances_train2017.json"
    before = (marker.stat().st_mtime_ns, ann.stat().st_mtime_ns, ann.stat().st_ino)
    assert synth.ensure(str(root), seed=1, **SMALL) == root
    assert (marker.stat().st_mtime_ns, ann.stat().st_mtime_ns, ann.stat().st_ino) == before


def test_ensure_defaults_are_filled_in(tmp_path, monkeypatch):
    root = tmp_path / "f"
    synth.generate(root, seed=0, **SMALL)
    # the same params spelt differently (seed left to its default) still match
    calls = []
    monkeypatch.setattr(synth, "_generate", lambda *a: calls.append(a))
    synth.ensure(root, **SMALL)
    assert calls == []


def test_ensure_different_params_raise(tmp_path):
    root = tmp_path / "g"
    synth.ensure(root, seed=1, **SMALL)
    with pytest.raises(ValueError) as ei:
        synth.ensure(root, seed=2, **SMALL)
    msg = str(ei.value)
    assert "'seed': 1" in msg and "'seed': 2" in msg
    assert "delete" in msg and "another root" in msg
    with pytest.raises(ValueError, match="train_images"):
        synth.ensure(root, seed=1, train_images=7, val_images=3, image_size=96)


def test_ensure_format_version_change_raises(tmp_path):
    root = tmp_path / "v"
    synth.ensure(root, **SMALL)
    m = json.loads((root / synth.MARKER_NAME).read_text())
    m["format_version"] = synth.FORMAT_VERSION - 1
    (root / synth.MARKER_NAME).write_text(json.dumps(m))
    with pytest.raises(ValueError, match="format_version"):
        synth.ensure(root, **SMALL)


def test_ensure_ignores_leftover_temporary_folder(tmp_path):
    root = tmp_path / "h"
    # what a killed run leaves behind: a half-written temporary sibling, without a marker
    leftover = tmp_path / f".{root.name}.partial-dead"
    (leftover / "annotations").mkdir(parents=True)
    (leftover / "annotations" / "instances_train2017.json").write_text("{")
    synth.ensure(root, **SMALL)
    assert (root / synth.MARKER_NAME).is_file()
    assert len(list((root / "train2017").glob("*.jpg"))) == 6


def test_interrupted_generate_leaves_nothing(tmp_path, monkeypatch):
    root = tmp_path / "i"
    real = synth._write_split

    def boom(out_dir, split_code, *args):
        if split_code == 1:
            raise KeyboardInterrupt
        return real(out_dir, split_code, *args)

    monkeypatch.setattr(synth, "_write_split", boom)
    with pytest.raises(KeyboardInterrupt):
        synth.generate(root, **SMALL)
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []  # temporary folder cleaned up
    monkeypatch.setattr(synth, "_write_split", real)
    synth.ensure(root, **SMALL)
    assert (root / synth.MARKER_NAME).is_file()


def test_ensure_regenerates_incomplete_dataset_of_ours(tmp_path):
    root = tmp_path / "j"
    synth.ensure(root, **SMALL)
    victim = next((root / "val2017").glob("*.jpg"))
    victim.unlink()
    synth.ensure(root, **SMALL)
    assert victim.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["j"]


def test_ensure_refuses_foreign_directory(tmp_path):
    root = tmp_path / "k"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train2017.json").write_text("{}")
    with pytest.raises(ValueError, match="prunestudy-synth.json"):
        synth.ensure(root, **SMALL)
    with pytest.raises(ValueError, match="not made by"):
        synth.generate(root, **SMALL)
    assert (root / "annotations" / "instances_train2017.json").read_text() == "{}"


def test_ensure_accepts_empty_directory(tmp_path):
    root = tmp_path / "l"
    root.mkdir()
    synth.ensure(root, **SMALL)
    assert (root / synth.MARKER_NAME).is_file()


def test_generate_replaces_own_dataset(tmp_path):
    root = tmp_path / "m"
    synth.generate(root, seed=1, **SMALL)
    synth.generate(root, seed=2, **SMALL)
    assert json.loads((root / synth.MARKER_NAME).read_text())["params"]["seed"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_root_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        synth.ensure(f, **SMALL)


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "name, value",
    [
        ("train_images", 0),
        ("train_images", -5),
        ("train_images", 2.5),
        ("train_images", "10"),
        ("val_images", 0),
        ("val_images", True),
        ("image_size", 63),
        ("image_size", 10_000),
        ("image_size", 128.0),
        ("seed", -1),
        ("seed", None),
    ],
)
def test_bad_arguments(tmp_path, name, value):
    for fn in (synth.generate, synth.ensure):
        with pytest.raises(ValueError, match=name):
            fn(tmp_path / "bad", **{name: value})
    assert not (tmp_path / "bad").exists()


def test_unknown_parameter(tmp_path):
    with pytest.raises(ValueError, match="imagesize"):
        synth.ensure(tmp_path / "u", imagesize=128)


def test_numpy_ints_accepted(tmp_path):
    root = synth.generate(tmp_path / "n", seed=np.int64(1), train_images=np.int32(2), val_images=1, image_size=64)
    assert json.loads((root / synth.MARKER_NAME).read_text())["params"] == {
        "seed": 1,
        "train_images": 2,
        "val_images": 1,
        "image_size": 64,
    }
    assert os.path.isdir(root / "val2017")

"""Bad input never becomes a result (issue 15): every case ends in exit 2 (bad parameters), a named
data error (bad files) or a skip that is counted and shown; nothing unmeasured or degenerate is
published. Data cases alter a copy of ../shared/coco-sample (files are symlinks; a test replaces the
ones it changes); whole runs use the smoke parameters. Each test is a row of docs/faults.md or
docs/coco.md."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, terminal_sigint
from torch import nn

from prunestudy import cli, coco, config, data, execute, models, paths, pipeline, report, train

CLI = [sys.executable, "-m", "prunestudy.cli"]
TWO = ["person", "car"]
SPLIT_FILE = {"train": "instances_train2017.json", "test": "instances_val2017.json"}
NOISE = ("Traceback", "ZMQError", "IPKernelApp", "Task exception", "KeyboardInterrupt", "PoolWorker")


# --------------------------------------------------------------------------- helpers

def copy_sample(sample: Path, tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    shutil.copytree(sample, root, copy_function=lambda s, d: Path(d).symlink_to(s))
    return root


def raw(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / SPLIT_FILE[split]).read_text())


def write(root: Path, split: str, obj: dict) -> Path:
    path = root / "annotations" / SPLIT_FILE[split]
    path.unlink()
    path.write_text(json.dumps(obj))
    return path


def build(root: Path, out: Path, **kw) -> dict:
    kw.setdefault("classes", TWO)
    kw.setdefault("min_per_class", 1)
    kw.setdefault("show_progress", False)
    return data.build_dataset(root, out, **kw)


def used_image(d: dict) -> int:
    """Index in d['images'] of the first image holding an eligible person or car box."""
    ids = {c["id"] for c in d["categories"] if c["name"] in TWO}
    used = {a["image_id"] for a in d["annotations"] if a["category_id"] in ids and not a["iscrowd"]
            and min(a["bbox"][2:]) >= 16}
    return next(i for i, im in enumerate(d["images"]) if im["id"] in used)


def used_annotation(d: dict) -> int:
    ids = {c["id"] for c in d["categories"] if c["name"] in TWO}
    return next(i for i, a in enumerate(d["annotations"]) if a["category_id"] in ids and not a["iscrowd"]
                and min(a["bbox"][2:]) >= 16)


def params_cli(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main(["params", "-f", "params/smoke.yaml", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def skip_table(markdown: str) -> dict[str, dict[str, str]]:
    """The report's data section: {split: {skip reason (as shown): count (as shown)}}."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("| ")]
    header = rows[0]
    return {r[0]: dict(zip(header[2:], r[2:])) for r in rows[1:] if r[0] in ("train", "test")}


def shown(info: dict, split: str, reason: str) -> str:
    """How many boxes the report's data section shows as skipped for `reason`."""
    return skip_table(report.data_markdown(info))[split][report.md_escape(reason)]


def problem_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("  - ")]


# --------------------------------------------------------------------------- parameters: exit 2 before any work

def test_model_input_sizes_are_what_the_real_models_take():
    """The traced ranges (meta device) agree with the layers and with real forward passes on the CPU:
    a one-sample training batch runs at both ends of the range and fails just outside it."""
    anchor = config.default("data.image_size")
    seed = models.build_model("seed_cnn", 3)
    side = int(round((seed.fc1.in_features / seed.conv3.out_channels) ** 0.5))   # fc1 takes 128 x side x side
    assert models.input_sizes("seed_cnn", anchor) == (side * 8, side * 8 + 7)   # three 2x2 max-pools: // 8
    lo, hi = models.input_sizes("resnet18", anchor)
    assert hi is None and 1 < lo < anchor
    for name in ("seed_cnn", "resnet18"):
        lo, hi = models.input_sizes(name, anchor)
        torch.manual_seed(0)
        net = models.build_model(name, 3).train()
        for size, fits in [(lo, True), (lo - 1, False)] + ([(hi, True), (hi + 1, False)] if hi else []):
            try:
                net(torch.rand(1, 3, size, size))
                ran = True
            except (RuntimeError, ValueError):
                ran = False
            assert ran == fits, (name, size)


def test_image_size_the_model_cannot_take_exits_2_with_the_valid_range(capsys):
    rc, _, err = params_cli(capsys, "-p", "data.image_size=17")
    assert rc == 2 and "data.image_size=17 does not fit train.model=seed_cnn" in err and "64 to 71 px" in err
    assert "e.g. data.image_size=64" in err
    rc, _, err = params_cli(capsys, "-p", "train.model=resnet18", "-p", "data.image_size=17")
    lo, _ = models.input_sizes("resnet18", config.default("data.image_size"))
    assert rc == 2 and "train.model=resnet18" in err and f"at least {lo} px" in err
    rc, out, _ = params_cli(capsys, "-p", "train.model=resnet18", "-p", "data.image_size=48")
    assert rc == 0 and yaml.safe_load(out.split("# params hash")[0])["data"]["image_size"] == 48


def test_negative_seeds_duplicate_and_single_classes_exit_2_all_listed_at_once(capsys):
    rc, _, err = params_cli(capsys, "-p", "seed=-1", "-p", "seeds=[0, -2, 3]", "-p",
                            "data.classes=[person, car, person]")
    lines = problem_lines(err)
    assert rc == 2 and len(lines) == 3, err
    assert "seed must be 0 or more" in lines[0] and "got -1" in lines[0]
    assert "seeds[1] must be 0 or more" in lines[1] and "got -2" in lines[1]
    assert "data.classes lists 'person' more than once" in err
    for one in ("[circle]", "[person, person]", "top:1", "top:0", "[]"):
        rc, _, err = params_cli(capsys, "-p", f"data.classes={one}")
        assert rc == 2 and "at least 2" in err and len(problem_lines(err)) == 1, (one, err)
    rc, _, _ = params_cli(capsys, "-p", "data.classes=[person, car]")
    assert rc == 0


@pytest.mark.parametrize("command", ["params", "run"])
def test_yaml_error_in_a_p_value_is_one_line_naming_key_and_value(command, capsys, tmp_path):
    extra = ["--run-dir", str(tmp_path / "run")] if command == "run" else []
    rc = cli.main([command, "-f", "params/smoke.yaml", "-p", "data.classes=[person", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = problem_lines(err)
    assert "-p data.classes" in line and "'[person'" in line and "not valid YAML" in line
    assert not (tmp_path / "run").exists()   # before any work


def test_relative_paths_are_taken_from_the_current_directory(tmp_path, monkeypatch, capsys):
    here = tmp_path / "work"
    (here / "coco").mkdir(parents=True)
    (here / "w.pt").write_bytes(b"")
    monkeypatch.chdir(here)
    cfg = config.load(ROOT / "params" / "smoke.yaml", ["data.root=coco", "train.weights=w.pt"])
    assert cfg["data"]["root"] == str(here / "coco") and cfg["train"]["weights"] == str(here / "w.pt")
    # the kernels run in notebooks/: they are given the absolute paths
    injected = execute.notebook_parameters("data", cfg, here / "run")
    assert injected["root"] == str(here / "coco") and Path(injected["run_dir"]).is_absolute()
    assert config.load(ROOT / "params" / "smoke.yaml")["data"]["root"] == "embedded"   # not a path
    rc = cli.main(["params", "-f", str(ROOT / "params" / "smoke.yaml"), "-p", "data.root=nope", "-p",
                   "train.weights=no.pt"])
    err = capsys.readouterr().err
    assert rc == 2 and f"data.root 'nope' (= {here / 'nope'}: relative paths are taken from the current directory)" \
        in err and str(here / "no.pt") in err
    rc = cli.main(["params", "-f", "params/smoke.yaml"])
    assert rc == 2 and str(here / "params" / "smoke.yaml") in capsys.readouterr().err
    # --run-dir: the current directory too (shown before the run stops at the incomplete COCO root)
    rc = cli.main(["run", "-f", str(ROOT / "params" / "smoke.yaml"), "-p", "data.root=coco", "--run-dir", "out"])
    captured = capsys.readouterr()
    assert rc == 2 and f"run folder {here / 'out'} " in captured.out and "incomplete" in captured.err
    assert not (here / "out").exists()
    # without --run-dir the run goes to the project's runs/, from anywhere
    assert pipeline.default_run_dir("params/smoke.yaml", [], cfg) == ROOT / "runs" / "smoke"


# --------------------------------------------------------------------------- COCO files: checked like a linter

SKIPPED_IMAGE = [("test", "width", None), ("train", "file_name", None), ("test", "height", 0),
                 ("train", "width", "640")]


def altered(sample: Path, tmp_path: Path, split: str, kind: str, key: str, value) -> tuple[Path, dict, int, dict]:
    """A copy of the sample whose first used image or annotation (kind) of `split` has `key` deleted
    (value None) or set to `value`: (root, the original json, the record's index, the record)."""
    root = copy_sample(sample, tmp_path)
    d = raw(root, split)
    i = used_image(d) if kind == "images" else used_annotation(d)
    record = d[kind][i]
    if value is None:
        del record[key]
    else:
        record[key] = value
    write(root, split, d)
    return root, d, i, record


@pytest.mark.parametrize("split,key,value", SKIPPED_IMAGE)
def test_malformed_image_record_is_skipped_counted_and_named(split, key, value, coco_sample, tmp_path):
    root, d, i, image = altered(coco_sample, tmp_path, split, "images", key, value)
    info = build(root, tmp_path / "out")
    checked = info["records_skipped"][split]
    assert checked["image_records_skipped"] == 1 and checked["file"] == SPLIT_FILE[split]
    (example,) = checked["examples"]
    assert example["record"] == f"images[{i}]" and example["id"] == image["id"] and key in example["problem"]
    boxes = sum(a["image_id"] == image["id"] for a in d["annotations"])
    assert info["skipped"][split]["bad_image_record"] == boxes > 0
    manifest = data.read_manifest(tmp_path / "out", split)
    assert image["id"] not in set(manifest["image_id"])
    assert shown(info, split, "bad_image_record") == str(boxes)   # and the report's data section shows it


MALFORMED_ANNOTATION = [("test", "category_id", None, "no 'category_id'"), ("train", "image_id", None, "no 'image_id'"),
                        ("train", "id", None, "no 'id'"), ("test", "bbox", None, "no 'bbox'"),
                        ("train", "bbox", [1, 2, 3], "not 4 numbers"), ("test", "category_id", "1", "not an integer"),
                        ("train", "iscrowd", "no", "'iscrowd'"), ("test", "area", "big", "'area'")]


@pytest.mark.parametrize("split,key,value,problem", MALFORMED_ANNOTATION)
def test_malformed_annotation_is_skipped_counted_and_named(split, key, value, problem, coco_sample, tmp_path):
    root, _, i, ann = altered(coco_sample, tmp_path, split, "annotations", key, value)
    info = build(root, tmp_path / "out")
    assert info["skipped"][split]["malformed"] == 1
    (example,) = info["records_skipped"][split]["examples"]
    assert example["record"] == f"annotations[{i}]" and problem in example["problem"]
    assert example["id"] == (None if key == "id" else ann["id"])
    assert ann.get("id") not in set(data.read_manifest(tmp_path / "out", split)["ann_id"]) or key == "id"
    assert shown(info, split, "malformed") == "1"


@pytest.mark.parametrize("key,value,problem", [("name", None, "no 'name'"), ("id", None, "no 'id'"),
                                               ("id", "1", "not an integer"), ("name", "", "not a non-empty string")])
def test_malformed_category_is_a_data_error_naming_file_and_record(key, value, problem, coco_sample, tmp_path):
    root = copy_sample(coco_sample, tmp_path)
    d = raw(root, "test")
    if value is None:
        del d["categories"][3][key]
    else:
        d["categories"][3][key] = value
    path = write(root, "test", d)
    with pytest.raises(data.DataError) as err:
        build(root, tmp_path / "out")
    assert f"{path}: categories[3]" in str(err.value) and problem in str(err.value)
    assert not (tmp_path / "out" / "data.json").exists()


def test_too_many_malformed_records_is_an_error(coco_sample, tmp_path):
    root = copy_sample(coco_sample, tmp_path)
    d = raw(root, "test")
    for im in d["images"][:5]:
        del im["width"]
    path = write(root, "test", d)
    with pytest.raises(data.DataError) as err:
        build(root, tmp_path / "out")
    n = len(d["images"])
    assert f"{path}: 5 of {n} image records ({5 / n:.1%}) are malformed, more than data.max_bad_fraction=0.01" \
        in str(err.value)
    info = build(root, tmp_path / "out", max_bad_fraction=0.05)   # accepted: skipped and counted
    assert info["records_skipped"]["test"]["image_records_skipped"] == 5


def test_annotation_of_an_unknown_category_is_skipped_and_counted(coco_sample, tmp_path):
    root = copy_sample(coco_sample, tmp_path)
    d = raw(root, "train")
    i = used_annotation(d)
    d["annotations"][i]["category_id"] = 9999
    write(root, "train", d)
    info = build(root, tmp_path / "out")
    assert info["skipped"]["train"]["unknown_category"] == 1 and shown(info, "train", "unknown_category") == "1"
    assert info["records_skipped"]["train"]["examples"][0]["record"] == f"annotations[{i}]"


def merged(root: Path, split: str, change) -> Path:
    d = raw(root, split)
    change(d)
    return write(root, split, d)


def _dup_image_id(d):
    a, b = used_image(d), used_image(d) + 1
    d["images"][b]["id"] = d["images"][a]["id"]


def _dup_file_name(d):
    a = used_image(d)
    d["images"][a + 1]["file_name"] = d["images"][a]["file_name"]


def _dup_annotation_id(d):
    d["annotations"][7]["id"] = d["annotations"][3]["id"]


def _dup_category_id(d):
    d["categories"][5]["id"] = d["categories"][4]["id"]


def _dup_category_name(d):
    d["categories"][5]["name"] = d["categories"][4]["name"]


@pytest.mark.parametrize("split,change,expect", [
    ("test", _dup_image_id, r"image id (\d+) is used by images\[\d+\] \(.+\) and images\[\d+\]"),
    ("train", _dup_file_name, r"file name '.+\.jpg' is used by images\[\d+\] \(id \d+\) and images\[\d+\]"),
    ("train", _dup_annotation_id, r"annotation id \d+ is used by annotations\[3\] .* and annotations\[7\]"),
    ("test", _dup_category_id, r"category id \d+ is used by categories\[4\] .* and categories\[5\]"),
    ("train", _dup_category_name, r"category name '.+' is used by categories\[4\] .* and categories\[5\]"),
])
def test_merged_files_duplicates_are_data_errors(split, change, expect, coco_sample, tmp_path):
    root = copy_sample(coco_sample, tmp_path)
    path = merged(root, split, change)
    with pytest.raises(data.DataError) as err:
        build(root, tmp_path / "out")
    line = next(x for x in str(err.value).splitlines() if str(path) in x)
    assert re.search(expect, line), line
    assert not (tmp_path / "out" / "data.json").exists()


@pytest.mark.parametrize("by", ["id", "file_name"])
def test_image_in_both_train_and_val_is_a_data_error(by, coco_sample, tmp_path):
    root = copy_sample(coco_sample, tmp_path)
    train_image = raw(root, "train")["images"][0]
    d = raw(root, "test")
    val_image = d["images"][used_image(d)]
    if by == "id":
        for a in d["annotations"]:
            if a["image_id"] == val_image["id"]:
                a["image_id"] = train_image["id"]
    val_image[by] = train_image[by]
    write(root, "test", d)
    with pytest.raises(data.DataError) as err:
        build(root, tmp_path / "out")
    msg = str(err.value)
    assert "1 image of" in msg and "instances_val2017.json also in" in msg and "instances_train2017.json" in msg
    assert str(train_image[by]) in msg and "copies of training crops" in msg


def test_every_problem_of_both_files_is_listed_at_once(coco_sample, tmp_path):
    root = copy_sample(coco_sample, tmp_path)
    merged(root, "test", _dup_image_id)
    merged(root, "train", _dup_annotation_id)
    with pytest.raises(data.DataError) as err:
        build(root, tmp_path / "out")
    msg = str(err.value)
    assert msg.startswith("2 problems in the COCO annotation files")
    assert "instances_val2017.json: image id" in msg and "instances_train2017.json: annotation id" in msg


@pytest.mark.parametrize("how", ["no annotation of the classes", "no images"])
def test_empty_test_split_is_a_data_error(how, coco_sample, tmp_path):
    root = copy_sample(coco_sample, tmp_path)
    d = raw(root, "test")
    ids = {c["id"] for c in d["categories"] if c["name"] in TWO}
    if how == "no images":
        d["images"], d["annotations"] = [], []
    else:
        d["annotations"] = [a for a in d["annotations"] if a["category_id"] not in ids]
    write(root, "test", d)
    with pytest.raises(data.DataError, match="the test split is empty: no test sample of the classes 'person', 'car'"):
        build(root, tmp_path / "out")
    assert not (tmp_path / "out" / "data.json").exists()


def test_checks_name_the_record_without_bare_errors_on_any_field(coco_sample, tmp_path):
    """Every required field of every list, deleted in turn: never a bare KeyError or TypeError."""
    root = copy_sample(coco_sample, tmp_path)
    d = raw(root, "test")
    path = root / "annotations" / SPLIT_FILE["test"]
    fields = {"images": ("id", "file_name", "width", "height"),
              "annotations": ("id", "image_id", "category_id", "bbox"), "categories": ("id", "name")}
    for lst, keys in fields.items():
        for key in keys:
            changed = json.loads(json.dumps(d))
            del changed[lst][0][key]
            found = coco.lint(changed, path, max_bad_fraction=0.01)
            named = found.errors or [f"{e['record']} {e['problem']}" for e in found.examples]
            assert any(f"{lst}[0]" in x and key in x for x in named), (lst, key, named)


# --------------------------------------------------------------------------- results only for what was measured

def tiny(n: int = 80, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
            torch.randint(0, 3, (n,), generator=g))


def linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))


def test_evaluating_an_empty_set_is_an_error_not_zero():
    x, y = tiny()
    with pytest.raises(train.EmptySetError, match="empty set"):
        train.evaluate(linear(), x[:0], y[:0])


@pytest.mark.parametrize("poison,what", [(float("nan"), "not a finite number"), (1e7, "above 1000")])
def test_divergence_stops_training_at_its_step(poison, what, tmp_path):
    """50 steps per epoch; the weights are poisoned after optimizer step 63: the loss of step 64 is the
    first bad one. Training stops within DIVERGENCE_CHECK steps, before epoch 2 ends, and keeps
    nothing of epoch 2 (the checkpoint is epoch 1's)."""
    net, steps = linear(), []

    def on_step(step, model):
        steps.append(step)
        if step == 63:
            with torch.no_grad():
                w = model[1].weight
                w.copy_(torch.full_like(w, poison) if np.isnan(poison) else w * poison)

    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(train.DivergedError) as err:
        train.fit(net, tiny(400), tiny(20), epochs=3, batch_size=8, lr=1e-3, seed=0, log=lambda m: None,
                  on_step=on_step, checkpoint=ckpt, label="retrain", progress=False)
    assert err.value.step == 64 and "[retrain] diverged at step 64: the training batch's loss is" in str(err.value)
    assert what in str(err.value) and "lr=0.001" in str(err.value)
    assert 64 <= max(steps) <= 64 + train.DIVERGENCE_CHECK < 100   # stopped within epoch 2
    kept = torch.load(ckpt, weights_only=True)
    assert kept["epoch"] == 1 and kept["step"] == 50   # the last good state; nothing of the diverged epoch
    assert len(kept["history"]["steps"]) == 50 and all(np.isfinite(kept["history"]["steps"]))


def test_a_learning_rate_that_explodes_is_stopped():
    with pytest.raises(train.DivergedError, match=r"diverged at step \d+: .*lower the learning rate \(lr=10000 here\)"):
        train.fit(linear(), tiny(), tiny(20), epochs=2, batch_size=8, lr=1e4, seed=0, log=lambda m: None,
                  progress=False)


# --------------------------------------------------------------------------- whole runs

def tmp_home(tmp_path: Path) -> Path:
    """A project home whose data/ (embedded set, crop cache) is a temporary folder: the rest links
    to the checkout."""
    home = tmp_path / "home"
    home.mkdir()
    for name in ("notebooks", "params", "pyproject.toml", "requirements.lock"):
        (home / name).symlink_to(ROOT / name)
    return home


def results_figures(run_dir: Path) -> dict:
    res = json.loads((run_dir / "results.json").read_text())
    return {k: v for k, v in res.items() if isinstance(v, dict) and "test_accuracy" in v}


@pytest.mark.e2e
def test_diverging_run_stops_says_so_and_publishes_nothing(smoke_run, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([*CLI, "run", "-f", "params/smoke.yaml", "-p", "train.lr=1e4", "--run-dir", str(run_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    step = re.search(r"stage 'train' failed: DivergedError: \[train\] diverged at step (\d+): the (training batch's|"
                     r"test) loss", proc.stderr)
    assert step, proc.stderr
    page = re.search(r"the same as a web page: (\S+)", proc.stderr)   # the failed notebook, rendered
    assert page and f"diverged at step {step[1]}" in Path(page[1]).read_text()
    assert results_figures(run_dir) == {} and not (run_dir / "report.html").exists()
    assert not (paths.stage_dir(run_dir, "train") / paths.METRICS).exists()
    # compare refuses it: its analysis did not finish
    cmp = subprocess.run([*CLI, "compare", str(smoke_run[0]), str(run_dir), "-o", str(tmp_path / "c.html")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cmp.returncode == 2 and not (tmp_path / "c.html").exists()
    assert f"{run_dir} is not a finished run" in cmp.stderr and "Traceback" not in cmp.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("damage", ["no report.html", "no analysis record", "stale"])
def test_compare_refuses_a_run_whose_analysis_did_not_finish(damage, smoke_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(smoke_run[0], copy, ignore=shutil.ignore_patterns("*.pt", "*.npy", "notebooks"))
    record = paths.stage_record(copy, "analysis")
    if damage == "no report.html":
        (copy / paths.REPORT).unlink()
    elif damage == "no analysis record":
        record.unlink()
    else:
        rec = json.loads(record.read_text())
        record.write_text(json.dumps({**rec, "stale": "train was recomputed after it"}))
    assert cli.main(["compare", str(smoke_run[0]), str(copy), "-o", str(tmp_path / "c.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{copy} is not a finished run: its analysis did not finish" in err[0]
    assert {"no report.html": "no report.html", "no analysis record": "no analysis record",
            "stale": "train was recomputed"}[damage] in err[0]
    assert not (tmp_path / "c.html").exists()


@pytest.mark.e2e
def test_empty_test_split_from_another_folder_with_relative_paths_is_a_named_data_error(coco_sample, tmp_path):
    """Run from the COCO copy's parent folder, with relative data.root and --run-dir: the kernels (in
    notebooks/) get absolute paths; the val file holds no annotation of the classes: the data stage
    fails naming it, and nothing else runs or is published."""
    root = copy_sample(coco_sample, tmp_path)
    d = raw(root, "test")
    ids = {c["id"] for c in d["categories"] if c["name"] in TWO}
    d["annotations"] = [a for a in d["annotations"] if a["category_id"] not in ids]
    write(root, "test", d)
    env = {**os.environ, "PRUNESTUDY_HOME": str(tmp_home(tmp_path))}
    proc = subprocess.run([*CLI, "run", "-f", str(ROOT / "params" / "smoke.yaml"), "-p", "data.root=coco",
                           "-p", "data.classes=[person, car]", "--run-dir", "run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"run folder {tmp_path / 'run'} " in proc.stdout
    assert "stage 'data' failed: DataError: the test split is empty" in proc.stderr
    assert str(root / "annotations" / "instances_val2017.json") in proc.stderr   # resolved against the cwd
    assert "[2/5] train" not in proc.stdout and results_figures(tmp_path / "run") == {}
    assert json.loads((tmp_path / "run" / "params.json").read_text())["data"]["root"] == str(root)


def _interrupt(args: list[str], ready, delay: float, cwd: Path, env: dict) -> tuple[int, str]:
    """Start a run in its own process group, wait until ready(output so far) (the output is read as it
    comes: progress bars do not end their lines), wait `delay` s more, then Ctrl-C the whole group."""
    proc = subprocess.Popen([*CLI, "run", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=terminal_sigint)
    out, deadline = b"", time.time() + 300
    while not ready(out) and time.time() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            out += os.read(proc.stdout.fileno(), 65536)
    time.sleep(delay)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + out.decode()[-3000:]
    os.killpg(proc.pid, signal.SIGINT)   # what Ctrl-C in a terminal sends: runner, kernel and its workers alike
    rest, _ = proc.communicate(timeout=180)
    return proc.returncode, (out + rest).decode(errors="replace")


@pytest.mark.e2e
@pytest.mark.parametrize("where", ["generating the embedded data", "cropping"])
def test_ctrl_c_in_the_data_stage_shows_no_traceback(where, coco_sample, tmp_path):
    """Ctrl-C while the data stage's worker processes run (forked from the kernel to draw the embedded
    set; a forkserver pool to crop COCO images): one clean line, no traceback of a worker, the kernel
    or the notebook client."""
    home = tmp_home(tmp_path)
    env = {**os.environ, "PRUNESTUDY_HOME": str(home), "PRUNESTUDY_PROGRESS": "log", "PRUNESTUDY_SYNTH_WORKERS": "2"}
    args = ["-f", str(ROOT / "params" / "smoke.yaml"), "--run-dir", str(tmp_path / "run")]
    if where == "cropping":
        args += ["-p", f"data.root={copy_sample(coco_sample, tmp_path)}", "-p", "data.workers=2"]
        rc, out = _interrupt(args, lambda out: b"data train:" in out, 0.2, tmp_path, env)
    else:   # once the workers have drawn a few images of the embedded set
        args += ["-p", "data.embedded={seed: 11, train_images: 1000, val_images: 200}"]
        drawn = home / "data" / "embedded"
        rc, out = _interrupt(args, lambda out: len(list(drawn.glob(".*partial-*/train2017/*.jpg"))) >= 8, 0.3,
                             tmp_path, env)
    assert rc == 130, out[-3000:]
    assert "prunestudy: interrupted; finished stages are kept" in out
    assert not [n for n in NOISE if n in out], out[-4000:]
    assert not re.search(r'^\s+File "', out, re.M)   # no stack frame of any traceback

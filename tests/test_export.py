"""Runs that travel (issue 30): `prunestudy export RUN DEST` writes a self-contained copy of a run
folder (its stages as files, not links into the stage store), which reruns with nothing to do,
renders its report and compares without the store; a folder copied with `cp -r` (its links dangling)
says so, and how to fix it, in one line wherever a run folder is read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunestudy import atomic, cli, compare, config, execute, export, graph, paths, pipeline, stagestore, status

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "params" / "smoke.yaml")


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRUNESTUDY_HOME": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "prunestudy.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def fake_run(tmp_path: Path, name: str = "run") -> tuple[Path, Path]:
    """A run folder as the runner lays one out, by hand (no computation): params.json, data/ and
    train/ links into a store beside it (train/ holding a link to another entry, as retrain/control
    does), a notebook link into an entry, a curve point whose train/ links ../../train and whose
    data/ hard-links the data entry's files, store.json and run.lock. Returns (run, store)."""
    store, run = tmp_path / paths.STORE, tmp_path / name
    data, train, control = store / "data" / "d1", store / "train" / "t1", store / "control" / "c1"
    for folder in (data, train, control):
        folder.mkdir(parents=True)
    (data / paths.DATA_INFO).write_text('{"classes": ["a"]}')
    (data / paths.images("test")).write_bytes(b"x" * 5000)
    (train / paths.MODEL).write_bytes(b"w" * 3000)
    (train / paths.ENTRY_NOTEBOOK).write_text("{}")
    (control / paths.METRICS).write_text("{}")
    (train / paths.CONTROL).symlink_to(os.path.relpath(control, train))
    (store / "data" / ".d1.claim").write_text("1")
    old = time.time() - 86400
    for f in (data / paths.DATA_INFO, train / paths.MODEL):
        os.utime(f, (old, old))
    run.mkdir()
    atomic.write_json(run / paths.PARAMS, config.load(SMOKE, []))
    (run / paths.RESULTS).write_text("{}")
    stagestore.link(paths.stage_dir(run, "data"), data)
    stagestore.link(paths.stage_dir(run, "train"), train)
    stagestore.link(paths.executed_notebook(run, "train"), train / paths.ENTRY_NOTEBOOK)
    stagestore.record(run, store)
    (run / paths.LOCK).write_text("{}")
    point = paths.curve_point_dir(run, "l1_unstructured-0.5")
    pipeline.link_data(paths.stage_dir(run, "data"), paths.stage_dir(point, "data"))
    stagestore.link(paths.stage_dir(point, "train"), paths.stage_dir(run, "train"))
    return run, store


# --------------------------------------------------------------------------- export, by hand

def test_export_makes_the_store_links_files_keeps_inner_links_and_times(tmp_path):
    run, store = fake_run(tmp_path)
    done = export.export(run, tmp_path / "out")
    out = tmp_path / "out"
    model = paths.stage_dir(out, "train") / paths.MODEL
    assert not paths.stage_dir(out, "data").is_symlink() and not paths.stage_dir(out, "train").is_symlink()
    assert model.read_bytes() == b"w" * 3000
    assert model.stat().st_mtime_ns == (store / "train" / "t1" / paths.MODEL).stat().st_mtime_ns
    assert os.path.samefile(model, store / "train" / "t1" / paths.MODEL)   # same file system: a hard link
    assert (paths.stage_dir(out, "train") / paths.CONTROL / paths.METRICS).is_file()   # a link in an entry: followed
    assert not paths.executed_notebook(out, "train").is_symlink()
    point_train = paths.curve_point(out, "train", "l1_unstructured-0.5")
    assert point_train.is_symlink() and os.readlink(point_train) == "../../train"   # inside the run: a link
    assert os.path.samefile(paths.curve_point(out, "data", "l1_unstructured-0.5") / paths.DATA_INFO,
                            paths.stage_dir(out, "data") / paths.DATA_INFO)
    assert not (out / paths.STORE_RECORD).exists() and not (out / paths.LOCK).exists()
    assert not os.path.samefile(out / paths.PARAMS, run / paths.PARAMS)   # the run's own files: copied
    assert not [p for p in out.rglob("*") if p.is_symlink() and not p.resolve().is_relative_to(out.resolve())]
    assert not list(tmp_path.glob("out.partial-*"))
    assert done.files == 10 and done.copied == 2 and done.linked == 8, done   # copied: params, results


def test_export_copy_copies_every_file_with_its_time(tmp_path):
    run, store = fake_run(tmp_path)
    done = export.export(run, tmp_path / "out", copy=True)
    model = paths.stage_dir(tmp_path / "out", "train") / paths.MODEL
    assert not os.path.samefile(model, store / "train" / "t1" / paths.MODEL)
    assert model.stat().st_mtime_ns == (store / "train" / "t1" / paths.MODEL).stat().st_mtime_ns
    assert done.copied == 7 and done.linked == 3   # the curve point's data/: linked to the copies, as in the run


def test_an_interrupted_export_leaves_nothing_at_dest(tmp_path, monkeypatch):
    run, _ = fake_run(tmp_path)
    calls = []

    def failing(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return shutil.copyfile(src, dst)
    monkeypatch.setattr(export.shutil, "copy2", failing)
    assert cli.main(["export", str(run), str(tmp_path / "out"), "--copy"]) == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial-*"))


@pytest.mark.parametrize("case", ["exists", "inside-run", "inside-store", "not-a-run", "sweep", "dangling"])
def test_export_refuses_bad_input_in_one_line(tmp_path, capsys, case):
    run, store = fake_run(tmp_path)
    dest = {"exists": tmp_path / "there", "inside-run": run / "copy", "inside-store": store / "data" / "copy"}.get(
        case, tmp_path / "out")
    if case == "exists":
        dest.mkdir()
    if case == "not-a-run":
        (run / paths.PARAMS).unlink()
    if case == "sweep":
        (run / paths.PARAMS).unlink()
        (run / paths.SWEEP_GRID).write_text("{}")
    if case == "dangling":
        shutil.rmtree(store / "train")
    assert cli.main(["export", str(run), str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("prunestudy export: ")
    assert {"exists": "exists", "inside-run": "inside the run folder", "inside-store": "inside the stage store",
            "not-a-run": "is not a run folder", "sweep": "points/<point>",
            "dangling": "which does not exist"}[case] in err
    assert not list(tmp_path.rglob("*.partial-*")) and (case == "exists") == dest.exists()


# --------------------------------------------------------------------------- a folder copied without its store

def copied_without_store(tmp_path: Path) -> Path:
    """`cp -a run elsewhere/copy`: the links copied as they are, leading nowhere."""
    run, _ = fake_run(tmp_path / "here")
    (tmp_path / "elsewhere").mkdir()
    copy = tmp_path / "elsewhere" / "copy"
    subprocess.run(["cp", "-a", str(run), str(copy)], check=True)
    return copy


def test_a_dangling_stage_link_says_what_happened_and_how_to_fix_it_in_one_line(tmp_path):
    copy = copied_without_store(tmp_path)
    line = paths.dangling(copy / "train")
    assert "\n" not in line
    assert line.startswith(f"{copy / 'train'} links to ../.store/train/t1, which does not exist: the run folder was "
                           "copied or moved without its stage store (cp -r copies the links, not the stages)")
    assert "`prunestudy export SRC DEST`" in line
    assert f"`prunestudy run -f {copy / paths.PARAMS} --run-dir {copy}`" in line
    point = paths.curve_point(copy, "train", "l1_unstructured-0.5")   # a link to ../../train: resolves to nothing
    assert f"--run-dir {copy}`" in paths.dangling(point)   # a curve point's: its run is rerun
    assert paths.dangling(copy / paths.PARAMS) is None and paths.dangling(copy / "nothing") is None
    assert paths.dangling_stage(copy) == paths.dangling(copy / "data")
    with pytest.raises(FileNotFoundError) as e:   # the stage loaders (the notebooks, the report)
        paths.require("train", copy / "train")
    assert str(e.value) == line


def test_a_link_to_a_quarantined_entry_says_where_it_went(tmp_path):
    run, store = fake_run(tmp_path)
    where = stagestore.quarantine(store / "train" / "t1", "output model.pt is not the bytes the stage wrote")
    line = paths.dangling(run / "train")
    assert line == (f"{run / 'train'} links to ../.store/train/t1, which was moved to {where} (its files were not "
                    f"the bytes its stage wrote): rerun `prunestudy run -f {run / paths.PARAMS} --run-dir {run}` to "
                    "compute it again")
    assert f"which was moved to {where} " in paths.dangling(paths.executed_notebook(run, "train"))


def test_compare_and_status_on_a_folder_copied_without_its_store_say_so(tmp_path):
    copy = copied_without_store(tmp_path)
    with pytest.raises(compare.CompareError) as e:
        compare.load_run(copy)
    assert str(e.value) == paths.dangling(copy / "data")
    found = status.status(copy)
    data = next(x for x in found["stages"] if x["stage"] == "data" and x["where"] == ".")
    assert data["state"] == status.COMPUTE and data["reason"] == paths.dangling(copy / "data")


def test_the_runner_says_once_why_it_computes_a_dangling_stage_again(tmp_path, monkeypatch):
    copy = copied_without_store(tmp_path)
    cfg = atomic.read_json(copy / paths.PARAMS)
    computed, log, why = [], [], paths.dangling(copy / "data", fix=False)
    monkeypatch.setattr(execute, "execute_stage", lambda cfg, run_dir, stage, key, **kw: computed.append(stage) or 1.0)
    chain = pipeline._Chain("k", (), log.append, invalidate=paths.stage_record(copy, "analysis"),
                            store=stagestore.Store(tmp_path / "elsewhere" / paths.STORE), root=copy)
    folder = pipeline._Folder("study", "", cfg, copy, ("data", "train"), graph.chain_keys(cfg), {}, lambda: {})
    assert chain.step(folder, 0)["status"] == "ran"
    assert computed == ["data"] and not paths.stage_dir(copy, "data").is_symlink()   # the link went first
    said = [m for m in log if "which does not exist" in m]
    assert len(said) == 1, log
    assert said[0] == f"==> [1/5] data: {why}: it is computed again, and every stage after it"


# --------------------------------------------------------------------------- the smoke run, exported

@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory):
    """The smoke run and its store copied, exported twice (hard links, then --copy), and the copied
    store deleted: (the copy without its store, the export, the --copy export, the export's output)."""
    run, _ = smoke_run
    base = tmp_path_factory.mktemp("export")
    shutil.copytree(run.parent, base / "orig", symlinks=True)
    started = time.perf_counter()
    out = _cli("export", str(base / "orig" / "run"), str(base / "exported"))
    assert out.returncode == 0, out.stderr
    print(f"export (hard links) {time.perf_counter() - started:.2f} s: {out.stdout.strip()}")
    model = paths.stage_dir(base / "exported", "retrain") / paths.MODEL
    assert os.path.samefile(model, paths.stage_dir(base / "orig" / "run", "retrain") / paths.MODEL)
    assert cli.main(["export", str(base / "orig" / "run"), str(base / "copied"), "--copy"]) == 0
    assert not os.path.samefile(paths.stage_dir(base / "copied", "retrain") / paths.MODEL, model)
    shutil.rmtree(base / "orig" / paths.STORE)
    return base / "orig" / "run", base / "exported", base / "copied", out


@pytest.mark.e2e
def test_an_exported_run_is_complete_without_its_store(exported):
    orig, dest, copied, out = exported
    assert out.stdout.startswith(f"prunestudy export: {orig} -> {dest}: ") and " hard-linked, " in out.stdout
    assert not [p for p in dest.rglob("*") if p.is_symlink() and not p.exists()]
    assert not (dest / paths.STORE_RECORD).exists()
    rerun = _cli("run", "-f", str(dest / paths.PARAMS), "--run-dir", str(dest))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "==> nothing to do: every stage is up to date" in rerun.stdout, rerun.stdout
    assert ": start (" not in rerun.stdout
    last = rerun.stdout.strip().splitlines()[-2:]   # its stages are its own files; then where the report is
    assert last == [f"prunestudy: every stage is in the run folder {dest} (it links nothing in a stage store)",
                    f"prunestudy: report {dest / paths.REPORT}"], last
    assert status.status(copied)["stale"] == 0
    page = execute.render_report(dest, atomic.read_json(dest / paths.PARAMS))
    assert page == dest / paths.REPORT and page.stat().st_size > 10_000
    both = _cli("compare", str(dest), str(copied), "-o", str(dest.parent / "compare.html"))
    assert both.returncode == 0, both.stderr


@pytest.mark.e2e
def test_the_copy_without_its_store_says_so_where_it_is_read(exported):
    orig, dest, _, _ = exported
    gone = _cli("compare", str(orig), str(dest), "-o", str(orig.parent / "compare.html"))
    assert gone.returncode == 2
    assert gone.stderr.strip() == f"prunestudy compare: {paths.dangling(orig / 'data')}"
    st = _cli("status", str(orig))
    assert st.returncode == 1 and paths.dangling(orig / "train") in st.stdout

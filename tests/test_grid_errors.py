"""The grid's errors as `run`'s (issue 30, item 6): equal values written differently are one grid
value, `-p key=null` clears a key before the grid checks it, the plan of a large grid is arithmetic
(keys once per distinct stage parameters), and the sweep's signals, engines and paths fail in one
line."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from prunestudy import cli, config, graph, grid, stagestore

SMALL = ROOT / "params" / "grid-small.yaml"
SMOKE = ROOT / "params" / "smoke.yaml"
CLI = [sys.executable, "-m", "prunestudy.cli"]


# --- equal values written differently -------------------------------------------------------------
@pytest.mark.parametrize("values", ["prune.amount=0.5,5e-1", "train.lr=1,1.0", "prune.amount=0.50,0.5"])
def test_equal_values_written_differently_are_refused(values):
    with pytest.raises(config.ParamsError) as e:
        grid.points(SMALL, [], [values])
    key = values.split("=")[0]
    assert len(e.value.problems) == 1 and key in e.value.problems[0] and "twice" in e.value.problems[0]


def test_equal_values_exit_2_naming_key_and_values(tmp_path, capsys):
    rc = cli.main(["sweep", "-f", str(SMALL), "-g", "prune.amount=0.5,5e-1,0.50", "--dry-run",
                   "--sweep-dir", str(tmp_path / "sw"), "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert rc == 2
    problem = [line for line in err.splitlines() if "prune.amount" in line]
    assert len(problem) == 1 and "0.5 and 5e-1 and 0.50" in problem[0]   # as written


def test_dict_values_equal_after_merging_are_refused(tmp_path):
    """data.embedded merges key-wise into the file's: {seed: 0} is the file's value written short."""
    with pytest.raises(config.ParamsError, match="data.embedded lists one value twice"):
        grid.points(SMALL, [], ["data.embedded=[{seed: 0}, {seed: 0, train_images: 40}]"])


def test_every_point_has_its_own_parameters():
    pts = grid.points(SMALL, [], ["prune.amount=0.25,0.5"])
    assert len({config.stage_hash(p.cfg) for p in pts}) == len(pts)


# --- -p key=null --------------------------------------------------------------------------------
def test_null_override_clears_a_runner_key(tmp_path, capsys):
    args = ["sweep", "-f", str(SMOKE), "--dry-run", "--sweep-dir", str(tmp_path / "sw"), "--store",
            str(tmp_path / "store")]
    assert cli.main(args) == 2   # smoke.yaml has prune.amounts: a run's curve, not a grid's
    assert "-p prune.amounts=null" in capsys.readouterr().err
    assert cli.main([*args, "-p", "prune.amounts=null"]) == 0
    assert "1 points" in capsys.readouterr().out


def test_override_of_a_dict_parameter_merges_with_the_file():
    (p,) = grid.points(SMOKE, ["prune.amounts=null", "data.embedded={seed: 3}"])
    assert p.cfg["data"]["embedded"]["seed"] == 3 and p.cfg["data"]["embedded"]["train_images"] == 40


# --- the plan is arithmetic ---------------------------------------------------------------------
def test_keys_computed_once_per_distinct_stage_parameters(monkeypatch):
    calls: dict[str, int] = {}
    real = graph.key

    def counted(name, *args, **kw):
        calls[name] = calls.get(name, 0) + 1
        return real(name, *args, **kw)

    monkeypatch.setattr(graph, "key", counted)
    pts = grid.points(SMALL, [], ["prune.amount=0.1,0.2,0.3,0.4,0.5", "seed=0,1,2"])   # 2 methods: 30 points
    assert len(pts) == 30
    assert calls == {"data": 3, "train": 3, "control": 3, "prune": 30, "retrain": 30, "analysis": 30}
    monkeypatch.setattr(graph, "key", real)
    for p in pts:   # the memo gives what each point's own computation gives
        assert p.keys == graph.all_keys(p.cfg)


def test_the_plan_process_does_not_import_pytorch(tmp_path):
    """A dry run (and a grid refused for a check only a traced model answers) leaves PyTorch out of
    the plan's process: the checks that need it are asked of a child once, then read from the cache."""
    script = """if True:
        import json, sys
        from prunestudy import cli, config, torchchecks
        runs = []
        for grid in (["-g", "prune.amount=0.2,0.5", "-g", "seed=0,1,2"],
                     ["-g", "train.model=resnet18", "-g", "prune.targets=linear", "-g", "prune.method=channel"]):
            rc = cli.main(["sweep", "-f", sys.argv[1], "-p", "prune.amounts=null", *grid, "--dry-run",
                           "--sweep-dir", sys.argv[2], "--store", sys.argv[3]])
            runs.append(rc)
        imported = sorted(m for m in ("torch", "torchvision", "torch_pruning") if m in sys.modules)
        cached = (config.cache_root() / "checks" / f"{torchchecks.digest()}.json").is_file()
        print(json.dumps({"rc": runs, "imported": imported, "cached": cached}))
    """
    env = {**os.environ, config.CACHE_ENV: str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", script, str(SMOKE), str(tmp_path / "sw"), str(tmp_path / "store")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"rc": [0, 2], "imported": [], "cached": True}, got
    assert "prune.method 'channel' cannot apply to resnet18 with prune.targets='linear'" in proc.stderr


def test_a_problem_of_two_grid_keys_together_is_found_at_its_points_only():
    """Grid keys that a check reads together are checked together (config.READ_TOGETHER); apart,
    fp16 and cpu are each valid."""
    with pytest.raises(config.ParamsError) as e:
        grid.points(SMALL, [], ["train.precision=fp16,fp32", "train.device=cpu,cuda", "seed=0",
                                "prune.method=l1_unstructured", "prune.amount=0.5"])
    (problem,) = e.value.problems
    assert "train.precision=fp16, train.device=cpu: train.precision fp16 is refused on the CPU" in problem
    assert config.read_together(["seed", "train.device", "prune.amount", "train.precision", "train.model",
                                 "data.image_size"]) == [(0,), (1, 3), (2, 4, 5)]


def test_points_share_the_sections_they_do_not_change():
    a, b = grid.points(SMALL, [], ["prune.amount=0.25,0.5", "seed=0", "prune.method=l1_unstructured"])
    assert a.cfg["data"] is b.cfg["data"] and a.cfg["train"] is b.cfg["train"]
    assert a.cfg["prune"] is not b.cfg["prune"] and (a.cfg["prune"]["amount"], b.cfg["prune"]["amount"]) == (0.25, 0.5)


def test_streamed_hash_of_a_list_is_the_hash_of_the_list():
    items = [{"b": [1, 2.5], "a": None}, {"c": "x"}, {}]
    assert config.stage_hash_of_list(iter(items)) == config.stage_hash(items)
    assert config.stage_hash_of_list([]) == config.stage_hash([])


# --- SIGTERM behaves like Ctrl-C ----------------------------------------------------------------
def _living(group: int) -> list[str]:
    ps = subprocess.run(["ps", "-o", "stat=,args=", "-g", str(group)], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if line.strip() and not line.strip().startswith("Z")]


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["sweep", "run"])
def test_sigterm_is_a_ctrl_c(command, tmp_path):
    """SIGTERM to the driver alone while a stage computes: exit 143, one line, no stack, no claim held,
    no worker or kernel left."""
    store = tmp_path / "store"
    args = (["sweep", "-f", str(SMALL), "-g", "seed=0", "-g", "prune.method=l1_unstructured", "-g",
             "prune.amount=0.5", "--jobs", "1", "--sweep-dir", str(tmp_path / "sw")] if command == "sweep"
            else ["run", "-f", str(SMOKE), "-p", "prune.amounts=null", "--run-dir", str(tmp_path / "run")])
    proc = subprocess.Popen([*CLI, *args, "--store", str(store)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and \
            not any(stagestore.held(c) for c in store.rglob("*.claim")):
        time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-2000:] + err[-3000:]
    assert "Traceback" not in out + err and "terminated (SIGTERM)" in err, err[-3000:]
    assert len([line for line in err.splitlines() if line.startswith("prunestudy:")]) == 1, err
    assert not any(stagestore.held(c) for c in store.rglob("*.claim"))
    deadline = time.time() + 15
    while time.time() < deadline and _living(proc.pid):
        time.sleep(0.5)
    assert _living(proc.pid) == []


# --- SIGKILL of the driver ---------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process, None when it is gone."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], fields[19]


def _descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every process below `pid`, read from /proc's children lists."""
    found, todo = {}, [pid]
    while todo:
        for task in glob.glob(f"/proc/{todo.pop()}/task/*/children"):
            with contextlib.suppress(OSError):
                for child in map(int, open(task).read().split()):
                    with contextlib.suppress(OSError):
                        found[child] = open(f"/proc/{child}/cmdline").read().replace("\0", " ")
                    todo.append(child)
    return found


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the processes in Linux's /proc")
def test_sigkill_of_the_driver_ends_its_workers_and_kernels(tmp_path):
    """`kill -9` of a sweep's driver while its two pool workers and their kernels run: none of them
    is left after 10 s (prunestudy.lifeline: PR_SET_PDEATHSIG; before, they computed on for minutes)."""
    args = ["sweep", "-f", str(SMALL), "-g", "seed=0", "-g", "prune.method=l1_unstructured", "-g", "prune.amount=0.5",
            "--jobs", "2", "--sweep-dir", str(tmp_path / "sw"), "--store", str(tmp_path / "store")]
    proc = subprocess.Popen([*CLI, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen: dict[int, tuple] = {}   # pid: (command line, start time), to kill leftovers and not a reused pid
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            for pid, cmd in _descendants(proc.pid).items():
                if pid not in seen and (st := _stat(pid)):
                    seen[pid] = (cmd, st[1])
            workers = [p for p, (cmd, _) in seen.items() if "multiprocessing" in cmd and _stat(p)]
            kernels = [p for p, (cmd, _) in seen.items() if "ipykernel" in cmd and _stat(p)]
            if len(workers) >= 2 and kernels:
                break
            time.sleep(0.2)
        assert proc.poll() is None and len(workers) >= 2 and kernels, (seen, proc.poll())
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.time()
        proc.wait(timeout=10)

        def alive() -> list[str]:
            return [cmd for p, (cmd, start) in seen.items() if (st := _stat(p)) and st == (st[0], start)
                    and st[0] not in "ZX"]

        while alive() and time.time() < killed + 10:
            time.sleep(0.1)
        print(f"every worker and kernel gone {time.time() - killed:.2f} s after the SIGKILL")
        assert alive() == []
    finally:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid, (_, start) in seen.items():   # never outlive the test, whatever failed
            if (st := _stat(pid)) and st[1] == start:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)


TIED = """
import os, subprocess, sys, time
from prunestudy import lifeline
if sys.argv[1] == "middle":   # start the tied child, say its pid, wait to be killed
    child = subprocess.Popen([sys.executable, "-c", sys.argv[2], "child", sys.argv[3]])
    print(child.pid, flush=True)
    time.sleep(60)
else:
    if sys.argv[2] == "watchdog":
        lifeline._prctl_deathsig = lambda sig: False
    print(lifeline.tie_to_parent(os.getppid()), flush=True)
    time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the processes in Linux's /proc")
@pytest.mark.parametrize("how", ["prctl", "watchdog"])
def test_a_tied_process_dies_with_its_parent(how):
    """prctl(PR_SET_PDEATHSIG) where Linux has it; else a thread polling getppid() (forced here)."""
    middle = subprocess.Popen([sys.executable, "-c", TIED, "middle", TIED, how], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        child = int(middle.stdout.readline())
        time.sleep(0.5)   # the child has tied itself (its "prctl"/"watchdog" line goes to the same pipe)
        assert middle.stdout.readline().strip() == how
        middle.kill()
        middle.wait()
        deadline = time.time() + 5
        while _stat(child) and _stat(child)[0] not in "ZX" and time.time() < deadline:
            time.sleep(0.05)
        assert not _stat(child) or _stat(child)[0] in "ZX"
    finally:
        with contextlib.suppress(OSError):
            os.killpg(middle.pid, signal.SIGKILL)


def test_a_process_whose_parent_died_before_it_tied_itself_ends_at_once():
    proc = subprocess.run([sys.executable, "-c", "from prunestudy import lifeline; lifeline.tie_to_parent(1)"],
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL


# --- an unreachable Ray cluster -----------------------------------------------------------------
def test_unreachable_ray_address_fails_within_30_s(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed")
    started = time.time()
    proc = subprocess.run([*CLI, "sweep", "-f", str(SMALL), "-g", "seed=0", "-g", "prune.method=l1_unstructured",
                           "-g", "prune.amount=0.5", "--engine", "ray", "--address", "127.0.0.1:1", "--sweep-dir",
                           str(tmp_path / "sw"), "--store", str(tmp_path / "store")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert time.time() - started < 30
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1:1" in lines[0] and "Traceback" not in proc.stderr, proc.stderr


# --- a full disk, a store that cannot be written --------------------------------------------------
ONE_POINT = ["-g", "seed=0", "-g", "prune.method=l1_unstructured", "-g", "prune.amount=0.5"]


@contextlib.contextmanager
def tmpfs(folder, options: str):
    """A small tmpfs at `folder` for the test (root only): a real full or read-only disk."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'}): these tests need root "
                    "where mounting is allowed (a container without CAP_SYS_ADMIN refuses it)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a sweep that failed for its file system says (stderr, progress bars aside)."""
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.startswith("prunestudy")]
    assert len(said) == 1, proc.stderr[-3000:]
    return said[0]


@pytest.mark.parametrize("case", ["full (local)", "full (ray)", "read-only", "under a file"])
def test_a_store_that_cannot_be_prepared_is_one_line_and_exit_2(case, tmp_path):
    """The sweep's preparation (its points' folders, their links into the store) on a full disk (no
    inode left), a read-only disk, or a store path under a file: exit 2, one line naming the path."""
    mount = tmp_path / "mnt"
    options = {"read-only": "ro,size=64k", "under a file": None}.get(case, "size=64k,nr_inodes=2")
    with contextlib.ExitStack() as stack:
        if options:
            stack.enter_context(tmpfs(mount, options))
            store = mount / "store" if case == "read-only" else mount
        else:
            (tmp_path / "afile").write_text("a file, not a folder")
            store = tmp_path / "afile" / "store"
        engine = ["--engine", "ray"] if case.endswith("(ray)") else ["--jobs", "1"]
        proc = subprocess.run([*CLI, "sweep", "-f", str(SMALL), *ONE_POINT, *engine, "--sweep-dir",
                               str(tmp_path / "sw"), "--store", str(store)], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = one_line(proc)
    why = {"read-only": "(Read-only file system)", "under a file": "(a part of it is a file, not a folder)"}
    assert str(store) in line and why.get(case, "the disk is full") in line, line
    assert ("free some space" if case.startswith("full") else "fix its permissions") in line, line


@pytest.mark.e2e
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_full_disk_in_a_stage_is_one_line_and_stops_the_sweep(engine, tmp_path):
    """A stage that fills the store's disk, in a worker of the pool (the training's torch.save:
    "[enforce fail at inline_container.cc] unexpected pos", no errno, no file) or of Ray (the data
    stage, papermill saving its notebook: ENOSPC): exit 1, one line naming the stage's folder in the
    store and saying to free space; no traceback; no later stage started, no grid report."""
    if engine == "ray":
        pytest.importorskip("ray", reason="Ray is not installed")
    size = "20m" if engine == "local" else "300k"   # 20 MB hold the data stage (4 MB), not the model (34 MB)
    with tmpfs(tmp_path / "store", f"size={size}") as store:
        args = ["--jobs", "1"] if engine == "local" else ["--engine", "ray"]
        proc = subprocess.run([*CLI, "sweep", "-f", str(SMALL), *ONE_POINT, *args, "--sweep-dir", str(tmp_path / "sw"),
                               "--store", str(store)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
        line = one_line(proc)
        stage = "train" if engine == "local" else "data"
        entry = next(e for e in (store / stage).iterdir() if e.is_dir())
        assert f"the disk is full: {entry} could not be written" in line and "free some space" in line, line
        assert re.findall(r"\] (\w+): start", proc.stdout) == (["data", "train"] if engine == "local" else ["data"])
        assert not (tmp_path / "sw" / "sweep.html").exists()

"""One kernel per process, reset between its notebooks (prunestudy.kernels): each notebook sees what
a fresh kernel would show it, a kernel is replaced when what it read at its start changed or when it
died, and a study computed that way is bit for bit the study computed with a kernel per notebook."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from prunestudy import execute, kernels

ROOT = Path(__file__).resolve().parents[1]


def _notebook(path: Path, *sources: str) -> Path:
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources]), path)
    return path


def _execute(src: Path, out: Path, **kw):
    kernels.execute_notebook(src, out, kernel_name=execute.ensure_kernel(), **kw)
    return nbformat.read(out, as_version=4)


def _output(nb, i: int = -1) -> str:
    return "".join(o.get("text", "") for o in nb.cells[i].outputs)


def test_a_reused_kernel_shows_each_notebook_a_fresh_namespace(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESTUDY_PROBE", "first")
    kernels.shutdown()
    before = kernels.starts
    try:
        a = _notebook(tmp_path / "a.ipynb", "import os, matplotlib.pyplot as plt\nleft_behind = 41\nfig = plt.figure()",
                      # a cycle: only the collector frees it
                      "import sys, weakref\nclass Held: pass\nheld = Held()\nheld.me = held\n"
                      "sys.probe = weakref.ref(held)\nheld",
                      "print(os.environ['PRUNESTUDY_PROBE'], os.getpid())")
        first = _execute(a, tmp_path / "a.out.ipynb")
        pid = _output(first).split()[1]
        assert _output(first).split()[0] == "first"
        monkeypatch.setenv("PRUNESTUDY_PROBE", "second")   # read at call time: set before each notebook
        b = _notebook(tmp_path / "b.ipynb", "import os, matplotlib.pyplot as plt",
                      "print(os.environ['PRUNESTUDY_PROBE'], os.getpid(), len(plt.get_fignums()))",
                      "print('left_behind' in dir())", "import sys\nprint(sys.probe() is None)",
                      # made after the reset froze what survived it (kernels._reset): still collected
                      "import sys, weakref\nclass Again: pass\nagain = Again()\nagain.me = again\n"
                      "sys.probe = weakref.ref(again)")
        second = _execute(b, tmp_path / "b.out.ipynb")
        assert _output(second, 1).split() == ["second", pid, "0"]   # the same process; no figure left open
        assert _output(second, 2).strip() == "False"                 # no name of the notebook before
        assert _output(second, 3).strip() == "True"                  # what it held (its output too) is freed
        assert [c.execution_count for c in second.cells] == [1, 2, 3, 4, 5]   # numbered as in a fresh kernel
        assert kernels.starts == before + 1
        monkeypatch.delenv("PRUNESTUDY_PROBE")
        c = _notebook(tmp_path / "c.ipynb", "import os\nprint('PRUNESTUDY_PROBE' in os.environ)",
                      "import sys, gc\nprint(sys.probe() is None, gc.get_freeze_count() > 0)")
        third = _execute(c, tmp_path / "c.out.ipynb")
        assert _output(third, 0).strip() == "False"   # an unset one is unset there
        assert _output(third, 1).split() == ["True", "True"]   # the second notebook's cycle is freed too

        # a variable read only when a kernel starts: a new kernel, the old one stopped
        monkeypatch.setenv("OMP_NUM_THREADS", "1" if os.environ.get("OMP_NUM_THREADS") != "1" else "2")
        d = _notebook(tmp_path / "d.ipynb", "import os\nprint(os.environ['OMP_NUM_THREADS'], os.getpid())")
        threads, new_pid = _output(_execute(d, tmp_path / "d.out.ipynb")).split()
        assert threads == os.environ["OMP_NUM_THREADS"] and new_pid != pid
        assert kernels.starts == before + 2
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()

        # a kernel that died (killed by the OOM killer, say) is replaced
        os.kill(int(new_pid), 9)
        e = _notebook(tmp_path / "e.ipynb", "import os\nprint(os.getpid())")
        assert _output(_execute(e, tmp_path / "e.out.ipynb")).strip() not in (pid, new_pid)
        assert kernels.starts == before + 3
    finally:
        kernels.shutdown()


def test_a_reset_or_warmed_kernel_starts_worker_processes_as_a_fresh_one(tmp_path):
    """IPython's reset deletes __main__.__spec__, which multiprocessing's spawn reads (the data
    stage's crop workers): a reused kernel, and a sweep worker's kernel warmed before its first
    notebook, must start processes as a fresh kernel does."""
    kernels.shutdown()
    before = kernels.starts
    try:
        kernels.warm(execute.ensure_kernel(), kernels.notebook_cwd(tmp_path / "p.ipynb"), "import os")
        nb = _notebook(tmp_path / "p.ipynb", "from concurrent.futures import ProcessPoolExecutor\n"
                       "from multiprocessing import get_context\n"
                       "with ProcessPoolExecutor(1, mp_context=get_context('spawn')) as ex:\n"
                       "    print(list(ex.map(abs, [-1, -2])))",
                       "import sys\nprint([getattr(sys.modules['__main__'], a) for a in ('__spec__', '__package__')])")
        for i in range(2):   # after the warm-up's reset, then after the first notebook's
            out = _execute(nb, tmp_path / f"p{i}.out.ipynb")
            assert _output(out, 0).strip() == "[1, 2]" and _output(out, 1).strip() == "[None, None]"
        assert kernels.starts == before + 1   # the warmed kernel, reused
    finally:
        kernels.shutdown()


def test_run_here_runs_code_in_the_processs_kernel_or_says_it_did_not(tmp_path, monkeypatch):
    """kernels.run_here: False without a kernel (the caller computes in its own process); in a
    warm kernel, the code runs there, in the kernel's process, with the runner's PRUNESTUDY_*
    variables of the moment; False when the code fails there, and the kernel is still usable."""
    kernels.shutdown()
    out = tmp_path / "out.txt"
    write = f"import os\nopen({str(out)!r}, 'w').write(f\"{{os.getpid()}} {{os.environ['PRUNESTUDY_PROBE']}}\")"
    monkeypatch.setenv("PRUNESTUDY_PROBE", "no kernel")
    assert kernels.run_here(write, "a probe") is False and not out.exists()
    try:
        kernels.warm(execute.ensure_kernel(), str(tmp_path), "import os")
        monkeypatch.setenv("PRUNESTUDY_PROBE", "now")   # set after the kernel started: passed on
        assert kernels.run_here(write, "a probe") is True
        pid, probe = out.read_text().split()
        assert probe == "now" and int(pid) != os.getpid()
        assert kernels.run_here("raise ValueError('no')", "a failing probe") is False
        assert kernels.run_here(write, "a probe") is True and out.read_text().split()[0] == pid   # the same kernel
    finally:
        kernels.shutdown()
    assert kernels.run_here(write, "a probe") is False   # stopped: none left


@pytest.mark.parametrize("start", ["warmed", "first notebook", "fresh kernels"])
def test_a_kernel_keeps_its_history_in_memory_not_in_the_users_ipython_folder(tmp_path, monkeypatch, start):
    """Every stage's code went to ~/.ipython/profile_default/history.sqlite (nbclient keeps the
    history in memory only for kernelspecs named python or python3), and a sweep's kernels
    contended for that file's lock."""
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))   # read at the kernel's start: a new kernel
    kernels.shutdown()
    try:
        if start == "warmed":
            kernels.warm(execute.ensure_kernel(), kernels.notebook_cwd(tmp_path / "h.ipynb"), "import os")
        nb = _notebook(tmp_path / "h.ipynb", "x = 1", "print(get_ipython().history_manager.hist_file)")
        for i in range(2):
            out = _execute(nb, tmp_path / f"h{i}.out.ipynb", fresh=start == "fresh kernels")
            assert _output(out).strip() == ":memory:"
        assert not list((tmp_path / "ipython").rglob("history.sqlite"))
    finally:
        kernels.shutdown()


def test_a_new_client_of_a_reused_kernel_sees_every_output_of_its_first_request(tmp_path):
    """ReadyClient returns from wait_for_ready without jupyter_client's 0.2 s of IOPub silence, but
    only once IOPub is subscribed: the first code run by each new client gets all of its output."""
    from nbclient.util import run_sync

    kernels.shutdown()
    try:
        kernels.warm(execute.ensure_kernel(), str(tmp_path), "import os")
        km = kernels._km
        for i in range(15):
            kc = km.client()
            assert isinstance(kc, kernels.ReadyClient)
            kc.start_channels()
            try:
                run_sync(kc.wait_for_ready)(timeout=60)
                seen: list[str] = []

                def hook(m, seen=seen):
                    if m["msg_type"] == "stream":
                        seen.append(m["content"]["text"])
                reply = run_sync(kc.execute_interactive)(f"print('start {i}', flush=True)\nprint('end {i}')",
                                                         timeout=60, output_hook=hook)
            finally:
                kc.stop_channels()
            assert reply["content"]["status"] == "ok"
            assert "".join(seen).split() == ["start", str(i), "end", str(i)]
    finally:
        kernels.shutdown()


def test_ready_client_asks_again_while_iopub_misses_the_reply_and_skips_other_requests_messages():
    """The protocol of ReadyClient.wait_for_ready on scripted channels: a kernel_info whose IOPub
    `idle` never comes (the subscription was not connected) is asked again; a late reply or status
    of another request does not count; what IOPub holds at the end is taken without waiting."""
    import asyncio
    from queue import Empty

    class Channel:
        def __init__(self):
            self.queue, self.waits = [], []

        async def get_msg(self, timeout=None):
            self.waits.append(timeout)
            if not self.queue:
                raise Empty
            return self.queue.pop(0)

    def msg(parent, kind, **content):
        return {"parent_header": {"msg_id": parent}, "msg_type": kind, "content": content}

    class Scripted(kernels.ReadyClient):
        shell, iopub = Channel(), Channel()
        shell_channel = property(lambda self: self.shell)
        iopub_channel = property(lambda self: self.iopub)
        sent = 0

        def kernel_info(self):
            self.sent += 1
            mid = f"info-{self.sent}"
            if self.sent == 1:   # a late reply of an earlier request first; IOPub not subscribed yet
                self.shell.queue += [msg("old", "kernel_info_reply"), msg(mid, "kernel_info_reply")]
            else:                # subscribed: another request's idle, then this one's busy and idle
                self.shell.queue += [msg(mid, "kernel_info_reply")]
                self.iopub.queue += [msg("old", "status", execution_state="idle"),
                                     msg(mid, "status", execution_state="busy"),
                                     msg(mid, "status", execution_state="idle"),
                                     msg("later", "stream", text="queued")]
            return mid

        def _handle_kernel_info_reply(self, reply):
            self.accepted = reply["parent_header"]["msg_id"]

        async def _async_is_alive(self):
            return True

    client = Scripted()
    asyncio.run(client.wait_for_ready(timeout=10))
    assert client.sent == 2 and client.accepted == "info-2"
    assert client.iopub.queue == []                 # the queued message was taken
    assert client.iopub.waits[-2:] == [0, 0]        # ... without waiting for more


def test_a_notebook_that_reads_a_name_it_did_not_define_fails_as_in_jupyterlab(tmp_path):
    kernels.shutdown()
    try:
        _execute(_notebook(tmp_path / "a.ipynb", "shared = 1"), tmp_path / "a.out.ipynb")
        with pytest.raises(pm.PapermillExecutionError, match="NameError"):
            _execute(_notebook(tmp_path / "b.ipynb", "print(shared)"), tmp_path / "b.out.ipynb")
    finally:
        kernels.shutdown()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.e2e
def test_one_kernel_per_run_computes_what_a_kernel_per_notebook_computes(smoke_run, tmp_path):
    """The smoke study run with one kernel (the default) and with --fresh-kernels: the same weights
    byte for byte, the same accuracies and losses; the stage notebooks of both are numbered from 1.
    (The fresh run leaves out the smoke run's sweep points: they are more runs of the same notebooks.)"""
    warm, _ = smoke_run
    fresh = tmp_path / "fresh"
    proc = subprocess.run([sys.executable, "-m", "prunestudy.cli", "run", "-f", "params/smoke.yaml", "--run-dir",
                           str(fresh), "--store", "none", "--fresh-kernels", "-p", "prune.amounts=null"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for model in ("train/model.pt", "prune/model.pt", "retrain/model.pt", "retrain/control/model.pt"):
        assert _sha((warm / model).resolve()) == _sha(fresh / model), model
    a, b = (json.loads((d / "results.json").read_text()) for d in (warm, fresh))
    for state in ("train", "prune", "retrain", "control"):
        assert (a[state]["test_accuracy"], a[state]["test_loss"]) == (b[state]["test_accuracy"], b[state]["test_loss"])
    for run in (warm, fresh):
        for nb in sorted((run / "notebooks").glob("0*.ipynb")):
            counts = [c.execution_count for c in nbformat.read(nb, 4).cells if c.cell_type == "code"]
            assert counts == list(range(1, len(counts) + 1)), (nb, counts)


def test_notebooks_in_a_reused_kernel_leave_no_sockets_or_threads_behind(tmp_path):
    """nbclient stops its client's channels only when it owns the kernel manager: with the
    process's reused kernel every notebook left about 14 file descriptors (its client's sockets)
    and a heartbeat thread behind, and a process failed with "Too many open files" after 71
    notebooks at the common limit of 1,024 descriptors (1,425 at 20,000): a sweep's pool worker
    after some 24 points."""
    import threading

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    kernels.shutdown()
    try:
        nb = _notebook(tmp_path / "n.ipynb", "print(1)")
        for _ in range(3):   # the kernel started, its manager's sockets open
            _execute(nb, tmp_path / "n.out.ipynb")
        before, threads = fds(), threading.active_count()
        for _ in range(10):
            _execute(nb, tmp_path / "n.out.ipynb")
        assert fds() - before <= 2, (before, fds())
        assert threading.active_count() <= threads, (threads, threading.active_count())
        assert not kernels._open_clients
    finally:
        kernels.shutdown()

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

from prunestudy import kernels, pipeline

ROOT = Path(__file__).resolve().parents[1]


def _notebook(path: Path, *sources: str) -> Path:
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources]), path)
    return path


def _execute(src: Path, out: Path, **kw):
    kernels.execute_notebook(src, out, kernel_name=pipeline.ensure_kernel(), **kw)
    return nbformat.read(out, as_version=4)


def _output(nb, i: int = -1) -> str:
    return "".join(o.get("text", "") for o in nb.cells[i].outputs)


def test_a_reused_kernel_shows_each_notebook_a_fresh_namespace(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESTUDY_PROBE", "first")
    kernels.shutdown()
    before = kernels.starts
    try:
        a = _notebook(tmp_path / "a.ipynb", "import os, matplotlib.pyplot as plt\nleft_behind = 41\nfig = plt.figure()",
                      "import sys, weakref\nclass Held: pass\nheld = Held()\nsys.probe = weakref.ref(held)\nheld",
                      "print(os.environ['PRUNESTUDY_PROBE'], os.getpid())")
        first = _execute(a, tmp_path / "a.out.ipynb")
        pid = _output(first).split()[1]
        assert _output(first).split()[0] == "first"
        monkeypatch.setenv("PRUNESTUDY_PROBE", "second")   # read at call time: set before each notebook
        b = _notebook(tmp_path / "b.ipynb", "import os, matplotlib.pyplot as plt",
                      "print(os.environ['PRUNESTUDY_PROBE'], os.getpid(), len(plt.get_fignums()))",
                      "print('left_behind' in dir())", "import sys\nprint(sys.probe() is None)")
        second = _execute(b, tmp_path / "b.out.ipynb")
        assert _output(second, 1).split() == ["second", pid, "0"]   # the same process; no figure left open
        assert _output(second, 2).strip() == "False"                 # no name of the notebook before
        assert _output(second, 3).strip() == "True"                  # what it held (its output too) is freed
        assert [c.execution_count for c in second.cells] == [1, 2, 3, 4]   # numbered as in a fresh kernel
        assert kernels.starts == before + 1
        monkeypatch.delenv("PRUNESTUDY_PROBE")
        c = _notebook(tmp_path / "c.ipynb", "import os\nprint('PRUNESTUDY_PROBE' in os.environ)")
        assert _output(_execute(c, tmp_path / "c.out.ipynb")).strip() == "False"   # an unset one is unset there

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
        kernels.warm(pipeline.ensure_kernel(), kernels.notebook_cwd(tmp_path / "p.ipynb"), "import os")
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

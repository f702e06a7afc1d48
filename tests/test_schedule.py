"""The one scheduling loop (prunestudy.schedule) and its executors: the order it submits tasks in,
what it does with a task's error and with a worker that dies. The engines that use it (the runner,
`run --jobs`, the sweep) are tested end to end in test_pipeline, test_seeds and test_sweep."""

from __future__ import annotations

import os
import time

import pytest

from prunestudy import schedule


def graph(*edges: tuple[str, tuple[str, ...]]) -> dict[str, schedule.Task]:
    return {tid: schedule.Task(tid, tid.split(":")[0], tid, "p", deps) for tid, deps in edges}


def _record(tid: str, *upstream: dict) -> dict:
    """A task of the tests: its id, and the ids of the results it was given."""
    return {"id": tid, "stage": "s", "point": "p", "status": "ran", "got": [u["id"] for u in upstream],
            "pid": os.getpid(), "start": time.time(), "end": time.time()}


def test_inline_runs_one_task_at_a_time_in_the_graphs_order():
    """In this process (the runner), the first task of the graph whose inputs are done runs next:
    a study's chain before its points, which wait for its training, and the analysis last, with
    every input's result in the order of its inputs."""
    todo = graph(("data", ()), ("train", ("data",)), ("prune", ("train",)), ("point:prune", ("train",)),
                 ("seed:train", ("data",)), ("analysis", ("prune", "point:prune", "seed:train")))
    order = []

    def work(task):
        return (lambda *up: order.append(task.id) or _record(task.id, *up)),
    results, final = schedule.run(todo, schedule.Inline(), work, lambda m: None)
    assert order == list(todo) and final is None
    assert results["analysis"]["got"] == ["prune", "point:prune", "seed:train"]
    assert results["point:prune"]["got"] == ["train"]


def test_inline_raises_a_tasks_error_and_runs_nothing_after_it():
    todo = graph(("a", ()), ("b", ("a",)), ("c", ("b",)))
    ran = []

    def work(task):
        def fn(*up):
            ran.append(task.id)
            if task.id == "b":
                raise ValueError("b broke")
            return _record(task.id, *up)
        return (fn,)
    with pytest.raises(ValueError, match="b broke"):
        schedule.run(todo, schedule.Inline(), work, lambda m: None)
    assert ran == ["a", "b"]


def test_a_result_that_halts_starts_no_other_task_and_no_final():
    """A full disk (worker.run_task's `halt`): the tasks not started yet are skipped, even those that
    do not depend on it, and the final task (the grid report) does not run."""
    todo = graph(("a", ()), ("b", ()), ("c", ("a",)))
    ran = []

    def work(task):
        def fn(*up):
            ran.append(task.id)
            return {**_record(task.id, *up), "status": "failed", "halt": "the disk is full: /x"}
        return (fn,)
    results, final = schedule.run(todo, schedule.Inline(), work, lambda m: None, final=(lambda: "page",))
    assert ran == ["a"] and final is None
    assert {t: r["status"] for t, r in results.items()} == {"a": "failed", "b": "skipped", "c": "skipped"}
    assert results["b"]["because"] == "a"


DEATHS = """
import json, os, sys
from prunestudy import schedule

def record(tid, *upstream):
    return {"id": tid, "stage": "s", "point": "p", "status": "ran", "got": [u["id"] for u in upstream]}

def die_once(marker, tid, *upstream):   # kills its worker the first time (a SIGKILL, an OOM kill)
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    return record(tid, *upstream)

def die(tid, *upstream):
    os._exit(9)

if __name__ == "__main__":
    Task, logged = schedule.Task, []
    once, _ = schedule.run({"a": Task("a", "s", "a", "p", ()), "b": Task("b", "s", "b", "p", ("a",)),
                            "c": Task("c", "s", "c", "p", ())}, schedule.Pool(2),
                           lambda t: (die_once, sys.argv[1], t.id) if t.id == "b" else (record, t.id), logged.append)
    always, _ = schedule.run({"x": Task("x", "s", "x", "p", ()), "y": Task("y", "s", "y", "p", ("x",))},
                             schedule.Pool(1), lambda t: (die, t.id) if t.id == "x" else (record, t.id), print)
    print(json.dumps({"once": once, "always": always, "logged": logged}))
"""


def test_the_pool_submits_a_task_again_when_its_worker_dies(tmp_path):
    """A worker that dies breaks the pool: its tasks are submitted again to a new pool, at most
    RETRIES more times; a task that always kills its worker fails with how often, the tasks that
    do not need it still finish, and those after it get its failure as their input. (In a process
    of its own: pool workers that die abruptly are not for a test runner's worker to host.)"""
    import json
    import subprocess
    import sys

    script = tmp_path / "deaths.py"
    script.write_text(DEATHS)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "died")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    once, always = out["once"], out["always"]
    assert {r["status"] for r in once.values()} == {"ran"} and once["b"]["got"] == ["a"]
    assert any("b: its worker process died; trying again (1/3)" in m for m in out["logged"]), out["logged"]
    assert always["x"]["status"] == "failed"
    assert always["x"]["error"] == f"its process died {schedule.RETRIES + 1} times"
    assert always["y"]["got"] == ["x"]   # given the failure: the worker's run_task then skips its stage


def test_the_pool_never_runs_more_tasks_than_its_slots():
    todo = graph(*[(f"t{i}", ()) for i in range(6)])
    results, final = schedule.run(todo, schedule.Pool(2), lambda t: (_slow, t.id), lambda m: None,
                                  final=(os.getpid,))
    events = sorted([(r["start"], 1) for r in results.values()] + [(r["end"], -1) for r in results.values()])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert len(results) == 6 and peak <= 2
    assert final not in (None, False, os.getpid())   # the final ran in a worker of the pool


def _slow(tid: str, *upstream: dict) -> dict:
    start = time.time()
    time.sleep(0.3)
    return {**_record(tid, *upstream), "start": start}


def test_the_engines_have_one_loop_and_differ_in_their_executor():
    """The runner, `run --jobs` and the sweep hand their tasks to schedule.run; no other module of
    the package waits on futures, starts a process pool or submits Ray tasks itself."""
    import ast
    from pathlib import Path

    pkg = Path(schedule.__file__).parent
    loops = {"ProcessPoolExecutor", "FIRST_COMPLETED", "as_completed", "remote", "wait"}
    for path in pkg.rglob("*.py"):
        if path.name == "schedule.py":
            continue
        names = {n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, (ast.Attribute, ast.Name))}
        imported = {a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)
                    and (n.module or "").startswith(("concurrent", "ray")) for a in n.names}
        assert not imported & loops and "ray" not in names, path
        assert not ({"ProcessPoolExecutor", "FIRST_COMPLETED"} & names), path
    users = {p.name for p in pkg.glob("*.py") if "schedule.run(" in p.read_text()}
    assert users == {"worker.py", "pipeline.py"}, users   # sweep.py and run --jobs through worker.compute


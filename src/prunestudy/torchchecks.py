"""The parameter checks that need PyTorch (a model traced on the meta device), answered without
importing it into the calling process.

`config.validate` asks two questions that only a model can answer: can `prune.method` apply to
`train.model` with `prune.targets` (prune.check), and does `train.model` take `data.image_size`
crops (models.check_input_size). Importing PyTorch to answer them costs about 2 s and 510 MB of
resident memory, more than all the rest of a 100,000-point grid's plan, and the command line does
not need PyTorch otherwise (its stages compute in their kernels). So:

- a process that has imported PyTorch already (a kernel, a test) answers here, as before;
- any other asks one short child process (`python -m prunestudy.torchchecks`) for every question
  it has at once, and keeps the answers in the cache folder (config.cache_root()/checks/, given by
  the caller: this module imports nothing of the package but what answers), under a
  digest of the code that answers them (models.py, prune.py, methods.py) and of the installed
  torch and torchvision: a later plan, dry run or run asks nothing. The answers are the checks'
  own error texts, so the messages are the same either way.

A question: ("method", method, targets, model) or ("size", model, image_size, anchor); its answer:
the error text, or None when it passes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_CODE = ("models.py", "prune.py", "methods.py")   # what answers the questions (with torch and torchvision)
_answers: dict[tuple, str | None] = {}
_collecting: list[set] = []


def answers(questions, cache: Callable[[], Path], models: tuple[str, ...] = ()) -> dict[tuple, str | None]:
    """{question: its error text or None}: from this process's memory, the cache folder (`cache()`:
    config.cache_root), this process when it has PyTorch imported, else one child process for all
    the questions not known (and, while it has PyTorch, every method and targets on each of
    `models`, the valid train.model values: `_widened`)."""
    questions = [tuple(q) for q in questions]
    todo = [q for q in dict.fromkeys(questions) if q not in _answers]
    if todo:
        path = Path(cache()) / "checks" / f"{digest()}.json"
        _load(path)   # another process (a test worker, a run) may have added answers since
        todo = [q for q in todo if q not in _answers]
    if todo and _collecting:   # a grid collecting its questions before asking them at once (`collected`)
        _collecting[-1].update(todo)
        return {q: _answers.get(q) for q in questions}
    if todo:
        found = {q: _compute(q) for q in todo} if "torch" in sys.modules else _ask_child(todo, models)
        _answers.update(found)
        _save(path, found)
    return {q: _answers[q] for q in questions}


def _widened(questions: list[tuple], models: tuple[str, ...]) -> list[tuple]:
    """The questions, then those a later check is likely to ask (every method and targets on each
    model, each asked size on each model): cheap once the child has PyTorch imported."""
    from . import methods

    more = [("method", m, t, model) for model in models for m in methods.names() for t in methods.TARGETS]
    more += [("size", model, q[2], q[3]) for q in questions if q[0] == "size" for model in models]
    return list(dict.fromkeys([*questions, *(q for q in more if q not in _answers)]))


@contextlib.contextmanager
def collected():
    """Within it, questions not answered yet are recorded into the yielded set (and answered None,
    to be ignored): a grid validates each distinct part of its points once this way, then asks
    every question it found in one child process (`answers`), then validates for real."""
    wanted: set = set()
    _collecting.append(wanted)
    try:
        yield wanted
    finally:
        _collecting.remove(wanted)


# --- computing the answers, with PyTorch ---------------------------------------------------------
def _compute(question: tuple) -> str | None:
    kind, *args = question
    if kind == "method":
        from . import prune

        method, targets, model = args
        try:
            prune.check(method, 0.0, targets, model)
        except ValueError as e:
            return str(e)
        return None
    if kind == "size":
        from . import models

        model, size, anchor = args
        try:
            models.check_input_size(model, size, anchor)
        except ValueError as e:
            return str(e)
        return None
    raise ValueError(f"unknown check {question!r}")


def _ask_child(questions: list[tuple], models: tuple[str, ...] = ()) -> dict[tuple, str | None]:
    """The answers of a child process that imports PyTorch (this one does not), to these questions
    and to `_widened`'s; computed here if the child fails (its error is then raised here, as it
    would have been before)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(_HERE.parent), os.environ.get("PYTHONPATH"))
                                                       if p)}
    try:
        proc = subprocess.run([sys.executable, "-m", "prunestudy.torchchecks", str(len(questions))],
                              input=json.dumps(_widened(questions, models)), capture_output=True, text=True, env=env,
                              timeout=600)
        if proc.returncode == 0:
            found = {tuple(q): a for q, a in json.loads(proc.stdout.strip().splitlines()[-1])}
            if all(q in found for q in questions):
                return found
    except (OSError, subprocess.SubprocessError, ValueError, IndexError, TypeError):
        pass
    return {q: _compute(q) for q in questions}


def _main() -> None:
    """The child: [[question, answer], ...] of the questions on stdin; the first argv[1] of them must
    be answered (an error there is the child's), the others only where they can be."""
    questions = [tuple(q) for q in json.loads(sys.stdin.read())]
    asked = int(sys.argv[1]) if len(sys.argv) > 1 else len(questions)
    out = [[q, _compute(q)] for q in questions[:asked]]
    for q in questions[asked:]:
        with contextlib.suppress(Exception):
            out.append([q, _compute(q)])
    print(json.dumps(out))


# --- the cache folder ----------------------------------------------------------------------------
@functools.cache
def digest() -> str:
    """What the answers depend on: the code that computes them and the installed PyTorch."""
    h = hashlib.sha256()
    for name in _CODE:
        h.update(name.encode() + b"\0" + (_HERE / name).read_bytes() + b"\0")
    for dist in ("torch", "torchvision"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "none"
        h.update(f"{dist}={version}\0".encode())
    return h.hexdigest()[:16]


def _key(question: tuple) -> str:
    return json.dumps(list(question))


def _load(path: Path) -> None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(stored, dict):
        for k, v in stored.items():
            with contextlib.suppress(ValueError, TypeError):
                _answers.setdefault(tuple(json.loads(k)), v)


def _save(path: Path, found: dict[tuple, str | None]) -> None:
    """Add these answers to the cache file (best effort: a folder that cannot be written only
    means asking again next time)."""
    from . import atomic

    try:
        stored = json.loads(path.read_text()) if path.is_file() else {}
        stored = stored if isinstance(stored, dict) else {}
        stored.update({_key(q): a for q, a in found.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, stored)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    _main()

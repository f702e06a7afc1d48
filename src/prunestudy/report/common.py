"""What every section reads: a state's metrics and epochs from results.json, the data stage's
record, the test-set size and its binomial standard error, and how numbers are written in prose."""

from __future__ import annotations

import math
from pathlib import Path

from .. import paths, states, store

MB = 1e6   # sizes in MB of 10^6 bytes


def epochs(results: dict, state: str) -> list[dict]:
    """The per-epoch rows of a state's training ([] when it did not train)."""
    return states.metrics(results, state).get("epochs") or []


def data_info(run_dir) -> dict:
    """The data stage's record (classes, sizes, counts) of a run folder."""
    path = paths.stage_dir(run_dir, "data") / paths.DATA_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the data stage has not run")
    return store.read_json(path)


def where(run_dir, key: str, name: str) -> Path:
    """A file of a state's folder in a run, e.g. where(run, "trained", paths.MODEL)."""
    return states.folder(run_dir, key) / name


def test_size(results: dict) -> int | None:
    data = results.get("data") or {}
    if data.get("test_size"):
        return int(data["test_size"])
    counts = (data.get("counts") or {}).get("test")
    return int(sum(counts.values())) if counts else None


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n independent test samples (a fraction)."""
    return math.sqrt(max(p * (1 - p), 0.0) / n)


# --------------------------------------------------------------------------- numbers in prose

def pct(fraction: float, digits: int = 1) -> str:
    return f"{100 * fraction:.{digits}f}%"


def pts(points: float) -> str:
    """Absolute size of a change in percentage points, precise enough to show small ones."""
    return f"{abs(points):.1f}" if abs(points) >= 0.095 or points == 0 else f"{abs(points):.2f}"


def count(x: int) -> str:
    return f"{int(x):,}"


def change(points: float, what: str) -> str:
    if abs(points) < 0.005:
        return f"{what} did not change"
    return f"{what} {'fell' if points < 0 else 'rose'} by {pts(points)} points"

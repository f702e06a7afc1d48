"""The seed report: the earlier test this study is compared with. Its figures live in a data file,
params/seed_report.yaml, read once here. Its test losses are not comparable with this study's (see
its `note`) and are therefore never plotted."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from .. import config

SEED_REPORT_FILE = Path("params") / "seed_report.yaml"   # relative to config.project_root()
REQUIRED = ("source", "hardware", "settings", "test_accuracy", "reported_test_loss", "step_loss", "note")


def seed_report_path() -> Path:
    return config.project_root() / SEED_REPORT_FILE


def seed_report() -> dict[str, Any]:
    """The seed report's figures, `source` and `note` formatted with its own values (cached per file)."""
    return _load(seed_report_path())


@functools.cache
def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the seed report's figures are kept there (set PRUNESTUDY_HOME "
                                "to the project's checkout)")
    d = yaml.safe_load(path.read_text())
    missing = [k for k in REQUIRED if k not in (d or {})]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    for key in ("source", "note"):
        d[key] = d[key].format(**d)
    return d


def accuracy(state: str) -> float:
    """The seed report's test accuracy (a fraction) of 'trained' or 'pruned'."""
    return seed_report()["test_accuracy"][state]


def accuracies() -> dict[str, float]:
    """{'trained': ..., 'pruned': ...}: the two states the seed report measured, in that order."""
    return dict(seed_report()["test_accuracy"])

"""The model states a study compares, defined once: which stage folder holds each, what it is
called in tables and prose, and its colour in every figure (report, compare)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import paths


@dataclass(frozen=True)
class State:
    key: str        # results.json / seed repeats key: trained | pruned | retrained | control
    stage: str      # results.json section holding its metrics (train, prune, retrain, control)
    folder: str     # its folder in a run, relative to the run folder
    label: str      # short name in tables and legends
    long_label: str  # the name in the summary table's rows
    phase: str      # the step that produced it, in prose
    color: str      # hex colour in every figure
    tick: str = ""  # its name under a bar, where the label needs two lines ("" = the label)

    @property
    def tick_label(self) -> str:
        return self.tick or self.label


TRAINED = State("trained", "train", "train", "trained", "trained", "training", "#4c72b0")
PRUNED = State("pruned", "prune", "prune", "pruned", "pruned", "pruning", "#dd8452")
RETRAINED = State("retrained", "retrain", "retrain", "retrained", "retrained", "retraining", "#55a868")
CONTROL = State("control", "control", f"retrain/{paths.CONTROL}", "dense control",
                "dense control (fine-tuned, unpruned)", "fine-tuning without pruning", "#8c8c8c",
                "dense control\n(fine-tuned)")

ALL = (TRAINED, PRUNED, RETRAINED, CONTROL)
BY_KEY = {s.key: s for s in ALL}
MAIN = ("trained", "pruned", "retrained")      # the study's chain (the control stands beside it)
KEYS = tuple(BY_KEY)                            # trained, pruned, retrained, control
SEED_REPORT_COLOR = "#b0b0b0"                   # the seed report's bars: muted grey, drawn hatched
# The comparisons a study makes between its states (after, before): what pruning changed, what
# retraining changed from the pruned model and in all, and the retrained model against the
# dense control (the same extra training, without pruning). Paired on the test set within a run
# (results.json `paired`), over seeds in the report.
COMPARED = (("pruned", "trained"), ("retrained", "pruned"), ("retrained", "trained"), ("retrained", "control"))


def get(key: str) -> State:
    try:
        return BY_KEY[key]
    except KeyError:
        raise ValueError(f"unknown model state {key!r}: one of {', '.join(BY_KEY)}") from None


def folder(run_dir: str | Path, key: str) -> Path:
    """The folder of a state's outputs (model, predictions, metrics) in a run folder."""
    return Path(run_dir) / get(key).folder


def metrics(results: dict, key: str) -> dict:
    """The state's metrics from a results.json dict ({} when that state did not run)."""
    return results.get(get(key).stage) or {}

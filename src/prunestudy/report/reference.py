"""The seed report: the earlier test this study is compared with. Its figures live in a data file,
params/seed_report.yaml, read once here. Its test losses are not comparable with this study's (see
its `note` and `loss_bound`) and are therefore never plotted.

What data a run used decides whether the seed's figures may stand beside it (`data_source`): only
a run on the full COCO 2017 at the seed's settings is set beside its 71% / 70%; on the embedded
synthetic shapes, or any other root, the seed is a reference only, never a baseline."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

import yaml

from .. import atomic, config, data, paths, synth

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


def rounding() -> float:
    """How coarsely the seed report's accuracies are given (0.01: whole percents)."""
    return float(seed_report().get("accuracy_rounding", 0.0))


def drop_range() -> tuple[float, float]:
    """The seed's accuracy drop after pruning, in points, as far as its rounded figures allow (both
    ends open: 71% and 70% give a drop strictly between 0 and 2 points)."""
    drop, width = 100 * (accuracy("trained") - accuracy("pruned")), 100 * rounding()
    return drop - width, drop + width


def loss_bound() -> dict:
    """Why the seed's loss cannot be a per-sample mean: a misclassified sample's cross-entropy is at
    least ln 2 (its class gets at most half the probability), so the mean over the test set is at
    least (1 - accuracy) ln 2, with the accuracy at the top of its rounding. `times_batch`: the
    reported loss times the test batch size, what a sum of batch means divided by N would hide."""
    seed = seed_report()
    top = accuracy("trained") + rounding() / 2
    return {"misclassified": 1 - top, "bound": (1 - top) * math.log(2),
            "reported": seed["reported_test_loss"]["trained"], "batch": seed["settings"]["batch_size"],
            "times_batch": seed["reported_test_loss"]["trained"] * seed["settings"]["batch_size"]}


# --------------------------------------------------------------------------- what data a run used

EMBEDDED, COCO, OTHER = "embedded", "coco2017", "other"
COCO2017_IMAGES = {"train": 118_287, "test": 5_000}   # images of the official train2017 / val2017
# the seed report's settings (params/seed_report.yaml) and the parameters that hold them in a run
SETTING_PARAMS = {"image_size": "data.image_size", "batch_size": "train.batch_size", "epochs": "train.epochs",
                  "lr": "train.lr", "prune_amount": "prune.amount", "model": "train.model"}


def data_source(results: dict) -> dict:
    """What data the run used, and whether the seed report's figures may stand beside it:
    `kind` (EMBEDDED, COCO: the full COCO 2017, or OTHER), `comparable` (COCO at the seed's settings
    only), `text` (a phrase naming the data) and `differs` (the seed's settings this run does not
    share)."""
    info = results.get("data") or {}
    params = results.get("params") or {}
    root = info.get("root") or (params.get("data") or {}).get("root")
    classes = info.get("classes") or []
    if (params.get("data") or {}).get("root") == "embedded" or (root and (Path(root) / synth.MARKER_NAME).is_file()):
        return {"kind": EMBEDDED, "comparable": False, "differs": [],
                "text": f"the embedded synthetic dataset: {len(classes)} classes of drawn shapes made by "
                        "prunestudy.synth (named in the data section), not COCO photographs"}
    images = _image_counts(root)
    if images is None:
        return {"kind": OTHER, "comparable": False, "differs": [],
                "text": f"the COCO-format data at {root} (its image folders are not on this machine, so it was not "
                        "checked against COCO 2017)"}
    if images != COCO2017_IMAGES:
        return {"kind": OTHER, "comparable": False, "differs": [],
                "text": f"the COCO-format data at {root} ({images['train']:,} training and {images['test']:,} "
                        "validation images: not the full COCO 2017)"}
    differs = _differing_settings(results)
    text = f"COCO 2017 (the full train2017 and val2017 at {root})"
    return {"kind": COCO, "comparable": not differs, "differs": differs,
            "text": text + (" at the seed report's settings" if not differs else
                            f", but not at the seed report's settings ({'; '.join(differs)})")}


def run_source(run_dir) -> dict:
    """data_source of a run folder read from its params.json and data.json."""
    run_dir = Path(run_dir)
    res: dict = {}
    if (run_dir / paths.PARAMS).is_file():
        res["params"] = atomic.read_json(run_dir / paths.PARAMS)
    info = paths.stage_dir(run_dir, "data") / paths.DATA_INFO
    if info.is_file():
        res["data"] = atomic.read_json(info)
    return data_source(res)


def _image_counts(root) -> dict[str, int] | None:
    """JPEG files in the root's train2017 and val2017 folders (None where they are not here)."""
    if not root:
        return None
    counts = {}
    for split, folder in data.SPLITS.items():
        where = Path(root) / folder
        if not where.is_dir():
            return None
        with os.scandir(where) as it:
            counts[split] = sum(1 for e in it if e.name.lower().endswith(".jpg") and e.is_file())
    return counts


def _differing_settings(results: dict) -> list[str]:
    """The seed report's settings this run does not share, e.g. 'train.epochs 1, seed 10'."""
    seed = seed_report()["settings"]
    flat = config.flatten(results.get("params") or {})
    if not flat:
        return ["this run's parameters were not recorded"]
    out = []
    n_classes = len((results.get("data") or {}).get("classes") or [])
    if n_classes != seed["classes"]:
        out.append(f"{n_classes} classes, seed {seed['classes']}")
    for setting, key in SETTING_PARAMS.items():
        ours, theirs = flat.get(key), seed.get(setting)
        same = ours == theirs if isinstance(theirs, str) and not _number(theirs) else \
            ours is not None and math.isclose(float(ours), float(theirs))
        if theirs is not None and not same:
            out.append(f"{key} {ours}, seed {theirs}")
    return out


def _number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False

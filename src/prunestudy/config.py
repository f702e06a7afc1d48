"""Study parameters: defaults, YAML files, `key=value` overrides, validation and hashing.

Parameters are nested by stage (`data.*`, `train.*`, `prune.*`, `retrain.*`) plus a top-level
`seed`. SCHEMA is the single source of truth: default, accepted types and a one-line
description for every key.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

STAGE_SECTIONS = ("data", "train", "prune", "retrain")

# key -> (default, accepted types, description)
SCHEMA: dict[str, tuple[Any, tuple[type, ...], str]] = {
    "seed": (0, (int,), "seed for data subsets, initialisation, batch order and augmentation"),
    "data.root": ("embedded", (str, type(None)), "COCO root in the official layout, or 'embedded' for the embedded synthetic set"),
    "data.embedded": (
        {"seed": 0, "train_images": 800, "val_images": 250, "image_size": 160},
        (dict,),
        "size and seed of the embedded dataset, generated under data/embedded/ on first use",
    ),
    "data.classes": ("top:10", (str, list), "list of category names, or 'top:K' for the K most frequent"),
    "data.image_size": (64, (int,), "side of the square crops, in pixels"),
    "data.context": (0.2, (float, int), "context added on each side of a box, as a fraction of its longer side"),
    "data.min_box": (16, (int,), "boxes whose shorter side is below this many pixels are skipped"),
    "data.max_per_class": (None, (int, type(None)), "cap on training samples per class (null = no cap)"),
    "data.max_test_per_class": (None, (int, type(None)), "cap on test samples per class (null = no cap)"),
    "data.label_mode": ("crop", (str,), "crop: one sample per box | image: one per image, labelled by its largest box"),
    "data.min_per_class": (20, (int,), "error if a class keeps fewer training samples than this"),
    "data.max_bad_fraction": (0.01, (float, int), "unreadable images of a split tolerated (skipped, listed) before an error"),
    "data.workers": (None, (int, type(None)), "processes cropping images (null = all CPU cores); does not change the result"),
    "train.model": ("seed_cnn", (str,), "seed_cnn | resnet18 | efficientnet_b0"),
    "train.epochs": (10, (int,), "training epochs"),
    "train.batch_size": (32, (int,), "training batch size"),
    "train.lr": (1e-4, (float,), "Adam learning rate"),
    "train.device": ("auto", (str,), "auto | cpu | cuda | cuda:N"),
    "prune.method": ("l1_unstructured", (str,), "pruning method (torch.nn.utils.prune)"),
    "prune.amount": (0.2, (float, int), "fraction of each targeted weight tensor set to zero"),
    "prune.targets": ("all", (str,), "which weights are pruned: conv | linear | all"),
    "retrain.epochs": (2, (int,), "fine-tuning epochs after pruning, masks held"),
    "retrain.lr": (1e-4, (float,), "Adam learning rate for fine-tuning"),
    "retrain.batch_size": (32, (int,), "fine-tuning batch size"),
}

CHOICES = {
    "train.model": ("seed_cnn", "resnet18", "efficientnet_b0"),
    "data.label_mode": ("crop", "image"),
    "prune.method": ("l1_unstructured",),
    "prune.targets": ("conv", "linear", "all"),
}


class ParamsError(ValueError):
    """One or more invalid parameters; the message lists every problem, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid parameters:\n" + "\n".join(f"  - {p}" for p in problems))


def defaults() -> dict:
    cfg: dict = {}
    for key, (default, _, _) in SCHEMA.items():
        _set(cfg, key, copy.deepcopy(default))
    return cfg


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The checkout holding params/ and pyproject.toml (PRUNESTUDY_HOME overrides); else cwd."""
    if os.environ.get("PRUNESTUDY_HOME"):
        return Path(os.environ["PRUNESTUDY_HOME"]).resolve()
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file() and (d / "params").is_dir():
            return d
    return here


def load(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Defaults, then the YAML file, then `key=value` overrides (values parsed as YAML); validated."""
    cfg = defaults()
    problems: list[str] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ParamsError([f"parameter file {p} does not exist: pass an existing YAML file to -f"])
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ParamsError([f"{p} is not valid YAML: {e}"]) from None
        if not isinstance(loaded, dict):
            raise ParamsError([f"{p} must hold a mapping of parameters, not {type(loaded).__name__}"])
        for key, value in _flatten(loaded).items():
            _set(cfg, key, value)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r} is not key=value (e.g. -p train.epochs=3)")
            continue
        _set(cfg, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    _coerce_floats(cfg)
    problems += validate(cfg)
    if problems:
        raise ParamsError(problems)
    return cfg


def validate(cfg: dict) -> list[str]:
    """Every problem in cfg, one readable line each (empty list = valid)."""
    problems = []
    flat = _flatten(cfg)
    for key, value in flat.items():
        if key not in SCHEMA:
            close = difflib.get_close_matches(key, SCHEMA, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(SCHEMA)}"
            problems.append(f"unknown parameter {key!r}{hint}")
            continue
        _, types, _ = SCHEMA[key]
        if isinstance(value, bool) or not isinstance(value, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f"{key} must be {names}, got {value!r}")
        elif isinstance(value, dict) and set(value) - set(SCHEMA[key][0]):
            extra = ", ".join(sorted(set(value) - set(SCHEMA[key][0])))
            problems.append(f"{key} has unknown keys {extra}; valid: {', '.join(SCHEMA[key][0])}")
        elif key in CHOICES and value not in CHOICES[key]:
            problems.append(f"{key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    bad = {p.split()[0] for p in problems}

    def ok(key: str) -> bool:  # range checks only where the type is right
        return key not in bad

    for key in ("train.epochs", "train.batch_size", "retrain.batch_size", "data.image_size"):
        if ok(key) and flat[key] < 1:
            problems.append(f"{key} must be at least 1, got {flat[key]}")
    if ok("data.root") and flat["data.root"] is None:
        problems.append("data.root is not set: give a COCO 2017 root, e.g. -p data.root=/path/to/coco "
                        "(or 'embedded' for the embedded dataset)")
    if ok("retrain.epochs") and flat["retrain.epochs"] < 0:
        problems.append(f"retrain.epochs must be 0 or more, got {flat['retrain.epochs']}")
    for key in ("train.lr", "retrain.lr"):
        if ok(key) and not flat[key] > 0:
            problems.append(f"{key} must be positive, got {flat[key]}")
    if ok("prune.amount") and not 0 <= flat["prune.amount"] < 1:
        problems.append(f"prune.amount must be in [0, 1), got {flat['prune.amount']}")
    if ok("data.min_per_class") and flat["data.min_per_class"] < 1:
        problems.append(f"data.min_per_class must be at least 1, got {flat['data.min_per_class']}")
    if ok("data.max_bad_fraction") and not 0 <= flat["data.max_bad_fraction"] <= 1:
        problems.append(f"data.max_bad_fraction must be in [0, 1], got {flat['data.max_bad_fraction']}")
    if ok("data.workers") and flat["data.workers"] is not None and flat["data.workers"] < 1:
        problems.append(f"data.workers must be null (all cores) or at least 1, got {flat['data.workers']}")
    for key in ("data.max_per_class", "data.max_test_per_class"):
        if ok(key) and flat[key] is not None and flat[key] < 1:
            problems.append(f"{key} must be null (no cap) or at least 1, got {flat[key]}")
    if ok("data.context") and not 0 <= flat["data.context"] <= 2:
        problems.append(f"data.context must be in [0, 2], got {flat['data.context']}")
    return problems


def stage_hash(cfg: dict) -> str:
    """Short sha256 of the canonical JSON of cfg: the name of what defines a run."""
    blob = json.dumps(cfg, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def resolve_path(value: str | os.PathLike | None, root: Path | None = None) -> Path | None:
    """A path parameter made absolute: relative paths are taken from the project root."""
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else (root or project_root()) / p


def _coerce_floats(cfg: dict) -> None:
    """YAML 1.1 reads `1e-4` as a string and `1` as an int: accept both where a float is meant."""
    for key, value in _flatten(cfg).items():
        types = SCHEMA.get(key, (None, ()))[1]
        if float in types and not isinstance(value, bool) and isinstance(value, (str, int)):
            try:
                _set(cfg, key, float(value))
            except ValueError:
                pass


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in SCHEMA:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set(cfg: dict, dotted: str, value: Any) -> None:
    default = SCHEMA.get(dotted, (None,))[0]
    if isinstance(default, dict) and isinstance(value, dict):  # a dict parameter merges key-wise
        for k, v in value.items():
            _set(cfg, f"{dotted}.{k}", v)
        return
    *parents, last = dotted.split(".")
    node = cfg
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value

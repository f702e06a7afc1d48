"""Study parameters: defaults, YAML files, `key=value` overrides, validation and hashing.

Parameters are nested by stage (`data.*`, `train.*`, `prune.*`, `retrain.*`) plus a top-level
`seed`. SCHEMA is the single source of truth: default, accepted types and a one-line
description for every key.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from . import methods, torchchecks

STAGE_SECTIONS = ("data", "train", "prune", "retrain")

# key -> (default, accepted types, description)
SCHEMA: dict[str, tuple[Any, tuple[type, ...], str]] = {
    "seed": (0, (int,), "seed for data subsets, initialisation, batch order and augmentation"),
    "seeds": (None, (list, type(None)), "repeats: the study's train, prune and retrain stages (not the curve) rerun "
              "with each of these seeds on the same data (repeats/seed-<s>/); the report gives mean, spread and paired "
              "confidence intervals over `seed` and these; null = one run"),
    "data.root": ("embedded", (str, type(None)), "COCO root in the official layout, or 'embedded' for the embedded "
                  "synthetic set"),
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
    "data.min_test_per_class": (20, (int,), "a class with fewer test samples is named in the report and its "
                                "per-class figures are marked too few to read; a class with none is an error "
                                "unless this is 0"),
    "data.max_bad_fraction": (0.01, (float, int), "unreadable images of a split, and malformed image or annotation "
                              "records of an annotation file, tolerated (skipped, counted) before an error"),
    "data.workers": (None, (int, type(None)), "processes cropping images (null = all CPU cores); does not change "
                     "the result"),
    "train.model": ("seed_cnn", (str,), "seed_cnn | resnet18 | efficientnet_b0"),
    "train.epochs": (10, (int,), "training epochs"),
    "train.batch_size": (32, (int,), "training batch size"),
    "train.lr": (1e-4, (float,), "Adam learning rate"),
    "train.device": ("auto", (str,), "auto | cpu | cuda | cuda:N"),
    "train.precision": ("auto", (str,), "auto | fp32 | bf16 | fp16 (autocast; fp16 with a gradient scaler); "
                        "auto = fastest safe on the device (fp32 on CPU, bf16 on CUDA); also for retraining"),
    "train.channels_last": ("auto", (str, bool), "auto | true | false: NHWC memory format of training, evaluation "
                                                  "and latency timing (auto = on)"),
    "train.compile": ("auto", (str, bool), "auto | true | false: torch.compile (CUDA graphs for small CUDA "
                      "batches); auto = off (slower on this CPU, unmeasured on GPU)"),
    "train.fused": ("auto", (str, bool), "auto | true | false: fused Adam kernel (auto = on); all four "
                    "options fp32/false reproduce the plain loop bit for bit"),
    "train.weights": (None, (str, type(None)), "local state_dict to start from (nothing is downloaded); "
                      "null = random initialisation"),
    "train.launcher": ("none", (str,), "none | torchrun: train and retrain (control and curve included) under "
                       "torchrun with DistributedDataParallel"),
    "train.nproc_per_node": (1, (int,), "processes per node under torchrun (gloo on CPU, NCCL on CUDA)"),
    "prune.method": ("l1_unstructured", (str,), " | ".join(f"{m.name} ({m.kind})" for m in methods.REGISTRY.values())
                     + "; masked: zeros, dense shape; structural: smaller layers (prunestudy.methods)"),
    "prune.amount": (0.2, (float, int), "fraction of the targeted weights (channels for ln_structured / channel) "
                     "pruned in all, in [0, 1)"),
    "prune.targets": ("all", (str,), "which weights are pruned: conv | linear | all"),
    "prune.rounds": (1, (int,), "1 = one shot; N > 1 = iterative: N rounds, each pruning 1-(1-amount)^(1/N) "
                     "of what remains, with retrain.epochs_per_round of fine-tuning between rounds"),
    "prune.rewind_step": (None, (int, type(None)), "lottery-ticket rewinding: before the final retraining, the "
                          "surviving weights restart from their values after this training step (0 = the "
                          "initialisation; masks kept); null = off; masked methods only"),
    "prune.amounts": (None, (list, type(None)), "a curve: amounts in [0, 1); each (method of prune.methods, amount) is "
                      "a point with pruning and retraining stages of its own (curve/<method>-<amount>/), every other "
                      "parameter as the study's (rounds, rewinding, the control), shared through the stage store "
                      "with `prunestudy sweep` grid points; null = no curve"),
    "prune.latency_repeats": (20, (int,), "paired latency measurements per batch size (the dense and the pruned "
                              "model, in random order) in the prune and retrain stages: the measured speedup and its "
                              "95% interval rest on them; at least 2. A model of the dense computation (masked "
                              "pruning) is not timed: its speed is the dense model's"),
    "prune.methods": (None, (list, type(None)), f"methods of the curve (null = [prune.method, {methods.floor()}]); "
                      "used only with prune.amounts"),
    "retrain.epochs": (2, (int,), "fine-tuning epochs after pruning, masks held"),
    "retrain.lr": (1e-4, (float,), "Adam learning rate for fine-tuning"),
    "retrain.batch_size": (32, (int,), "fine-tuning batch size"),
    "retrain.epochs_per_round": (1, (int,), "fine-tuning epochs after each round but the last of an iterative "
                                 "schedule (prune.rounds > 1)"),
    "retrain.control": (True, (bool,), "also fine-tune the unpruned trained model for as many epochs with the same "
                        "settings (the dense control: the gain of extra training, without pruning)"),
}

# Parameters of the runner, not of any stage: how many chains it runs (the `seeds` repeats, the
# `prune.amounts` x `prune.methods` curve points), each chain a point of the same stage graph.
RUNNER_KEYS = ("seeds", "prune.amounts", "prune.methods")
# Where a run's curve gets bands over seeds (its `seeds` repeats do not repeat it): said by the runner
# and under the report's curve table.
SWEEP_SEEDS_HINT = ("run its points as a grid with `seed` as a grid key (`prunestudy sweep`, docs/sweeps.md), "
                    "which reuses the stages this run computed")

# Which schema key each parameter of a stage function (and of its notebook's parameters cell)
# stands for: the stage's own section, plus these keys from other sections.
STAGE_EXTRAS = {
    "data": {"seed": "seed"},
    "train": {"seed": "seed", "rewind_step": "prune.rewind_step"},   # the train stage saves the rewind state
    "prune": {"epochs_per_round": "retrain.epochs_per_round", "lr": "retrain.lr",   # fine-tuning between rounds
              "batch_size": "retrain.batch_size", "seed": "seed", "device": "train.device"},
    "retrain": {"device": "train.device", "seed": "seed", "latency_repeats": "prune.latency_repeats"},
}

CHOICES = {
    "train.model": ("seed_cnn", "resnet18", "efficientnet_b0"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.channels_last": ("auto", True, False),
    "train.compile": ("auto", True, False),
    "train.fused": ("auto", True, False),
    "train.launcher": ("none", "torchrun"),
    "data.label_mode": ("crop", "image"),
    "prune.targets": methods.TARGETS,
}


class ParamsError(ValueError):
    """One or more invalid parameters; the message lists every problem, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid parameters:\n" + "\n".join(f"  - {p}" for p in problems))


def default(key: str) -> Any:
    """The default of one parameter (a copy): what every stage function and notebook starts from."""
    return copy.deepcopy(SCHEMA[key][0])


def stage_parameters(stage: str) -> dict[str, str]:
    """Parameter name of `stage`'s function and notebook -> the schema key it stands for."""
    return dict(_stage_parameters(stage))


@functools.cache
def _stage_parameters(stage: str) -> dict[str, str]:
    if stage not in STAGE_EXTRAS:
        raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGE_EXTRAS)}")
    own = {key.split(".", 1)[1]: key for key in SCHEMA if key.startswith(stage + ".") and key not in RUNNER_KEYS}
    return {**own, **STAGE_EXTRAS[stage]}


def stage_params(stage: str, cfg: dict) -> dict:
    """The values of `stage`'s parameters in cfg (what its notebook is run with)."""
    return {name: value(cfg, key) for name, key in _stage_parameters(stage).items()}


def value(cfg: dict, key: str) -> Any:
    """The value of a schema key (dotted) in cfg, as flatten(cfg)[key] gives it (without flattening
    all of cfg: a grid reads a few keys of each of its points)."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def choices(key: str) -> tuple | None:
    """The valid values of a parameter with a fixed set (pruning methods: the registry now)."""
    if key == "prune.method":
        return methods.names()
    return CHOICES.get(key)


def defaults() -> dict:
    cfg: dict = {}
    for key, (default, _, _) in SCHEMA.items():
        _set(cfg, key, copy.deepcopy(default))
    return cfg


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The checkout holding params/ and pyproject.toml (PRUNESTUDY_HOME overrides) that holds the
    current folder (or `start`); else the checkout this package is imported from (an editable
    install: papermill run from /tmp finds the project's notebooks); else the current folder."""
    if os.environ.get("PRUNESTUDY_HOME"):
        return Path(os.environ["PRUNESTUDY_HOME"]).resolve()
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents, *Path(__file__).resolve().parents[1:3]):
        if (d / "pyproject.toml").is_file() and (d / "params").is_dir():
            return d
    return here


def git_commit() -> str | None:
    """The project's git commit, '+dirty' when tracked files differ from it; None outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_root(),
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


CACHE_ENV = "PRUNESTUDY_CACHE"     # another folder for the caches (crop sets, digests, code summaries)


def cache_root() -> Path:
    """<project>/data/cache, or $PRUNESTUDY_CACHE (the test suite points it at its temp folder: its
    COCO roots are temp folders, part of each crop set's key, so their sets would never be reused)."""
    return Path(os.environ[CACHE_ENV]).resolve() if os.environ.get(CACHE_ENV) else project_root() / "data" / "cache"


def load(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Defaults, then the YAML file, then `key=value` overrides (values parsed as YAML); validated."""
    cfg, problems = merged(path, overrides)
    problems += validate(cfg)
    if problems:
        raise ParamsError(problems)
    return absolute_paths(cfg)


def merged(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
           values: dict | None = None) -> tuple[dict, list]:
    """(defaults, then the YAML file, then `values` (flat, parsed already), then the `key=value`
    overrides, floats coerced; the overrides' problems): not validated yet (a grid sets its values
    first, then validates each point)."""
    cfg = defaults()
    if path is not None:
        for key, value in read_file(path).items():
            _set(cfg, key, value)
    for key, value in (values or {}).items():
        _set(cfg, key, value)
    problems = []
    for item in overrides:
        try:
            key, value = parse_override(item)
        except ParamsError as e:
            problems += e.problems
            continue
        _set(cfg, key, value)
    _coerce_floats(cfg)
    return cfg, problems


def read_file(path: str | os.PathLike) -> dict:
    """A parameter file's parameters, flat ({'train.lr': 0.001})."""
    p = Path(path)
    if not p.is_file():
        raise ParamsError([f"parameter file {p}{_resolved(str(p))} does not exist: pass an existing YAML file to -f"])
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError([f"{p} is not valid YAML: {e}"]) from None
    if not isinstance(loaded, dict):
        raise ParamsError([f"{p} must hold a mapping of parameters, not {type(loaded).__name__}"])
    return flatten(loaded)


def parse_override(item: str) -> tuple[str, Any]:
    """(key, value) of one `-p key=value` (the value read as YAML; empty: null)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ParamsError([f"override {item!r} is not key=value (e.g. -p train.epochs=3)"])
    try:
        return key.strip(), (yaml.safe_load(raw) if raw.strip() else None)
    except yaml.YAMLError as e:
        raise ParamsError([f"-p {key.strip()}: the value {raw!r} is not valid YAML ({_yaml_reason(e)}): close its "
                           "brackets or quotes, e.g. -p 'data.classes=[person, car]', or quote a string, e.g. "
                           "-p 'data.root=\"/my dir\"'"]) from None


PATH_KEYS = ("data.root", "train.weights")   # parameters naming a file or folder ('embedded' is not a path)


def absolute_paths(cfg: dict) -> dict:
    """cfg with its relative path parameters made absolute (against the current directory, the one
    base of every relative path given to prunestudy), so that they mean the same in the notebooks,
    which run in notebooks/."""
    flat = flatten(cfg)
    for key in PATH_KEYS:
        value = flat.get(key)
        if isinstance(value, str) and value and not (key == "data.root" and value == "embedded"):
            _set(cfg, key, str(resolve_path(value)))
    return cfg


def _yaml_reason(e: yaml.YAMLError) -> str:
    """The gist of a YAML error on one line (its problem, without the marks)."""
    reason = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    return " ".join(str(reason).split())


# The checks of `validate` that read several parameters, each as the parameters it reads (a check
# gated on `ok(key)` reads that key too): any other check reads one parameter alone. A grid checks
# the values of keys that no entry here joins apart from each other (grid._bad_points): a check
# that reads two parameters must be listed here.
READ_TOGETHER: tuple[frozenset[str], ...] = (
    frozenset({"train.precision", "train.device"}),
    frozenset({"seeds", "seed"}),
    frozenset({"prune.rewind_step", "prune.method", "prune.methods", "prune.amounts"}),   # rewinding, the curve
    frozenset({"prune.method", "prune.amount", "prune.targets", "prune.amounts", "prune.methods",
               "train.model"}),   # prune.check of each method on the model (torchchecks)
    frozenset({"train.model", "data.image_size"}),   # the crops fit the model (torchchecks)
)


def read_together(keys) -> list[tuple[int, ...]]:
    """The grid keys (their indices in `keys`) in groups that no check of `validate` reads across:
    those READ_TOGETHER joins, directly or through another key; every key in one group."""
    keys = list(keys)
    group = list(range(len(keys)))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for joined in READ_TOGETHER:
        inside = [i for i, k in enumerate(keys) if k in joined]
        for i in inside[1:]:
            group[root(i)] = root(inside[0])
    out: dict[int, list[int]] = {}
    for i in range(len(keys)):
        out.setdefault(root(i), []).append(i)
    return [tuple(members) for members in out.values()]


def validate(cfg: dict, known: dict[str, list[str]] | None = None) -> list[str]:
    """Every problem in cfg, one readable line each (empty list = valid). `known`: the problems of
    each value on its own (key_problems) for keys whose values are known to be those (a grid's
    common parameters, checked once, not once per point)."""
    flat = flatten(cfg)
    known = known or {}
    own = key_problems(flat, [k for k in flat if k not in known])
    problems = [p for k in flat for p in (own[k] if k in own else known[k])]
    bad = {p.split()[0] for p in problems}

    def ok(key: str) -> bool:  # range checks only where the type is right
        return key not in bad

    if ok("train.weights") and flat["train.weights"] is not None and not resolve_path(flat["train.weights"]).is_file():
        problems.append(f"train.weights {flat['train.weights']!r}{_resolved(flat['train.weights'])} is not a file: "
                        "give a local state_dict (.pt, loadable with torch.load(weights_only=True)) or null")
    if ok("train.precision") and ok("train.device") and flat["train.precision"] == "fp16" \
            and flat["train.device"] == "cpu":
        problems.append("train.precision fp16 is refused on the CPU (no fast kernels, needs loss scaling): "
                        "use auto, fp32 or bf16")
    for key in ("train.epochs", "train.batch_size", "retrain.batch_size", "data.image_size", "train.nproc_per_node"):
        if ok(key) and flat[key] < 1:
            problems.append(f"{key} must be at least 1, got {flat[key]}")
    if ok("data.root") and flat["data.root"] not in (None, "embedded") and not resolve_path(flat["data.root"]).is_dir():
        problems.append(f"data.root {flat['data.root']!r}{_resolved(flat['data.root'])} is not a folder: give the "
                        "COCO 2017 root that holds annotations/, train2017/ and val2017/ (prunestudy coco download "
                        "--to DIR fetches it)")
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
    if ok("data.min_test_per_class") and flat["data.min_test_per_class"] < 0:
        problems.append(f"data.min_test_per_class must be 0 or more, got {flat['data.min_test_per_class']}")
    if ok("data.max_bad_fraction") and not 0 <= flat["data.max_bad_fraction"] <= 1:
        problems.append(f"data.max_bad_fraction must be in [0, 1], got {flat['data.max_bad_fraction']}")
    if ok("data.workers") and flat["data.workers"] is not None and flat["data.workers"] < 1:
        problems.append(f"data.workers must be null (all cores) or at least 1, got {flat['data.workers']}")
    for key in ("data.max_per_class", "data.max_test_per_class"):
        if ok(key) and flat[key] is not None and flat[key] < 1:
            problems.append(f"{key} must be null (no cap) or at least 1, got {flat[key]}")
    if ok("data.context") and not 0 <= flat["data.context"] <= 2:
        problems.append(f"data.context must be in [0, 2], got {flat['data.context']}")
    if ok("seed") and flat["seed"] < 0:
        problems.append(f"seed must be 0 or more (numpy's generators take no negative seed), got {flat['seed']}")
    problems += _seeds_problems(flat, ok)
    problems += _classes_problems(flat, ok)
    pruning, questions = _prune_problems(flat, ok)
    problems += pruning
    if size := _model_check(flat, ok):
        questions.append(("", size))
    found = torchchecks.answers((q for _, q in questions), cache_root, CHOICES["train.model"])   # without PyTorch here
    problems += [prefix + found[q] for prefix, q in questions if found[q]]
    return problems


def key_problems(flat: dict, keys=None) -> dict[str, list[str]]:
    """{key: the problems of its value on its own (an unknown key, a wrong type, an unknown choice)}
    for `keys` of flat (default: all)."""
    out = {}
    for key in (flat if keys is None else keys):
        out[key] = problems = []
        value = flat[key]
        if key not in SCHEMA:
            close = difflib.get_close_matches(key, SCHEMA, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(SCHEMA)}"
            problems.append(f"unknown parameter {key!r}{hint}")
            continue
        _, types, _ = SCHEMA[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f"{key} must be {names}, got {value!r}")
        elif isinstance(value, dict) and set(value) - set(SCHEMA[key][0]):
            extra = ", ".join(sorted(set(value) - set(SCHEMA[key][0])))
            problems.append(f"{key} has unknown keys {extra}; valid: {', '.join(SCHEMA[key][0])}")
        elif choices(key) is not None and value not in choices(key):
            problems.append(f"{key} must be one of {', '.join(map(str, choices(key)))}, got {value!r}")
    return out


def _classes_problems(flat: dict, ok) -> list[str]:
    """A study compares at least 2 distinct classes (one class: 100% accuracy, loss 0, nothing measured)."""
    classes = flat.get("data.classes")
    if not ok("data.classes"):
        return []
    if isinstance(classes, str):
        prefix, _, k = classes.partition(":")
        if prefix != "top" or not k.isdigit() or int(k) < 2:
            return [f"data.classes must be a list of at least 2 category names or 'top:K' with K >= 2 (a study "
                    f"needs 2 classes or more), got {classes!r}; e.g. top:10 or [person, car]"]
        return []
    problems = [f"data.classes[{i}] must be a category name, got {c!r}" for i, c in enumerate(classes)
                if not isinstance(c, str) or not c]
    dups = sorted({c for c in classes if isinstance(c, str) and classes.count(c) > 1})
    if len(set(map(str, classes))) >= 2 and dups:
        problems.append(f"data.classes lists {', '.join(map(repr, dups))} more than once: give each class once")
    elif len(set(map(str, classes))) < 2:
        problems.append(f"data.classes must name at least 2 distinct classes (a study of one class measures "
                        f"nothing: every prediction is right), got {classes}; e.g. [person, car] or top:10")
    return problems


def _model_check(flat: dict, ok) -> tuple | None:
    """The crops' size must fit the model (the seed CNN's fc1 fixes it to a narrow range): the
    question for torchchecks (None: nothing to ask)."""
    if not (ok("train.model") and ok("data.image_size")) or flat["data.image_size"] < 1:
        return None
    return ("size", flat["train.model"], flat["data.image_size"], default("data.image_size"))


def repeat_seeds(cfg: dict) -> list[int]:
    """The seeds of the repeats: `seeds` without the main run's `seed`, in order."""
    return [s for s in dict.fromkeys(cfg.get("seeds") or []) if s != cfg["seed"]]


def repeat_config(cfg: dict, seed: int) -> dict:
    """The parameters of the repeat with `seed`: the study's, with that seed, no repeats of its own
    and no curve (a repeat measures the spread of the main pruning; the curve runs once)."""
    out = copy.deepcopy(cfg)
    out["seed"], out["seeds"] = seed, None
    out["prune"]["amounts"] = out["prune"]["methods"] = None
    return out


def _seeds_problems(flat: dict, ok) -> list[str]:
    seeds = flat.get("seeds")
    if not ok("seeds") or seeds is None:
        return []
    problems = [f"seeds[{i}] must be an integer, got {s!r}" for i, s in enumerate(seeds)
                if isinstance(s, bool) or not isinstance(s, int)]
    problems += [f"seeds[{i}] must be 0 or more (numpy's generators take no negative seed), got {s}"
                 for i, s in enumerate(seeds) if not problems and s < 0]
    if not problems and len(set(seeds)) != len(seeds):
        problems.append(f"seeds lists a seed twice: {seeds}")
    if not problems and ok("seed") and not [s for s in seeds if s != flat["seed"]]:
        problems.append(f"seeds {seeds} holds no seed besides seed={flat['seed']}: list the repeats' seeds, e.g. "
                        f"seeds: [{flat['seed']}, {flat['seed'] + 1}, {flat['seed'] + 2}], or null for one run")
    return problems


def curve_points(cfg: dict) -> list[dict]:
    """The parameters of the curve's points, in order (methods, then amounts). A point is
    the study with that prune.method and prune.amount, on the main seed, without repeats or a curve
    of its own: the same parameters as the grid point of `prunestudy sweep`, so the same stage keys."""
    amounts = cfg["prune"].get("amounts") or []
    out = []
    for method in (curve_methods(cfg["prune"]) if amounts else []):
        for amount in amounts:
            point = copy.deepcopy(cfg)
            point["seeds"] = None
            point["prune"].update(method=method, amount=amount, amounts=None, methods=None)
            out.append(point)
    return out


def curve_methods(prune_cfg: dict) -> list[str]:
    """The methods of the curve: prune.methods, or [prune.method, the floor method (random)]."""
    chosen = prune_cfg.get("methods")
    if chosen is None:
        chosen = [prune_cfg.get("method", default("prune.method")), methods.floor()]
    return list(dict.fromkeys(chosen))


def _prune_problems(flat: dict, ok) -> tuple[list[str], list[tuple[str, tuple]]]:
    """(the problems of the pruning schedule, rewinding and curve; the questions for torchchecks:
    `prune.check` of every method against train.model, so that a method that cannot apply to the
    model is an error before any work starts, as (prefix of its message, question))."""
    problems = []
    if ok("prune.latency_repeats") and flat["prune.latency_repeats"] < 2:
        problems.append(f"prune.latency_repeats must be at least 2 (an interval needs two paired timings), got "
                        f"{flat['prune.latency_repeats']}")
    if ok("prune.rounds") and flat["prune.rounds"] < 1:
        problems.append(f"prune.rounds must be at least 1 (1 = one shot), got {flat['prune.rounds']}")
    if ok("retrain.epochs_per_round") and flat["retrain.epochs_per_round"] < 0:
        problems.append(f"retrain.epochs_per_round must be 0 or more, got {flat['retrain.epochs_per_round']}")
    rewind = flat.get("prune.rewind_step")
    if ok("prune.rewind_step") and rewind is not None:
        if rewind < 0:
            problems.append(f"prune.rewind_step must be null (no rewinding) or a training step >= 0, got {rewind}")
        method = flat.get("prune.method")
        if method in methods.REGISTRY and not methods.get(method).masked:
            problems.append(f"prune.rewind_step cannot be used with prune.method={method}: a structural method makes "
                            "the layers smaller, so no earlier state of the pruned model's shape exists to rewind "
                            "to; set prune.rewind_step=null or choose a masked method")
    amounts, swept = flat.get("prune.amounts"), flat.get("prune.methods")
    curve_ok = ok("prune.amounts") and ok("prune.methods")
    if ok("prune.amounts") and amounts is not None:
        if not amounts:
            problems.append("prune.amounts must be null (no curve) or a non-empty list of fractions in [0, 1)")
        for i, a in enumerate(amounts):
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a < 1:
                problems.append(f"prune.amounts[{i}] must be a fraction in [0, 1), got {a!r}")
                curve_ok = False
        if len(set(amounts)) != len(amounts):
            problems.append(f"prune.amounts lists an amount twice: {amounts}")
    if ok("prune.methods") and swept is not None:
        if not swept:
            problems.append(f"prune.methods must be null ([prune.method, {methods.floor()}]) or a non-empty list")
        for i, m in enumerate(swept):
            if not isinstance(m, str) or m not in methods.REGISTRY:
                problems.append(f"prune.methods[{i}] must be one of {', '.join(methods.names())}, got {m!r}")
                curve_ok = False
        if len(set(map(str, swept))) != len(swept):
            problems.append(f"prune.methods lists a method twice: {swept}")
    if not all(ok(k) for k in ("train.model", "prune.targets")):
        return problems, []
    checks = []
    if ok("prune.method") and ok("prune.amount") and 0 <= flat["prune.amount"] < 1:
        checks.append(("", flat["prune.method"]))
    if curve_ok and amounts:
        prune_cfg = {"method": flat.get("prune.method"), "methods": swept}
        checks += [("prune.methods (the curve): ", m) for m in curve_methods(prune_cfg)
                   if m in methods.REGISTRY and not (m == flat.get("prune.method") and ("", m) in checks)]
        structural = [m for m in curve_methods(prune_cfg) if m in methods.REGISTRY and not methods.get(m).masked]
        if ok("prune.rewind_step") and rewind is not None and structural:
            problems.append(f"prune.methods (the curve) holds the structural method(s) {', '.join(structural)}, "
                            f"and prune.rewind_step={rewind}: every curve point rewinds like the study, and a "
                            "structural method has no earlier state of its smaller shape to rewind to; list "
                            "masked methods only in prune.methods, or set prune.rewind_step=null")
    return problems, [(prefix, ("method", method, flat["prune.targets"], flat["train.model"]))
                      for prefix, method in checks]


def describe(cfg: dict) -> str:
    """Every parameter on one line: `key: value  # description (default ...)`.

    The output is itself a valid parameter file (dotted keys are accepted by :func:`load`)."""
    flat = flatten(cfg)
    rows = [(f"{key}: {json.dumps(flat.get(key, default))}", text, default, flat.get(key, default))
            for key, (default, _, text) in SCHEMA.items()]
    width = min(max(len(r[0]) for r in rows), 36)
    return "".join(f"{left:<{width}}  # {text}"
                   + (f" [default {json.dumps(default)}]" if value != default else "") + "\n"
                   for left, text, default, value in rows)


# json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str), its encoder made once (a
# grid's plan hashes three keys a point)
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def stage_hash(cfg: dict) -> str:
    """Short sha256 of the canonical JSON of cfg: the name of what defines a run."""
    return hashlib.sha256(_CANONICAL.encode(cfg).encode()).hexdigest()[:12]


def stage_hash_of_list(items) -> str:
    """stage_hash(list(items)), streamed: the same digest without the JSON of all of them in memory
    at once (a 100,000-point grid's parameters are some 300 MB of JSON)."""
    h = hashlib.sha256(b"[")
    for i, item in enumerate(items):
        h.update((b"," if i else b"") + _CANONICAL.encode(item).encode())
    h.update(b"]")
    return h.hexdigest()[:12]


def resolve_path(value: str | os.PathLike | None, root: Path | None = None) -> Path | None:
    """A path made absolute: a relative path is taken from the current directory (as a shell user
    expects; `root` instead, where a default location of the project is meant, e.g. runs/)."""
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else Path(os.path.abspath(Path(root or Path.cwd()) / p))


def _resolved(value: str) -> str:
    """' (= /abs/path, ...)' for a relative path: the error shows where it was looked for."""
    if Path(value).expanduser().is_absolute():
        return ""
    return f" (= {resolve_path(value)}: relative paths are taken from the current directory)"


def _coerce_floats(cfg: dict) -> None:
    """YAML 1.1 reads `1e-4` as a string and `1` as an int: accept both where a float is meant."""
    for key, value in flatten(cfg).items():
        if coerced(key, value) is not value:
            _set(cfg, key, coerced(key, value))


def coerced(key: str, value: Any) -> Any:
    """The value as the schema takes it: `1e-4` (a string to YAML 1.1) and `1` as floats where a
    float is meant; anything else as it is (validation then says what is wrong)."""
    types = SCHEMA.get(key, (None, ()))[1]
    if float in types and not isinstance(value, bool) and isinstance(value, (str, int)):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def with_values(cfg: dict, values: dict) -> dict:
    """cfg with these flat values set (coerced already), sharing with cfg every section they leave
    alone: a grid of 100,000 points holds one copy of its common parameters, not one each. Treat
    the sections as read-only."""
    out, fresh = dict(cfg), set()
    for key, value in values.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:   # copy each section on the way once
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
            elif id(child) not in fresh:
                child = dict(child)
            fresh.add(id(child))
            node[part] = node = child
        if isinstance(SCHEMA.get(key, (None,))[0], dict) and isinstance(value, dict) \
                and isinstance(node.get(last), dict):   # a dict parameter merges key-wise (_set)
            value = {**node[last], **value}
        node[last] = value
    return absolute_paths(out) if any(k in PATH_KEYS for k in values) else out


def flatten(d: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}; dict-valued parameters (data.embedded) stay whole."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in SCHEMA:
            out.update(flatten(v, key + "."))
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

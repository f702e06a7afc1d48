"""A study grid: ordinary study parameters plus a `grid:` mapping of keys to value lists; every
combination is a point (a study of its own), and points that share a prefix of the stage chain
share its stages (one data stage, one training per seed and training parameters, ...).

    # params/grid.yaml
    train: {epochs: 10}
    grid:
      prune.method: [l1_unstructured, global_magnitude, random_unstructured]
      prune.amount: [0.2, 0.5, 0.7, 0.8, 0.9]
      seed: [0, 1, 2]

`load` reads the file, the `-p key=value` overrides (for every point) and the `-g key=v1,v2`
grid overrides, and validates every point before any work (config.ParamsError lists every bad
point with its problem). `plan` names each point's stages by their keys and counts the unique
ones; `dry_run_text` prints that plan with what is already done and an estimate of the time left.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import config, graph, paths, records

GRID_KEY = "grid"


@dataclass(frozen=True)
class Point:
    name: str                   # folder name under <sweep>/points/, readable
    values: dict                # this point's grid values {key: value}
    cfg: dict = field(repr=False)   # its full, validated parameters (sections shared between points: read-only)
    keys: dict | None = field(default=None, repr=False)   # its stage keys (graph.all_keys), when computed already


def keys_of(point: Point) -> dict[str, str]:
    """Every stage key of a point (graph.all_keys): those computed with the grid, or now."""
    return point.keys if point.keys is not None else graph.all_keys(point.cfg)


def _parse_grid_override(item: str) -> tuple[str, list]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise config.ParamsError([f"grid override {item!r} is not key=v1,v2,... (e.g. -g prune.amount=0.2,0.5,0.8)"])
    raw = raw.strip()
    try:
        values = yaml.safe_load(raw) if raw.startswith("[") else [yaml.safe_load(v) for v in raw.split(",")]
    except yaml.YAMLError as e:
        raise config.ParamsError([f"grid override {item!r}: values are not valid YAML ({e.problem})"]) from None
    return key.strip(), values if isinstance(values, list) else [values]


def read(path: str | Path | None, overrides=(), grid_overrides=()) -> tuple[dict, dict[str, list]]:
    """(the study parameters common to every point, as a flat dict of the file, then the -p overrides
    (so that `-p key=null` clears a key of the file); the grid {key: values}) from a grid file."""
    loaded: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise config.ParamsError([f"grid file {p} does not exist: pass an existing YAML file to -f"])
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise config.ParamsError([f"{p} is not valid YAML: {e}"]) from None
        if not isinstance(loaded, dict):
            raise config.ParamsError([f"{p} must hold a mapping of parameters and a `grid:` mapping"])
    loaded = dict(loaded)
    grid = loaded.pop(GRID_KEY, None) or {}
    if not isinstance(grid, dict):
        raise config.ParamsError([f"`grid:` must map parameter keys to lists of values, got {type(grid).__name__}"])
    grid = {str(k): (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in config.flatten(grid).items()}
    for item in grid_overrides:
        key, values = _parse_grid_override(item)
        grid[key] = values
    base, problems = config.flatten(loaded), []
    for item in overrides:
        try:
            key, value = config.parse_override(item)
        except config.ParamsError as e:
            problems += e.problems
            continue
        both_dicts = isinstance(base.get(key), dict) and isinstance(value, dict)
        base[key] = {**base[key], **value} if both_dicts else value   # a dict parameter merges key-wise
    if problems:
        raise config.ParamsError(problems)
    return base, grid


def _problems_of_grid(base: dict, grid: dict[str, list]) -> list[str]:
    problems = []
    for key, values in grid.items():
        if key not in config.SCHEMA:
            problems.append(f"grid key {key!r} is not a parameter (prunestudy params --show lists them)")
        elif not values:
            problems.append(f"grid key {key} has no values")
        elif twice := _twice(key, values, base):
            problems.append(f"grid key {key} lists one value twice: {twice}; list each value once")
    for key in config.RUNNER_KEYS:
        if base.get(key) is not None or key in grid:
            target = {"seeds": "seed", "prune.amounts": "prune.amount", "prune.methods": "prune.method"}[key]
            problems.append(f"{key} is the one-run shorthand of a grid: in a grid file write `grid: {{{target}: "
                            f"[...]}}` instead (each value a point, its stages shared and run in parallel), or "
                            f"clear it with -p {key}=null")
    return problems


def _twice(key: str, values: list, base: dict) -> str:
    """The values of a grid key that are one value as the schema takes it (0.5, 5e-1 and 0.50 are
    one prune.amount; a dict parameter merged into its default): '' if none."""
    seen: dict[str, list] = {}
    for value in values:
        seen.setdefault(_canonical(key, value, base), []).append(value)
    alike = [written for written in seen.values() if len(written) > 1]
    return "; ".join(" and ".join(json.dumps(v, default=str) for v in written) for written in alike)


def _canonical(key: str, value, base: dict) -> str:
    value = config.coerced(key, value)
    default = config.SCHEMA[key][0]
    if isinstance(default, dict) and isinstance(value, dict):   # merged key-wise into the file's or default
        value = {**default, **(base.get(key) or {}), **value}
    return json.dumps([type(value).__name__, value], sort_keys=True, default=str)


def points(path: str | Path | None, overrides=(), grid_overrides=()) -> list[Point]:
    """Every point of the grid, validated: config.ParamsError lists every problem of every point.
    The common parameters are merged once; each point shares their sections it does not change,
    and its stage keys are computed once per distinct stage parameters (graph.KeyMemo)."""
    base, grid = read(path, overrides, grid_overrides)
    problems = _problems_of_grid(base, grid)
    if problems:
        raise config.ParamsError(problems)
    common, _ = config.merged(values=base)
    common = config.absolute_paths(common)
    keys = list(grid)
    grid = {k: [config.coerced(k, v) for v in vs] for k, vs in grid.items()}
    memo = graph.KeyMemo(tuple(keys))
    flat = config.flatten(common)
    known = config.key_problems(flat, [k for k in flat if k not in grid])   # the common values, checked once
    out, bad = [], []
    combos = itertools.product(*(grid[k] for k in keys)) if keys else [()]
    for combo in combos:
        values = dict(zip(keys, combo))
        cfg = config.with_values(common, values)
        problems = config.validate(cfg, known)
        if problems:
            bad += [f"point {_label(values)}: {p}" for p in problems]
            continue
        out.append(Point(_name(values), values, cfg, graph.all_keys(cfg, memo=memo)))
    if bad:
        raise config.ParamsError(bad)
    names = [p.name for p in out]
    if len(set(names)) != len(names):   # values that print alike: make the names unique
        out = [Point(f"{p.name}-{config.stage_hash(p.values)[:6]}", p.values, p.cfg, p.keys) for p in out]
    return out


def _label(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "(the base parameters)"


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


def _name(values: dict) -> str:
    """A readable folder name: the grid values, short keys (e.g. method=l1_unstructured,amount=0.5,seed=0)."""
    if not values:
        return "base"
    last = [k.rsplit(".", 1)[-1] for k in values]
    parts = [f"{k.rsplit('.', 1)[-1] if last.count(k.rsplit('.', 1)[-1]) == 1 else k}={json.dumps(v, default=str)}"
             for k, v in values.items()]
    name = _UNSAFE.sub("_", ",".join(parts).replace('"', ""))
    return name if len(name) <= 120 else f"{name[:100]}-{config.stage_hash(values)[:8]}"


# --- the plan ----------------------------------------------------------------------------------
def plan(pts: list[Point]) -> dict:
    """{stage kind: {key: [point names]}}: the unique stages and the points that share each."""
    out: dict[str, dict[str, list[str]]] = {s: {} for s in graph.PLANNED}
    for p in pts:
        for stage, key in keys_of(p).items():
            out[stage].setdefault(key, []).append(p.name)
    return out


def done_keys(store_root: Path, the_plan: dict) -> dict[str, set[str]]:
    """The keys of each stored kind whose store entry holds a record of that key (complete when
    its inputs still agree: the run checks that again before it skips anything). Only the entries
    that exist are read (a 100,000-point plan on a fresh store opens no file)."""
    done = {}
    for stage, keys in the_plan.items():
        folder = Path(store_root) / stage
        done[stage] = {k for k in _present(folder, keys) if records.recorded(folder / k, k)}
    return done


def _present(folder: Path, names) -> list[str]:
    """The names that are entries of the folder (none if it does not exist), listed once."""
    try:
        there = set(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [n for n in names if n in there]


def dry_run_text(pts: list[Point], sweep_dir: Path, store_root: Path) -> str:
    """The plan: points, unique stages per kind (and how many are done), and an estimate of the time
    left from the stage times the store has measured."""
    the_plan = plan(pts)
    done = done_keys(store_root, the_plan)
    points_dir = Path(sweep_dir) / paths.SWEEP_POINTS
    by_name = {p.name: p for p in pts}
    for name in _present(points_dir, by_name):   # analyses live in the point folders, not in the store
        key = keys_of(by_name[name])["analysis"]
        if records.recorded(paths.stage_dir(paths.point_dir(sweep_dir, name), "analysis"), key):
            done["analysis"].add(key)
    seconds = measured_seconds(store_root)
    lines = [f"{len(pts)} points; stages (unique, done, to run; shared per ...):"]
    left, unknown = 0.0, []
    for stage in graph.PLANNED:
        keys = the_plan[stage]
        todo = len(keys) - len(done[stage])
        lines.append(f"  {stage:9s} {len(keys):5d} unique, {len(done[stage]):5d} done, {todo:5d} to run"
                     f"   (one per {graph.stage(stage).shared_by})")
        if todo and stage in seconds:
            left += todo * seconds[stage]
        elif todo:
            unknown.append(stage)
    estimate = f"about {left / 60:.1f} min of stage time left" if left else "no stage time measured yet"
    if unknown:
        estimate += f" (no measurement yet for {', '.join(unknown)}: not counted)"
    lines.append(f"estimate: {estimate}, from the median stage times in {store_root}; divide by the "
                 "number of parallel jobs")
    return "\n".join(lines)


def measured_seconds(store_root: Path, most: int = 500) -> dict[str, float]:
    """Median wall time per kind of stage over the store's records; for the analysis (kept in run
    folders, not in the store) over the runs and sweep points beside the store (at most `most`)."""
    root = Path(store_root)
    out = {}
    for stage in graph.PLANNED:
        if stage == "analysis":
            folders = itertools.islice(itertools.chain(root.parent.glob(f"*/{paths.SWEEP_POINTS}/*/{stage}"),
                                                       root.parent.glob(f"*/{stage}")), most)
        else:
            folders = (root / stage).iterdir() if (root / stage).is_dir() else ()
        times = []
        for folder in folders:
            rec = records.read(folder) if folder.is_dir() else None
            if rec and (rec.get("wall_seconds") or rec.get("seconds")):
                times.append(float(rec.get("wall_seconds") or rec["seconds"]))
        if times:
            times.sort()
            out[stage] = times[len(times) // 2]
    return out



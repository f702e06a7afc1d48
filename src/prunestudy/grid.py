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
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import config, graph, paths, records, torchchecks

GRID_KEY = "grid"


class Point:
    """A point of a grid: `name` (its folder under <sweep>/points/, readable), `values` (its grid
    values {key: value}), `cfg` (its full, validated parameters; sections shared between points:
    read-only) and `keys` (its stage keys, graph.all_keys, when computed already).

    A point of `points` keeps only its grid values and its keys: its parameters are made again from
    the grid's common ones each time `cfg` is read (config.with_values, microseconds), so that a
    100,000-point grid does not hold 100,000 copies of its changed sections."""

    __slots__ = ("name", "_values", "_cfg", "_keys", "_grid")

    def __init__(self, name: str, values: dict, cfg: dict, keys: dict | None = None):
        self.name, self._values, self._cfg, self._keys, self._grid = name, values, cfg, keys, None

    @classmethod
    def _of(cls, grid: _Grid, name: str, combo: tuple, keys: tuple) -> Point:
        p = cls.__new__(cls)
        p.name, p._values, p._cfg, p._keys, p._grid = name, combo, None, keys, grid
        return p

    def _renamed(self, name: str) -> Point:
        p = Point.__new__(Point)
        p.name, p._values, p._cfg, p._keys, p._grid = name, self._values, self._cfg, self._keys, self._grid
        return p

    @property
    def values(self) -> dict:
        return dict(zip(self._grid.names, self._values)) if self._grid is not None else self._values

    @property
    def cfg(self) -> dict:
        return config.with_values(self._grid.common, self.values) if self._grid is not None else self._cfg

    @property
    def keys(self) -> dict | None:
        if self._grid is None or self._keys is None:
            return self._keys
        return dict(zip(graph.CHAIN + ("control",), self._keys))   # graph.all_keys' order

    def __repr__(self) -> str:
        return f"Point(name={self.name!r}, values={self.values!r})"


@dataclass(frozen=True)
class _Grid:
    common: dict               # the parameters every point shares (merged, checked, paths absolute)
    names: tuple[str, ...]     # the grid keys, in order


def keys_of(point: Point) -> dict[str, str]:
    """Every stage key of a point (graph.all_keys): those computed with the grid, or now."""
    keys = point.keys
    return keys if keys is not None else graph.all_keys(point.cfg)


class _Written(list):
    """A grid key's values from `-g key=v1,v2`, with each as it was written (`written`): a value
    listed twice is named as the user wrote it (0.5 and 0.50 are one value)."""

    written: list[str]


def _parse_grid_override(item: str) -> tuple[str, list]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise config.ParamsError([f"grid override {item!r} is not key=v1,v2,... (e.g. -g prune.amount=0.2,0.5,0.8)"])
    raw = raw.strip()
    try:
        if raw.startswith("["):
            values = yaml.safe_load(raw)
        else:
            values = _Written(yaml.safe_load(v) for v in raw.split(","))
            values.written = [v.strip() for v in raw.split(",")]
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
    shown = getattr(values, "written", None) or [json.dumps(v, default=str) for v in values]
    seen: dict[str, list] = {}
    for value, written in zip(values, shown):
        seen.setdefault(_canonical(key, value, base), []).append(written)
    alike = [written for written in seen.values() if len(written) > 1]
    return "; ".join(" and ".join(written) for written in alike)


def _canonical(key: str, value, base: dict) -> str:
    value = config.coerced(key, value)
    default = config.SCHEMA[key][0]
    if isinstance(default, dict) and isinstance(value, dict):   # merged key-wise into the file's or default
        value = {**default, **(base.get(key) or {}), **value}
    return json.dumps([type(value).__name__, value], sort_keys=True, default=str)


def points(path: str | Path | None, overrides=(), grid_overrides=()) -> list[Point]:
    """Every point of the grid, validated: config.ParamsError lists every problem of every point.
    The common parameters are merged and checked once; the values of grid keys that no check reads
    together are checked apart (`_bad_points`); each point's stage keys are computed once per
    distinct stage parameters (graph.KeyMemo); a point keeps only its values and keys (Point)."""
    base, grid = read(path, overrides, grid_overrides)
    problems = _problems_of_grid(base, grid)
    if problems:
        raise config.ParamsError(problems)
    common, _ = config.merged(values=base)
    common = config.absolute_paths(common)
    keys = tuple(grid)
    grid = {k: [config.coerced(k, v) for v in vs] for k, vs in grid.items()}
    lists = [grid[k] for k in keys]
    flat = config.flatten(common)
    known = config.key_problems(flat, [k for k in flat if k not in grid])   # the common values, checked once
    bad = _bad_points(common, keys, lists, known)
    if bad:
        raise config.ParamsError(bad)
    the_grid, memo, name_of = _Grid(common, keys), graph.KeyMemo(keys), _namer(keys, lists)
    out = []
    for index in itertools.product(*(range(len(vs)) for vs in lists)):
        combo = tuple(vs[i] for vs, i in zip(lists, index))
        cfg = config.with_values(common, dict(zip(keys, combo)))
        out.append(Point._of(the_grid, name_of(index, combo), combo,
                             tuple(graph.all_keys(cfg, memo=memo).values())))
    names = {p.name for p in out}
    if len(names) != len(out):   # values that print alike: make the names unique
        out = [p._renamed(f"{p.name}-{config.stage_hash(p.values)[:6]}") for p in out]
    return out


def _bad_points(common: dict, keys: tuple, lists: list[list], known: dict) -> list[str]:
    """The problems of every bad point ('point <values>: <problem>'), each point's as config.validate
    gives them. No check reads two grid keys of different groups (config.READ_TOGETHER) together,
    so a point is valid when each group's values, set alone on the common parameters, are: each
    distinct combination of a group's values is checked once (100 amounts x 1,000 seeds: 1,100
    checks, not 100,000), and only the points holding a combination found bad are checked whole.
    The checks that need PyTorch are asked all at once (torchchecks)."""
    groups = config.read_together(keys) or [()]

    def check_groups() -> list[set]:
        bad = []
        for group in groups:
            found = set()
            for index in itertools.product(*(range(len(lists[g])) for g in group)):
                cfg = config.with_values(common, {keys[g]: lists[g][i] for g, i in zip(group, index)})
                if config.validate(cfg, known):
                    found.add(index)
            bad.append(found)
        return bad

    with torchchecks.collected() as wanted:
        bad_parts = check_groups()
    if wanted:   # questions for PyTorch found: asked at once, then the groups checked with the answers
        torchchecks.answers(wanted, config.cache_root, config.CHOICES["train.model"])
        bad_parts = check_groups()
    if not any(bad_parts):
        return []
    problems = []
    for index in itertools.product(*(range(len(vs)) for vs in lists)):
        if any(tuple(index[g] for g in group) in found for group, found in zip(groups, bad_parts) if found):
            values = {k: vs[i] for k, vs, i in zip(keys, lists, index)}
            problems += [f"point {_label(values)}: {p}" for p in config.validate(config.with_values(common, values),
                                                                                 known)]
    return problems


def _label(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "(the base parameters)"


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


def _name(values: dict) -> str:
    """A readable folder name: the grid values, short keys (e.g. method=l1_unstructured,amount=0.5,seed=0)."""
    if not values:
        return "base"
    keys = tuple(values)
    return _namer(keys, [[v] for v in values.values()])((0,) * len(keys), tuple(values.values()))


def _namer(keys: tuple, lists: list[list]):
    """name(index, combo) of the points of a grid: _name's, each key=value part formatted once per
    value (the unsafe characters never span a part: ',' is safe)."""
    if not keys:
        return lambda index, combo: "base"
    short = [k.rsplit(".", 1)[-1] for k in keys]
    labels = [s if short.count(s) == 1 else k for k, s in zip(keys, short)]
    parts = [[_UNSAFE.sub("_", f"{label}={json.dumps(v, default=str)}".replace('"', "")) for v in vs]
             for label, vs in zip(labels, lists)]

    def name(index: tuple, combo: tuple) -> str:
        joined = ",".join(p[i] for p, i in zip(parts, index))
        return joined if len(joined) <= 120 else f"{joined[:100]}-{config.stage_hash(dict(zip(keys, combo)))[:8]}"
    return name


# --- the plan ----------------------------------------------------------------------------------
def plan(pts: list[Point]) -> dict:
    """{stage kind: {key: [point names]}}: the unique stages and the points that share each."""
    out: dict[str, dict[str, list[str]]] = {s: {} for s in graph.PLANNED}
    for p in pts:
        for stage, key in keys_of(p).items():
            out[stage].setdefault(key, []).append(p.name)
    return out


def unique_keys(pts: list[Point]) -> dict[str, set[str]]:
    """{stage kind: its unique keys}: the plan's counts, without the names of the points sharing each."""
    out: dict[str, set[str]] = {s: set() for s in graph.PLANNED}
    for p in pts:
        for stage, key in keys_of(p).items():
            out[stage].add(key)
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
    the_plan = unique_keys(pts)
    done = done_keys(store_root, the_plan)
    points_dir = Path(sweep_dir) / paths.SWEEP_POINTS
    if points_dir.is_dir():   # analyses live in the point folders, not in the store
        by_name = {p.name: p for p in pts}
        for name in _present(points_dir, by_name):
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



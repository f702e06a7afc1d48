"""`prunestudy status RUN_OR_SWEEP` (and `prunestudy run --dry-run`): for each stage of a run folder,
or each point and stage of a sweep, whether it is up to date, would be linked from the stage store,
or must be computed, and why (a parameter, a code file by name, an input recomputed, an output
edited, no record), as `dvc status` does for a pipeline. Nothing is written or computed.

Exit status of the command: 0 when every stage is up to date, 1 otherwise, 2 for bad input.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import atomic, config, execute, graph, paths, records, stagestore

UP_TO_DATE, LINK, COMPUTE = "up to date", "link", "compute"


@dataclass
class Line:
    stage: str
    key: str
    state: str                  # UP_TO_DATE, LINK (a complete store entry of its key) or COMPUTE
    reason: str | None = None   # why it is not up to date here
    where: str = "."            # the folder, relative to the run or sweep folder ("." the run itself)
    code: list[str] = field(default_factory=list)     # code files that changed since it was computed
    params: list[str] = field(default_factory=list)   # parameters that changed since it was computed

    def text(self) -> str:
        where = "" if self.where == "." else f"{self.where}: "
        if self.state == UP_TO_DATE:
            return f"  {where}{self.stage:9s} up to date (key {self.key})"
        verb = "linked from the stage store, not computed" if self.state == LINK else "must be computed"
        return f"  {where}{self.stage:9s} {verb} (key {self.key}): {self.reason}"


def _line(cfg: dict, folder: Path, stage: str, keys: dict, st: stagestore.Store | None, where: str) -> Line:
    """One stage's status; `keys`: the keys of its folder's stages (and of the data it reads)."""
    key = keys[stage]
    why = execute.problem(cfg, folder, stage, key)
    if why is None:
        return Line(stage, key, UP_TO_DATE, where=where)
    why = paths.dangling(paths.stage_dir(folder, stage)) or why   # a link that leads nowhere: with the fix
    rec = records.read(paths.stage_dir(folder, stage)) or {}
    files, names = [], []
    if rec and rec.get("key") != key:
        files, names = records.key_diff(rec, graph.key_params(stage, cfg), graph.code_files(stage))
    state = LINK if st is not None and stage in graph.STORED and _in_store(st, stage, keys) else COMPUTE
    return Line(stage, key, state, why, where, files, names)


def _in_store(st: stagestore.Store, stage: str, keys: dict) -> bool:
    """A complete store entry of the stage's key, computed from inputs of the keys asked for (the
    runner links them first, or they are in the folder already)."""
    entry = st.entry(stage, keys[stage])
    rec = records.read(entry)
    if rec is None or records.problem(entry, keys[stage]) is not None or not (entry / paths.marker(stage)).is_file():
        return False
    return all((rec.get("inputs") or {}).get(up, {}).get("key") == keys.get(up) for up in graph.stage(stage).reads)


def run_lines(cfg: dict, run_dir: Path, st: stagestore.Store | None) -> list[Line]:
    """The status of every stage a `prunestudy run` with cfg would check in run_dir, in its order."""
    keys = graph.chain_keys(cfg)
    lines = [_line(cfg, run_dir, s, keys, st, ".") for s in graph.CHAIN[:-1]]
    for name, pcfg in paths.curve_points(cfg):
        pkeys = {"data": keys["data"], **graph.point_keys(pcfg, keys["data"])}
        folder = paths.curve_point_dir(run_dir, name)
        lines += [_line(pcfg, folder, s, pkeys, st, f"{paths.CURVE}/{name}") for s in graph.POINT]
    for seed in config.repeat_seeds(cfg):
        rcfg, folder = config.repeat_config(cfg, seed), paths.repeat_dir(run_dir, seed)
        rkeys = {"data": keys["data"], **graph.repeat_keys(cfg, seed, keys["data"])}
        lines += [_line(rcfg, folder, s, rkeys, st, paths.repeat_name(seed)) for s in graph.REPEAT]
    lines.append(_line(cfg, run_dir, "analysis", keys, None, "."))
    return _propagate(lines)


def _propagate(lines: list[Line]) -> list[Line]:
    """A stage computed again makes every stage that reads it run again too (the runner reruns
    what follows a stage that ran): its folder's later stages, an in-run point's or a repeat's
    stages after the study's data and training, and the analysis after anything."""
    computed: dict[tuple[str, str], str] = {}
    for line in lines:
        if line.state != COMPUTE:
            earlier = graph.CHAIN[:graph.CHAIN.index(line.stage)]
            deps = [(line.where, s) for s in earlier]
            if line.where.startswith((paths.CURVE + "/", paths.REPEATS + "/")):
                deps += [(".", s) for s in ("data", "train")]
            cause = next((computed[d] for d in deps if d in computed), None)
            if line.stage == "analysis" and cause is None and computed:
                cause = next(iter(computed.values()))
            if cause:
                line.state, line.reason = COMPUTE, f"{cause} is computed again before it"
        if line.state == COMPUTE:
            computed[(line.where, line.stage)] = line.stage if line.where == "." else f"{line.where}/{line.stage}"
    return lines


def sweep_lines(sweep_dir: Path) -> tuple[list[Line], Path]:
    """The status of every point and stage of a sweep folder (its grid.json and point folders)."""
    grid_file = atomic.read_json(Path(sweep_dir) / paths.SWEEP_GRID)
    st = stagestore.Store(stagestore.choose(sweep_dir, None))
    lines = []
    for row in grid_file["points"]:
        folder, where = paths.point_dir(sweep_dir, row["name"]), f"{paths.SWEEP_POINTS}/{row['name']}"
        try:
            cfg = atomic.read_json(folder / paths.PARAMS)
        except (OSError, ValueError):
            lines.append(Line("data", "?", COMPUTE, f"the point's {paths.PARAMS} is missing or damaged", where))
            continue
        keys = graph.chain_keys(cfg)
        lines += _propagate([_line(cfg, folder, s, keys, st, where) for s in graph.CHAIN])
    return lines, st.root


def status(target: str | Path, cfg: dict | None = None, store_root: str | Path | None = None) -> dict:
    """{"folder", "kind" (run or sweep), "store", "stages": [Line as a dict], "stale": count}."""
    folder = config.resolve_path(target)
    if (folder / paths.SWEEP_GRID).is_file() and cfg is None:
        lines, root = sweep_lines(folder)
        kind = "sweep"
    else:
        if cfg is None:
            if not (folder / paths.PARAMS).is_file():
                raise FileNotFoundError(f"{folder} is neither a run folder (no {paths.PARAMS}) nor a sweep folder "
                                        f"(no {paths.SWEEP_GRID}): name one that `prunestudy run` or `prunestudy "
                                        "sweep` wrote")
            cfg = atomic.read_json(folder / paths.PARAMS)
        root = stagestore.choose(folder, store_root)   # the run folder's own store, if it recorded one
        st = stagestore.Store(root) if root is not None else None
        lines, root, kind = run_lines(cfg, folder, st), (st.root if st else None), "run"
    return {"folder": str(folder), "kind": kind, "store": str(root) if root else None,
            "stages": [asdict(x) for x in lines], "stale": sum(x.state != UP_TO_DATE for x in lines)}


def text(result: dict, everything: bool = True) -> str:
    lines = [Line(**x) for x in result["stages"]]
    shown = lines if everything else [x for x in lines if x.state != UP_TO_DATE]
    head = f"{result['kind']} {result['folder']}" + (f" (stage store {result['store']})" if result["store"] else "")
    out = [head, *(x.text() for x in shown)]
    todo = sum(x.state == COMPUTE for x in lines)
    link = sum(x.state == LINK for x in lines)
    if not result["stale"]:
        out.append(f"every stage is up to date ({len(lines)})")
    else:
        out.append(f"{len(lines) - result['stale']} of {len(lines)} stages up to date; {todo} to compute, {link} to "
                   "link from the stage store")
    return "\n".join(out)


def as_json(result: dict) -> str:
    return json.dumps(result, indent=1)

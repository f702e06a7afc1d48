"""The stage graph, written once: every stage, what it reads, where it is kept, the code that computes
it, and its key. Every other module (paths, records, the stage functions, the runner, the grid,
the sweep engine, the command line) reads it from here.

    data -> train -> prune -> retrain -> analysis          the chain of a run folder (its notebooks)
                 \\-> control                               the dense control (within retraining)
                                      \\-> timing           latency on this machine (within the analysis)

A stage's **key** names what defines its result (open_lth's run hash, DVC's stage hash): its
defining parameters, the key of the stage it follows (so a change reruns that stage and every
one after it, nothing before), and the digest of what computes it (`codedigest`: the package code
its entry points reach, its notebook's code cells, the lock file). Where a run folder lives, how
many threads or workers compute it, and which process does, are not part of it, except for the
timing stage: a latency is a measurement of a machine, so its key holds the machine's description
(`machine.describe()`: processor, instruction set, threads, GPUs), and so does the analysis' key
(the analysis runs the timing stage); the pruning it times is not computed again on another machine.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

from . import codedigest, config, machine, paths


@dataclass(frozen=True)
class Stage:
    name: str
    after: str | None          # the stage whose key its key holds (the one it follows)
    reads: tuple[str, ...]     # the stages whose outputs it reads (their records' ids are in its record)
    stored: bool               # kept once per key in the stage store (the analysis stays in its run folder)
    code: tuple[str, ...]      # entry points ("module:name") of the code that computes it
    read_as: str | None = None   # the argument naming this stage's folder in the functions of later stages
    shared_by: str = "point"     # what the stages of a grid share one of this stage by (the plan's wording)
    follow_notebook: bool = False   # its notebook's calls compute it (the analysis), not only display it
    files: tuple[str, ...] = ()     # package folders whose files compute it too (the report's template)
    measures: bool = False          # a measurement of the machine (keyed on it), not a stage of a grid's plan


_ALL = (
    Stage("data", None, (), True, ("stages:run_data",), "data_dir", "data parameters"),
    Stage("train", "data", ("data",), True, ("stages:run_train",), "model_dir", "seed and training parameters"),
    Stage("control", "train", ("train",), True, ("stages:_control",), None, "training and retraining parameters"),
    Stage("prune", "train", ("data", "train"), True, ("stages:run_prune",), "pruned_dir"),
    Stage("retrain", "prune", ("data", "train", "prune"), True, ("stages:run_retrain",)),
    Stage("timing", "retrain", ("train", "prune", "retrain"), True, ("stages:run_timing",), None,
          "point and machine", measures=True),
    Stage("analysis", "retrain", ("data", "train", "prune", "retrain"), False,
          ("execute:render_report", "execute:write_results"), follow_notebook=True, files=("templates",)),
)
STAGES: dict[str, Stage] = {s.name: s for s in _ALL}
KINDS = tuple(STAGES)                                             # every kind of stage, inputs first
PLANNED = tuple(s for s in KINDS if not STAGES[s].measures)       # what a grid's plan counts
# a run folder's stages, in order: those with a notebook of their own (paths.NOTEBOOK_OF; the control
# is computed within the retraining's)
CHAIN = tuple(s.name for s in _ALL if s.name in paths.NOTEBOOK_OF)
STORED = tuple(s for s in CHAIN if STAGES[s].stored)               # a run folder's stages kept in the store
REPEAT = ("train", "prune", "retrain")   # what a repeat with another seed computes (the data is shared)
TIMING_PENDING = "the timing stage"      # an efficiency summary's latency_from: left to the timing stage
POINT = ("prune", "retrain")             # what an in-run point of prune.amounts computes (the training is shared)


def stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}: one of {', '.join(STAGES)}")
    return STAGES[name]


def later(name: str) -> tuple[str, ...]:
    """The chain's stages after `name`."""
    return CHAIN[CHAIN.index(name) + 1:]


# --- what computes a stage ---------------------------------------------------------------------
@functools.cache
def _code_files(name: str, where: tuple) -> tuple[dict[str, str], str]:
    """(files, combined digest) of a stage's code for the project found from `where` (its
    PRUNESTUDY_HOME and the current folder, which config.project_root reads)."""
    s = stage(name)
    files = codedigest.files(s.code, config.project_root(), paths.NOTEBOOK_OF.get(name), s.follow_notebook, s.files)
    return files, codedigest.combined(files)


def _where() -> tuple:
    return os.environ.get("PRUNESTUDY_HOME"), os.getcwd()


def code_files(name: str) -> dict[str, str]:
    """{file: digest} of what computes the stage (codedigest), computed once per process."""
    return dict(_code_files(name, _where())[0])


def code_digest(name: str) -> str:
    """The digest of everything that computes the stage (one digest of code_files)."""
    return _code_files(name, _where())[1]


# --- keys ----------------------------------------------------------------------------------------
def defining(name: str, params: dict) -> dict:
    """The parameters that define a stage's result. The data stage's `workers` never changes it
    (tested), and its `seed` only draws the capped subsets (data.max_per_class, max_test_per_class):
    without caps, points and repeats that differ only in seed share one data stage."""
    if name != "data":
        return params
    drop = {"workers"} | ({"seed"} if params.get("max_per_class") is None
                          and params.get("max_test_per_class") is None else set())
    return {k: v for k, v in params.items() if k not in drop}


def key(name: str, params: dict, after: str | None, *, code: str | None = None, **extra) -> str:
    """The key of a stage: its defining parameters, the key of the stage it follows, and the digest
    of the code that computes it (`code`: that digest given, for the pinned-key tests)."""
    return config.stage_hash({"stage": name, "params": defining(name, params), "after": after,
                              "code": code_digest(name) if code is None else code, **extra})


def key_params(name: str, cfg: dict) -> dict:
    """A stage's parameters in cfg (what its notebook is run with, where it reads and writes aside).
    The analysis has none but the machine: it runs the timing stage, so on another machine (or with
    other threads) it runs again, and the latencies are measured there."""
    return {"machine": machine.describe()} if name == "analysis" else config.stage_params(name, cfg)


def chain_keys(cfg: dict, *, after: str | None = None, names: tuple[str, ...] = CHAIN,
               code: str | None = None, memo: KeyMemo | None = None) -> dict[str, str]:
    """Each stage's key in a run folder with these parameters. The analysis' key also holds the keys
    of the repeats' (`seeds`) and the in-run points' (`prune.amounts`) last stages. `memo`: the keys
    already computed for other studies of a grid (KeyMemo)."""
    keys, previous = {}, after
    for name in names:
        extra = {}
        if name == "analysis" and config.repeat_seeds(cfg):
            extra["repeats"] = {str(s): repeat_keys(cfg, s, keys["data"], code=code)["retrain"]
                                for s in config.repeat_seeds(cfg)}
        if name == "analysis" and config.curve_points(cfg):
            extra["curve"] = [point_keys(p, keys["data"], code=code)["retrain"] for p in config.curve_points(cfg)]
        if memo is not None and not extra:
            keys[name] = memo.key(name, cfg, previous, code)
        else:
            keys[name] = key(name, key_params(name, cfg), previous, code=code, **extra)
        previous = keys[name]
    return keys


CONTROL_INPUTS = ("retrain.epochs", "prune.rounds", "retrain.epochs_per_round", "retrain.lr", "retrain.batch_size",
                  "seed", "train.device")   # what control_params_of reads


def inputs(name: str) -> tuple[str, ...]:
    """The parameters (schema keys) a stage's key parameters are read from, beside the key it follows
    (and, for the analysis, the machine): two studies that agree in these and in the key before
    have the same key for this stage."""
    if name == "control":
        return CONTROL_INPUTS
    if name in ("analysis", "timing"):
        return ()
    return tuple(config.stage_parameters(name).values())


class KeyMemo:
    """The stage keys of many studies that differ in a few parameters (a grid's points, `varying`):
    each key computed once per distinct stage parameters and key before, not once per study (a
    100,000-point plan computes a few hundred data, training and control keys, not 100,000 each)."""

    def __init__(self, varying: tuple[str, ...]):
        self.varying = tuple(varying)
        self._read = {name: tuple(k for k in self.varying if k in inputs(name)) for name in KINDS}
        self._keys: dict[tuple, dict[tuple, str]] = {}   # {(stage, code): {(key before, read values): key}}
        self._code: dict[str, str] = {}                    # each stage's code digest, read once
        self._machine: dict | None = None                  # machine.describe(), once
        self._params: dict[str, dict] = {}                 # the first study's stage parameters (key_params)
        self._own = {name: [(p, k) for p, k in config.stage_parameters(name).items() if k in self.varying]
                     for name in KINDS if name in config.STAGE_EXTRAS}   # the varying ones among them

    def key(self, name: str, cfg: dict, after: str | None, code: str | None = None) -> str:
        """The key of stage `name` of cfg, after the key `after` (computed if no study before had it)."""
        known = self._keys.setdefault((name, code), {})
        memo = (after, *[part for k in self._read[name] for part in _hashable(config.value(cfg, k))])
        found = known.get(memo)
        if found is None:
            if name == "control":
                params = control_params_of(cfg)
            elif name == "analysis":   # key_params' machine, described once (it reads the environment)
                self._machine = self._machine or {"machine": machine.describe()}
                params = self._machine
            elif name in self._params:   # the first study's, with this one's varying values
                params = {**self._params[name], **{p: config.value(cfg, k) for p, k in self._own[name]}}
            else:
                params = self._params[name] = key_params(name, cfg)
            if code is None and name not in self._code:
                self._code[name] = code_digest(name)
            found = known[memo] = key(name, params, after, code=self._code[name] if code is None else code)
        return found


def _hashable(value) -> tuple:
    """A value as a memo's key: its type too (1, 1.0 and True are one key to a dict, not to a stage)."""
    if isinstance(value, (dict, list)):
        return ("json", json.dumps(value, sort_keys=True, default=str))
    return (type(value).__name__, value)


def repeat_keys(cfg: dict, seed: int, data_key: str, *, code: str | None = None) -> dict[str, str]:
    """Keys of a repeat's stages: its parameters (the study's, with `seed`) after the shared data."""
    return chain_keys(config.repeat_config(cfg, seed), after=data_key, names=REPEAT, code=code)


def point_keys(pcfg: dict, data_key: str, *, code: str | None = None) -> dict[str, str]:
    """Keys of an in-run point's stages (prune.amounts): its parameters after the shared data (its
    training is the study's: the same key)."""
    return chain_keys(pcfg, after=data_key, names=REPEAT, code=code)


def control_params(epochs: int, lr: float, batch_size: int, seed: int, device: str) -> dict:
    """What defines the dense control beside the training it starts from (its key's parameters)."""
    return {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "device": device}


def control_params_of(cfg: dict) -> dict:
    """The dense control's parameters in cfg: its training, and the retraining settings over as many
    epochs as the pruned model gets (between rounds included)."""
    rounds, per_round, re_ = cfg["prune"]["rounds"], cfg["retrain"]["epochs_per_round"], cfg["retrain"]
    return control_params(re_["epochs"] + (rounds - 1) * per_round, re_["lr"], re_["batch_size"], cfg["seed"],
                          cfg["train"]["device"])


def timing_params(latency_repeats: int, device: str) -> dict:
    """What defines a timing beside the models it times: the prune stage's latency settings and the
    machine it is measured on."""
    return {"latency_repeats": latency_repeats, "device": device, "machine": machine.describe()}


def timing_key(retrain_key: str, latency_repeats: int, device: str) -> str:
    """The key of the timing of the models of a chain whose retraining has `retrain_key`, on this machine."""
    return key("timing", timing_params(latency_repeats, device), retrain_key)


def all_keys(cfg: dict, *, code: str | None = None, memo: KeyMemo | None = None) -> dict[str, str]:
    """Every stage key of one study (a grid point): its chain's, and its control's. `memo`: see chain_keys."""
    keys = chain_keys(cfg, code=code, memo=memo)
    if cfg["retrain"]["control"]:
        keys["control"] = (memo.key("control", cfg, keys["train"], code) if memo is not None
                           else key("control", control_params_of(cfg), keys["train"], code=code))
    return keys

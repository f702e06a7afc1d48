"""Data-parallel training with torchrun (`train.launcher: none | torchrun`, `train.nproc_per_node`).

`launch` runs a stage function in `nproc_per_node` processes per node under
`python -m torch.distributed.run` and streams their output; each process runs this module's
worker (`python -m prunestudy.distributed ARGS.json`), which initialises the process group
(gloo on the CPU, nccl on CUDA, one GPU per process) and calls the stage function. `train.fit`
is DDP-aware: it wraps the model in DistributedDataParallel, gives each rank its slice of every
global batch, all-reduces the statistics; only rank 0 logs epochs and writes checkpoints, and
stages write their artifacts only where `train.is_main_process()`.

One node (what `launch(..., nproc_per_node=2)` runs)::

    python -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node 2 \\
        -m prunestudy.distributed ARGS.json

Several nodes: run the same `launch(..., nproc_per_node=8, nnodes=2,
rdzv_endpoint="node0.example:29400")` on every node (same endpoint: a host:port that all nodes
reach, the rendezvous runs there), i.e.::

    python -m torch.distributed.run --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint node0.example:29400 --rdzv-id prunestudy -m prunestudy.distributed ARGS.json

The run folder must then be on a file system shared by the nodes; `launch` returns the stage's
result on the node that holds global rank 0, None on the others.
"""

from __future__ import annotations

import collections
import faulthandler
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import machine

LAUNCHERS = ("none", "torchrun")


class LaunchError(RuntimeError):
    """A distributed run failed; the message ends with the last lines it printed."""


def resolve_stage(name: str) -> Callable[..., Any]:
    """'run_train' -> prunestudy.stages.run_train; 'package.module:function' -> that function."""
    module, _, fn = name.rpartition(":") if ":" in name else ("prunestudy.stages", "", name)
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise LaunchError(f"cannot find stage function {name!r} ({e}): name a function of prunestudy.stages "
                          "or 'package.module:function'") from None


def command(args_file: str | os.PathLike, nproc_per_node: int, nnodes: int = 1,
            rdzv_endpoint: str | None = None, rdzv_id: str = "prunestudy") -> list[str]:
    """The torchrun command line that runs this module's worker on ARGS file."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
           "--nproc_per_node", str(nproc_per_node)]
    if rdzv_endpoint is None:
        if nnodes != 1:
            raise ValueError(f"nnodes={nnodes} needs rdzv_endpoint='host:port' (a node all nodes reach)")
        cmd.insert(3, "--standalone")
    else:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id]
    return cmd + ["-m", "prunestudy.distributed", str(args_file)]


def _child_env(nproc_per_node: int, extra: dict | None) -> dict:
    """Unbuffered output (streamed line by line) and one share of the cores per process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
    env.setdefault("OMP_NUM_THREADS", str(max(1, machine.usable_cpus() // nproc_per_node)))
    return env


def launch(stage_fn_name: str, kwargs: dict, nproc_per_node: int, nnodes: int = 1,
           rdzv_endpoint: str | None = None, log: Callable[[str], None] = print, *,
           env: dict | None = None, tail: int = 40) -> Any:
    """Run stage function `stage_fn_name(**kwargs)` under torchrun; return rank 0's result.

    kwargs must be JSON-serialisable (no `log` function: workers print). Output is streamed
    line by line to `log`; a failure raises LaunchError with the last `tail` lines. `env` adds
    environment variables for the workers (e.g. PYTHONPATH).
    """
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node={nproc_per_node}: must be at least 1")
    with tempfile.TemporaryDirectory(prefix="prunestudy-ddp-") as tmp:
        args_file, result = Path(tmp) / "args.json", Path(tmp) / "result.json"
        args_file.write_text(json.dumps({"stage": stage_fn_name, "kwargs": kwargs, "result": str(result)}))
        cmd = command(args_file, nproc_per_node, nnodes, rdzv_endpoint)
        last: collections.deque[str] = collections.deque(maxlen=tail + _REPORT_LINES)
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                              env=_child_env(nproc_per_node, env)) as proc:
            for line in proc.stdout:
                line = line.rstrip("\n")
                last.append(line)
                log(line)
            rc = proc.wait()
        if rc != 0:
            raise LaunchError(f"distributed run of {stage_fn_name} ({nnodes} node(s) x {nproc_per_node} "
                              f"processes) failed with exit code {rc}" + failure_text(list(last), tail))
        return json.loads(result.read_text()) if result.is_file() else None


# torchrun's own report of a failed process: a log line, its traceback and a box of ~20 lines
# (ChildFailedError) that names the first failure's rank and exit code or signal
_REPORT_LINES = 80
_AGENT_FAILED = re.compile(r"torch/distributed/elastic/.*\] failed \(exitcode: ")
_AGENT_LOG = re.compile(r"^[IWE]\d{4} .*torch/distributed/elastic/")
_ROOT = re.compile(r"^\s*(rank|exitcode)\s*: (.*)$")


def failure_text(lines: list[str], tail: int = 40) -> str:
    """What a failed launch's message ends with: the first failure's rank and cause, then the
    processes' own last `tail` lines (what the failing rank printed: its traceback, or for a
    crash its fault handler's stack), not torchrun's traceback, which buries them."""
    start = next((i for i, s in enumerate(lines) if _AGENT_FAILED.search(s)), None)
    if start is None:
        return "; last lines:\n" + "\n".join(lines[-tail:])
    report = lines[start:]
    root = next((i for i, s in enumerate(report) if "Root Cause" in s), None)
    fields = {}
    for s in report[root:] if root is not None else []:
        m = _ROOT.match(s)
        if m and m[1] not in fields:
            fields[m[1]] = m[2].strip()
    if fields:
        cause = f"first failure: rank {fields.get('rank', '?')}, exitcode {fields.get('exitcode', '?')}"
        cause = " ".join(cause.split())
    else:
        cause = report[0].split("] ", 1)[-1]
    own = [s for s in lines[:start] if not _AGENT_LOG.match(s)]  # not its "Sending ... SIGTERM"
    return f"; {cause}; the processes' last lines before torchrun's report:\n" + "\n".join(own[-tail:])


def _backend(kwargs: dict) -> str:
    import torch

    return "nccl" if torch.cuda.is_available() and str(kwargs.get("device", "auto")) != "cpu" else "gloo"


def worker(args_file: str | os.PathLike) -> None:
    """One torchrun process: join the process group, run the stage, rank 0 saves its result."""
    import torch
    import torch.distributed as dist

    from . import atomic

    faulthandler.enable()  # a crash (SIGABRT, SIGSEGV) prints this process's Python stack before it dies
    spec = json.loads(Path(args_file).read_text())
    fn = resolve_stage(spec["stage"])
    backend = _backend(spec["kwargs"])
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        result = fn(**spec["kwargs"])
        if dist.get_rank() == 0 and spec.get("result"):
            atomic.write_json(spec["result"], result)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m torch.distributed.run ... -m prunestudy.distributed ARGS.json", file=sys.stderr)
        return 2
    worker(argv[0])
    return 0


if __name__ == "__main__":
    rc = main()
    # The stage is done and written (its artifacts, rank 0's result file) and the process group
    # destroyed: skip the interpreter's teardown. With gloo it could abort a finished rank under
    # load ("terminate called without an active exception", SIGABRT: C++ threads of the process
    # group's objects still alive at finalisation), and torchrun then fails the whole run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)

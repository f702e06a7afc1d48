"""`prunestudy` command line: run the study, install the kernel, show parameters, compare runs."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
from pathlib import Path

import yaml

from . import (
    atomic,
    config,
    download,
    execute,
    graph,
    grid,
    lab,
    machine,
    paths,
    pipeline,
    reclaim,
    runlock,
    schedule,
    stagestore,
    sweep,
)

_ending = False   # an interrupted run or sweep is ending (_interrupted_status; see main)


def main(argv: list[str] | None = None) -> int:
    """The `prunestudy` command. An interrupted run or sweep of the program itself (argv None: not a
    caller in this process) ends right after its exit handlers (its kernel stopped, Ray shut down):
    the interpreter's own teardown could still meet a late SIGINT (a handler put back as a closed
    generator unwinds) and end the process with 130 or -2 instead of its status."""
    code = _main(argv)
    if _ending and argv is None:
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()
        os._exit(code)
    return code


def _main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `prunestudy params | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = argparse.ArgumentParser(prog="prunestudy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the five notebooks with papermill and render the HTML report")
    _add_params_args(run)
    run.add_argument("--run-dir", help="output folder (default: runs/<params file name>[-<hash of overrides>])")
    run.add_argument("--store", metavar="DIR",
                     help="the stage store shared by runs and sweeps (default: the one the run folder recorded, "
                          "else .store beside it or $PRUNESTUDY_STORE; 'none': every stage computed in the "
                          "run folder)")
    run.add_argument("--fresh-kernels", action="store_true",
                     help="a new Jupyter kernel for every notebook (default: one kernel, reset between notebooks)")
    run.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="with `seeds`: compute the repeats N stages at a time first (the local pool, "
                          "cores/N threads each), then link them (default 1: one after another)")
    run.add_argument("--force", metavar="STAGE", choices=pipeline.FORCEABLE,
                     help=f"rerun from this stage on even if up to date ({', '.join(graph.CHAIN)}); 'timing': "
                          "measure the latencies again on this machine (and rerun the analysis) without "
                          "recomputing any model")
    run.add_argument("--dry-run", action="store_true",
                     help="print what the run would do, stage by stage (up to date, linked from the store, or "
                          "computed, and why), and stop: `prunestudy status` for these parameters")
    show = sub.add_parser("params", help="print the effective parameters (defaults, file, overrides)")
    _add_params_args(show)
    show.add_argument("--show", action="store_true",
                      help="one line per parameter: value, default and what it does")
    sub.add_parser("kernel", help="install the 'prunestudy' Jupyter kernel (and JupyterLab settings) for this Python")
    lab_p = sub.add_parser("lab", help="JupyterLab on a run folder's working copies of the stage notebooks (RUN/lab/), "
                                       "with the prunestudy kernel (as root too)")
    lab_p.add_argument("run_dir", nargs="?", metavar="RUN",
                       help="the run folder (default: runs/default); its lab/ gets copies of the stage notebooks with "
                            "its parameters, once (yours from then on)")
    lab_p.add_argument("--reset", action="store_true",
                       help=f"copy the notebooks into RUN/lab/ again; the old copies are moved to "
                            f"{paths.LAB}/{paths.LAB_OLD}/, never deleted")
    lab_p.add_argument("--source", action="store_true",
                       help="JupyterLab on the tracked notebooks/ instead, to edit the study's code (saving strips "
                            "outputs and JupyterLab's metadata)")
    lab_p.add_argument("--port", type=int, help="port (default: JupyterLab's, 8888 or the next free)")
    lab_p.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    download.add_cli(sub)
    _add_compare_cli(sub)
    _add_export_cli(sub)
    _add_sweep_cli(sub)
    _add_status_cli(sub)
    _add_cache_cli(sub)
    _add_store_cli(sub)
    args = parser.parse_args(argv)
    if getattr(args, "handler", None):
        return args.handler(args)

    if args.command == "kernel":
        print(f"kernel '{execute.ensure_kernel()}' -> {sys.executable} ({execute.kernel_dir()}); "
              f"JupyterLab settings {lab.ensure_settings()}")
        return 0
    if args.command == "lab":
        if args.source and (args.run_dir or args.reset):
            print("prunestudy lab: --source opens the tracked notebooks/, not a run folder: drop RUN and --reset",
                  file=sys.stderr)
            return 2
        return lab.main(args.run_dir, source=args.source, reset=args.reset, port=args.port,
                        open_browser=not args.no_browser)
    try:
        cfg = config.load(args.file, args.param)
    except config.ParamsError as e:
        print(f"prunestudy: {e}", file=sys.stderr)
        return 2
    if args.command == "params":
        print(config.describe(cfg) if args.show else yaml.safe_dump(cfg, sort_keys=False), end="")
        print(f"# params hash: {config.stage_hash(cfg)}")
        return 0
    if args.jobs < 1:
        print(f"prunestudy: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    run_dir = (config.resolve_path(args.run_dir) if args.run_dir
               else pipeline.default_run_dir(args.file, args.param, cfg))
    if args.dry_run:
        from . import status

        try:
            result = status.status(run_dir, cfg, args.store)
        except stagestore.StoreError as e:
            print(f"prunestudy: {e}", file=sys.stderr)
            return 2
        print(status.text(result))
        return 0
    print(f"prunestudy: run folder {run_dir} (params hash {config.stage_hash(cfg)})", flush=True)
    schedule.sigterm_as_sigint()
    try:
        res = pipeline.run(cfg, run_dir, force=args.force, log=lambda m: print(m, flush=True), store_root=args.store,
                           fresh_kernels=args.fresh_kernels, jobs=args.jobs)
    except (FileNotFoundError, execute.PreflightError, runlock.LockedError, atomic.PlantedLink,
            stagestore.StoreError) as e:
        print(f"prunestudy: {e}", file=sys.stderr)
        return 2
    except execute.StageFailed as e:
        print(f"prunestudy: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _interrupted_status()   # first: a second SIGINT (a kernel's group stopped) must not end us now
        # the notebook client's cell task ends with the kernel's KeyboardInterrupt after we stopped listening:
        # asyncio would print it as "Task exception was never retrieved" with a traceback at exit
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        print(f"prunestudy: {_interruption()}; finished stages are kept in {run_dir}: rerun the same command to "
              "go on", file=sys.stderr)
        return _interrupted_status()   # again: a SIGTERM handled meanwhile makes it 143
    except OSError as e:  # the runner's own writes (results.json, report): disk full, folder gone
        print(f"prunestudy: {e}; finished stages are kept in {run_dir}: fix the cause and rerun", file=sys.stderr)
        return 1
    print(_summary(res))
    no_store = args.store is not None and args.store.lower() == "none"
    print(_where_stored(None if no_store else stagestore.recorded(run_dir), run_dir))
    print(f"prunestudy: report {run_dir / paths.REPORT}")   # always the last line: where to look
    return 0


def _interruption() -> str:
    return "terminated (SIGTERM)" if schedule.terminated() else "interrupted"


def _interrupted_status() -> int:
    """The shell's status of a process ended by the signal: 143 for SIGTERM, 130 for Ctrl-C. From here
    on SIGINT is ignored: stopping a kernel signals its process group, which may hold this process,
    and a KeyboardInterrupt while exiting would end it with -2 instead (seen once in CI, when the
    SIGINT came while the closing line was printed: so this is called first)."""
    global _ending
    _ending = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # and blocked in this thread: a handler restored later (at exit) cannot let a pending one through
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    # a SIGTERM from now on is only noted (the command is ending already), never a second interrupt
    signal.signal(signal.SIGTERM, schedule.note_sigterm)
    return 128 + (signal.SIGTERM if schedule.terminated() else signal.SIGINT)


def _where_stored(root: Path | None, run_dir: Path | None = None) -> str:
    """A run's or sweep's line on where its stage outputs are (its folders only link there). A run
    folder none of whose stages links into a store (`--store none`, an exported copy) holds them."""
    linked = run_dir is None or any(Path(run_dir, name).is_symlink() for name in paths.NOTEBOOK_OF)
    if root is None or not linked:
        return ("prunestudy: no stage store (--store none): every stage is in the run folder" if root is None
                else f"prunestudy: every stage is in the run folder {run_dir} (it links nothing in a stage store)")
    return f"prunestudy: stage outputs are in the stage store {root} (the folder's stages link there; docs/sweeps.md)"


def _add_compare_cli(sub) -> None:
    """`prunestudy compare` (prunestudy.compare, imported when the command runs: pandas, seaborn and
    PyTorch are not needed to parse a command line)."""
    p = sub.add_parser(
        "compare", help="one self-contained HTML page comparing finished runs side by side",
        description="Write one self-contained HTML page (no script, nothing fetched) comparing two or more "
                    "finished run folders: per model state their test accuracy, loss, sparsity, parameters, "
                    "model size and latency; a figure; and the parameters that differ.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `prunestudy run` (two or more)")
    p.add_argument("-o", "--output", default=paths.COMPARE_PAGE, metavar="OUT.html",
                   help=f"the page to write (default: {paths.COMPARE_PAGE} in the current directory; replaced if "
                        "it exists)")
    p.set_defaults(handler=_compare)


def _compare(args: argparse.Namespace) -> int:
    """0: page written; 2: bad input (nothing written)."""
    from . import compare

    try:
        out = compare.compare(args.runs, args.output)
    except compare.CompareError as e:
        for line in str(e).splitlines():
            print(f"prunestudy compare: {line}", file=sys.stderr)
        return 2
    print(f"prunestudy compare: {len(args.runs)} runs -> {out}")
    return 0


def _add_export_cli(sub) -> None:
    p = sub.add_parser(
        "export", help="a self-contained copy of a run folder (its stages as files, not links into the store)",
        description="Copy a run folder to DEST with its stages: every link into the stage store becomes real "
                    "files (hard links on the store's file system, copies elsewhere or with --copy; modification "
                    "times kept), links inside the folder stay links. `cp -r` / `cp -a` copy the links, not the "
                    "stages. DEST must not exist; it appears whole or not at all. A sweep's points are run "
                    "folders: export them one by one.")
    p.add_argument("run", metavar="RUN", help="a run folder written by `prunestudy run` (or a sweep's points/<p>)")
    p.add_argument("dest", metavar="DEST", help="the new folder (must not exist)")
    p.add_argument("--copy", action="store_true", help="copy every file, never hard-link to the store's files")
    p.set_defaults(handler=_export)


def _export(args) -> int:
    """0: exported; 2: bad input, nothing written; 1: an error while writing (nothing left at DEST)."""
    from . import export

    try:
        done = export.export(args.run, args.dest, copy=args.copy)
    except export.ExportError as e:
        print(f"prunestudy export: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"prunestudy export: {e}; nothing was left at {args.dest}: fix the cause and rerun", file=sys.stderr)
        return 1
    print(f"prunestudy export: {args.run} -> {args.dest}: {done.line()}")
    return 0


def _add_status_cli(sub) -> None:
    p = sub.add_parser(
        "status", help="which stages of a run or sweep are up to date, and why the others are not (exit 1)",
        description="For each stage of a run folder (or each point and stage of a sweep folder): up to date, "
                    "linked from the stage store, or to be computed, and why: a parameter, a code file, an input "
                    "recomputed, an output edited, no record. Computes and writes nothing. Exit 0 when every "
                    "stage is up to date, 1 otherwise, 2 for bad input.")
    p.add_argument("folder", metavar="RUN_OR_SWEEP", help="a run folder (prunestudy run) or a sweep folder")
    p.add_argument("--json", action="store_true", help="print the status as JSON (for scripts)")
    p.add_argument("--store", metavar="DIR", help="a run's stage store, if not the default (as given to `run`)")
    p.add_argument("--stale", action="store_true", help="print only the stages that are not up to date")
    p.set_defaults(handler=_status)


def _status(args) -> int:
    from . import status

    try:
        result = status.status(args.folder, store_root=args.store)
    except (FileNotFoundError, ValueError) as e:
        print(f"prunestudy status: {e}", file=sys.stderr)
        return 2
    print(status.as_json(result) if args.json else status.text(result, everything=not args.stale))
    return 1 if result["stale"] else 0


def _add_cache_cli(sub) -> None:
    p = sub.add_parser("cache", help="list or clear cached crop sets (data/cache) and the embedded dataset")
    p.add_argument("action", choices=("list", "clear"))
    p.add_argument("--all", action="store_true", help="clear: also remove the generated embedded dataset")
    p.set_defaults(handler=_cache)


def _cache(args) -> int:
    from . import cache  # the crop sets' code imports PyTorch

    if args.action == "clear":
        freed = cache.clear(include_embedded=args.all)
        print(f"prunestudy: cache cleared, {freed / 2**20:.1f} MiB freed"
              + ("" if args.all else " (the embedded dataset is kept: --all removes it too)"))
        return 0
    rows = cache.entries()
    if not rows:
        print(f"prunestudy: the cache is empty ({cache.cache_root()})")
    for r in rows:
        sizes = f"{r['train_size']} train / {r['test_size']} test, " if r["train_size"] is not None else ""
        state = "" if r["complete"] else " (incomplete)"
        print(f"{r['kind']:8s} {r['key']}  {sizes}{r['bytes'] / 2**20:.1f} MiB{state}  {r['root'] or r['path']}")
    return 0


def _add_store_cli(sub) -> None:
    p = sub.add_parser("store", help="the stage store: verify its entries, see its size (du), remove what no "
                                     "folder links (gc)",
                       description="verify: hash every complete entry again; du: its size, what the run and sweep "
                                   "folders link and what they do not; gc: remove what none links.")
    actions = p.add_subparsers(dest="action", required=True)
    verify = actions.add_parser("verify", help="hash every complete entry again against its recorded digests",
                                description="hash every complete entry of the stage store again and compare with "
                                            "the digests its stage recorded; a damaged entry is moved to "
                                            "<store>/.quarantine/ (the runs that link it compute it again). Exit 1 "
                                            "when one was damaged.")
    du = actions.add_parser("du", help="the store's size per stage, what the run and sweep folders link, the "
                                       "quarantine",
                            description="the entries and bytes of each stage kind (hard links counted once), how "
                                        "many of them the run and sweep folders under ROOTS link (directly or "
                                        "through a linked entry) and how many they do not, the quarantine's size.")
    gc = actions.add_parser("gc", help="remove the entries no run or sweep folder links",
                            description="remove the store entries that no run or sweep folder under ROOTS links "
                                        "(a symbolic link whose target is the entry or lies in it; a link inside "
                                        "a kept entry counts too). Safe beside a running sweep or run: an entry "
                                        "being computed (claimed), or linked after gc started, is kept.")
    for q in (verify, du, gc):
        q.add_argument("--store", metavar="DIR",
                       help="the stage store (default: $PRUNESTUDY_STORE, else the project's runs/.store)")
    for q in (du, gc):
        q.add_argument("roots", nargs="*", metavar="ROOTS",
                       help="the folders holding the run and sweep folders whose links count (default: the "
                            "store's parent folder, runs/ for runs/.store, and every folder that recorded the "
                            "store, wherever it lies)")
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed and the bytes freed")
    gc.add_argument("--older-than", metavar="AGE",
                    help="only entries completed longer ago than AGE (7d, 12h, 30m, 45s, 2w)")
    gc.add_argument("--quarantine", action="store_true", help="empty the quarantine too")
    p.set_defaults(handler=_store)


def _store(args) -> int:
    root = (Path(args.store).resolve() if args.store
            else stagestore.default_root(config.resolve_path(Path("runs") / "any", config.project_root())))
    if not root.is_dir():
        print(f"prunestudy store: no stage store at {root}: give the one your runs use with --store DIR",
              file=sys.stderr)
        return 2
    if args.action == "verify":
        found = stagestore.verify_all(root, lambda m: print(f"prunestudy store: {m}", flush=True))
        print(f"prunestudy store: {root}: {len(found['ok'])} entries verified, {len(found['damaged'])} damaged "
              f"(quarantined), {len(found['unverifiable'])} without digests (computed by an earlier prunestudy), "
              f"{len(found['incomplete'])} incomplete")
        return 1 if found["damaged"] else 0
    missing = [r for r in args.roots if not Path(r).is_dir()]
    if missing:
        print(f"prunestudy store: ROOTS must be folders: {', '.join(missing)} not found", file=sys.stderr)
        return 2
    if args.action == "du":
        report = reclaim.du(root, args.roots)
        print(f"prunestudy store du: {root}")
        print(f"looked for links under: {', '.join(map(str, report['roots'])) or '(nothing)'}")
        print(reclaim.du_table(report))
        return 0
    try:
        age = reclaim.parse_age(args.older_than) if args.older_than else None
    except ValueError as e:
        print(f"prunestudy store: {e}", file=sys.stderr)
        return 2
    looked = reclaim.roots_of(root, args.roots)
    print(f"prunestudy store gc: {root}" + (" (dry run: nothing is removed)" if args.dry_run else ""))
    print(f"looked for links under: {', '.join(map(str, looked)) or '(nothing)'}")
    done = reclaim.collect(root, args.roots, dry_run=args.dry_run, older_than=age, quarantine=args.quarantine,
                           log=lambda m: print(f"  {m}", flush=True))
    for folder in done["dropped_users"]:
        print(f"  {'would drop' if args.dry_run else 'dropped'} the registered folder {folder} (it no longer exists)")
    verb = "would remove" if args.dry_run else "removed"
    print(f"prunestudy store gc: {verb} {len(done['removed'])} entries, {reclaim.human(done['bytes'])}"
          + (f" (+ {reclaim.human(done['quarantine_bytes'])} of quarantine)" if done["quarantine_bytes"] else "")
          + (f"; kept {len(done['busy'])} being computed (claimed)" if done["busy"] else "")
          + (f"; only entries older than {args.older_than}" if age is not None else ""))
    return 0


def _add_params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--file", help="YAML parameter file (e.g. params/default.yaml)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter, e.g. -p train.epochs=3 (repeatable; value read as YAML)")


def _summary(res: dict) -> str:
    rows = []
    for stage in ("train", "prune", "retrain"):
        if stage in res:
            r = res[stage]
            sp = f", sparsity {r['global_sparsity']:.1%}" if "global_sparsity" in r else ""
            rows.append(f"  {stage:8s} test acc {r['test_accuracy']:.1%}, test loss {r['test_loss']:.4f}{sp}")
    return "results:\n" + "\n".join(rows)


def _add_sweep_cli(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="run a grid of studies, each unique stage once (local pool or Ray)")
    p.add_argument("-f", "--file", required=True, help="grid file: study parameters plus `grid:` (params/grid.yaml)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter of every point (repeatable; value read as YAML)")
    p.add_argument("-g", "--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="set or replace a grid key's values, e.g. -g prune.amount=0.2,0.5,0.8 (repeatable)")
    p.add_argument("--sweep-dir", help="output folder (default: runs/<grid file name>[-<hash of the points>])")
    p.add_argument("--dry-run", action="store_true", help="print the plan (points, unique stages, done, time left)")
    p.add_argument("--engine", choices=("local", "ray"), default="local", help="local process pool (default) or Ray")
    p.add_argument("--jobs", type=int, default=machine.usable_cpus(),
                   help="local engine: parallel stages (default: the cores this process may use)")
    p.add_argument("--gpus", default="auto", metavar="auto|none|ID,ID,...",
                   help="local engine: pin worker i to GPU i mod the count (its CUDA_VISIBLE_DEVICES), so N jobs use "
                        "every GPU; auto (default): the GPUs this process sees, when a point trains on CUDA")
    p.add_argument("--address", help="ray engine: the cluster (auto, ray://host:port); default a local Ray")
    p.add_argument("--store", metavar="DIR", help="the stage store (default: the one the sweep folder recorded, "
                                                  "else .store beside it or $PRUNESTUDY_STORE; on a shared file "
                                                  "system for several machines)")
    p.add_argument("--fresh-kernels", action="store_true",
                   help="a new Jupyter kernel for every notebook (default: one per worker, reset between notebooks)")
    p.set_defaults(handler=_sweep)


def _sweep(args) -> int:
    try:
        pts = grid.points(args.file, args.param, args.grid)
    except config.ParamsError as e:
        print(f"prunestudy: {e}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"prunestudy: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    if args.engine == "ray" and args.gpus != "auto":
        print("prunestudy: --gpus is the local engine's; Ray gives each training stage a GPU of its own "
              "(num_gpus=1): drop --gpus", file=sys.stderr)
        return 2
    try:   # --gpus auto raises nothing (and asks PyTorch for the GPUs when some point trains on CUDA)
        if (args.gpus or "auto").strip() != "auto":
            schedule.gpu_ids(args.gpus, [p.cfg["train"] for p in pts])
    except ValueError as e:
        print(f"prunestudy: {e}", file=sys.stderr)
        return 2
    # the default folder's name: the hash of every point's parameters (not computed for --sweep-dir)
    digest = config.stage_hash_of_list(p.cfg for p in pts) if (args.param or args.grid) and not args.sweep_dir else None
    name = Path(args.file).stem + (f"-{digest}" if digest else "")
    sweep_dir = (config.resolve_path(args.sweep_dir) if args.sweep_dir
                 else config.resolve_path(Path("runs") / name, config.project_root()))   # the project's runs/
    try:
        root = stagestore.choose(sweep_dir, args.store)   # the sweep folder's own, once it recorded one
        if root is None:
            raise stagestore.StoreError("a sweep computes its stages in a stage store: drop --store none")
    except stagestore.StoreError as e:
        print(f"prunestudy: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"prunestudy: sweep folder {sweep_dir}, stage store {root}")
        print(grid.dry_run_text(pts, sweep_dir, root))
        return 0
    print(f"prunestudy: sweep folder {sweep_dir} ({len(pts)} points), stage store {root}", flush=True)
    schedule.sigterm_as_sigint()
    try:
        summary = sweep.run(pts, sweep_dir, engine=args.engine, jobs=args.jobs, address=args.address, store_root=root,
                      log=lambda m: print(m, flush=True), fresh_kernels=args.fresh_kernels, gpus=args.gpus)
    except (FileNotFoundError, execute.PreflightError, runlock.LockedError, schedule.EngineError, atomic.PlantedLink,
            stagestore.StoreError) as e:
        print(f"prunestudy: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _interrupted_status()   # first (see cli._run)
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)   # see cli._run
        print(f"prunestudy: {_interruption()}; finished stages are kept in the store ({root}): rerun the same "
              "command to go on", file=sys.stderr)
        return _interrupted_status()   # again: a SIGTERM handled meanwhile makes it 143
    except execute.StageFailed as e:   # the grid report itself
        print(f"prunestudy: {e}", file=sys.stderr)
        return 1
    except OSError as e:   # the driver's own writes (the grid report, its pages): a full disk, a folder gone
        print(f"prunestudy: {execute.write_problem(e, sweep_dir) or f'{e}; finished stages are kept in the store'}"
              f" ({root}): fix the cause and rerun", file=sys.stderr)
        return 1
    if summary["halted"]:   # a full disk or an unwritable folder stopped it: one line, as `run` says it
        print(f"prunestudy: {summary['halted']}", file=sys.stderr)
        return 1
    ran = ", ".join(f"{n} {s}" for s, n in summary["ran"].items() if n) or "nothing (every stage was done)"
    print(f"prunestudy: {summary['points']} points, {summary['unique']} unique stages; computed {ran}; "
          f"report {sweep_dir / paths.SWEEP_REPORT}")
    if summary["failed"]:
        print(f"prunestudy: {len(summary['failed'])} stage(s) failed; the points that need them are unfinished:",
              file=sys.stderr)
        for r in summary["failed"]:
            where = f"; executed notebook: {r['notebook']}" if r.get("notebook") else ""
            print(f"  - {r['id']} (point {r['point']}): {r.get('error')}{where}", file=sys.stderr)
        print("  fix the cause and rerun the same command: only what is missing or failed runs", file=sys.stderr)
        return 1
    print(_where_stored(root))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`prunestudy` command line: run the study, install the kernel, show parameters, compare runs."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import yaml

from . import config, download, execute, graph, lab, paths, pipeline, runlock, sweep


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `prunestudy params | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = argparse.ArgumentParser(prog="prunestudy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the five notebooks with papermill and render the HTML report")
    _add_params_args(run)
    run.add_argument("--run-dir", help="output folder (default: runs/<params file name>[-<hash of overrides>])")
    run.add_argument("--store", metavar="DIR",
                     help="the stage store shared by runs and sweeps (default: .store beside the run folder, "
                          "or $PRUNESTUDY_STORE; 'none': every stage computed in the run folder)")
    run.add_argument("--fresh-kernels", action="store_true",
                     help="a new Jupyter kernel for every notebook (default: one kernel, reset between notebooks)")
    run.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="with `seeds`: compute the repeats N stages at a time first (the sweep's local engine, "
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
    lab_p = sub.add_parser("lab", help="JupyterLab on the notebooks, with the prunestudy kernel (as root too)")
    lab_p.add_argument("--port", type=int, help="port (default: JupyterLab's, 8888 or the next free)")
    lab_p.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    download.add_cli(sub)
    _add_compare_cli(sub)
    sweep.add_cli(sub)
    _add_status_cli(sub)
    _add_cache_cli(sub)
    args = parser.parse_args(argv)
    if getattr(args, "handler", None):
        return args.handler(args)

    if args.command == "kernel":
        print(f"kernel '{execute.ensure_kernel()}' -> {sys.executable} ({execute.kernel_dir()}); "
              f"JupyterLab settings {lab.ensure_settings()}")
        return 0
    if args.command == "lab":
        return lab.main(port=args.port, open_browser=not args.no_browser)
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

        result = status.status(run_dir, cfg, args.store)
        print(status.text(result))
        return 0
    print(f"prunestudy: run folder {run_dir} (params hash {config.stage_hash(cfg)})", flush=True)
    try:
        res = pipeline.run(cfg, run_dir, force=args.force, log=lambda m: print(m, flush=True), store_root=args.store,
                           fresh_kernels=args.fresh_kernels, jobs=args.jobs)
    except (FileNotFoundError, execute.PreflightError, runlock.LockedError) as e:
        print(f"prunestudy: {e}", file=sys.stderr)
        return 2
    except execute.StageFailed as e:
        print(f"prunestudy: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # the notebook client's cell task ends with the kernel's KeyboardInterrupt after we stopped listening:
        # asyncio would print it as "Task exception was never retrieved" with a traceback at exit
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        print(f"prunestudy: interrupted; finished stages are kept in {run_dir}: rerun the same command to go on",
              file=sys.stderr)
        return 130
    except OSError as e:  # the runner's own writes (results.json, report): disk full, folder gone
        print(f"prunestudy: {e}; finished stages are kept in {run_dir}: fix the cause and rerun", file=sys.stderr)
        return 1
    print(_summary(res))
    return 0


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


if __name__ == "__main__":
    sys.exit(main())

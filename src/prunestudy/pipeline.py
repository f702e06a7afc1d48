"""The runner: executes the five notebooks with papermill, in order, in the project's own kernel,
then renders the HTML report with nbconvert."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from . import config, progress, stages, store

STAGES = ("data", "train", "prune", "retrain", "analysis")
KERNEL_NAME = "prunestudy"
TEMPLATES = Path(__file__).parent / "templates"


class StageFailed(RuntimeError):
    def __init__(self, stage: str, notebook: Path, reason: str):
        self.stage, self.notebook = stage, notebook
        super().__init__(f"stage '{stage}' failed: {reason}\n  executed notebook (with the traceback): {notebook}")


def kernel_dir() -> Path:
    return Path(sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME


def ensure_kernel() -> str:
    """Install (or repair) the `prunestudy` kernelspec for *this* Python in sys.prefix, and put
    that folder first on JUPYTER_PATH, so papermill and JupyterLab start this environment's
    interpreter whatever other kernels of that name exist for the user or the system."""
    # log_level=ERROR: ipykernel warns on every start that loopback TCP is unencrypted; that line
    # would repeat five times per run in the terminal and in CI logs.
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                     "--IPKernelApp.log_level=ERROR"],
            "display_name": "Python (prunestudy)", "language": "python",
            "env": {"PYTHONUNBUFFERED": "1"}, "metadata": {"debugger": True}}
    path = kernel_dir() / "kernel.json"
    if not path.is_file() or json.loads(path.read_text()) != spec:
        store.write_json(path, spec)
    data_dir = str(kernel_dir().parent.parent)
    paths = os.environ.get("JUPYTER_PATH", "").split(os.pathsep)
    if paths[0] != data_dir:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([data_dir, *[p for p in paths if p]])
    return KERNEL_NAME


def notebooks_dir() -> Path:
    return config.project_root() / "notebooks"


def default_run_dir(params_file: str | None, overrides: list[str], cfg: dict) -> Path:
    stem = Path(params_file).stem if params_file else "defaults"
    name = f"{stem}-{config.stage_hash(cfg)}" if overrides else stem
    return config.resolve_path(Path("runs") / name)


def notebook_parameters(stage: str, cfg: dict, run_dir: Path) -> dict:
    """What papermill injects into each notebook: its stage's parameters and its input paths."""
    rd = str(run_dir)
    device = cfg["train"]["device"]
    if stage == "data":
        return {"run_dir": rd, **cfg["data"], "seed": cfg["seed"]}
    if stage == "train":
        return {"run_dir": rd, **cfg["train"], "seed": cfg["seed"], "data_dir": str(run_dir / "data")}
    if stage == "prune":
        return {"run_dir": rd, **cfg["prune"], "device": device, "data_dir": str(run_dir / "data"),
                "model_dir": str(run_dir / "train")}
    if stage == "retrain":
        return {"run_dir": rd, **cfg["retrain"], "device": device, "seed": cfg["seed"],
                "data_dir": str(run_dir / "data"), "pruned_dir": str(run_dir / "prune")}
    return {"run_dir": rd}


def run(cfg: dict, run_dir: str | Path, *, log: Callable[[str], None] = print) -> dict:
    """Run the whole study into run_dir; returns results.json's content."""
    import papermill as pm

    run_dir = config.resolve_path(run_dir)
    preflight(cfg)
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    store.write_json(run_dir / "params.json", cfg)
    kernel = ensure_kernel()
    os.environ.setdefault(progress.ENV, "log")  # kernels inherit it: progress bars paced for a log
    timings: dict[str, float] = {}
    for i, stage in enumerate(STAGES, 1):
        src = notebooks_dir() / stages.NOTEBOOK_OF[stage]
        out = run_dir / "notebooks" / src.name
        log(f"==> [{i}/{len(STAGES)}] {stage}: start ({src.name})")
        start = time.perf_counter()
        try:
            pm.execute_notebook(str(src), str(out), parameters=notebook_parameters(stage, cfg, run_dir),
                                kernel_name=kernel, cwd=str(src.parent), progress_bar=False,
                                stdout_file=sys.stdout, stderr_file=sys.stderr)
        except pm.PapermillExecutionError as e:
            _finish(run_dir, cfg, timings, render=False)
            log(f"==> [{i}/{len(STAGES)}] {stage}: FAILED after {time.perf_counter() - start:.1f} s")
            raise StageFailed(stage, out, f"{e.ename}: {e.evalue}") from None
        timings[stage] = round(time.perf_counter() - start, 2)
        _finish(run_dir, cfg, timings, render=False)
        log(f"==> [{i}/{len(STAGES)}] {stage}: done in {timings[stage]:.1f} s")
    return _finish(run_dir, cfg, timings, render=True, log=log)


def preflight(cfg: dict) -> None:
    """Checks that need the file system, before any work starts."""
    from . import data

    if cfg["data"]["root"] != "embedded":
        data.check_layout(config.resolve_path(cfg["data"]["root"]))
    missing = [nb for nb in stages.NOTEBOOK_OF.values() if not (notebooks_dir() / nb).is_file()]
    if missing:
        raise FileNotFoundError(f"notebooks {', '.join(missing)} not found in {notebooks_dir()}: run "
                                "prunestudy from the project's checkout (or set PRUNESTUDY_HOME to it)")


def _finish(run_dir: Path, cfg: dict, timings: dict, render: bool, log=print) -> dict:
    results = stages.collect_results(run_dir, cfg, timings)
    store.write_json(run_dir / "results.json", results)
    if render:
        start = time.perf_counter()
        report = render_report(run_dir)
        log(f"==> report: {report} ({time.perf_counter() - start:.1f} s)")
    return results


def render_html(notebook: Path, target: Path, *, hide_code: bool, title: str | None = None) -> Path:
    """One executed notebook as a self-contained HTML page (figures embedded, nothing fetched)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="prunestudy_report", extra_template_basedirs=[str(TEMPLATES)],
                            exclude_input=hide_code, exclude_input_prompt=hide_code,
                            exclude_output_prompt=hide_code, embed_images=True)
    resources = {"metadata": {"name": title or Path(notebook).stem}}
    body, _ = exporter.from_notebook_node(nbformat.read(notebook, as_version=4), resources=resources)
    store.write_bytes(target, body.encode())
    return target


def render_report(run_dir: Path) -> Path:
    """report.html from the analysis notebook (code hidden); every stage notebook as HTML beside it."""
    nb_dir = Path(run_dir) / "notebooks"
    for nb in sorted(nb_dir.glob("0*.ipynb")):
        render_html(nb, nb.with_suffix(".html"), hide_code=False)
    return render_html(nb_dir / stages.NOTEBOOK_OF["analysis"], Path(run_dir) / "report.html", hide_code=True,
                       title=f"prunestudy report: {Path(run_dir).name}")

"""What a stage notebook costs beyond its cells, in a reused kernel (prunestudy.kernels): the
kernel's reset, papermill's set-up and its saves of the executed notebook. A sweep runs three
notebooks a point and `prunestudy run` five, so this is paid hundreds of times in a grid.

    .venv/bin/python benchmarks/bench_kernel.py [--notebooks N]

Both ways in one run, in one kernel each, on the same notebook (3 cells: the parameters, the
package's import, an assignment), N notebooks each after one to warm up:
  1. as before (jupyter_client's own client, whose wait_for_ready waits for 0.2 s of IOPub
     silence, once for the reset and once for papermill; a full garbage collection per reset, on
     top of IPython's; IPython's history in ~/.ipython's SQLite file);
  2. the project's settings (kernels.ReadyClient, gc.freeze after the reset's collection, the
     history in memory).
Prints the median and spread of the wall time of a notebook each way and their ratio. The
figures depend on the machine; benchmarks/README.md has this machine's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from prunestudy import execute, kernels

BEFORE = {"CLIENT_CLASS": "jupyter_client.asynchronous.AsyncKernelClient",
          "COLLECT": "__import__('gc').collect()", "KERNEL_ARGUMENTS": ()}
NOW = {name: getattr(kernels, name) for name in BEFORE}


def notebook(folder: Path) -> Path:
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": execute.ensure_kernel(), "language": "python",
                                                           "display_name": "prunestudy"},
                                            "language_info": {"name": "python"}})
    params = nbformat.v4.new_code_cell("x = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("import prunestudy.stages, prunestudy.report"),
                nbformat.v4.new_code_cell("y = x + 1")]
    path = folder / "tiny.ipynb"
    nbformat.write(nb, path)
    return path


def per_notebook(src: Path, settings: dict, n: int) -> list[float]:
    for name, value in settings.items():
        setattr(kernels, name, value)
    kernels.shutdown()
    try:
        out = src.with_name("out.ipynb")
        times = []
        for i in range(n + 1):   # the first starts the kernel and imports: not counted
            start = time.perf_counter()
            kernels.execute_notebook(src, out, kernel_name=execute.ensure_kernel(), parameters={"x": i})
            if i:
                times.append(time.perf_counter() - start)
        return times
    finally:
        kernels.shutdown()
        for name, value in NOW.items():
            setattr(kernels, name, value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--notebooks", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["IPYTHONDIR"] = str(Path(tmp) / "ipython")   # the baseline's history goes here, not to ~
        src = notebook(Path(tmp))
        results = {}
        for name, settings in (("before", BEFORE), ("now", NOW)):
            times = per_notebook(src, settings, args.notebooks)
            results[name] = statistics.median(times)
            print(f"{name:7s} {1e3 * results[name]:7.1f} ms a notebook (median of {len(times)}; "
                  f"{1e3 * min(times):.1f}-{1e3 * max(times):.1f} ms)", flush=True)
    print(f"ratio before / now: {results['before'] / results['now']:.1f}x "
          f"({os.cpu_count()} CPUs, Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()

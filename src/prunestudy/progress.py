"""The one progress bar of the project (data cropping, training epochs, downloads), reading well in
a terminal, in JupyterLab and in papermill's log.

`bar(total, desc, show=...)` always returns a tqdm usable as a context manager (disabled when no
bar is wanted), decided by `show` and by PRUNESTUDY_PROGRESS:

* show="auto": PRUNESTUDY_PROGRESS=off -> none; =log (set by `prunestudy run` for the kernels it
  starts, whose output is streamed into a log line by line) -> a text bar redrawn at most every
  LOG_INTERVAL seconds, a handful of lines with rate and ETA; in Jupyter -> tqdm.auto (a widget
  with ipywidgets, else text that JupyterLab redraws in place); in a terminal -> a live bar;
  anywhere else (pipes, CI, worker processes) -> none.
* show=True: a bar wherever stderr goes (paced for a log where it is not interactive);
  show=False: none.
"""

from __future__ import annotations

import os
import sys
import warnings

from tqdm import tqdm
from tqdm.std import tqdm as std_tqdm

ENV = "PRUNESTUDY_PROGRESS"  # "log" (few updates), "off", or unset (interactive)
LOG_INTERVAL = 15.0
# No monitor thread: a stray thread would make the data stage's pool use forkserver, not fork.
tqdm.monitor_interval = 0


def mode() -> str:
    return os.environ.get(ENV, "").lower()


def wanted() -> bool:
    return mode() != "off"


def in_kernel() -> bool:
    return "ipykernel" in sys.modules and "IPython" in sys.modules


def _stderr_tty() -> bool:
    return getattr(sys.stderr, "isatty", lambda: False)()


def bar(total: int | None, desc: str, unit: str = "it", show: bool | str = "auto", **kw) -> tqdm:
    """A tqdm bar on stderr with count, rate and ETA, paced for where the output goes."""
    log_mode = mode() == "log"
    interactive = not log_mode and (in_kernel() or _stderr_tty())
    if show == "auto":
        show = wanted() and (log_mode or interactive)
    if unit == "B":
        kw = {"unit_scale": True, "unit_divisor": 1024, **kw}
    kw = {"total": total, "desc": desc, "unit": unit, "disable": not show, "smoothing": 0.1,
          "mininterval": 0.5 if interactive else LOG_INTERVAL, "maxinterval": max(LOG_INTERVAL, 10.0), **kw}
    if show and interactive and in_kernel():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from tqdm.auto import tqdm as auto_tqdm
        return auto_tqdm(**kw, dynamic_ncols=True)
    return std_tqdm(**kw, file=sys.stderr, dynamic_ncols=interactive, ncols=None if interactive else 100,
                    ascii=not interactive)

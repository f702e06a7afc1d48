"""Progress bars that read well in a terminal, in JupyterLab and in papermill's log.

A terminal gets a live tqdm bar. Inside a notebook the bar goes to stderr, which JupyterLab
redraws in place. Under `prunestudy run` (which sets PRUNESTUDY_PROGRESS=log for the kernels it
starts) each notebook's output is streamed into a log line by line, so the bar is redrawn at most
every LOG_INTERVAL seconds: a handful of lines with rate and ETA, not thousands.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

ENV = "PRUNESTUDY_PROGRESS"  # "log" (few updates), "off", or unset (interactive)
LOG_INTERVAL = 15.0
# No monitor thread: a stray thread would make the data stage's pool use forkserver, not fork.
tqdm.monitor_interval = 0


def wanted() -> bool:
    return os.environ.get(ENV, "").lower() != "off"


def bar(total: int, desc: str, unit: str = "it", disable: bool = False, **kw) -> tqdm:
    """A tqdm bar on stderr showing count, rate and ETA, paced for where the output goes."""
    log_mode = os.environ.get(ENV, "").lower() == "log"
    interactive = not log_mode and (sys.stderr.isatty() or "ipykernel" in sys.modules)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable or not wanted(),
                mininterval=0.5 if interactive else LOG_INTERVAL, maxinterval=max(LOG_INTERVAL, 10.0),
                dynamic_ncols=interactive, ncols=None if interactive else 100, ascii=not interactive,
                smoothing=0.1, **kw)

"""`prunestudy lab` (and `make lab`): JupyterLab on the project's notebooks, in this environment,
as a user or as root (containers, CI), with the `prunestudy` kernel and no news pop-up.

JupyterLab asks on first start whether to fetch Jupyter news and checks for updates; the project's
settings answer both with no (an `overrides.json` in this environment's JupyterLab settings folder,
written by `prunestudy kernel`), and the server never checks for updates either.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from . import atomic, execute

# What JupyterLab would otherwise ask or fetch at start (docs: user/announcements).
OVERRIDES = {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}}


def settings_dir() -> Path:
    """This environment's JupyterLab application settings folder (read for overrides.json)."""
    return Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings"


def ensure_settings() -> Path:
    """Merge the project's overrides into this environment's overrides.json (others are kept)."""
    path = settings_dir() / "overrides.json"
    try:
        current = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        current = {}
    merged = {**current, **{k: {**current.get(k, {}), **v} for k, v in OVERRIDES.items()}}
    if merged != current:
        atomic.write_json(path, merged)
    return path


def command(notebook_dir: Path, *, ip: str = "127.0.0.1", port: int | None = None, open_browser: bool = True,
            token: str | None = None) -> list[str]:
    """The JupyterLab command line: this Python's jupyterlab, the notebooks folder, loopback only,
    --allow-root when running as root, no update checks."""
    args = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={notebook_dir}", f"--ServerApp.ip={ip}",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if port is not None:
        args.append(f"--ServerApp.port={port}")
    if not open_browser:
        args.append("--no-browser")
    if token is not None:
        args.append(f"--IdentityProvider.token={token}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")   # containers and CI run as root; JupyterLab refuses without it
    return args


def main(port: int | None = None, open_browser: bool = True) -> int:
    """Start JupyterLab in the foreground (Ctrl-C stops it)."""
    execute.ensure_kernel()
    ensure_settings()
    args = command(execute.notebooks_dir(), port=port, open_browser=open_browser)
    print(f"prunestudy: JupyterLab on {execute.notebooks_dir()} with the kernel 'Python (prunestudy)'", flush=True)
    os.execv(args[0], args)
    return 0  # not reached

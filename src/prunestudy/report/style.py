"""The look of every figure and the escaping of every name: the theme, the colours and markers
(from `states` and `methods`), figure helpers, and saving figures into the run folder."""

from __future__ import annotations

import io
import re
import struct
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.figure import Figure

from .. import atomic, methods, paths

FIGSIZE = (10, 4)
DPI = 100        # figures as the notebook shows them
SAVE_DPI = 150   # figures as analysis/figures/*.png hold them (shown in the report scaled to DPI)
SEED_HATCH = "///"          # the seed report's bars (states.SEED_REPORT_COLOR), hatched
SEED_EDGE = "#707070"
UNKNOWN_METHOD = ("black", "o")   # colour and marker of a method the registry does not know


def setup_style() -> None:
    """One clean theme for every figure of the report (call once, before plotting)."""
    sns.set_theme(style="whitegrid", context="notebook", palette="deep",
                  rc={"figure.dpi": DPI, "savefig.dpi": SAVE_DPI, "axes.titlesize": 11, "axes.labelsize": 10,
                      "legend.fontsize": 8, "xtick.labelsize": 9, "ytick.labelsize": 9,
                      "figure.max_open_warning": 0})


def method_style(name: str) -> tuple[str, str]:
    """(colour, marker) of a pruning method's curves; black circles for one that is not registered."""
    m = methods.REGISTRY.get(name)
    return (m.color, m.marker) if m else UNKNOWN_METHOD


def floor_method() -> str | None:
    """The registered floor method (random pruning), if there is one."""
    try:
        return methods.floor()
    except StopIteration:
        return None


# --------------------------------------------------------------------------- escaping

def literal(s: Any) -> str:
    """A string drawn literally by matplotlib: '$' would otherwise start mathtext."""
    return str(s).replace("$", r"\$")


_MD_ESCAPE = re.compile(r"([\\`*_\[\]#|~$])")


def md_escape(s: Any) -> str:
    """Plain text -> Markdown that renders as the same text (no HTML, links, emphasis or math)."""
    s = str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_ESCAPE.sub(r"\\\1", s)


# --------------------------------------------------------------------------- figures

def figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = FIGSIZE, **kw) -> tuple[Figure, list]:
    """A constrained-layout figure and its axes as a flat list (always a list)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=size, dpi=DPI, layout="constrained", squeeze=False, **kw)
    return fig, list(axes.flat)


def label(ax, xlabel: str, ylabel: str, title: str | None = None) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)


def placeholder(message: str, size: tuple[float, float] = (10, 1.5)) -> Figure:
    """A small figure that says what is missing, instead of an exception in the report."""
    fig, (ax,) = figure(size=size)
    ax.text(0.5, 0.5, literal(message), ha="center", va="center", fontsize=11, color="dimgray",
            transform=ax.transAxes)
    ax.set_axis_off()
    return fig


def bar_values(ax, container, fmt: str) -> None:
    ax.bar_label(container, fmt=fmt, padding=2, fontsize=8)


def legend_outside(ax, **kw) -> None:
    """The axes' legend to the right of it, top-aligned."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, **kw)


_FIG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def save_figures(run_dir, figures: dict[str, Figure], dpi: int = SAVE_DPI) -> list[Path]:
    """Write each figure to the run's figures folder as <name>.png atomically (temp file + os.replace)."""
    return [_write_png(run_dir, name, fig, dpi)[0] for name, fig in figures.items()]


def show_figure(run_dir, name: str, fig: Figure, dpi: int = SAVE_DPI):
    """Write the figure as the run's analysis/figures/<name>.png and return that PNG for the
    notebook to display, at the notebook's DPI: the figure is drawn once, not once for the file and
    again by the inline backend (it is closed here, so the backend does not show it)."""
    from IPython.display import Image

    _, png = _write_png(run_dir, name, fig, dpi)
    alt = caption(fig) or name
    plt.close(fig)
    width = struct.unpack(">I", png[16:20])[0]   # the PNG header's width, in pixels
    return Image(data=png, format="png", width=round(width * DPI / dpi), alt=alt)


def caption(fig: Figure) -> str:
    """A figure's caption, for its alt text: its title above all, then each panel's title, or the
    axis labels of an untitled panel (what a reader who cannot see it needs to know it shows)."""
    top = fig._suptitle.get_text() if fig._suptitle else ""
    panels = [ax.get_title() or " against ".join(t for t in (ax.get_ylabel(), ax.get_xlabel()) if t)
              or " ".join(t.get_text() for t in ax.texts) for ax in fig.axes if ax.get_visible()]
    return "; ".join(t for t in [top, *panels] if t).replace("\n", " ")


def _write_png(run_dir, name: str, fig: Figure, dpi: int) -> tuple[Path, bytes]:
    name = str(name).removesuffix(".png")
    if not _FIG_NAME.fullmatch(name):
        raise ValueError(f"figure name {name!r} is not a plain file name (letters, digits, '_', '-', '.')")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    png = buf.getvalue()
    return atomic.write_bytes(paths.figures_dir(run_dir) / f"{name}.png", png), png

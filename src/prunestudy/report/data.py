"""The data: what the data stage built (source, classes, sizes, what was skipped), the crops per
class and a mosaic of the first crops of every class."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from .. import config, data, paths
from .common import count, data_info
from .style import bar_values, figure, label, literal, md_escape, placeholder

SPLIT_COLORS = {"train": "#8172b3", "test": "#937860"}   # seaborn "deep" 5 and 6: data splits are not model states


def data_markdown(info: dict, min_test: int | None = None) -> str:
    """What the data stage built: source, classes in label order, sizes and what was skipped, and
    the classes with fewer than `min_test` test crops (data.min_test_per_class; the schema's default
    when not given), whose per-class figures are too few to read."""
    lines = [f"Built from `{md_escape(info.get('root', '?'))}`: **{count(info['train_size'])}** training and "
             f"**{count(info['test_size'])}** test crops of {info.get('image_size', '?')} px, "
             f"{len(info['classes'])} classes (label order): {', '.join(md_escape(c) for c in info['classes'])}.",
             "", "| split | kept | " + " | ".join(md_escape(k) for k in _skip_keys(info)) + " |",
             "|---|---|" + "---|" * len(_skip_keys(info))]
    for split, size in (("train", info["train_size"]), ("test", info["test_size"])):
        skipped = (info.get("skipped") or {}).get(split, {})
        lines.append(f"| {split} | {count(size)} | "
                     + " | ".join(count(skipped.get(k, 0)) for k in _skip_keys(info)) + " |")
    lines += skip_legend(_skip_keys(info))
    lines += _small_lines(info, config.default("data.min_test_per_class") if min_test is None else min_test)
    clipped = info.get("clipped") or {}
    if any(clipped.values()):
        lines += ["", "Boxes reaching outside their image, clipped to it: "
                  + ", ".join(f"{split} {count(n)}" for split, n in clipped.items()) + "."]
    return "\n".join(lines + _rejects_lines(info))


def skip_legend(keys: list[str]) -> list[str]:
    """One line under the data table: what each of its skip columns counts (data.SKIP_REASONS)."""
    if not keys:
        return []
    said = [f"*{md_escape(k)}*" + (f": {md_escape(data.SKIP_REASONS[k])}" if k in data.SKIP_REASONS else "")
            for k in keys]
    return ["", "Boxes skipped, by reason: " + "; ".join(said) + "."]


def _small_lines(info: dict, min_test: int) -> list[str]:
    """The classes with too few test crops to read per class (and those with none)."""
    test = (info.get("counts") or {}).get("test") or {}
    few = {c: n for c, n in test.items() if n < min_test}
    if not few:
        return []
    named = ", ".join(f"{md_escape(c)} ({count(n)})" for c, n in few.items())
    empty = [c for c, n in few.items() if n == 0]
    return ["", f"**Too few test crops to read per class** (fewer than {min_test}, data.min_test_per_class): "
            f"{named}. Their per-class figures are shown but marked, and no per-class verdict is given"
            + (f"; {', '.join(md_escape(c) for c in empty)} {'has' if len(empty) == 1 else 'have'} none at all"
               if empty else "") + "."]


def _rejects_lines(info: dict) -> list[str]:
    """The images skipped as unreadable, with their reason (a few examples per split)."""
    rejected = info.get("rejected") or {}
    if not any(r.get("images") for r in rejected.values()):
        return []
    lines = ["", "Images that could not be read were skipped (all listed in "
             f"`{paths.rejects('<split>')}` of the data stage):",
             "", "| split | image file | boxes | reason | detail |", "|---|---|---|---|---|"]
    for split, r in rejected.items():
        for ex in r.get("examples", [])[:10]:
            lines.append(f"| {split} | {md_escape(ex['file_name'])} | {count(ex['boxes'])} | {md_escape(ex['reason'])} "
                         f"| {md_escape(str(ex['detail'])[:120])} |")
        if r.get("images", 0) > len(r.get("examples", [])[:10]):
            lines.append(f"| {split} | ... {count(r['images'])} images in all | | | |")
    return lines


def _skip_keys(info: dict) -> list[str]:
    return sorted({k for v in (info.get("skipped") or {}).values() for k in v})


def plot_class_counts(info: dict) -> Figure:
    """Training and test crops per class (``info`` = data.json, or results['data'])."""
    classes, counts = info.get("classes") or [], info.get("counts") or {}
    splits = [s for s in paths.SPLITS if counts.get(s)]
    if not classes or not splits:
        return placeholder(f"No class counts ({paths.DATA_INFO}) available.")
    fig, axes = figure(len(splits), size=(10, max(3, 0.32 * len(classes) + 1)), sharey=True)
    y = np.arange(len(classes))
    for ax, split in zip(axes, splits):
        values = [counts[split].get(c, 0) for c in classes]
        bars = ax.barh(y, values, color=SPLIT_COLORS[split])
        bar_values(ax, bars, "%d")
        ax.set_xlim(0, max(values + [1]) * 1.15)
        label(ax, f"{split} crops (count)", "class" if ax is axes[0] else "", f"{split}: {count(sum(values))} crops")
    axes[0].set_yticks(y, [literal(c) for c in classes])
    axes[0].invert_yaxis()
    return fig


def sample_mosaic(images: np.ndarray, labels: np.ndarray, n_classes: int, per_class: int, gap: int = 2) -> np.ndarray:
    """One row per class of its first ``per_class`` images (white where a class has fewer)."""
    size = images.shape[1]
    step = size + gap
    mosaic = np.full((n_classes * step - gap, per_class * step - gap, 3), 255, np.uint8)
    for c in range(n_classes):
        for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            img = np.asarray(images[i])
            cell = img[..., None] if img.ndim == 2 else img[..., :3]
            mosaic[c * step:c * step + size, j * step:j * step + size] = cell
    return mosaic


def plot_samples(run_dir, per_class: int = 8) -> Figure:
    """A grid of the first ``per_class`` training crops of every class, class names as row labels."""
    folder = paths.stage_dir(run_dir, "data")
    classes = data_info(run_dir)["classes"]
    images = np.load(folder / paths.images("train"), mmap_mode="r")
    labels = np.load(folder / paths.labels("train"))
    mosaic = sample_mosaic(images, labels, len(classes), per_class)
    step = images.shape[1] + 2
    fig, (ax,) = figure(size=(0.75 * per_class + 2.2, 0.75 * len(classes) + 0.9))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks(np.arange(len(classes)) * step + images.shape[1] / 2, [literal(c) for c in classes])
    ax.set_xticks(np.arange(per_class) * step + images.shape[1] / 2, np.arange(1, per_class + 1))
    ax.grid(False)
    label(ax, f"training crop ({images.shape[1]}×{images.shape[2]} px, first {per_class} of each class)", "class")
    return fig

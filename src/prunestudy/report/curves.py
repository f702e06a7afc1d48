"""Training and its effects: the loss of every step, test accuracy and loss per epoch, sparsity per
layer and the weight magnitudes before and after pruning."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

from .. import atomic, paths, states
from . import reference
from .common import epochs, pct, where
from .style import SEED_EDGE, bar_values, figure, label, legend_outside, literal, placeholder

TRAINING = ("trained", "retrained")   # the states whose stage trains (retraining continues the axes)


def _history(run_dir: Path, state: str) -> dict | None:
    path = where(run_dir, state, paths.HISTORY)
    h = atomic.read_json(path) if path.is_file() else None
    return h if h and h.get("steps") else None


def _epoch_chunks(n_steps: int, n_epochs: int) -> list[np.ndarray]:
    """Step indices of each epoch (steps per epoch = n_steps / n_epochs)."""
    return np.array_split(np.arange(n_steps), max(n_epochs, 1))


def _seed_step_ranges(ax, train_chunks: list[np.ndarray]) -> None:
    """The seed report's printed step-loss ranges at the matching epochs of this run (if it has them)."""
    drawn = False
    for epoch, r in reference.seed_report()["step_loss"].items():
        if epoch > len(train_chunks):
            continue
        lo, hi = r.get("min", r.get("last_steps_min")), r.get("max", r.get("last_steps_max"))
        chunk = train_chunks[epoch - 1]
        x = chunk[0] + 1 + (0.5 if "min" in r else 0.9) * len(chunk)
        ax.errorbar([x], [(lo + hi) / 2], yerr=[[(hi - lo) / 2]], fmt="none", ecolor=SEED_EDGE, elinewidth=2.5,
                    capsize=5, zorder=5,
                    label=None if drawn else "seed report: step-loss range (epochs 1, 2; end of 10)")
        drawn = True


def plot_step_loss(run_dir) -> Figure:
    """Every optimizer step's loss, per-epoch mean and min-max band; retraining continues the step axis;
    the seed report's step-loss ranges only where the run is on COCO 2017 at its settings."""
    phases = [(s, h) for s in TRAINING if (h := _history(Path(run_dir), s))]
    if not phases:
        return placeholder(f"No training history ({states.TRAINED.folder}/{paths.HISTORY}) in this run folder.")
    fig, (ax,) = figure()
    offset = 0
    for state, hist in phases:
        steps, color, name = np.asarray(hist["steps"], float), states.get(state).color, states.get(state).phase
        chunks = _epoch_chunks(len(steps), len(hist.get("epochs") or []))
        ax.plot(offset + np.arange(1, len(steps) + 1), steps, lw=0.6, alpha=0.35, color=color,
                label=f"{name}: every step")
        edges = [offset + c[0] + 0.5 for c in chunks] + [offset + len(steps) + 0.5]
        lo, hi = [steps[c].min() for c in chunks], [steps[c].max() for c in chunks]
        ax.fill_between(edges, lo + lo[-1:], hi + hi[-1:], step="post", color=color, alpha=0.15, lw=0,
                        label=f"{name}: epoch min–max")
        ax.plot([offset + c.mean() + 1 for c in chunks], [steps[c].mean() for c in chunks], "o-", color=color,
                lw=1.8, ms=4, label=f"{name}: epoch mean")
        if state == "trained" and reference.run_source(run_dir)["comparable"]:
            _seed_step_ranges(ax, chunks)
        elif offset:
            ax.axvline(offset + 0.5, color="dimgray", ls="--", lw=1)
            ax.text(offset + 0.5, 0.98, " retraining starts", transform=ax.get_xaxis_transform(), va="top",
                    fontsize=8, color="dimgray")
        offset += len(steps)
    ax.set_xlim(0.5, offset + 0.5)
    label(ax, "optimizer step", "cross-entropy loss (batch mean)", "Loss of every optimizer step")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=4)
    return fig


def plot_epoch_metrics(results: dict) -> Figure:
    """Test accuracy (%) and test/train loss per epoch; retraining continues the epoch count, the pruned
    model sits half an epoch after training; the seed report's accuracies are grey stars where the
    run is on COCO 2017 at its settings (reference.data_source)."""
    train_rows, re_rows = (epochs(results, s) for s in TRAINING)
    if not train_rows and not re_rows:
        return placeholder(f"No per-epoch metrics (train / retrain stages) in {paths.RESULTS}.")
    fig, (acc_ax, loss_ax) = figure(2)
    n_train = len(train_rows)
    for state, rows, start in (("trained", train_rows, 1), ("retrained", re_rows, n_train + 1)):
        if not rows:
            continue
        x, c, name = np.arange(start, start + len(rows)), states.get(state).color, states.get(state).phase
        acc_ax.plot(x, [100 * r["test_accuracy"] for r in rows], "o-", color=c, label=f"{name}: test accuracy")
        loss_ax.plot(x, [r["test_loss"] for r in rows], "o-", color=c, label=f"{name}: test loss")
        loss_ax.plot(x, [r["train_loss"] for r in rows], "s--", color=c, alpha=0.6, ms=4, label=f"{name}: train loss")
    prune = states.metrics(results, "pruned")
    if "test_accuracy" in prune:
        x = n_train + 0.5
        acc_ax.plot([x], [100 * prune["test_accuracy"]], "D", color=states.PRUNED.color, ms=8,
                    label="pruned (no training)")
        if prune.get("test_loss") is not None:
            loss_ax.plot([x], [prune["test_loss"]], "D", color=states.PRUNED.color, ms=8, label="pruned: test loss")
    if n_train and reference.data_source(results)["comparable"]:
        seed = reference.accuracies()
        acc_ax.plot([n_train, n_train + 0.5], [100 * a for a in seed.values()],
                    "*", color=states.SEED_REPORT_COLOR, mec=SEED_EDGE, ms=13, ls="none",
                    label=f"seed report: {' / '.join(seed)}")
    label(acc_ax, "epoch (retraining continues the count)", "test accuracy (%)", "Test accuracy per epoch")
    label(loss_ax, "epoch (retraining continues the count)", "cross-entropy loss (mean per sample)",
          "Loss per epoch (seed report's loss not comparable)")
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best")
    return fig


def plot_layer_sparsity(results: dict) -> Figure:
    """Per-layer sparsity (%) after pruning and after retraining, the asked amount as a dashed line."""
    series = [(s, m["layers"]) for s in ("pruned", "retrained") if (m := states.metrics(results, s)).get("layers")]
    if not series:
        return placeholder("No per-layer sparsity: the prune stage has not run.")
    layers = list(dict.fromkeys(name for _, sp in series for name in sp))
    fig, (ax,) = figure(size=(min(20, max(10, 0.45 * len(layers) * len(series))), 4))
    x, width = np.arange(len(layers)), 0.8 / len(series)
    for i, (state, sp) in enumerate(series):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, [100 * sp.get(l, np.nan) for l in layers], width,
                      color=states.get(state).color, label=f"after {states.get(state).phase}")
        if len(layers) <= 12:
            bar_values(ax, bars, "%.2f")
    amount = states.metrics(results, "pruned").get("amount")
    top = max(100 * v for _, sp in series for v in sp.values())
    if amount is not None:
        ax.axhline(100 * amount, color="black", ls="--", lw=1, label=f"asked amount ({pct(amount, 0)})")
        top = max(top, 100 * amount)
    ax.set_xticks(x, [literal(l) for l in layers], rotation=0 if len(layers) <= 8 else 60,
                  ha="center" if len(layers) <= 8 else "right")
    ax.set_ylim(0, max(top * 1.3, 1))
    legend_outside(ax)
    label(ax, "layer", "sparsity (% of the dense layer's weights zero or removed)", "Sparsity per pruned layer")
    return fig


def _layer_weights(path: Path) -> dict[str, np.ndarray] | None:
    """Every conv/linear weight (key ending in '.weight', ndim >= 2) of a saved state_dict, flattened."""
    if not Path(path).is_file():
        return None
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().double().flatten().numpy() for k, v in sd.items()
            if k.endswith(".weight") and torch.is_tensor(v) and v.ndim >= 2}


def cut_threshold(dense: np.ndarray, pruned: np.ndarray) -> float | None:
    """The largest |w| of the dense model that pruning set to zero (None when nothing was pruned)."""
    cut = (pruned == 0) & (dense != 0)
    return float(np.abs(dense[cut]).max()) if cut.any() else None


def _pick_layers(weights: dict[str, np.ndarray], max_layers: int) -> list[str]:
    """All layers in network order, or the ``max_layers`` largest ones (still in network order)."""
    names = list(weights)
    if len(names) <= max_layers:
        return names
    keep = set(sorted(names, key=lambda k: -weights[k].size)[:max_layers])
    return [k for k in names if k in keep]


def _weight_panel(ax, name: str, dense: np.ndarray, pruned: np.ndarray | None, retrained: np.ndarray | None,
                  bins: int) -> None:
    before = np.abs(dense[dense != 0])
    after = None if pruned is None or pruned.shape != dense.shape else np.abs(pruned[pruned != 0])
    again = None if retrained is None or retrained.shape != dense.shape else np.abs(retrained[retrained != 0])
    present = [a for a in (before, after, again) if a is not None and a.size]
    if not present:
        ax.text(0.5, 0.5, "all weights are zero", ha="center", transform=ax.transAxes)
        return
    # the smallest 0.1% of magnitudes are gathered in the first bin, so that a few tiny weights do not
    # stretch the log axis over decades of empty bins
    lo = float(np.quantile(np.concatenate(present), 0.001))
    hi = max(max(a.max() for a in present), lo * 1.001)
    edges = np.logspace(np.log10(lo), np.log10(hi), bins + 1)
    edges[0], edges[-1] = lo, hi          # exactly: log/exp round-off would drop the extreme weights

    # counted in log space, where the bins are even (numpy's fast path), and drawn as one step patch per
    # histogram on the log-spaced edges (ax.hist would make a patch per bin: slow to build and to draw)
    log_range = (math.log10(lo), math.log10(hi))

    def hist(values, **kw):
        logs = np.clip(np.log10(values, dtype=np.float64), *log_range)
        ax.stairs(np.histogram(logs, bins, log_range)[0], edges, **kw)
    hist(before, fill=True, color=states.TRAINED.color, alpha=0.45, label="before pruning (all)")
    if after is not None:
        hist(after, lw=1.6, color=states.PRUNED.color, label="after pruning (nonzero)")
    if again is not None:
        hist(again, lw=1.2, ls="--", color=states.RETRAINED.color, label="after retraining (nonzero)")
    ax.set_xscale("log")
    # the style draws no tick marks, so a log axis' minor ticks show nothing; their labels (empty)
    # were a third of this figure's drawing time
    ax.xaxis.set_minor_locator(NullLocator())
    cut = cut_threshold(dense, pruned) if after is not None else None
    title = literal(name.removesuffix(".weight"))
    if cut is not None:
        ax.axvline(cut, color="black", ls=":", lw=1.2, label="cut threshold")
        ax.text(cut, 0.97, f" cut {cut:.2g}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        title += f" ({100 * (pruned == 0).mean():.1f}% zero)"
    elif after is not None:
        title += " (not pruned)"
    label(ax, "|w| (log scale)", "weights per bin", title)


def plot_weight_histograms(run_dir, max_layers: int = 12, bins: int = 60) -> Figure:
    """Per layer: |w| before pruning (the trained model) vs the nonzero |w| after pruning (and after
    retraining), log-scale x, with the cut threshold (the largest |w| that was set to zero)."""
    dense = _layer_weights(where(run_dir, "trained", paths.MODEL))
    if not dense:
        return placeholder(f"No trained weights ({states.TRAINED.folder}/{paths.MODEL}) in this run folder.")
    pruned = _layer_weights(where(run_dir, "pruned", paths.MODEL)) or {}
    retrained = _layer_weights(where(run_dir, "retrained", paths.MODEL)) or {}
    names = _pick_layers(dense, max_layers)
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = figure(ncols, nrows, size=(10, 2.7 * nrows + 0.6))
    for ax, name in zip(axes, names):
        _weight_panel(ax, name, dense[name], pruned.get(name), retrained.get(name), bins)
    for ax in axes[len(names):]:
        ax.remove()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    shown = f"the {len(names)} largest of {len(dense)} weight tensors; " if len(names) < len(dense) else ""
    fig.suptitle(f"{shown}the first bin of each panel also holds the smallest 0.1% of |w|", fontsize=9,
                 color="dimgray")
    return fig

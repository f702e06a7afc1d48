"""What each stage notebook (train, prune, retrain) shows under its run: one paragraph computed from
the stage's metrics, and its per-epoch table."""

from __future__ import annotations

import pandas as pd

from .. import paths
from .common import change, count, pct
from .findings import amount_phrase
from .style import md_escape


def stage_markdown(stage: str, metrics: dict) -> str:
    """One paragraph of a stage's outcome, computed from its metrics."""
    acc = f"test accuracy **{pct(metrics['test_accuracy'])}**"
    if metrics.get("balanced_accuracy") is not None:
        acc += f" (balanced accuracy {pct(metrics['balanced_accuracy'])}, macro-F1 {pct(metrics['macro_f1'])})"
    acc += f", test loss {metrics['test_loss']:.4f} (per-sample mean)"
    if stage == "prune":
        return _prune_markdown(metrics, acc)
    epochs = len(metrics.get("epochs") or [])
    sp = (f"; global sparsity {pct(metrics['global_sparsity'], 2)}" if "global_sparsity" in metrics else "")
    s = (f"After {epochs} epoch{'s' * (epochs != 1)} in {metrics['seconds']:.0f} s on "
         f"{md_escape(metrics['device'])}: {acc}{sp}.")
    if metrics.get("export"):
        e = metrics["export"]
        shape = (f"the small channel-pruned model (rebuild it with prune.rebuild and {paths.EXPORT_META})"
                 if e["kind"] == "structural" else "a plain dense state_dict, pruned weights exactly zero")
        s += (f" Exported to `{md_escape(e['file'])}` + `{md_escape(e['meta'])}`: {shape}, "
              f"{count(e['params_nonzero'])} nonzero of {count(e['params_total'])} parameters, "
              f"{e['bytes'] / 1e6:.2f} MB; it loads with torch.load(weights_only=True).")
    return s


def _prune_markdown(metrics: dict, acc: str) -> str:
    change_points = 100 * (metrics["test_accuracy"] - metrics["dense_test_accuracy"])
    total = metrics.get("dense_params_total", metrics["params_total"])
    s = (f"{md_escape(metrics['method'])}: {md_escape(amount_phrase(metrics))}, targets "
         f"{md_escape(metrics['targets'])}: global sparsity **{pct(metrics['global_sparsity'], 2)}** of the targeted "
         f"weights (zero or removed), {count(metrics['params_nonzero'])} of the dense model's {count(total)} "
         f"parameters nonzero. Before retraining: {acc}; {change(change_points, 'accuracy')} from the dense model's "
         f"{pct(metrics['dense_test_accuracy'])}.")
    if metrics.get("rewind"):
        r = metrics["rewind"]
        s += (f" Rewound to training step {r['step']} (masks kept), the model scores {pct(r['test_accuracy'])}: "
              f"retraining starts from there.")
    return s


def epoch_table(metrics: dict) -> pd.DataFrame:
    """A stage's per-epoch figures (empty when it trained 0 epochs)."""
    rows = metrics.get("epochs") or []
    return pd.DataFrame(rows).set_index("epoch").round(4) if rows else pd.DataFrame()

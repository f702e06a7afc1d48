"""What the network really uses: the units of the trained model that never fire on the training
set (conv channels and fc units whose ReLU output is zero on every training crop), and how much of
each pruned layer's removed weight sat in them, so that "pruning found redundancy" can be told
from "pruning removed what was never used".

A unit of a layer followed directly by a ReLU (the model class's ``RELU_AFTER``) is *dead* when its
pre-activation is at most 0 at every position of every training crop (normalised as in training,
without augmentation, the model in eval mode): it outputs 0 whatever the crop, so its incoming
weights (its row of the layer's weight: an output channel's filter, an fc unit's row) never change
the answer. Other architectures are not analysed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import atomic, paths
from .common import count, data_info, where
from .style import md_escape

BATCH = 256


def dead_units(run_dir, batch_size: int = BATCH) -> dict[str, np.ndarray] | None:
    """layer -> boolean array, True for each unit of the trained model that never fires on the
    training set; None when the model has no layers known to feed a ReLU, or the run lacks them."""
    import torch

    from .. import artifacts, train

    run_dir = Path(run_dir)
    train_dir = paths.stage_dir(run_dir, "train")
    images_file = paths.stage_dir(run_dir, "data") / paths.images("train")
    if not (train_dir / paths.MODEL).is_file() or not images_file.is_file():
        return None
    net = artifacts.load_model(train_dir, "cpu", run_dir=run_dir).eval()
    layers = getattr(type(net), "RELU_AFTER", None)
    if not layers:
        return None
    modules = dict(net.named_modules())
    fired = {name: None for name in layers}

    def hook(name):
        def record(module, inputs, output):
            dims = [0] + list(range(2, output.dim()))
            active = (output > 0).any(dim=dims[0]) if output.dim() == 2 else (output > 0).flatten(2).any(2).any(0)
            fired[name] = active if fired[name] is None else fired[name] | active
        return record
    handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
    images = np.load(images_file, mmap_mode="r")
    try:
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(np.array(images[i:i + batch_size])).permute(0, 3, 1, 2)
                net(train.normalize(x))
    finally:
        for h in handles:
            h.remove()
    return {name: (~active).numpy() for name, active in fired.items() if active is not None}


def usage_table(run_dir, dead: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Per layer that feeds a ReLU: its units, the dead ones (count and %), the share of the layer's
    weights that sit in dead units' rows, and, where the pruned model has masks, the weights pruning
    removed and the share of them in dead units' rows (beside the share of all weights there: what
    pruning would take from dead units by chance)."""
    run_dir = Path(run_dir)
    dead = dead_units(run_dir) if dead is None else dead
    if not dead:
        return pd.DataFrame()
    import torch

    weights = torch.load(where(run_dir, "trained", paths.MODEL), map_location="cpu", weights_only=True)
    mask_file = where(run_dir, "pruned", paths.MASKS)
    masks = atomic.load_tensors(mask_file) if mask_file.is_file() else {}
    rows = {}
    for layer, is_dead in dead.items():
        w = weights[f"{layer}.weight"]
        per_unit = w[0].numel()
        row = {"units": len(is_dead), "dead units": int(is_dead.sum()), "dead (%)": 100 * is_dead.mean(),
               "weights": w.numel(), "weights in dead units (%)": 100 * is_dead.mean()}
        if layer in masks:
            removed = (~masks[layer].bool()).reshape(len(is_dead), per_unit).sum(1).numpy()
            row["weights removed by pruning"] = int(removed.sum())
            row["removed in dead units (%)"] = (100 * removed[is_dead].sum() / removed.sum() if removed.sum()
                                                else np.nan)
        rows[layer] = row
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "layer"
    return df


def usage_markdown(run_dir, table: pd.DataFrame | None = None) -> str:
    """The dead units and what pruning took from them, in sentences computed from ``usage_table``."""
    df = usage_table(run_dir) if table is None else table
    if df.empty:
        model = (atomic.read_json(where(run_dir, "trained", paths.METRICS)).get("model", "this model")
                 if where(run_dir, "trained", paths.METRICS).is_file() else "this run")
        return (f"Not analysed for {md_escape(model)}: dead units are found only for models whose layers feed a "
                "ReLU directly (the seed CNN), and only once the train stage has run.")
    n_train = data_info(run_dir).get("train_size")
    lines = [f"A unit is dead when it outputs 0 on every one of the {count(n_train or 0)} training crops (the "
             "trained model, in eval mode, without augmentation): its incoming weights change no answer on those "
             "crops."]
    for layer, r in df.iterrows():
        s = (f"- **{md_escape(layer)}**: {count(r['dead units'])} of {count(r['units'])} units dead "
             f"({r['dead (%)']:.1f}%), holding {r['weights in dead units (%)']:.1f}% of the layer's "
             f"{count(r['weights'])} weights")
        if "removed in dead units (%)" in r and not pd.isna(r["removed in dead units (%)"]):
            s += (f"; of the {count(r['weights removed by pruning'])} weights pruning removed here, "
                  f"{r['removed in dead units (%)']:.1f}% sat in dead units")
        lines.append(s + ".")
    if "removed in dead units (%)" in df:
        big = df["weights"].idxmax()
        r = df.loc[big]
        if not pd.isna(r["removed in dead units (%)"]):
            removed, there = r["removed in dead units (%)"], r["weights in dead units (%)"]
            how = ("more often than" if removed > 1.1 * there else "less often than" if removed < 0.9 * there
                   else "about as often as")   # within 10% of it: about as often
            lines.append(
                f"\n{md_escape(big)} holds {100 * r['weights'] / df['weights'].sum():.1f}% of these layers' weights. "
                "The weights of dead units took no part in any answer on the training crops, so the part of the "
                "pruning that fell on them found no redundancy in what the network uses; pruning fell on them "
                f"{how} their share of the weights would by chance ({removed:.1f}% of the removed weights, "
                f"against {there:.1f}% of all weights).")
    return "\n".join(lines)

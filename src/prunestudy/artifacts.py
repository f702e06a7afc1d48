"""A stage's model files: the model with its architecture (channel-pruned layers are smaller),
the masks, the export without pickle, the test predictions; and loading them back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import atomic, data, models, paths, prune
from . import methods as pruning_methods


def cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_model(out: Path, net, arch: str, num_classes: int) -> None:
    """masks.pt, model.pt (masks folded: a plain state_dict) and architecture.json (rebuilds any
    model, channel-pruned ones included) of a model; `net` itself is not changed."""
    atomic.save_tensors(out / paths.MASKS, prune.masks(net))
    atomic.save_tensors(out / paths.MODEL, prune.export(net)[0])
    atomic.write_json(out / paths.ARCHITECTURE,
                     {"model": arch, "num_classes": num_classes, "layers": prune.architecture(net)})


def export(out: Path, net, arch: str, classes: list[str], pm: dict, ev: dict) -> dict:
    """retrain/export.pt (a plain state_dict: dense with zeros for masked methods, the small model
    for channel) and export.json (how to rebuild it); see load_export."""
    state, meta = prune.export(net)
    kind = pruning_methods.get(pm["method"]).kind
    meta.update({"model": arch, "num_classes": len(classes), "classes": classes, "kind": kind,
                 "method": pm["method"], "amount": pm["amount"], "test_accuracy": ev["accuracy"],
                 "test_loss": ev["loss"],
                 "load": ("prune.rebuild(model, num_classes, architecture)" if kind == "structural"
                          else "models.build_model(model, num_classes)")
                 + ".load_state_dict(torch.load('export.pt', weights_only=True)); inputs uint8 images / 255, "
                   "normalised with mean = std = 0.5 (prunestudy.train.normalize)"})
    atomic.save_tensors(out / paths.EXPORT, state)
    atomic.write_json(out / paths.EXPORT_META, meta)
    return {"file": paths.EXPORT, "meta": paths.EXPORT_META, "kind": kind, "params_total": meta["params_total"],
            "params_nonzero": meta["params_nonzero"], "bytes": (out / paths.EXPORT).stat().st_size}


def load_export(directory, device="cpu") -> torch.nn.Module:
    """The model exported by the retrain stage (export.pt + export.json), loaded without pickle:
    masked methods into the dense architecture, channel-pruned ones into the rebuilt small one."""
    directory = Path(directory)
    meta = atomic.read_json(directory / paths.EXPORT_META)
    if meta["kind"] != "masked":
        net = prune.rebuild(meta["model"], meta["num_classes"], meta["architecture"])
    else:
        net = models.build_model(meta["model"], meta["num_classes"])
    net.load_state_dict(torch.load(directory / paths.EXPORT, map_location="cpu", weights_only=True))
    return net.to(device)


def load_model(stage_dir: Path, device="cpu", masks: bool = False, *, weights: str = paths.MODEL,
               run_dir: Path | None = None) -> torch.nn.Module:
    """The model saved by a stage: rebuilt from its architecture.json when it has one (the prune and
    retrain stages write it; channel-pruned layers are smaller), else the architecture of
    train/metrics.json; `weights` names the state_dict file; masks re-attached if asked."""
    stage_dir = Path(stage_dir)
    if (stage_dir / paths.ARCHITECTURE).is_file():
        spec = atomic.read_json(stage_dir / paths.ARCHITECTURE)
        net = prune.rebuild(spec["model"], spec["num_classes"], spec["layers"])
    else:
        run_dir = Path(run_dir) if run_dir is not None else stage_dir.parent
        arch = atomic.read_json(paths.stage_dir(run_dir, "train") / paths.METRICS)["model"]
        classes = data.read_info(paths.stage_dir(run_dir, "data"))["classes"]
        net = models.build_model(arch, len(classes))
    net.load_state_dict(atomic.load_tensors(stage_dir / weights))
    if masks:
        prune.restore(net, atomic.load_tensors(stage_dir / paths.MASKS))
    return net.to(device)


def save_predictions(out: Path, predictions: np.ndarray) -> None:
    atomic.atomic_write(out / paths.PREDICTIONS, lambda f: np.save(f, predictions, allow_pickle=False))

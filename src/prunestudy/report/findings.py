"""The findings: sentences computed from the numbers of a run (each one changes when its numbers
do), from the data through training, pruning, retraining and the dense control to the seed report."""

from __future__ import annotations

import math

import numpy as np

from .. import methods, states
from . import reference
from .common import binomial_se, change, count, epochs, pct, pts, test_size
from .efficiency import f_efficiency
from .seeds import f_seeds
from .style import md_escape
from .sweep import f_sweep


def _f_data(results: dict) -> str | None:
    data = results.get("data") or {}
    counts = data.get("counts") or {}
    train, test = counts.get("train"), counts.get("test")
    if not train or not test:
        return None
    small, big = min(train, key=train.get), max(train, key=train.get)
    common = max(test, key=test.get)
    n_test = sum(test.values())
    ratio = train[big] / train[small] if train[small] else float("inf")
    return (f"The data has {count(sum(train.values()))} training and {count(n_test)} test crops over "
            f"{len(train)} classes; "
            f"training classes range from '{small}' ({count(train[small])} crops) to '{big}' ({count(train[big])}), "
            f"a {ratio:.1f}:1 imbalance, and always answering the commonest test class ('{common}') would score "
            f"{pct(test[common] / n_test)}, the floor any model has to beat.")


def _f_accuracy(results: dict) -> str | None:
    train = states.metrics(results, "trained")
    if "test_accuracy" not in train:
        return "Training has not run in this run folder, so there is no trained model to report."
    acc, n = train["test_accuracy"], test_size(results)
    n_epochs = len(train.get("epochs") or [])
    s = (f"After {n_epochs} training epoch{'s' * (n_epochs != 1)} the {train.get('model', 'model')} reached "
         f"{pct(acc)} test accuracy")
    if train.get("test_loss") is not None:
        s += f" (test loss {train['test_loss']:.3f}, a true per-sample mean)"
    if n:
        s += (f"; on {count(n)} test crops one binomial standard error of that accuracy is "
              f"±{100 * binomial_se(acc, n):.1f} points")
    return s + "."


def _f_train_loss(results: dict, state: str) -> str | None:
    rows = epochs(results, state)
    if not rows:
        return None
    loss = [r["train_loss"] for r in rows]
    last = len(loss) - 1

    def extreme(word: str, i: int) -> str:   # the value only where the sentence has not given it yet
        return f"{word} in epoch {i + 1}" if i in (0, last) else f"{word} {loss[i]:.3f} in epoch {i + 1}"
    s = (f"During {states.get(state).phase}, the per-epoch training loss (sample mean) went from {loss[0]:.3f} "
         f"in epoch 1 "
         f"to {loss[-1]:.3f} in epoch {last + 1} ({extreme('lowest', int(np.argmin(loss)))}, "
         f"{extreme('highest', int(np.argmax(loss)))})")
    if all("step_loss_min" in r for r in rows):
        s += (f"; single optimizer steps ranged from {min(r['step_loss_min'] for r in rows):.3f} "
              f"to {max(r['step_loss_max'] for r in rows):.3f} (batch means)")
    return s + "."


def _f_overfit(results: dict, state: str) -> str | None:
    rows = [r for r in epochs(results, state) if r.get("test_loss") is not None]
    if len(rows) < 2:
        return None
    test = [r["test_loss"] for r in rows]
    train = [r["train_loss"] for r in rows]
    acc = [r.get("test_accuracy", np.nan) for r in rows]
    best, last = int(np.argmin(test)), len(rows) - 1
    best_acc = int(np.nanargmax(acc)) if not np.all(np.isnan(acc)) else None
    tail = (f"; test accuracy peaked at {pct(acc[best_acc])} in epoch {best_acc + 1} (last epoch {pct(acc[-1])})"
            if best_acc is not None else "")
    phase = states.get(state).phase.capitalize()
    if best < last and test[last] > test[best] and train[last] < train[best]:
        return (f"{phase} overfits: test loss was lowest ({test[best]:.3f}) in epoch {best + 1} and rose to "
                f"{test[last]:.3f} by epoch {last + 1} while training loss kept falling ({train[best]:.3f} → "
                f"{train[last]:.3f}){tail}.")
    trend = "fell" if test[last] < test[0] else "did not fall"
    return (f"{phase}: test loss {trend} from {test[0]:.3f} to {test[last]:.3f} over {last + 1} epochs while "
            f"training loss went from {train[0]:.3f} to {train[last]:.3f}, with no rise of test loss after its "
            f"minimum, so no sign of overfitting by loss{tail}.")


def _dense_accuracy(results: dict) -> float | None:
    prune = states.metrics(results, "pruned")
    return prune.get("dense_test_accuracy", states.metrics(results, "trained").get("test_accuracy"))


def _f_prune(results: dict) -> str:
    prune = states.metrics(results, "pruned")
    dense = _dense_accuracy(results)
    if "test_accuracy" not in prune or dense is None:
        return "Pruning has not run in this run folder, so there is no pruned model to compare."
    acc, n = prune["test_accuracy"], test_size(results)
    d = 100 * (acc - dense)
    amount = amount_phrase(prune) if prune.get("amount") is not None else "?"
    s = (f"After pruning ({prune.get('method', '?')}, {amount}, targets '{prune.get('targets', '?')}'), "
         f"{change(d, 'test accuracy')}, from {pct(dense)} to {pct(acc)}")
    if n:
        se = 100 * binomial_se(dense, n)
        if abs(d) <= se:
            s += (f"; that is within one binomial standard error (±{se:.1f} points on {count(n)} test crops), "
                  f"indistinguishable from sampling noise")
        else:
            s += (f"; that is {abs(d) / se:.1f} binomial standard errors (±{se:.1f} points on {count(n)} test crops), "
                  f"larger than sampling noise of one standard error")
    if prune.get("test_loss") is not None and prune.get("dense_test_loss") is not None:
        s += f"; test loss went from {prune['dense_test_loss']:.3f} to {prune['test_loss']:.3f}"
    return s + "."


def amount_phrase(prune: dict) -> str:
    """What `amount` means for the method (its registry phrase), and the schedule (e.g. '50% of the
    weights of each layer'); a method the registry does not know reads as per-layer weights."""
    m = methods.REGISTRY.get(prune.get("method"))
    s = m.describe(prune["amount"]) if m else f"{pct(prune['amount'], 0)} of the weights of each layer"
    rounds = prune.get("rounds") or 1
    if rounds > 1:
        s += f" in {rounds} rounds with {prune.get('epochs_per_round', 0)} epoch(s) of fine-tuning between them"
    if prune.get("rewind"):
        s += f", survivors rewound to training step {prune['rewind']['step']}"
    return s


def _f_sparsity(results: dict) -> str | None:
    prune = states.metrics(results, "pruned")
    if "global_sparsity" not in prune:
        return None
    layers = prune.get("layers") or {}
    s = f"Measured sparsity of the targeted weights is {pct(prune['global_sparsity'], 2)}"
    if prune.get("amount") is not None:
        s += f" against the asked {pct(prune['amount'], 2)}"
    notes = getattr(methods.REGISTRY.get(prune.get("method")), "notes", "")
    if notes:
        s += f" {notes}"
    if layers:
        lo, hi = min(layers, key=layers.get), max(layers, key=layers.get)
        s += (f" (every one of the {len(layers)} layers at {pct(layers[lo], 2)})" if layers[hi] - layers[lo] < 5e-5
              else f" (per layer from {pct(layers[lo], 2)} in {lo} to {pct(layers[hi], 2)} in {hi})")
    if prune.get("params_nonzero") is not None and prune.get("params_total"):
        nz, tot = prune["params_nonzero"], prune["params_total"]
        s += (f"; counting biases and untargeted tensors, {count(nz)} of {count(tot)} parameters ({pct(nz / tot)}) "
              f"remain nonzero, {count(tot - nz)} are zero")
    return s + "."


def _f_retrain(results: dict) -> str:
    re_, prune = states.metrics(results, "retrained"), states.metrics(results, "pruned")
    if "test_accuracy" not in re_:
        return "Retraining has not run in this run folder, so recovery after pruning is not measured."
    acc, dense, pruned = re_["test_accuracy"], _dense_accuracy(results), prune.get("test_accuracy")
    s = f"During retraining ({len(re_.get('epochs') or [])} epochs, pruning masks held)"
    if pruned is None:
        return s + f" the model reached {pct(acc)} test accuracy."
    s += f", {change(100 * (acc - pruned), 'test accuracy')} (from {pct(pruned)} to {pct(acc)})"
    if dense is not None:
        drop, gain, vs_dense = 100 * (dense - pruned), 100 * (acc - pruned), 100 * (acc - dense)
        if vs_dense >= 0:
            s += (f", ending {pts(vs_dense)} points above the dense model's {pct(dense)}"
                  + (f": the {pts(drop)}-point pruning drop fully recovered" if drop > 0 else ""))
        elif drop > 0:
            s += (f", recovering {100 * max(gain, 0) / drop:.0f}% of the {pts(drop)}-point pruning drop "
                  f"and ending {pts(vs_dense)} points below the dense model's {pct(dense)}")
        else:
            s += (f", ending {pts(vs_dense)} points below the dense model's {pct(dense)} although pruning "
                  f"itself cost nothing")
    if re_.get("global_sparsity") is not None and prune.get("global_sparsity") is not None:
        a, b = re_["global_sparsity"], prune["global_sparsity"]
        s += (f"; sparsity stayed at {pct(a, 2)}, so the masks held" if abs(a - b) < 1e-9
              else f"; sparsity changed from {pct(b, 2)} to {pct(a, 2)}, so the masks did NOT hold")
    return s + ". The seed report gives no retraining result to compare with."


def _f_seed(results: dict) -> str | None:
    dense, pruned = _dense_accuracy(results), states.metrics(results, "pruned").get("test_accuracy")
    if dense is None:
        return None
    seed_t, seed_p = reference.accuracy("trained"), reference.accuracy("pruned")
    gap = 100 * (dense - seed_t)
    s = (f"This run's trained accuracy {pct(dense)} is {pts(gap)} points {'above' if gap >= 0 else 'below'} the "
         f"seed report's {pct(seed_t, 0)}")
    if pruned is None:
        return s + "; the pruning comparison waits for the prune stage."
    seed_drop, drop = 100 * (seed_t - seed_p), 100 * (dense - pruned)
    amount = states.metrics(results, "pruned").get("amount")
    amount_s = f" at amount {amount:g}" if amount is not None else ""
    diff = drop - seed_drop
    rel = "the same as" if abs(diff) < 0.05 else f"{pts(diff)} points {'more' if diff > 0 else 'less'} than"
    what = "dropped" if drop >= 0 else "gained"
    rate = reference.seed_report()["settings"]["prune_amount"]
    return (s + f"; the seed lost {seed_drop:.1f} point to pruning at rate {rate:g} "
            f"({pct(seed_t, 0)} → {pct(seed_p, 0)}), this run {what} {pts(drop)} points{amount_s} "
            f"({pct(dense)} → {pct(pruned)}), {rel} the seed's drop.")


def _f_loss_note(results: dict) -> str | None:
    losses = [(state, states.metrics(results, state).get("test_loss")) for state in states.MAIN]
    losses = [(s, v) for s, v in losses if v is not None]
    if not losses:
        return None
    ours = ", ".join(f"{v:.3f} ({s})" for s, v in losses)
    seed, batch = reference.seed_report()["reported_test_loss"], reference.seed_report()["settings"]["batch_size"]
    return (f"Test losses are not comparable with the seed report: its {seed['trained']} / {seed['pruned']} are "
            f"batch-mean losses divided by the number of samples (about {batch}× too small), "
            f"whereas this run's {ours} are true per-sample means; the seed's losses are therefore not plotted.")


def _f_first_steps(results: dict) -> str | None:
    rows = epochs(results, "trained")
    if not rows or "step_loss_first" not in rows[0]:
        return None
    k = len((results.get("data") or {}).get("classes") or []) or 10
    seed = reference.seed_report()["step_loss"][1]
    r = rows[0]
    return (f"The first optimizer step's loss was {r['step_loss_first']:.3f} (chance level for {k} classes: "
            f"ln {k} = {math.log(k):.3f}; seed report {seed['first']:.3f}); epoch-1 step losses spanned "
            f"{r['step_loss_min']:.3f}–{r['step_loss_max']:.3f} here vs {seed['min']:.3f}–{seed['max']:.3f} "
            f"in the seed report.")


def _f_time(results: dict) -> str | None:
    parts = []
    for state in ("trained", "retrained"):
        st = states.metrics(results, state)
        if st.get("seconds") is not None:
            rates = [r["images_per_s"] for r in st.get("epochs") or [] if "images_per_s" in r]
            rate = f" ({np.mean(rates):.0f} images/s)" if rates else ""
            parts.append(f"{states.get(state).phase} took {st['seconds']:.1f} s{rate}")
    if not parts:
        return None
    device = states.metrics(results, "trained").get("device")
    s = " and ".join(parts) + (f" on {device}" if device else "")
    return s[0].upper() + s[1:] + "."


def findings(results: dict) -> list[str]:
    """Sentences computed from the numbers of ``results`` (each one changes when its numbers do)."""
    builders = [_f_data, _f_accuracy, lambda r: _f_train_loss(r, "trained"), _f_first_steps,
                lambda r: _f_overfit(r, "trained"), _f_prune, _f_sparsity, _f_seed, f_seeds, _f_retrain, _f_control,
                f_efficiency, f_sweep,
                lambda r: _f_train_loss(r, "retrained"), lambda r: _f_overfit(r, "retrained"),
                _f_loss_note, _f_time]
    return [s for s in (b(results) for b in builders) if s]


def findings_markdown(results: dict) -> str:
    """The findings as a Markdown bullet list (text escaped: no HTML, links or math)."""
    return "\n".join(f"- {md_escape(s)}" for s in findings(results))


def _f_control(results: dict) -> str | None:
    control, re_ = states.metrics(results, "control"), states.metrics(results, "retrained")
    if "test_accuracy" not in control or "test_accuracy" not in re_:
        return None
    c, r, dense, n = control["test_accuracy"], re_["test_accuracy"], _dense_accuracy(results), test_size(results)
    n_epochs = control.get("fine_tune_epochs", len(control.get("epochs") or []))
    s = (f"The dense control (the trained model fine-tuned {n_epochs} more epoch{'s' * (n_epochs != 1)} with the same "
         f"settings, unpruned) reached {pct(c)}")
    if dense is not None:
        s += f" ({change(100 * (c - dense), 'accuracy')} from the dense model's {pct(dense)})"
    d = 100 * (r - c)
    s += f"; the retrained pruned model's {pct(r)} is {pts(d)} points {'above' if d >= 0 else 'below'} the control"
    if n:
        se = 100 * math.sqrt(binomial_se(r, n) ** 2 + binomial_se(c, n) ** 2)
        s += f" (±{se:.1f} points, one standard error of the difference)"
        if abs(d) <= se:
            s += ", indistinguishable from it"
    if d < 0:
        s += f"; counting the extra training, pruning cost {pts(d)} points"
        if dense is not None and r > dense:
            s += ", and the retrained model's gain over the dense model came from the extra training, not from pruning"
    else:
        s += "; counting the extra training, pruning cost nothing measurable"
    return s + "."


def control_markdown(results: dict) -> str:
    """The retrained pruned model beside the dense control, as Markdown."""
    s = _f_control(results)
    if s is None:
        return ("No dense control in this run (retrain.control is false, or retraining has not run): gains of "
                "retraining cannot be told apart from effects of pruning.")
    return md_escape(s)

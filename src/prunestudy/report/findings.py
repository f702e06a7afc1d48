"""The findings: sentences computed from the numbers of a run (each one changes when its numbers
do), from the data through training, pruning, retraining and the dense control to the seed report.

Every comparison of two model states is read from results.json's paired tests (exact McNemar
test and Newcombe interval on the same test crops, prunestudy.metrics): a change is called a
drop or a gain only when the test says so at its level, and a change it cannot tell from noise
is given with what its interval rules out, never as "no cost". A model state at the
majority-class floor makes every comparison it is part of say that nothing can be concluded."""

from __future__ import annotations

import html
import math

import numpy as np

from .. import methods, states
from . import glossary, reference
from .common import (
    binomial_se,
    change,
    ci_text,
    comparison,
    count,
    epochs,
    flagged,
    joined,
    min_test,
    pct,
    plural,
    pts,
    pvalue,
    relative,
    signed,
    small_classes,
    test_size,
    verdict_text,
)
from .curve import f_curve
from .efficiency import f_efficiency
from .seeds import f_seeds
from .style import md_escape


def _f_floor(results: dict) -> str | None:
    """First of all: the model states that sit at the majority-class floor, or answer one class."""
    bad = flagged(results)
    if not bad:
        return None
    names = joined([states.get(s).label for s in bad])
    return (f"Nothing can be concluded about pruning or retraining from the {names} model"
            f"{'s' * (len(bad) != 1)}: {floor_detail(results['floor'], bad)}.")


def floor_detail(floor: dict, bad: dict) -> str:
    """Why the flagged states are at the floor: one clause per distinct finding, naming the states
    it holds for (which state, which class, what share)."""
    groups: dict[str, list[str]] = {}
    for state, e in bad.items():
        what = [f"{pct(e['accuracy'])}"]
        if e["at_floor"]:
            what.append(f"not significantly above the majority floor of {pct(floor['share'])} (always answering "
                        f"'{floor['class']}'; exact binomial test of being above it: {pvalue(e['p_value'])})")
        if e["collapsed"]:
            what.append(f"answering '{e['top_class']}' for {pct(e['top_share'])} of the test crops ("
                        f"'{e['top_class']}' is {pct(e['top_test_share'])} of them)")
        groups.setdefault(", ".join(what), []).append(states.get(state).label)
    return "; ".join(f"the {joined(names)} model{'s' * (len(names) != 1)} "
                     f"{'scores' if len(names) == 1 else 'each score'} {what}" for what, names in groups.items())


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
    s = (f"The data has {count(sum(train.values()))} training and {count(n_test)} test crops over "
         f"{len(train)} classes; "
         f"training classes range from '{small}' ({count(train[small])} crops) to '{big}' ({count(train[big])}), "
         f"a {ratio:.1f}:1 imbalance, and always answering the commonest test class ('{common}') would score "
         f"{pct(test[common] / n_test)}, the floor any model has to beat")
    few = small_classes(results)
    empty = [c for c, n in few.items() if n == 0]
    thin = {c: n for c, n in few.items() if n > 0}
    if thin:
        s += (f". {_listing(thin)} {'has' if len(thin) == 1 else 'have'} fewer than {min_test(results)} test crops "
              f"(data.min_test_per_class): {'its' if len(thin) == 1 else 'their'} per-class figures are too few "
              "to read")
    if empty:
        s += (f". {', '.join(repr(c) for c in empty)} {'has' if len(empty) == 1 else 'have'} no test crops at all: "
              "nothing is measured for " + ("it" if len(empty) == 1 else "them"))
    return s + "."


def _listing(by_class: dict[str, int]) -> str:
    """'bicycle' (9 test crops), 'oven' (7)"""
    items = list(by_class.items())
    return ", ".join(f"'{c}' ({count(n)}{' test crops' * (i == 0)})" for i, (c, n) in enumerate(items))


def _f_accuracy(results: dict) -> str | None:
    train = states.metrics(results, "trained")
    if "test_accuracy" not in train:
        return "Training has not run in this run folder, so there is no trained model to report."
    acc, n = train["test_accuracy"], test_size(results)
    n_epochs = len(train.get("epochs") or [])
    s = (f"After {plural(n_epochs, 'training epoch')} the {train.get('model', 'model')} reached "
         f"{pct(acc)} test accuracy")
    extra = [f"{what} {pct(train[key])}" for key, what in (("balanced_accuracy", "balanced accuracy"),
                                                            ("macro_f1", "macro-F1")) if train.get(key) is not None]
    if train.get("test_loss") is not None:
        extra.append(f"test loss {train['test_loss']:.3f}, a true per-sample mean")
    if extra:
        s += f" ({'; '.join(extra)})"
    if n:
        s += f"; {_uncertainty(results, acc, n)}"
    return s + "."


def _uncertainty(results: dict, acc: float, n: int) -> str:
    """The standard error of the trained accuracy: binomial where the test crops are independent
    (one per image, or images unknown), else the image-level (cluster bootstrap) one beside it."""
    binomial = f"±{100 * binomial_se(acc, n):.1f} points"
    clusters = results.get("test_clusters")
    e = (((results.get("floor") or {}).get("states") or {}).get("trained") or {}).get("accuracy_clustered")
    if not clusters:
        return f"on {count(n)} test crops one binomial standard error of that accuracy is {binomial}"
    where = f"on {count(n)} test crops from {count(clusters['images'])} images"
    if clusters["one_per_image"] or not e:
        return f"{where} (one per image: independent) one binomial standard error of that accuracy is {binomial}"
    return (f"{where} one standard error of that accuracy is ±{100 * e['se_bootstrap']:.1f} points when whole "
            f"images are resampled ({e['resamples']} cluster-bootstrap resamples, seed {e['seed']}; "
            f"{e['confidence']:.0%} interval {pct(e['ci_low'])} to {pct(e['ci_high'])}), against {binomial} if the "
            f"crops were independent (design effect {e['design_effect']:.1f})")


def _f_train_loss(results: dict, state: str) -> str | None:
    rows = epochs(results, state)
    if not rows:
        return None
    loss = [r["train_loss"] for r in rows]
    phase = states.get(state).phase
    if len(loss) == 1:
        s = f"During {phase} (1 epoch), the training loss (sample mean) was {loss[0]:.3f}"
    else:
        s = (f"During {phase}, the per-epoch training loss (sample mean) went from {loss[0]:.3f} in epoch 1 "
             f"to {loss[-1]:.3f} in epoch {len(loss)}")
        inner = [f"{word} {loss[i]:.3f} in epoch {i + 1}" for word, i in
                 (("lowest", int(np.argmin(loss))), ("highest", int(np.argmax(loss)))) if 0 < i < len(loss) - 1]
        if inner:
            s += f" ({', '.join(inner)})"
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
    tail = ""
    if not np.all(np.isnan(acc)):
        top = int(np.nanargmax(acc))
        tail = (f"; test accuracy was highest in the last epoch ({pct(acc[-1])})" if acc[-1] >= acc[top] else
                f"; test accuracy peaked at {pct(acc[top])} in epoch {top + 1} (last epoch {pct(acc[-1])})")
    phase = states.get(state).phase.capitalize()
    if best < last and test[last] > test[best] and train[last] < train[best] and train[last] >= test[last]:
        # training loss (with dropout and augmentation) still above test loss: the model has not
        # fit its training data, so a rising test loss is not overfitting (e.g. a model at the floor)
        return (f"{phase}: test loss was lowest ({test[best]:.3f}) in epoch {best + 1} and rose to "
                f"{test[last]:.3f} by epoch {last + 1} while training loss fell ({train[best]:.3f} → "
                f"{train[last]:.3f}), but training loss is still above test loss: the model has not fit its "
                f"training data, so this is no sign of overfitting{tail}.")
    if best < last and test[last] > test[best] and train[last] < train[best]:
        return (f"{phase} overfits: test loss was lowest ({test[best]:.3f}) in epoch {best + 1} and rose to "
                f"{test[last]:.3f} by epoch {last + 1} while training loss kept falling ({train[best]:.3f} → "
                f"{train[last]:.3f}){tail}.")
    trend = "fell" if test[last] < test[0] else "did not fall"
    rise = ("with no rise of test loss after its minimum, so no sign of overfitting by loss" if best == last or
            test[last] <= test[best] else "and test loss was lowest in an earlier epoch")
    return (f"{phase}: test loss {trend} from {test[0]:.3f} to {test[last]:.3f} over {last + 1} epochs while "
            f"training loss went from {train[0]:.3f} to {train[last]:.3f}, {rise}{tail}.")


def _dense_accuracy(results: dict) -> float | None:
    prune = states.metrics(results, "pruned")
    return prune.get("dense_test_accuracy", states.metrics(results, "trained").get("test_accuracy"))


def _balanced(results: dict, before: str, after: str) -> str:
    """' (balanced accuracy 56.6% → 56.1%)' where both states have it."""
    a, b = (states.metrics(results, s).get("balanced_accuracy") for s in (before, after))
    return f" (balanced accuracy {pct(a)} → {pct(b)})" if a is not None and b is not None else ""


def _stuck(results: dict, *involved: str) -> str | None:
    """Why nothing can be concluded from a comparison of `involved` states (None if something can)."""
    bad = [s for s in involved if s in flagged(results)]
    if not bad:
        return None
    return (f"but the {joined([states.get(s).label for s in bad])} model{'s' * (len(bad) != 1)} "
            f"{'is' if len(bad) == 1 else 'are'} at the majority-class floor, so nothing can be concluded from this "
            "comparison")


def _f_prune(results: dict) -> str:
    prune = states.metrics(results, "pruned")
    dense = _dense_accuracy(results)
    if "test_accuracy" not in prune or dense is None:
        return "Pruning has not run in this run folder, so there is no pruned model to compare."
    acc = prune["test_accuracy"]
    amount = amount_phrase(prune) if prune.get("amount") is not None else "?"
    s = (f"After pruning ({prune.get('method', '?')}, {amount}, targets '{prune.get('targets', '?')}'), "
         f"{_moved(acc, dense)}" + _balanced(results, "trained", "pruned"))
    stuck = _stuck(results, "trained", "pruned")
    c = comparison(results, "pruned", "trained")
    if stuck:
        s += f"; {stuck}"
    elif c:
        s += (f". Paired on the same {count(c['n'])} test crops, the two models agree on {pct(c['agree'])} of them: "
              + verdict_text(c))
    if prune.get("test_loss") is not None and prune.get("dense_test_loss") is not None:
        s += f"; test loss went from {prune['dense_test_loss']:.3f} to {prune['test_loss']:.3f}"
    return s + "."


def _moved(after: float, before: float) -> str:
    """'test accuracy fell by 0.5 points, from 57.3% to 56.8%', or 'test accuracy stayed at 55.9%'."""
    d = 100 * (after - before)
    if abs(d) < 0.005:
        return f"test accuracy stayed at {pct(after)}"
    return f"{change(d, 'test accuracy')}, from {pct(before)} to {pct(after)}"


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
    s = f"During retraining ({plural(len(re_.get('epochs') or []), 'epoch')}, pruning masks held)"
    if pruned is None:
        return s + f" the model reached {pct(acc)} test accuracy."
    s += f", {_moved(acc, pruned)}" + _balanced(results, "pruned", "retrained")
    if (re_.get("start") or {}).get("weights") == "rewound":
        s += f", starting from the rewound weights' {pct(re_['start']['test_accuracy'])}"
    stuck = _stuck(results, "pruned", "retrained", "trained")
    if stuck:
        s += f"; {stuck}"
    else:
        c = comparison(results, "retrained", "pruned")
        if c:
            s += f": {verdict_text(c)}"
        c = comparison(results, "retrained", "trained")
        if c and dense is not None:
            where = relative(100 * c["change"], f"the dense model's {pct(dense)}")
            s += f". The retrained model is {where}: {verdict_text(c)}"
    if re_.get("global_sparsity") is not None and prune.get("global_sparsity") is not None:
        a, b = re_["global_sparsity"], prune["global_sparsity"]
        s += (f"; sparsity stayed at {pct(a, 2)}, so the masks held" if abs(a - b) < 1e-9
              else f"; sparsity changed from {pct(b, 2)} to {pct(a, 2)}, so the masks did NOT hold")
    return s + ". The seed report gives no retraining result to compare with."


def _f_seed(results: dict) -> str | None:
    """The seed report: beside this run only on COCO 2017 at its settings, as a reference otherwise."""
    dense = _dense_accuracy(results)
    if dense is None:
        return None
    seed_t, seed_p = reference.accuracy("trained"), reference.accuracy("pruned")
    src = reference.data_source(results)
    seeds = f"{pct(seed_t, 0)} / {pct(seed_p, 0)}"
    if not src["comparable"]:
        why = {reference.EMBEDDED: "the embedded synthetic shapes", reference.COCO: "COCO 2017 at other settings"
               }.get(src["kind"], "other data")
        return (f"The seed report's {seeds} (trained / pruned, on COCO 2017 at its settings) is a reference only: "
                f"this run is on {why}, so its accuracies are not set against the seed's.")
    floor = results.get("floor") or {}
    half = 100 * reference.rounding() / 2
    s = (f"On the same data and settings as the seed report, this run's trained model scored {pct(dense)} against "
         f"the seed's {pct(seed_t, 0)} (a rounded figure: {100 * seed_t - half:.1f}–{100 * seed_t + half:.1f}%)")
    if floor:
        s += (f"; this test set's majority floor is {pct(floor['share'])} (always '{floor['class']}'), which the "
              "seed report does not give")
    c = comparison(results, "pruned", "trained")
    if c is None:
        return s + "; the pruning comparison waits for the prune stage."
    lo, hi = reference.drop_range()
    rate = reference.seed_report()["settings"]["prune_amount"]
    return (s + f". The seed lost {100 * (seed_t - seed_p):.0f} point to pruning at rate {rate:g} ({seeds}; "
            f"from rounded figures, a drop anywhere between {lo:.0f} and {hi:.0f} points); this run's change is "
            f"{signed(100 * c['change'])} points ({ci_text(c)}).")


def _f_loss_note(results: dict) -> str | None:
    losses = [(state, states.metrics(results, state).get("test_loss")) for state in states.MAIN]
    losses = [(s, v) for s, v in losses if v is not None]
    if not losses:
        return None
    ours = ", ".join(f"{v:.3f} ({s})" for s, v in losses)
    b = reference.loss_bound()
    seed = reference.seed_report()["reported_test_loss"]
    s = (f"Test losses are not comparable with the seed report's {seed['trained']} / {seed['pruned']}: those cannot "
         f"be mean cross-entropies per sample, since a misclassified sample costs at least ln 2 (its true class "
         f"gets at most half the probability) and at the seed's accuracy at least {pct(b['misclassified'])} of the "
         f"test samples were misclassified, so the mean is at least {b['bound']:.2f}. {b['reported']} × {b['batch']} "
         f"= {b['times_batch']:.2f} is a plausible mean, so the likely cause is batch-mean losses summed and divided "
         f"by the number of samples at test batch {b['batch']} (an inference: the report does not say). This run's "
         f"{ours} are true per-sample means")
    n, trained = test_size(results), states.metrics(results, "trained").get("test_loss")
    if n and trained is not None:
        batches = math.ceil(n / b["batch"])
        s += (f"; computed the seed's likely way (a sum of {batches} batch means over {count(n)} samples) the "
              f"trained model's would read about {trained * batches / n:.3f}")
    return s + ". The seed's losses are not plotted."


def _f_first_steps(results: dict) -> str | None:
    rows = epochs(results, "trained")
    if not rows or "step_loss_first" not in rows[0]:
        return None
    k = len((results.get("data") or {}).get("classes") or []) or 10
    r = rows[0]
    s = (f"The first optimizer step's loss was {r['step_loss_first']:.3f} (chance level for {k} classes: "
         f"ln {k} = {math.log(k):.3f}); epoch-1 step losses spanned {r['step_loss_min']:.3f}–{r['step_loss_max']:.3f}")
    if reference.data_source(results)["comparable"]:
        seed = reference.seed_report()["step_loss"][1]
        s += f" (seed report: first {seed['first']:.3f}, epoch 1 {seed['min']:.3f}–{seed['max']:.3f})"
    return s + "."


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
    builders = [_f_floor, _f_data, _f_accuracy, lambda r: _f_train_loss(r, "trained"), _f_first_steps,
                lambda r: _f_overfit(r, "trained"), _f_prune, _f_sparsity, _f_seed, f_seeds, _f_retrain, _f_control,
                f_efficiency, f_curve,
                lambda r: _f_train_loss(r, "retrained"), lambda r: _f_overfit(r, "retrained"),
                _f_loss_note, _f_time]
    return [s for s in (b(results) for b in builders) if s]


def findings_markdown(results: dict) -> str:
    """The findings as a Markdown bullet list (text escaped: no HTML, links or math)."""
    return "\n".join(f"- {md_escape(s)}" for s in findings(results))


def findings_section(results: dict) -> str:
    """The findings below the first screen's verdict and table, folded (the verdict says what they
    conclude; a click opens the reasoning), the first mention of each glossary term linked."""
    items = "".join(f"<li>{html.escape(' '.join(s.split()), quote=False)}</li>" for s in findings(results))
    return (f"<details><summary><b>Findings, step by step</b> ({items.count('<li>')} sentences computed from the "
            f"numbers)</summary><ul>{glossary.link(items, html=True)}</ul></details>")


def _f_control(results: dict) -> str | None:
    control, re_ = states.metrics(results, "control"), states.metrics(results, "retrained")
    if "test_accuracy" not in control or "test_accuracy" not in re_:
        return None
    c_acc, r_acc, dense = control["test_accuracy"], re_["test_accuracy"], _dense_accuracy(results)
    n_epochs = control.get("fine_tune_epochs", len(control.get("epochs") or []))
    s = (f"The dense control (the trained model fine-tuned {n_epochs} more epoch{'s' * (n_epochs != 1)} with the "
         f"same settings, unpruned) reached {pct(c_acc)}")
    if control.get("balanced_accuracy") is not None:
        s += f" (balanced accuracy {pct(control['balanced_accuracy'])})"
    if dense is not None:
        s += ", " + relative(100 * (c_acc - dense), f"the dense model's {pct(dense)}")
    s += f"; the retrained pruned model's {pct(r_acc)} is {relative(100 * (r_acc - c_acc), 'it')}"
    stuck = _stuck(results, "retrained", "control")
    c = comparison(results, "retrained", "control")
    if stuck:
        return s + f", {stuck}."
    if c is None:
        return s + "."
    s += f": {verdict_text(c, rules=False)}"
    if c["verdict"] == "drop":
        s += ". Against the same extra training, pruning cost accuracy"
    elif c["verdict"] == "gain":
        s += ". Against the same extra training, the pruned model did better"
    elif c["ci_low"] < 0:
        s += (f". Against the same extra training, pruning cost at most {pts(100 * c['ci_low'])} points at "
              f"{c['confidence']:.0%} confidence")
    return s + "."


def control_markdown(results: dict) -> str:
    """The retrained pruned model beside the dense control, as Markdown."""
    s = _f_control(results)
    if s is None:
        return ("No dense control in this run (retrain.control is false, or retraining has not run): gains of "
                "retraining cannot be told apart from effects of pruning.")
    return md_escape(s)

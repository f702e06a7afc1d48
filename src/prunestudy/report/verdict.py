"""The verdict: the report's first sentences. What pruning cost (the accuracy change of the last
model state against the dense model, with its interval and paired test), what it bought
(parameters, bytes on disk, MACs, measured time) and whether the change can be told from noise;
or, when a model sits at the majority-class floor, that nothing can be concluded.

Every figure is read from results.json through the functions the later sections use (the paired
comparisons of ``common.comparison``, the floor of ``common.flagged``, the efficiency summary of
``efficiency.dense_reference`` and ``prunestudy.efficiency``), so the verdict and the section it
summarises never disagree. The long explanations stay in those sections."""

from __future__ import annotations

from .. import efficiency, states
from .common import MB, bounds, ci_text, comparison, count, flagged, joined, pct, pts, pvalue, signed
from .efficiency import dense_reference
from .style import md_escape


def _last_state(results: dict) -> str | None:
    """The state the verdict judges: the retrained model where retraining ran, else the pruned one."""
    return next((s for s in ("retrained", "pruned") if comparison(results, s, "trained")), None)


def floor_sentence(results: dict) -> str | None:
    """'Nothing can be concluded ...' when a state the verdict compares is at the majority floor."""
    bad = {s: e for s, e in flagged(results).items() if s in ("trained", "pruned", "retrained")}
    if not bad:
        return None
    floor = results["floor"]
    names = joined([f"{states.get(s).label} ({pct(e['accuracy'])})" for s, e in bad.items()])
    many = len(bad) != 1
    return (f"Nothing can be concluded about pruning: the {names} model{'s' * many} {'are' if many else 'is'} "
            f"at the majority-class floor (always answering '{floor['class']}' scores {pct(floor['share'])}). "
            "Train longer (train.epochs) or on more data.")


def cost_sentence(results: dict) -> str | None:
    """The accuracy change of the last state against the dense model, its interval, the exact
    McNemar test and whether it can be told from noise."""
    state = _last_state(results)
    if state is None:
        return None
    c = comparison(results, state, "trained")
    when = "after retraining" if state == "retrained" else "right after pruning (no retraining)"
    dense, acc = (states.metrics(results, s).get("test_accuracy") for s in ("trained", state))
    moved = f"{pct(dense)} → {pct(acc)}, " if None not in (dense, acc) else ""
    figures = f"({moved}{signed(100 * c['change'])} points, {ci_text(c)}, exact McNemar {pvalue(c['p_value'])})"
    if c["verdict"] == "too few changes":
        return (f"Accuracy {when}: only {count(c['gains'] + c['losses'])} of {count(c['n'])} test crops changed "
                f"answer {figures}, too few to tell any change from noise.")
    if c["verdict"] == "drop":
        return f"Pruning cost {pts(100 * c['change'])} points of test accuracy {when} {figures}, beyond noise."
    if c["verdict"] == "gain":
        return f"Test accuracy rose by {pts(100 * c['change'])} points {when} {figures}, beyond noise."
    rule = bounds(c)
    return (f"The accuracy change {when} cannot be told from noise {figures}"
            + (f"; {rule}." if rule else "."))


def _time(eff: dict) -> str:
    """What pruning bought in time: the measured speedup and its interval, or why there is none."""
    if efficiency.is_pending(eff):
        return "time not measured yet"
    if not efficiency.timed(eff):
        return "no time (it runs the dense model's computation)"
    low, high = eff.get("speedup_ci") or (None, None)
    if low is None:
        return f"{eff['measured_speedup']:.2f}× the dense speed, not judged (no interval)"
    saves = "saves time" if eff.get("saves_time") else "no time saved beyond noise"
    return f"{eff['measured_speedup']:.2f}× the dense speed (95% CI {low:.2f}–{high:.2f}×): {saves}"


def bought_sentence(results: dict) -> str | None:
    """Parameters, size on disk (and the sparse estimate), MACs and time, from the efficiency summary."""
    eff = dense_reference(results)
    if not eff:
        return None
    dense_p = eff["dense_params_total"]
    gone = 1 - eff["params_nonzero"] / max(dense_p, 1)
    params = f"{pct(gone)} of the {count(dense_p)} parameters zeroed or removed"
    size, dense_size = eff["state_dict_bytes"] / MB, eff["dense_state_dict_bytes"] / MB
    disk = (f"the same {dense_size:.2f} MB on disk" if abs(size - dense_size) < 0.005 * dense_size
            else f"{dense_size:.2f} → {size:.2f} MB on disk")
    disk += f" ({eff['sparse_compressed_bytes'] / MB:.2f} MB as a sparse estimate)"
    if eff["macs"] < eff["dense_macs"]:
        macs = f"{eff['dense_macs'] / 1e6:.1f} → {eff['macs'] / 1e6:.1f} M MACs run"
    else:
        macs = (f"{eff['effective_macs'] / 1e6:.1f} of {eff['dense_macs'] / 1e6:.1f} M MACs nonzero, but all "
                "of them still run")
    return f"It bought {params}; {disk}; {macs}; {_time(eff)}."


def verdict(results: dict) -> str:
    """The verdict as plain sentences: the floor (nothing to conclude) or the cost, then what was bought."""
    if not comparison(results, "pruned", "trained") and "test_accuracy" not in states.metrics(results, "pruned"):
        return "Pruning has not run in this run folder: there is nothing to judge yet."
    first = floor_sentence(results) or cost_sentence(results) or "The paired comparison of pruning is missing."
    return " ".join(s for s in (first, bought_sentence(results)) if s)


def verdict_markdown(results: dict) -> str:
    """The verdict as the report's first block: a quoted paragraph led by 'Verdict' (text escaped)."""
    return f"> **Verdict.** {md_escape(verdict(results))}\n"

"""Is it noise? The study repeated over random seeds: accuracy (and balanced accuracy, macro-F1)
per seed, paired changes per seed with their spread, their sentences and the seeds figure.

All seeds share one test set, so a Student-t interval over seeds measures only how training varies
from seed to seed: it says nothing of the test set's own noise (a few crops, from fewer images).
A change over seeds is therefore judged with results.json's `seeds_paired` (the per-crop pairs of
every seed: stratified exact McNemar test, clustered by image, prunestudy.metrics.stratified), and
never called "beyond noise" from the t-interval alone."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .. import metrics, states
from . import reference
from .common import binomial_se, test_size
from .style import figure, label, legend_outside, md_escape, placeholder

PAIRS = states.COMPARED
CONFIDENCE = metrics.CONFIDENCE
SCORES = (("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1"))   # shown beside accuracy
CI_LOW, CI_HIGH = f"{CONFIDENCE:.0%} CI low", f"{CONFIDENCE:.0%} CI high"


def pair_name(a: str, b: str) -> str:
    """paired_table's row of the change from state b to state a, e.g. 'pruned − trained'."""
    return f"{states.get(a).label} − {states.get(b).label}"


PRUNING_CHANGE = pair_name("pruned", "trained")   # paired_table's row of the change pruning made


def seed_runs(results: dict) -> list[dict]:
    """Test accuracy (and loss, sparsity) of every model state per seed: this run's first, then the
    repeats' (`seeds`), as results.seed_results gives them."""
    main = {"seed": (results.get("params") or {}).get("seed"), "dir": "."}
    for state in states.KEYS:
        m = states.metrics(results, state)
        if m.get("test_accuracy") is not None:
            main[state] = {k: m.get(k) for k in ("test_accuracy", "balanced_accuracy", "macro_f1", "test_loss",
                                                 "global_sparsity")}
    return [main, *(results.get("repeats") or [])]


def _accuracies(runs: list[dict], state: str, key: str = "test_accuracy") -> dict:
    """seed -> test accuracy (or `key`: balanced_accuracy, macro_f1) of `state` in %, for the seeds
    where it was measured."""
    return {r["seed"]: 100 * r[state][key] for r in runs if (r.get(state) or {}).get(key) is not None}


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """Mean, sample standard deviation and the two ends of the Student-t confidence interval of the
    mean (NaN where fewer than two values: one seed says nothing about the spread)."""
    from scipy import stats

    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return (np.nan,) * 4
    mean = float(v.mean())
    if v.size < 2:
        return mean, np.nan, np.nan, np.nan
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1)) * sd / np.sqrt(v.size)
    return mean, sd, mean - half, mean + half


def seeds_table(results: dict) -> pd.DataFrame:
    """Test accuracy (%) of each model state per seed, with the mean, standard deviation (points),
    min and max over seeds; the mean and SD of its balanced accuracy and macro-F1 beside them."""
    runs = seed_runs(results)
    rows = {}
    for state in states.KEYS:
        acc = _accuracies(runs, state)
        if not acc:
            continue
        mean, sd, _, _ = t_interval(acc.values())
        row = {"seeds": len(acc), "mean (%)": mean, "SD (points)": sd,
               "min (%)": min(acc.values()), "max (%)": max(acc.values()),
               **{f"seed {s} (%)": a for s, a in acc.items()}}
        for key, name in SCORES:
            other = _accuracies(runs, state, key)
            if other:
                m, sd_, _, _ = t_interval(other.values())
                row[f"{name}: mean (%)"], row[f"{name}: SD (points)"] = m, sd_
        rows[states.get(state).label] = row
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "model state"
    return df


def paired_table(results: dict) -> pd.DataFrame:
    """The paired change of test accuracy (points) per seed: pruned − trained, retrained − trained,
    retrained − dense control, each over the seeds where both were measured, with its mean, SD and
    95% Student-t confidence interval."""
    runs = seed_runs(results)
    rows = {}
    for a, b in PAIRS:
        xa, xb = _accuracies(runs, a), _accuracies(runs, b)
        diff = {s: xa[s] - xb[s] for s in xa if s in xb}
        if not diff:
            continue
        mean, sd, lo, hi = t_interval(diff.values())
        rows[pair_name(a, b)] = {"seeds": len(diff), "mean (points)": mean, "SD (points)": sd, CI_LOW: lo, CI_HIGH: hi,
                                 **{f"seed {s}": d for s, d in diff.items()}}
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "paired change"
    return df


def seeds_styler(results: dict):
    df = seeds_table(results)
    return (df.style.format({c: "{:.2f}" for c in df.columns if c != "seeds"}, na_rep="—")
            .set_caption("Test accuracy per seed, and the mean balanced accuracy and macro-F1 over seeds. SD: "
                         "sample standard deviation over seeds, in points (— with one seed). All seeds share the "
                         "same data; a seed sets initialisation, batch order, augmentation and random pruning."))


def paired_styler(results: dict):
    df = paired_table(results)
    return (df.style.format({c: "{:.2f}" if c.startswith("SD") else "{:+.2f}" for c in df.columns if c != "seeds"},
                            na_rep="—")
            .set_caption(f"Paired change of test accuracy in points, per seed (the same seed's models compared). "
                         f"CI: {CONFIDENCE:.0%} Student-t interval of the mean change over seeds. Every seed is "
                         "scored on the same test crops, so this interval measures only the spread of training "
                         "over seeds, not the noise of the test set: the verdict is the paired test over all "
                         "seeds' crops in the text above."))


def seeds_markdown(results: dict) -> str:
    """The uncertainty over seeds in sentences: spread, and whether each paired change is noise."""
    runs = seed_runs(results)
    seeds = [r["seed"] for r in runs]
    if len(runs) < 2:
        return (f"One seed only ({md_escape(seeds[0])}): no spread over seeds can be measured. The paired tests above "
                "measure the noise of the test set, not that of training (initialisation, batch order, augmentation). "
                "Set `seeds: [0, 1, 2]` (or more) to repeat training, pruning and retraining with other seeds on the "
                "same data and read every change against that noise too.")
    lines = [f"- {len(runs)} seeds ({', '.join(md_escape(s) for s in seeds)}), the same data for all."]
    trained = _accuracies(runs, "trained")
    if trained:
        mean, sd, lo, hi = t_interval(trained.values())
        lines.append(f"- Trained test accuracy: mean {mean:.1f}%, SD {sd:.1f} points over seeds "
                     f"({min(trained.values()):.1f}–{max(trained.values()):.1f}%).")
    paired = paired_table(results)
    for name, r in paired.iterrows():
        if r["seeds"] < 2:
            continue
        a, b = _pair_of(name)
        lines.append(f"- {md_escape(name)}: {r['mean (points)']:+.2f} points on average over {int(r['seeds'])} seeds "
                     f"(Student-t {CONFIDENCE:.0%} interval over seeds [{r[CI_LOW]:+.2f}, {r[CI_HIGH]:+.2f}], the "
                     f"spread of training only: all seeds share one test set); {pooled_text(results, a, b)}.")
    pruning = _pruning_change(paired)
    if pruning is not None and reference.data_source(results)["comparable"]:
        lo, hi = pruning[CI_LOW], pruning[CI_HIGH]
        low, high = reference.drop_range()          # the seed's drop, from its rounded figures
        seed = (-high + 0.0, -low + 0.0)            # as a change (+ 0.0: no '-0')
        where = ("inside" if lo <= seed[0] and seed[1] <= hi else
                 "outside" if seed[1] <= lo or seed[0] >= hi else "partly inside")
        lines.append(f"- The seed report's change after pruning (one seed; from its rounded figures somewhere between "
                     f"{seed[0]:+.0f} and {seed[1]:+.0f} points) lies {where} this study's interval for it.")
    return "\n".join(lines)


def _pair_of(name: str) -> tuple[str, str]:
    """The (after, before) states of a paired_table row name."""
    return next((a, b) for a, b in PAIRS if pair_name(a, b) == name)


def pooled(results: dict, after: str, before: str) -> dict | None:
    """results.json's change from `before` to `after` over all seeds (metrics.stratified), if made."""
    return next((c for c in results.get("seeds_paired") or [] if c["after"] == after and c["before"] == before), None)


def pooled_text(results: dict, after: str, before: str) -> str:
    """The change over seeds as the paired test on every seed's crops says it: pooled gains and
    losses, the stratified exact p (and the image-clustered p and interval), the verdict; 'nothing
    can be concluded' where a seed's model sits at the majority floor. Never 'beyond noise'."""
    c = pooled(results, after, before)
    if c is None:
        return "the per-crop pairs of the seeds were not found, so no test over seeds was made"
    n_seeds = len(c["seeds"])
    nets = ", ".join(f"{t['gains'] - t['losses']:+d}" for t in c["per_seed"])
    s = (f"pooled over the {n_seeds} seeds' {c['n'] // n_seeds} test crops each, {c['gains']} crop answers gained "
         f"and {c['losses']} lost (per seed, net {nets}); "
         f"stratified exact McNemar p = {c['p_value']:.2f}")
    if "p_cluster" in c:
        s += (f", clustered by the {c['images']} test images p = {c['p_cluster']:.2f}, {CONFIDENCE:.0%} cluster-"
              f"bootstrap interval [{100 * c['ci_low_cluster']:+.2f}, {100 * c['ci_high_cluster']:+.2f}] points")
    if c["at_floor"]:
        return s + (f"; but in seed{'s' * (len(c['at_floor']) > 1)} {', '.join(md_escape(x) for x in c['at_floor'])} "
                    "a model is at the majority-class floor, so nothing can be concluded from this change")
    verdict = {"too few changes": "too few crops changed answer for any verdict",
               "no significant change": "no significant change: not distinguishable from the noise of this test set",
               "gain": f"a significant gain on this test set at {c['level']:.0%}",
               "drop": f"a significant drop on this test set at {c['level']:.0%}"}[c["verdict"]]
    return f"{s}: {verdict}"


def _pruning_change(paired: pd.DataFrame) -> pd.Series | None:
    """paired_table's pruned − trained row, where at least two seeds measured it."""
    if PRUNING_CHANGE not in paired.index or paired.loc[PRUNING_CHANGE, "seeds"] < 2:
        return None
    return paired.loc[PRUNING_CHANGE]


def f_seeds(results: dict) -> str | None:
    """The findings' sentence on the change pruning made, over seeds (with two or more)."""
    r = _pruning_change(paired_table(results))
    if r is None:
        return None
    return (f"Over {int(r['seeds'])} seeds, pruning changed test accuracy by {r['mean (points)']:+.2f} points on "
            f"average (seed-to-seed spread only, Student-t {CONFIDENCE:.0%} interval {r[CI_LOW]:+.2f} to "
            f"{r[CI_HIGH]:+.2f}); {pooled_text(results, 'pruned', 'trained')}.")


def plot_seeds(results: dict) -> Figure:
    """Test accuracy of each model state per seed, one line per seed joining its own models (the
    pairing), and the mean over seeds with its 95% confidence interval."""
    runs = seed_runs(results)
    shown_states = [s for s in states.KEYS if _accuracies(runs, s)]
    if not shown_states:
        return placeholder("No test accuracy yet: run the train stage.")
    fig, (ax,) = figure(size=(8, 4))
    x = {s: i for i, s in enumerate(shown_states)}
    shown = []   # every value drawn, for the y range (accuracy stays within 0-100%, a CI may not)
    for r in runs:
        pts = [(x[s], 100 * r[s]["test_accuracy"]) for s in shown_states
               if (r.get(s) or {}).get("test_accuracy") is not None]
        ax.plot(*zip(*pts), color="#9a9a9a", lw=1, alpha=0.8, zorder=1)
    for s in shown_states:
        acc = _accuracies(runs, s)
        ax.scatter([x[s]] * len(acc), list(acc.values()), color=states.get(s).color, s=22, alpha=0.7, zorder=2)
        mean, _, lo, hi = t_interval(acc.values())
        yerr = None if np.isnan(lo) else [[mean - lo], [hi - mean]]
        shown += [*acc.values(), *([] if np.isnan(lo) else [lo, hi])]
        ax.errorbar(x[s] + 0.12, mean, yerr=yerr, fmt="D", color=states.get(s).color, mec="black", ms=7, capsize=5,
                    ecolor="black", zorder=3)
    ax.set_xticks(list(x.values()), [states.get(s).label for s in shown_states])
    ax.set_xlim(-0.4, len(shown_states) - 0.4)
    n = test_size(results)   # the axis spans two standard errors of one test accuracy beyond the values at
    pad = max(3.0, 2 * 100 * binomial_se(np.mean(shown) / 100, n)) if n else 3.0   # least: no noise magnified
    ax.set_ylim(max(0.0, min(shown) - pad), min(100.0, max(shown) + pad))   # a wide CI runs off the axes
    handles = [Line2D([], [], color="#9a9a9a", lw=1, label="one seed (its models joined)"),
               Line2D([], [], marker="D", color="black", ls="none", mfc="white",
                      label=f"mean, {CONFIDENCE:.0%} CI over seeds" if len(runs) > 1 else "mean (one seed: no CI)")]
    legend_outside(ax, handles=handles)
    label(ax, "model state", "test accuracy (%)", f"Test accuracy per seed ({len(runs)} seed{'s' * (len(runs) != 1)}"
          + (f"; the axis reaches {pad:.1f} points, two standard errors of one accuracy, past the values)" if n
             else ")"))
    return fig

"""What a model state scores, and what may be concluded when two states are compared.

Pure computation on label and prediction arrays; every result is plain JSON data. The stages
write `scores` into each state's metrics.json, `results.collect_results` adds the paired tests
and the majority floor to results.json, and the report words them.

Scores of one model state (`scores`)
------------------------------------
* accuracy: the fraction of test samples predicted right (the headline, comparable across seeds
  and with the seed report);
* balanced accuracy: the mean over classes of the recall (right / test samples of the class),
  over the classes that have test samples;
* macro-F1: the mean over the same classes of F1 = 2 TP / (2 TP + FP + FN);
* top prediction: the class predicted most often and the share of predictions it gets.

Two model states on the same test samples (`paired`)
---------------------------------------------------
The samples only the second model gets right are its *gains*, those only the first gets right
its *losses*; the change of accuracy is (gains - losses) / n. Samples both get right or wrong
say nothing about the change, so the test is McNemar's, exact: a two-sided binomial test of the
gains among the m = gains + losses discordant samples at probability 1/2
(`scipy.stats.binomtest`); p = 1 when no sample changed. Its interval is Newcombe's
square-and-add (hybrid score) interval for the difference of paired proportions (Newcombe 1998,
Statistics in Medicine 17:2635-2650, method 10; recommended by Fagerland, Lydersen and Laake
2014): the Wilson score intervals of the two accuracies, combined with their estimated
correlation. It is not derived from the test, so at the very edge of significance the two can
disagree; the verdict is the test's.

Verdicts are made at LEVEL (5%). Where several comparisons are read together (the classes, the
curve points) the p-values are corrected with Holm's step-down method. With m discordant
samples the smallest possible p-value is 2^(1-m) (all of them one way); when even that does not
reach LEVEL (m <= 5) no verdict is given: too few samples changed to say anything. A
non-significant change is never read as "no change": the interval says how large a change the
data still allows.

The majority floor (`floor`)
----------------------------
Always answering the commonest test class scores its share of the test set. A state's accuracy
is tested against that share (one-sided exact binomial test: is it above the floor?); a state
whose accuracy is not above it at LEVEL, or that puts more than half of its predictions in one
class and at least COLLAPSE_EXCESS more than that class's share of the test set, is flagged:
nothing about pruning or retraining can be concluded from such a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LEVEL = 0.05                 # the level of every verdict
CONFIDENCE = 1 - LEVEL       # the level of every interval
COLLAPSE_SHARE = 0.5         # a model putting more than this share of its predictions in one class ...
COLLAPSE_EXCESS = 0.10       # ... and this much more than that class's share of the test set has collapsed
VERDICTS = ("drop", "gain", "no significant change", "too few changes")


# --------------------------------------------------------------------------- one model state

def scores(labels, predictions, classes: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1 and the top prediction of one model state (see the
    module doc). Classes without test samples are left out of the two means."""
    labels, predictions = _ints(labels), _ints(predictions)
    if labels.shape != predictions.shape:
        raise ValueError(f"{predictions.size} predictions for {labels.size} test labels")
    k = len(classes)
    if labels.size == 0:
        raise ValueError("no test samples: nothing to score")
    cm = np.bincount(labels * k + predictions, minlength=k * k).reshape(k, k)
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    present = support > 0
    recall = tp[present] / support[present]
    f1 = 2 * tp[present] / (support[present] + predicted[present])   # 2TP / (2TP + FP + FN)
    top = int(np.argmax(predicted))
    return {"accuracy": float(tp.sum() / labels.size), "balanced_accuracy": float(recall.mean()),
            "macro_f1": float(f1.mean()), "top_prediction": {"class": str(classes[top]),
                                                             "share": float(predicted[top] / labels.size)}}


SCORE_KEYS = ("balanced_accuracy", "macro_f1", "top_prediction")   # what a stage adds to its metrics.json


def _ints(a) -> np.ndarray:
    return np.asarray(a, dtype=np.int64).ravel()


# --------------------------------------------------------------------------- two model states

def discordant(labels, before, after) -> dict:
    """The 2x2 table of two models on the same samples: both right, gains (only `after` right),
    losses (only `before` right), neither."""
    labels, before, after = _ints(labels), _ints(before), _ints(after)
    if not labels.shape == before.shape == after.shape:
        raise ValueError(f"{before.size} and {after.size} predictions for {labels.size} test labels")
    b, a = before == labels, after == labels
    return {"n": int(labels.size), "both": int((a & b).sum()), "gains": int((a & ~b).sum()),
            "losses": int((~a & b).sum()), "neither": int((~a & ~b).sum())}


def mcnemar_p(gains: int, losses: int) -> float:
    """Exact two-sided McNemar p-value: binomial test of `gains` in gains + losses at 1/2."""
    from scipy.stats import binomtest

    m = gains + losses
    return 1.0 if m == 0 else float(binomtest(gains, m, 0.5).pvalue)


def smallest_p(discordant_count: int) -> float:
    """The smallest exact two-sided McNemar p-value m discordant samples can give: 2^(1-m)."""
    return 1.0 if discordant_count <= 1 else min(1.0, 2.0 ** (1 - discordant_count))


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n."""
    z = _z(confidence)
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(both: int, gains: int, losses: int, neither: int,
             confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Newcombe's square-and-add interval of the paired change of accuracy (gains - losses) / n
    (method 10 of Newcombe 1998): the Wilson intervals of the accuracy after ([l1, u1] around p1)
    and before ([l2, u2] around p2), combined with their estimated correlation psi."""
    n = both + gains + losses + neither
    right_after, right_before = both + gains, both + losses
    p1, p2 = right_after / n, right_before / n
    l1, u1 = wilson(right_after, n, confidence)
    l2, u2 = wilson(right_before, n, confidence)
    margins = right_after * (n - right_after) * right_before * (n - right_before)
    psi = 0.0
    if margins > 0:
        a = both * neither - gains * losses
        # Newcombe's continuity-corrected estimate of the correlation: 0 for small positive products
        psi = (a - n / 2) / math.sqrt(margins) if a > n / 2 else (a / math.sqrt(margins) if a < 0 else 0.0)
    change = p1 - p2
    low = change - math.sqrt(max((p1 - l1) ** 2 + (u2 - p2) ** 2 - 2 * psi * (p1 - l1) * (u2 - p2), 0.0))
    high = change + math.sqrt(max((p2 - l2) ** 2 + (u1 - p1) ** 2 - 2 * psi * (p2 - l2) * (u1 - p1), 0.0))
    return max(-1.0, low), min(1.0, high)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (each compared with the level directly), in input order."""
    p = np.asarray(pvalues, dtype=float)
    k = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(k)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (k - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def paired(labels, before, after, *, confidence: float = CONFIDENCE) -> dict:
    """The paired comparison of two models' predictions of the same test samples: the 2x2 table,
    the change of accuracy with its Newcombe interval (fractions), the exact McNemar p-value and
    the verdict at LEVEL (see `judge`)."""
    t = discordant(labels, before, after)
    if t["n"] == 0:
        raise ValueError("no test samples: nothing to compare")
    low, high = newcombe(t["both"], t["gains"], t["losses"], t["neither"], confidence)
    out = {**t, "agree": (t["both"] + t["neither"]) / t["n"], "change": (t["gains"] - t["losses"]) / t["n"],
           "ci_low": low, "ci_high": high, "confidence": confidence,
           "p_value": mcnemar_p(t["gains"], t["losses"]), "level": LEVEL}
    return judge(out)


def judge(comparison: dict, p_key: str = "p_value") -> dict:
    """Set comparison['verdict'] from its p-value (`p_key`: 'p_holm' once corrected): 'too few
    changes' when the discordant samples could not reach LEVEL even all one way, else 'drop' /
    'gain' when p < LEVEL, else 'no significant change'."""
    m = comparison["gains"] + comparison["losses"]
    if smallest_p(m) >= LEVEL:
        verdict = "too few changes"
    elif comparison[p_key] < LEVEL:
        verdict = "gain" if comparison["gains"] > comparison["losses"] else "drop"
    else:
        verdict = "no significant change"
    comparison["verdict"] = verdict
    return comparison


def correct(comparisons: list[dict]) -> list[dict]:
    """Holm-correct a family of comparisons read together: each gets `p_holm`, `family` (its size)
    and its verdict from the corrected p-value."""
    adjusted = holm([c["p_value"] for c in comparisons]) if comparisons else []
    for c, p in zip(comparisons, adjusted):
        c["p_holm"], c["family"] = p, len(comparisons)
        judge(c, "p_holm")
    return comparisons


# --------------------------------------------------------------------------- the majority floor

def floor_p(correct_count: int, n: int, share: float) -> float:
    """One-sided exact binomial p-value of an accuracy correct_count / n being above `share`."""
    from scipy.stats import binomtest

    return float(binomtest(correct_count, n, share, alternative="greater").pvalue)


def floor(labels, predictions: dict[str, np.ndarray], classes: Sequence[str]) -> dict:
    """The majority-class floor of a test set and where each model state (name -> predictions)
    stands against it: accuracy, the one-sided p-value of being above the floor, its top
    prediction; `at_floor` (not above it at LEVEL) and `collapsed` (see the module doc)."""
    labels = _ints(labels)
    n, k = labels.size, len(classes)
    counts = np.bincount(labels, minlength=k)
    major = int(np.argmax(counts))
    share = float(counts[major] / n)
    out = {"class": str(classes[major]), "share": share, "n": int(n), "level": LEVEL, "states": {}}
    for state, pred in predictions.items():
        pred = _ints(pred)
        right = int((pred == labels).sum())
        top = int(np.argmax(np.bincount(pred, minlength=k)))
        top_share = float((pred == top).mean())
        p = floor_p(right, n, share)
        out["states"][state] = {
            "accuracy": right / n, "p_value": p, "at_floor": bool(p >= LEVEL),
            "top_class": str(classes[top]), "top_share": top_share, "top_test_share": float(counts[top] / n),
            "collapsed": bool(top_share > COLLAPSE_SHARE and top_share - counts[top] / n >= COLLAPSE_EXCESS)}
    return out


def flagged(floor_info: dict | None) -> dict[str, dict]:
    """The states of a `floor` result that are at the floor or collapsed (state -> its entry)."""
    return {s: e for s, e in ((floor_info or {}).get("states") or {}).items() if e["at_floor"] or e["collapsed"]}


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))

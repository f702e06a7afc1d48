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

Crops of one image (`clustered`, `cluster_interval`, `stratified`)
------------------------------------------------------------------
Crops cut from the same image share its scene, lighting and objects, so they are not independent:
treating them as such understates every standard error by the square root of the design effect.
Where the test set's image of each crop is known, the paired change also gets Obuchowski's
clustered McNemar statistic (Obuchowski 1998, Statistics in Medicine 17:1495-1507, with the
variance under the null as in Yang, Sun and Hardin 2010): X2 = (K-1)/K * (sum_k d_k)^2 /
sum_k d_k^2 with d_k = gains_k - losses_k of image k and K images, chi-square with 1 df; and a
percentile interval from a cluster bootstrap that resamples whole images (BOOTSTRAP_RESAMPLES
resamples, BOOTSTRAP_SEED: the same figures on every run). The verdict of such a comparison is
made with the larger of the exact and the clustered p-value (`p_judged`): a change must hold
whether crops are counted one by one or image by image. With one sample per image
(`label_mode: image`) each cluster holds one crop and the exact test is the right one as it is.

Repeats over seeds share one test set, so a Student-t interval over seeds measures only how
training varies from seed to seed, never the noise of the test set. `stratified` tests the
change over all seeds at once with the per-crop pairs of every seed: the exact conditional test
of a common null across strata (the exact form of the Mantel-Haenszel test for matched pairs: the
gains among all discordant pairs pooled over seeds, binomial at 1/2), the clustered statistic with
each image holding its crops' pairs of every seed, and the cluster bootstrap of the mean change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LEVEL = 0.05                 # the level of every verdict
CONFIDENCE = 1 - LEVEL       # the level of every interval
COLLAPSE_SHARE = 0.5         # a model putting more than this share of its predictions in one class ...
COLLAPSE_EXCESS = 0.10       # ... and this much more than that class's share of the test set has collapsed
BOOTSTRAP_RESAMPLES = 2000  # cluster-bootstrap resamples of every interval over images
BOOTSTRAP_SEED = 0           # ... drawn from this seed: the same interval on every run
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
    adjusted = holm([c.get("p_judged", c["p_value"]) for c in comparisons]) if comparisons else []
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


# --------------------------------------------------------------------------- crops of one image

def cluster_sizes(groups) -> dict:
    """How the test samples fall into images: samples, images, the largest image's samples and
    whether every image holds one sample (then the per-sample tests are exact as they are)."""
    _, counts = np.unique(np.asarray(groups).ravel(), return_counts=True)
    return {"unit": "image", "samples": int(counts.sum()), "images": int(counts.size),
            "largest": int(counts.max()) if counts.size else 0, "one_per_image": bool((counts <= 1).all())}


def _per_cluster(groups, values) -> tuple[np.ndarray, np.ndarray]:
    """Sum of `values` and count of samples per image (images in sorted order)."""
    _, inv = np.unique(np.asarray(groups).ravel(), return_inverse=True)
    v = np.asarray(values, dtype=float).ravel()
    return np.bincount(inv, weights=v), np.bincount(inv).astype(float)


def obuchowski(diffs) -> tuple[float, float]:
    """Obuchowski's clustered McNemar statistic and its chi-square (1 df) p-value from the net
    change d_k = gains_k - losses_k of each cluster (variance under the null, Yang et al. 2010):
    X2 = (K-1)/K (sum d_k)^2 / sum d_k^2; p = 1 where no cluster changed."""
    from scipy.stats import chi2

    d = np.asarray(diffs, dtype=float).ravel()
    k, denom = d.size, float((d * d).sum())
    if denom == 0 or k < 2:
        return 0.0, 1.0
    x2 = (k - 1) / k * float(d.sum()) ** 2 / denom
    return x2, float(chi2.sf(x2, 1))


def cluster_interval(groups, values, confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> dict:
    """The mean of `values` (per sample: 1/0 for right, or +1/0/-1 for a paired change) with its
    cluster-bootstrap percentile interval (whole images resampled with replacement, seeded), its
    bootstrap standard error, the binomial-style standard error that treats samples as independent,
    and the design effect (the ratio of the two variances, cluster-robust over independent)."""
    sums, sizes = _per_cluster(groups, values)
    n, k = sizes.sum(), sizes.size
    mean = float(sums.sum() / n)
    v = np.asarray(values, dtype=float).ravel()
    se_iid = float(np.sqrt(v.var(ddof=1) / n)) if n > 1 else float("nan")
    robust = float(np.sqrt(k / (k - 1) * ((sums - sizes * mean) ** 2).sum()) / n) if k > 1 else float("nan")
    idx = np.random.default_rng(seed).integers(0, k, size=(resamples, k))
    boot = sums[idx].sum(axis=1) / sizes[idx].sum(axis=1)
    low, high = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"mean": mean, "ci_low": float(low), "ci_high": float(high), "se_bootstrap": float(boot.std(ddof=1)),
            "se_independent": se_iid, "se_cluster": robust,
            "design_effect": float((robust / se_iid) ** 2) if se_iid > 0 else float("nan"),
            "images": int(k), "samples": int(n), "resamples": resamples, "seed": seed, "confidence": confidence}


def _clustered_fields(groups, net) -> dict:
    """The clustered test and bootstrap interval of a per-sample net change (+1 gain, -1 loss, 0)."""
    sums, _ = _per_cluster(groups, net)
    x2, p = obuchowski(sums)
    ci = cluster_interval(groups, net)
    return {"images": ci["images"], "x2_cluster": x2, "p_cluster": p, "ci_low_cluster": ci["ci_low"],
            "ci_high_cluster": ci["ci_high"], "design_effect": ci["design_effect"],
            "resamples": ci["resamples"], "bootstrap_seed": ci["seed"]}


def _net(labels, before, after) -> np.ndarray:
    """+1 where only `after` is right, -1 where only `before` is, else 0."""
    labels = _ints(labels)
    return (_ints(after) == labels).astype(int) - (_ints(before) == labels).astype(int)


def clustered(comparison: dict, labels, before, after, groups) -> dict:
    """Add to a `paired` comparison what the images of its crops change (see the module doc):
    `images`, Obuchowski's `x2_cluster` / `p_cluster`, the cluster-bootstrap interval
    `ci_low_cluster` / `ci_high_cluster`, `design_effect`, `resamples`, `bootstrap_seed`; `p_judged`
    (the larger of the exact and the clustered p) and the verdict made with it."""
    comparison.update(_clustered_fields(groups, _net(labels, before, after)))
    comparison["p_judged"] = max(comparison["p_value"], comparison["p_cluster"])
    return judge(comparison, "p_judged")


def stratified(labels, pairs: dict, groups=None, *, confidence: float = CONFIDENCE) -> dict:
    """The change from `before` to `after` over seeds on one shared test set, from the per-crop pairs
    of every seed (pairs: seed -> (before, after) predictions): per-seed gains and losses, their
    pooled counts, the mean change, the exact stratified McNemar p-value (gains among the pooled
    discordant pairs, binomial at 1/2) and its verdict; with `groups`, the clustered fields over
    images (each image holding its crops' pairs of every seed) and the verdict from `p_judged`."""
    per_seed = {s: discordant(labels, b, a) for s, (b, a) in pairs.items()}
    gains, losses = (sum(t[k] for t in per_seed.values()) for k in ("gains", "losses"))
    n = sum(t["n"] for t in per_seed.values())
    out = {"seeds": list(pairs), "per_seed": [{"seed": s, **t} for s, t in per_seed.items()], "n": n,
           "gains": gains, "losses": losses, "change": (gains - losses) / n, "confidence": confidence,
           "p_value": mcnemar_p(gains, losses), "level": LEVEL, "test": "stratified exact McNemar"}
    judge(out)
    if groups is None:
        return out
    net = np.concatenate([_net(labels, b, a) for b, a in pairs.values()])
    out.update(_clustered_fields(np.tile(np.asarray(groups).ravel(), len(pairs)), net))
    out["p_judged"] = max(out["p_value"], out["p_cluster"])
    return judge(out, "p_judged")


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))

"""Honest claims (issue 14): the statistics of prunestudy.metrics against reference computations
(scipy's binomial test, a published worked example, a coverage simulation, Holm by hand), the
majority floor called out on a one-epoch COCO-sample run and not on a small embedded run that
learns, the data named on the first screen, small classes, and wording no test supports."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import curve_by_hand  # noqa: E402
from scipy.stats import binomtest  # noqa: E402

from prunestudy import data, metrics, paths, report, stages, states, synth  # noqa: E402
from prunestudy.report import reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda m: None}


# --------------------------------------------------------------------------- scores of one state

def test_balanced_accuracy_and_macro_f1_against_a_count_by_hand():
    rng = np.random.default_rng(3)
    classes = [f"c{i}" for i in range(6)]
    labels = rng.integers(0, 5, 400)                  # class c5 has no test sample
    pred = np.where(rng.random(400) < 0.6, labels, rng.integers(0, 6, 400))
    s = metrics.scores(labels, pred, classes)
    recall, f1 = [], []
    for k in range(5):
        tp = sum(1 for t, p in zip(labels, pred) if t == k and p == k)
        fn = sum(1 for t, p in zip(labels, pred) if t == k and p != k)
        fp = sum(1 for t, p in zip(labels, pred) if t != k and p == k)
        recall.append(tp / (tp + fn))
        f1.append(2 * tp / (2 * tp + fp + fn))
    assert s["accuracy"] == pytest.approx(np.mean(labels == pred))
    assert s["balanced_accuracy"] == pytest.approx(np.mean(recall))
    assert s["macro_f1"] == pytest.approx(np.mean(f1))
    top = int(np.bincount(pred, minlength=6).argmax())
    assert s["top_prediction"] == {"class": classes[top], "share": pytest.approx(np.mean(pred == top))}
    # always answering the majority class: balanced accuracy 1/K of the classes present
    majority = np.full_like(labels, np.bincount(labels).argmax())
    assert metrics.scores(labels, majority, classes)["balanced_accuracy"] == pytest.approx(1 / 5)


# --------------------------------------------------------------------------- paired comparisons

def test_paired_p_value_is_the_exact_binomial_test_of_the_discordant_crops():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 1000)
    for _ in range(20):
        before = np.where(rng.random(1000) < 0.6, labels, (labels + 1) % 10)
        flip = rng.random(1000) < rng.uniform(0.002, 0.1)
        after = np.where(flip, np.where(before == labels, (labels + 2) % 10, labels), before)
        c = metrics.paired(labels, before, after)
        gains = int(((after == labels) & (before != labels)).sum())
        losses = int(((after != labels) & (before == labels)).sum())
        assert (c["gains"], c["losses"], c["n"]) == (gains, losses, 1000)
        assert c["change"] == pytest.approx((after == labels).mean() - (before == labels).mean())
        ref = binomtest(gains, gains + losses, 0.5).pvalue if gains + losses else 1.0
        assert c["p_value"] == pytest.approx(ref, rel=1e-12)
        assert c["ci_low"] <= c["change"] <= c["ci_high"]
        if gains + losses >= 6:
            assert c["verdict"] == ("no significant change" if ref >= 0.05 else "gain" if gains > losses else "drop")


def test_newcombe_interval_matches_the_published_example():
    """Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), chapter 8: complete
    response before / after consolidation therapy (Cavo et al. 2012), 59 / 6 / 16 / 80 pairs: Newcombe's
    square-and-add interval -0.1186 to -0.0046, exact conditional McNemar P = 0.052479."""
    low, high = metrics.newcombe(59, 6, 16, 80)
    assert (round(low, 4), round(high, 4)) == (-0.1186, -0.0046)
    assert round(metrics.mcnemar_p(6, 16), 6) == 0.052479


def test_newcombe_interval_covers_the_true_change_at_its_level():
    """Coverage by simulation: paired outcomes drawn with known cell probabilities, the true change
    (p_gain - p_loss) inside the 95% interval in 93-97% of 3000 draws (binomial SE of the rate 0.4%)."""
    rng = np.random.default_rng(1)
    for cells, n in (((0.55, 0.05, 0.07, 0.33), 300), ((0.6, 0.01, 0.015, 0.375), 1000)):
        truth = cells[1] - cells[2]
        draws = rng.multinomial(n, cells, size=3000)
        covered = [lo <= truth <= hi for lo, hi in (metrics.newcombe(*d) for d in draws)]
        assert 0.93 <= np.mean(covered) <= 0.97, (cells, np.mean(covered))


def test_no_verdict_when_too_few_crops_changed():
    labels = np.zeros(200, dtype=np.int64)
    before = labels.copy()
    for m, verdict in ((5, "too few changes"), (6, "drop")):
        after = before.copy()
        after[:m] = 1                      # m crops lost, none gained
        c = metrics.paired(labels, before, after)
        assert c["p_value"] == pytest.approx(binomtest(0, m, 0.5).pvalue) and c["verdict"] == verdict
    assert metrics.smallest_p(5) == 2 ** -4 and metrics.smallest_p(6) == 2 ** -5 < 0.05
    c = metrics.paired(labels, before, before)
    assert c["verdict"] == "too few changes" and c["ci_low"] < 0 < c["ci_high"]   # no '±0.0'


def test_holm_correction_by_hand_and_the_verdicts_it_gives():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x, each at least the one before
    assert metrics.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    family = [{"gains": 0, "losses": 12, "p_value": q, "level": 0.05} for q in p]
    metrics.correct(family)
    assert [c["verdict"] for c in family] == ["drop", "no significant change", "no significant change", "drop"]
    assert all(c["family"] == 4 for c in family)


# --------------------------------------------------------------------------- the majority floor

def test_floor_is_the_one_sided_binomial_test_against_the_majority_share():
    labels = np.array([0] * 55 + [1] * 25 + [2] * 20)
    always = np.zeros(100, dtype=np.int64)
    good = labels.copy()
    good[:20] = 1                                       # 80% right, spread over the classes
    f = metrics.floor(labels, {"trained": always, "retrained": good}, ["person", "car", "cup"])
    assert (f["class"], f["share"], f["n"]) == ("person", 0.55, 100)
    t = f["states"]["trained"]
    assert t["p_value"] == pytest.approx(binomtest(55, 100, 0.55, alternative="greater").pvalue)
    assert t["at_floor"] and t["collapsed"] and t["top_share"] == 1.0
    r = f["states"]["retrained"]
    ref = binomtest(80, 100, 0.55, alternative="greater").pvalue
    assert r["p_value"] == pytest.approx(ref) and ref < 0.05
    assert not r["at_floor"] and not r["collapsed"]
    assert set(metrics.flagged(f)) == {"trained"}
    json.dumps(f)                                        # plain JSON: results.json holds it


# --------------------------------------------------------------------------- words

def test_no_cost_nothing_wording_anywhere():
    """'No significant difference' is never written as 'cost nothing'."""
    pattern = re.compile(r"costs? nothing", re.IGNORECASE)
    files = [*(ROOT / "src").rglob("*.py"), *(ROOT / "notebooks").glob("*.ipynb"), *(ROOT / "docs").glob("*.md"),
             ROOT / "README.md", *(ROOT / "params").glob("*.yaml")]
    hits = [f"{f.relative_to(ROOT)}: {m.group(0)}" for f in files for m in pattern.finditer(f.read_text())]
    assert not hits, hits


def _results(root: str, params_root: str, epochs: int = 10) -> dict:
    rows = [{"epoch": e + 1, "train_loss": 2.0 - 0.1 * e, "test_loss": 1.9 - 0.1 * e, "test_accuracy": 0.3 + 0.02 * e}
            for e in range(epochs)]
    return {"data": {"root": root, "classes": ["a", "b"], "test_size": 100,
                     "counts": {"train": {"a": 60, "b": 40}, "test": {"a": 90, "b": 10}}},
            "params": {"data": {"root": params_root}},
            "train": {"test_accuracy": 0.5, "epochs": rows, "model": "seed_cnn"}}


def test_the_first_screen_names_the_data(tmp_path):
    embedded = report.title_markdown(_results(str(tmp_path), "embedded"))
    assert "**Data:** the embedded synthetic dataset" in embedded and "not COCO photographs" in embedded
    assert "reference only" in embedded
    other = report.title_markdown(_results(str(tmp_path), str(tmp_path)))
    assert "COCO-format data at" in other and "not on this machine" in other
    root = synth.ensure(tmp_path / "synth", seed=1, train_images=4, val_images=2, image_size=96)
    assert reference.data_source(_results(str(root), str(root)))["kind"] == reference.EMBEDDED  # by its marker


def test_the_seed_loss_is_explained_by_the_provable_bound():
    seed = reference.seed_report()
    b = reference.loss_bound()
    top = seed["test_accuracy"]["trained"] + seed["accuracy_rounding"] / 2     # 71% is at most 71.5%
    assert b["bound"] == pytest.approx((1 - top) * math.log(2)) and b["bound"] > 7 * b["reported"]
    assert b["times_batch"] == pytest.approx(seed["reported_test_loss"]["trained"] * seed["settings"]["batch_size"])
    res = _results("/nowhere", "/nowhere")
    res["train"]["test_loss"] = 1.39
    note = next(s for s in report.findings(res) if "not comparable with the seed report" in s)
    assert f"at least {b['bound']:.2f}" in note and f"= {b['times_batch']:.2f}" in note and "likely cause" in note
    assert f"read about {1.39 * 4 / 100:.3f}" in note                   # 4 test batches of 32 over 100 samples
    assert reference.drop_range() == pytest.approx((0.0, 2.0))          # 71% -> 70%: a drop in (0, 2) points


@pytest.mark.parametrize("epochs", [1, 2, 10])
def test_training_sentences_read_naturally_for_any_number_of_epochs(epochs):
    res = _results("/nowhere", "/nowhere", epochs)
    f = report.findings(res)
    text = " ".join(f)
    assert "1 epochs" not in text and (epochs > 1 or "in epoch 1 to" not in text)
    loss = next(s for s in f if "training loss" in s and s.startswith("During training"))
    if epochs == 1:
        assert loss.startswith("During training (1 epoch), the training loss (sample mean) was 2.000")
        assert "lowest" not in loss and "After 1 training epoch the" in text
        assert not any(s.startswith("Training:") for s in f)          # one epoch: nothing to say on overfitting
    else:
        assert f"went from 2.000 in epoch 1 to {2.0 - 0.1 * (epochs - 1):.3f} in epoch {epochs}" in loss
        assert "(lowest" not in loss                                     # extremes at the ends: not repeated
        over = next(s for s in f if s.startswith("Training:"))
        assert "test accuracy was highest in the last epoch" in over and f"After {epochs} training epochs" in text


# --------------------------------------------------------------------------- small classes

def test_a_class_without_test_crops_is_an_error_unless_allowed(tmp_path):
    root = synth.ensure(tmp_path / "coco", seed=1, train_images=24, val_images=3, image_size=96)
    kw = {"root": str(root), "min_box": 8, "min_per_class": 1, **QUIET}
    with pytest.raises(data.DataError, match="no test samples for 'circle'.*data.min_test_per_class=0"):
        stages.run_data(tmp_path / "run", **kw)
    assert not (paths.stage_dir(tmp_path / "run", "data") / paths.DATA_INFO).is_file()   # not a complete stage
    info = stages.run_data(tmp_path / "run", min_test_per_class=0, **kw)
    assert info["counts"]["test"]["circle"] == 0
    md = report.data_markdown(info, 20)
    assert "Too few test crops to read per class" in md and "circle has none at all" in md


# --------------------------------------------------------------------------- whole runs

@pytest.mark.e2e
def test_the_floor_is_called_out_on_a_one_epoch_coco_sample_run(coco_run):
    """One epoch on ../shared/coco-sample: every model answers 'person' (56% of the test crops); the
    first screen says so, and the pruning and retraining findings say nothing can be concluded."""
    run_dir, _, _ = coco_run
    res = stages.load_results(run_dir)
    bad = report.common.flagged(res)
    assert "trained" in bad and res["floor"]["class"] == "person"
    share = res["floor"]["share"]
    assert bad["trained"]["p_value"] == pytest.approx(binomtest(
        round(bad["trained"]["accuracy"] * res["floor"]["n"]), res["floor"]["n"], share, alternative="greater").pvalue)
    title = report.title_markdown(res)
    assert "**Verdict.** Nothing can be concluded about pruning: the trained" in title and "'person'" in title
    assert "at the [majority-class floor]" in title
    assert f"{100 * share:.1f}%" in title
    assert "not the full COCO 2017" in title                            # the data named
    f = report.findings(res)
    assert f[0].startswith("Nothing can be concluded about pruning or retraining")
    prune = next(s for s in f if s.startswith("After pruning ("))
    assert "nothing can be concluded from this comparison" in prune and "McNemar" not in prune
    html = (run_dir / paths.REPORT).read_text()
    assert "at the majority-class floor" in html and html.index("majority-class floor") < html.index("<table")
    small = [c for c, n in res["data"]["counts"]["test"].items() if n < report.min_test(res)]
    assert small and all(report.md_escape(c) in report.per_class_markdown(run_dir) for c in small if "<" not in c)


@pytest.mark.e2e
def test_a_small_embedded_run_that_learns_is_not_at_the_floor_and_says_what_it_measured(tmp_path):
    rd = tmp_path / "run"
    stages.run_data(rd, embedded={"seed": 0, "train_images": 150, "val_images": 60, "image_size": 160},
                    min_per_class=1, **QUIET)
    stages.run_train(rd, epochs=3, lr=1e-3, **QUIET)
    stages.run_prune(rd, latency_repeats=5, **QUIET)   # the latency is not what this test is about
    stages.run_retrain(rd, epochs=1, lr=1e-3, latency_repeats=5, **QUIET)
    curve_by_hand(rd, ["l1_unstructured", "random_unstructured"], [0.5], latency_repeats=5,
                  retrain={"epochs": 1, "lr": 1e-3, "control": False, "latency_repeats": 5})
    res = stages.load_results(rd)
    json.dumps(res)
    assert not report.common.flagged(res) and "Warning" not in report.title_markdown(res)
    assert all(not e["at_floor"] for e in res["floor"]["states"].values())
    title = report.title_markdown(res)
    assert "**Data:** the embedded synthetic dataset" in title
    # balanced metrics are written by the stages themselves and shown on the first screen
    for s in states.ALL:
        m = json.loads((states.folder(rd, s.key) / paths.METRICS).read_text())
        assert 0 < m["balanced_accuracy"] <= 1 and 0 < m["macro_f1"] <= 1 and m["top_prediction"]["class"]
    df = report.summary_table(res)
    assert df.loc["trained", report.BALANCED] == round(100 * res["train"]["balanced_accuracy"], 2)
    # the pruning change with its paired test, against scipy on the saved predictions
    labels = np.load(paths.stage_dir(rd, "data") / paths.labels("test"))
    before, after = (np.load(states.folder(rd, k) / paths.PREDICTIONS) for k in ("trained", "pruned"))
    gains = int(((after == labels) & (before != labels)).sum())
    losses = int(((after != labels) & (before == labels)).sum())
    c = report.common.comparison(res, "pruned", "trained")
    assert (c["gains"], c["losses"]) == (gains, losses)
    assert c["p_value"] == pytest.approx(binomtest(gains, gains + losses, 0.5).pvalue if gains + losses else 1.0)
    prune = next(s for s in report.findings(res) if s.startswith("After pruning ("))
    assert f"{gains} crops gained, {losses} lost" in prune and "95% CI" in prune
    # every sweep point saved its predictions; its paired tests are Holm-corrected over the points
    for e in res["curve"]:
        for stage in ("prune", "retrain"):
            assert (paths.curve_point(rd, stage, e["name"]) / paths.PREDICTIONS).is_file()
        assert e["paired_after"]["family"] == len(res["curve"]) and e["balanced_accuracy_after"] > 0
    assert "Holm" in report.curve_styler(res).caption
    # dead units: a unit called dead never fires on a training crop, every other one does
    import torch

    from prunestudy import artifacts, train

    dead = report.dead_units(rd)
    net = artifacts.load_model(paths.stage_dir(rd, "train"), run_dir=rd).eval()
    images, _ = data.load_split(paths.stage_dir(rd, "data"), "train")
    out = {}
    net.fc1.register_forward_hook(lambda m, i, o: out.__setitem__("fc1", o))
    with torch.inference_mode():
        net(train.normalize(torch.from_numpy(images).permute(0, 3, 1, 2)))
    fired = (out["fc1"] > 0).any(0).numpy()
    assert np.array_equal(dead["fc1"], ~fired)
    table = report.usage_table(rd, dead)
    masks = torch.load(states.folder(rd, "pruned") / paths.MASKS, weights_only=True)
    removed = ~masks["fc1"]
    share = 100 * removed[torch.from_numpy(dead["fc1"])].sum().item() / removed.sum().item()
    assert table.loc["fc1", "removed in dead units (%)"] == pytest.approx(share)


# --------------------------------------------------------------------------- crops of one image, seeds

# Obuchowski (1998), Statistics in Medicine 17:1495-1507: PET against SPECT on the glands of 21
# patients (clusters); per patient the glands both call negative (a), only PET (b), only SPECT (c),
# neither (d). Her clustered statistic for this example is chi-square 2.857 (p 0.0910), as the R
# package clust.bin.pair (Gopstein) reproduces it from the same table.
THYROID_B = [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
THYROID_C = [2, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 1, 0, 0, 0]


def test_clustered_mcnemar_matches_obuchowskis_published_example():
    x2, p = metrics.obuchowski(np.subtract(THYROID_B, THYROID_C))
    assert round(x2, 4) == 2.8571 and round(p, 5) == 0.09097


def test_clustered_mcnemar_with_one_sample_per_cluster_is_mcnemars_chi_square():
    """Each cluster one pair: (K-1)/K times McNemar's (b - c)^2 / (b + c) over the K pairs."""
    d = np.array([1] * 15 + [-1] * 10 + [0] * 68)
    x2, _ = metrics.obuchowski(d)
    assert x2 == pytest.approx(92 / 93 * (15 - 10) ** 2 / 25)


def test_cluster_bootstrap_widens_by_the_design_effect_and_stays_for_independent_samples():
    """Textbook design effect 1 + (m - 1) rho: clusters of m = 5 identical outcomes (rho = 1) have
    the standard error of K = 100 independent samples, sqrt(p (1 - p) / 100); one sample per
    cluster keeps the binomial sqrt(p (1 - p) / n). Seeded: the same figures twice."""
    rng = np.random.default_rng(7)
    outcome = rng.integers(0, 2, 100)
    p = outcome.mean()
    whole = metrics.cluster_interval(np.repeat(np.arange(100), 5), np.repeat(outcome, 5))
    assert whole["se_bootstrap"] == pytest.approx(math.sqrt(p * (1 - p) / 100), rel=0.08)
    assert whole["design_effect"] == pytest.approx(499 / 99)   # K/(K-1) robust over (n/(n-1)) binomial variance
    single = metrics.cluster_interval(np.arange(500), np.repeat(outcome, 5))
    assert single["se_bootstrap"] == pytest.approx(math.sqrt(p * (1 - p) / 500), rel=0.08)
    assert single["design_effect"] == pytest.approx(1.0)
    assert whole["ci_high"] - whole["ci_low"] > 2 * (single["ci_high"] - single["ci_low"])
    assert metrics.cluster_interval(np.arange(500), np.repeat(outcome, 5)) == single
    assert single["resamples"] == metrics.BOOTSTRAP_RESAMPLES and single["seed"] == metrics.BOOTSTRAP_SEED


def _seed_pairs(gains_losses: list[tuple[int, int]], n: int = 93) -> tuple[np.ndarray, dict]:
    """Test labels (all 0) and per seed (before, after) predictions with the given gains and losses."""
    labels, pairs = np.zeros(n, dtype=int), {}
    for seed, (g, l) in enumerate(gains_losses):
        before, after = np.ones(n, dtype=int), np.ones(n, dtype=int)
        after[:g] = 0                      # gains: only `after` right
        before[g:g + l] = 0                # losses: only `before` right
        pairs[seed] = (before, after)
    return labels, pairs


def test_stratified_test_pools_every_seeds_crop_pairs():
    """The issue's case: 3 seeds on one test set of 93 crops, net changes +2, +2, +1, pooled 15
    gained and 10 lost: the exact stratified McNemar test is the binomial test of 15 in 25 at 1/2,
    p = 2 * P(X <= 10) = 0.4244 (by hand from the binomial coefficients)."""
    labels, pairs = _seed_pairs([(5, 3), (6, 4), (4, 3)])
    c = metrics.stratified(labels, pairs)
    by_hand = 2 * sum(math.comb(25, k) for k in range(11)) / 2 ** 25
    assert (c["gains"], c["losses"], c["n"]) == (15, 10, 279)
    assert c["p_value"] == pytest.approx(by_hand) and round(c["p_value"], 2) == 0.42
    assert c["verdict"] == "no significant change" and c["change"] == pytest.approx(5 / 279)
    assert [t["gains"] - t["losses"] for t in c["per_seed"]] == [2, 2, 1]


def test_stratified_test_clustered_by_image_counts_each_image_once_over_seeds():
    """The same crop's pairs in every seed fall in its image's cluster: with 20 images the clustered
    statistic is Obuchowski's over the 20 images' net changes summed over seeds."""
    labels, pairs = _seed_pairs([(5, 3), (6, 4), (4, 3)])
    groups = np.arange(93) % 20
    c = metrics.stratified(labels, pairs, groups)
    net = sum(np.bincount(groups, weights=(a == labels).astype(int) - (b == labels).astype(int), minlength=20)
              for b, a in pairs.values())
    assert c["x2_cluster"] == pytest.approx(19 / 20 * net.sum() ** 2 / (net ** 2).sum())
    assert c["images"] == 20 and c["p_judged"] == max(c["p_value"], c["p_cluster"])


def _clustered_accuracy(run_dir) -> tuple[dict, dict]:
    res = stages.load_results(run_dir)
    return res["test_clusters"], res["floor"]["states"]["trained"]["accuracy_clustered"]


@pytest.mark.e2e
def test_image_level_interval_widens_on_real_photos_and_stays_on_the_embedded_set(coco_run, smoke_run):
    """Real COCO photos: several crops per image answer alike, so the image-level standard error is
    over twice the binomial one (design effect about 5); the embedded set's crops do not cluster
    (design effect about 1). The report states the images beside the crops."""
    clusters, real = _clustered_accuracy(coco_run[0])
    assert clusters["images"] < clusters["samples"] and real["design_effect"] > 3
    assert real["se_bootstrap"] > 1.7 * real["se_independent"]
    clusters, synth_ = _clustered_accuracy(smoke_run[0])
    assert 0.6 < synth_["design_effect"] < 1.6 and synth_["resamples"] == metrics.BOOTSTRAP_RESAMPLES
    acc = next(s for s in report.findings(stages.load_results(smoke_run[0])) if "standard error" in s)
    assert f"test crops from {clusters['images']} images" in acc

"""What every section reads: a state's metrics and epochs from results.json, the data stage's
record, the test-set size and its binomial standard error, the paired comparisons and the
majority floor of results.json (prunestudy.metrics), and how numbers are written in prose."""

from __future__ import annotations

import html
import math
from pathlib import Path

from .. import atomic, config, metrics, paths, states

MB = 1e6   # sizes in MB of 10^6 bytes


def epochs(results: dict, state: str) -> list[dict]:
    """The per-epoch rows of a state's training ([] when it did not train)."""
    return states.metrics(results, state).get("epochs") or []


def data_info(run_dir) -> dict:
    """The data stage's record (classes, sizes, counts) of a run folder."""
    path = paths.stage_dir(run_dir, "data") / paths.DATA_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the data stage has not run")
    return atomic.read_json(path)


def where(run_dir, key: str, name: str) -> Path:
    """A file of a state's folder in a run, e.g. where(run, "trained", paths.MODEL)."""
    return states.folder(run_dir, key) / name


def test_size(results: dict) -> int | None:
    data = results.get("data") or {}
    if data.get("test_size"):
        return int(data["test_size"])
    counts = (data.get("counts") or {}).get("test")
    return int(sum(counts.values())) if counts else None


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n independent test samples (a fraction)."""
    return math.sqrt(max(p * (1 - p), 0.0) / n)


# --------------------------------------------------------------------------- numbers in prose

def pct(fraction: float, digits: int = 1) -> str:
    return f"{100 * fraction:.{digits}f}%"


def pts(points: float) -> str:
    """Absolute size of a change in percentage points, precise enough to show small ones."""
    return f"{abs(points):.1f}" if abs(points) >= 0.095 or points == 0 else f"{abs(points):.2f}"


def count(x: int) -> str:
    return f"{int(x):,}"


def change(points: float, what: str) -> str:
    if abs(points) < 0.005:
        return f"{what} did not change"
    return f"{what} {'fell' if points < 0 else 'rose'} by {pts(points)} points"


def relative(points: float, what: str) -> str:
    """'0.4 points above the dense model's 57.3%', or 'level with ...' when the change is 0."""
    if abs(points) < 0.005:
        return f"level with {what}"
    return f"{pts(points)} points {'above' if points > 0 else 'below'} {what}"


def joined(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def signed(points: float, digits: int = 1) -> str:
    """A change in points with its sign: +0.4, -1.4 (0.0 without one)."""
    return f"{points:+.{digits}f}" if round(points, digits) != 0 else f"{0:.{digits}f}"


def p_figure(p: float) -> str:
    """A p-value as a table cell shows it, under a column headed p: '< 0.001', '0.033', '1.000'.
    The one place a p-value's digits are decided (``pvalue`` says the same in prose)."""
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def pvalue(p: float) -> str:
    """A p-value as prose: 'p < 0.001', 'p = 0.033', 'p = 0.125'."""
    figure = p_figure(p)
    return f"p {figure}" if figure.startswith("<") else f"p = {figure}"


def p_cell(p: float) -> str:
    """``p_figure`` for a Styler's HTML cell ('&lt; 0.001'): Styler escapes what it is given, not
    what a formatter returns."""
    return html.escape(p_figure(p))


def plural(n: int, word: str) -> str:
    return f"{count(n)} {word}{'s' * (n != 1)}"


# --------------------------------------------------------------------------- what results.json concludes

def min_test(results: dict) -> int:
    """data.min_test_per_class of the run (the schema's default where the run did not record it)."""
    value = ((results.get("params") or {}).get("data") or {}).get("min_test_per_class")
    return config.default("data.min_test_per_class") if value is None else int(value)


def small_classes(results: dict) -> dict[str, int]:
    """Class -> test samples, for the classes with fewer than min_test(results) test samples."""
    test = ((results.get("data") or {}).get("counts") or {}).get("test") or {}
    return {c: n for c, n in test.items() if n < min_test(results)}


def comparison(results: dict, after: str, before: str) -> dict | None:
    """results.json's paired comparison of two model states (prunestudy.metrics.paired), if made."""
    return next((c for c in results.get("paired") or [] if c["after"] == after and c["before"] == before), None)


def flagged(results: dict) -> dict[str, dict]:
    """The model states at the majority-class floor or collapsed onto one class (state -> entry)."""
    return metrics.flagged(results.get("floor"))


def ci_text(c: dict) -> str:
    """The interval of a paired change in points, e.g. '95% CI -1.4 to +0.4 points'."""
    return f"{c['confidence']:.0%} CI {signed(100 * c['ci_low'])} to {signed(100 * c['ci_high'])} points"


def bounds(c: dict) -> str:
    """What a change's interval rules out, e.g. 'at 95% confidence the drop is at most 1.4 points and
    the gain at most 0.4'."""
    lo, hi = 100 * c["ci_low"], 100 * c["ci_high"]
    parts = ([f"the drop is at most {pts(lo)} points"] if lo < 0 else []) + \
            ([f"the gain at most {pts(hi)}" if lo < 0 else f"the gain is at most {pts(hi)} points"] if hi > 0 else [])
    return f"at {c['confidence']:.0%} confidence {' and '.join(parts)}" if parts else ""


def verdict_text(c: dict, family: str | None = None, rules: bool = True) -> str:
    """The paired test of a comparison in prose: its discordant counts, the exact McNemar p-value and
    the verdict at its level, with the interval (and, for a change it cannot call, what the interval
    rules out unless `rules` is false). `family` names what a Holm-corrected comparison was
    corrected over ('curve points', 'classes'): its verdict is then the corrected p-value's."""
    level = f"{c['level']:.0%}"
    tail = f"{c['gains']} crops gained, {c['losses']} lost"
    p = pvalue(c["p_value"])
    if family and "p_holm" in c:
        p += f" ({pvalue(c['p_holm'])} after Holm's correction over {c['family']} {family})"
    if c["verdict"] == "too few changes":
        return (f"only {plural(c['gains'] + c['losses'], 'crop')} changed answer ({c['gains']} gained, "
                f"{c['losses']} lost): too few for any verdict at {level} ({ci_text(c)})")
    if c["verdict"] in ("drop", "gain"):
        return f"{tail}, exact McNemar {p}: a significant {c['verdict']} at {level} ({ci_text(c)})"
    rule = bounds(c) if rules else ""
    return f"{tail}, exact McNemar {p}: no significant change at {level} ({ci_text(c)})" + (f"; {rule}" if rule else "")

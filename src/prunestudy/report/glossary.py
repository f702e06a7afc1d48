"""The glossary: the terms of the tests and measures the report uses (McNemar, Newcombe, Holm,
MACs, balanced accuracy, the majority floor), each defined once, at the end of the report, and
linked from the first place it appears in a block of text."""

from __future__ import annotations

import re

# term -> (anchor, the pattern it is written as in escaped Markdown, its definition)
TERMS = {
    "McNemar": ("glossary-mcnemar", r"McNemar",
                "the exact McNemar test compares two models on the same test crops: only the crops where they "
                "disagree count (gained against lost); its p-value is the chance of a split at least that uneven "
                "if neither model were better."),
    "Newcombe": ("glossary-newcombe", r"Newcombe|95% CI",
                 "the 95% confidence interval (CI) of a paired change of accuracy (Newcombe's method for paired "
                 "proportions): the changes the data do not rule out."),
    "Holm": ("glossary-holm", r"Holm",
             "Holm's correction: with many tests at once (one per class or curve point), the p-values are "
             "raised so that the chance of any false alarm stays at 5%."),
    "MACs": ("glossary-macs", r"\bM?MACs\b",
             "multiply-accumulate operations of the conv and linear layers for one image (MMACs: millions); "
             "'nonzero' counts only those with a nonzero weight, which dense kernels still run."),
    "balanced accuracy": ("glossary-balanced", r"balanced accuracy",
                          "the mean of the per-class recalls: each class counts the same, however many test crops "
                          "it has."),
    "majority floor": ("glossary-floor", r"majority(?:-class)? floor",
                       "the accuracy of always answering the commonest test class; a model not significantly "
                       "above it (exact binomial test) has learnt nothing pruning could take away."),
}


def link(text: str, terms=TERMS, html: bool = False) -> str:
    """Markdown (or, `html`, HTML) `text` with the first mention of each term linked to its
    definition (mentions inside an existing Markdown link, heading or code span are left alone)."""
    for anchor, pattern, _ in terms.values():
        to = rf'<a href="#{anchor}">\1</a>' if html else rf"[\1](#{anchor})"
        text = re.sub(rf"(?<![\[#`])({pattern})(?![^\[]*\])", to, text, count=1)
    return text


def linked_caption(styler):
    """A table (pandas Styler) whose caption links the first mention of each term, in place: the
    caption is HTML (pandas does not escape it)."""
    caption = getattr(styler, "caption", None)
    if caption:
        styler.set_caption(link(caption, html=True))
    return styler


def glossary_markdown() -> str:
    """The glossary section: one anchored line per term."""
    rows = [f'- <a id="{anchor}"></a>**{term}**: {text}' for term, (anchor, _, text) in TERMS.items()]
    return "## Glossary\n\n" + "\n".join(rows)

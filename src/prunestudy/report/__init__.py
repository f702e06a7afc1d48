"""Stage 5 (analysis): the summary table, findings computed from the numbers, and the figures.

Everything here reads a run folder (or its ``results.json`` dict) and returns something the
analysis notebook displays: a DataFrame, a list of sentences / Markdown, or a matplotlib Figure.
Figures are created with pyplot (so the notebook's inline backend shows them once, at the end of
the cell that made them) and are never shown or closed here. Class and layer names are arbitrary
strings: they are always drawn as literal text (``$`` escaped) and escaped in Markdown.

One module per section of notebooks/05_analysis.ipynb (``from prunestudy import report`` gives
them all, under the names the notebooks call):

- ``summary``: title (the data named, warnings), summary table, test-accuracy bars (the seed report's
  beside them only where comparable);
- ``verdict``: the first screen's verdict: what pruning cost and bought, or nothing to conclude;
- ``findings``: the sentences computed from the numbers, below the table (and the dense control's);
- ``glossary``: the terms of the tests and measures, defined once at the end, linked where they appear;
- ``seeds``: accuracy over seeds, paired changes and their confidence intervals;
- ``efficiency``: parameters, MACs, bytes and measured time;
- ``curve``: the curve table (prune.amounts x prune.methods) and its trade-off plots;
- ``grid``: the grid report of `prunestudy sweep` (notebooks/06_sweep.ipynb): operating points
  over seeds, trade-off curves per method, links to every point's report;
- ``data``: what the data stage built, crops per class, sample crops;
- ``curves``: loss per step, metrics per epoch, sparsity per layer, weight magnitudes;
- ``per_class``: per-class accuracy, paired change (exact McNemar, Holm), confusion matrices;
- ``usage``: what the network really uses: dead units, and the pruned weight that sat in them;
- ``provenance``: what made the run, links to every executed notebook;
- ``stage``: the stage notebooks' paragraph and per-epoch table;
- ``style`` (theme, colours, escaping, saving figures), ``common`` (results helpers) and
  ``reference`` (the seed report, read from params/seed_report.yaml).

Model states (names, colours, folders) come from ``prunestudy.states``, pruning methods (colours,
markers, the floor, the wording of an amount) from ``prunestudy.methods``, file names from
``prunestudy.paths``; the statistics (paired tests, intervals, the majority floor) from
``prunestudy.metrics`` through results.json.
"""

from .common import binomial_se, min_test
from .curve import curve_markdown, curve_styler, curve_table, plot_tradeoff
from .curves import cut_threshold, plot_epoch_metrics, plot_layer_sparsity, plot_step_loss, plot_weight_histograms
from .data import data_markdown, plot_class_counts, plot_samples, sample_mosaic
from .efficiency import efficiency_markdown, efficiency_styler, efficiency_table
from .findings import amount_phrase, control_markdown, findings, findings_markdown, findings_section
from .glossary import glossary_markdown, linked_caption
from .grid import (
    floor_markdown,
    grid_heading,
    grid_operating_styler,
    grid_points_markdown,
    grid_table,
    operating_points,
    plot_grid_tradeoff,
    save_grid_tables,
)
from .per_class import (
    confusion_matrix,
    per_class_markdown,
    per_class_styler,
    per_class_table,
    plot_confusion,
    row_normalised,
)
from .provenance import provenance_markdown
from .reference import SEED_REPORT_FILE, seed_report
from .seeds import (
    CONFIDENCE,
    paired_styler,
    paired_table,
    plot_seeds,
    seed_runs,
    seeds_markdown,
    seeds_styler,
    seeds_table,
    t_interval,
)
from .stage import epoch_table, stage_markdown
from .style import DPI, FIGSIZE, SEED_EDGE, SEED_HATCH, literal, md_escape, save_figures, setup_style, show_figure
from .summary import (
    ACC,
    BALANCED,
    CONTROL_LABEL,
    LATENCY,
    LOSS,
    MACRO_F1,
    NONZERO,
    SIZE,
    SPARSITY,
    SUMMARY_COLUMNS,
    TOTAL,
    latency_point,
    plot_accuracy,
    summary_styler,
    summary_table,
    title_markdown,
)
from .usage import dead_units, usage_markdown, usage_table
from .verdict import verdict, verdict_markdown

__all__ = [
    "ACC", "BALANCED", "CONFIDENCE", "MACRO_F1", "CONTROL_LABEL", "DPI", "FIGSIZE", "LATENCY", "LOSS", "NONZERO",
    "SEED_EDGE", "SEED_HATCH",
    "SEED_REPORT_FILE", "SIZE", "SPARSITY", "SUMMARY_COLUMNS", "TOTAL",
    "floor_markdown", "grid_heading", "grid_operating_styler", "grid_points_markdown", "grid_table", "operating_points",
    "plot_grid_tradeoff", "save_grid_tables",
    "amount_phrase", "binomial_se", "dead_units", "min_test", "confusion_matrix", "control_markdown", "cut_threshold",
    "data_markdown",
    "efficiency_markdown", "efficiency_styler", "efficiency_table", "epoch_table", "findings", "findings_markdown",
    "findings_section", "glossary_markdown", "linked_caption", "verdict", "verdict_markdown",
    "latency_point", "literal", "md_escape", "paired_styler", "paired_table", "per_class_markdown",
    "per_class_styler", "per_class_table", "plot_accuracy", "plot_class_counts", "plot_confusion",
    "plot_epoch_metrics", "plot_layer_sparsity", "plot_samples", "plot_seeds", "plot_step_loss", "plot_tradeoff",
    "plot_weight_histograms", "provenance_markdown", "row_normalised", "sample_mosaic", "save_figures", "show_figure",
    "seed_report", "seed_runs", "seeds_markdown", "seeds_styler", "seeds_table", "setup_style", "stage_markdown",
    "summary_styler", "summary_table", "curve_markdown", "curve_styler", "curve_table", "t_interval",
    "title_markdown", "usage_markdown", "usage_table",
]

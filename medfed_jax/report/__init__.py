"""Figures and ``report.md`` from a sweep's workdir (``sweep.json``, ``summary.csv``).

    python -m medfed_jax.report --workdir=runs/signflip
    python -m medfed_jax.report --workdir=runs/a --workdir=runs/b --readme=README.md

Each figure is drawn when the sweep's columns call for it:

- ``curves.png``: test accuracy vs round, mean with a 95% confidence band over seeds;
- ``heatmap.png``: final accuracy, aggregator x attack (one panel per other setting);
- ``fraction.png``: final accuracy vs malicious fraction, one line per aggregator;
- ``worst_case.png``: each aggregator's lowest final accuracy over the attacks vs
  malicious fraction (with a table in ``report.md``);
- ``epsilon.png``: final accuracy vs the privacy budget epsilon (non-private runs dashed);
- ``clients.png``: final accuracy on each client's own test split (hospitals);
- ``scales.png``: accuracy vs the sign flip's scale per aggregator, at 100 and 300 rounds.

``final.csv`` holds the final-round rows of ``summary.csv``. With ``--readme``,
the README's Results section (between ``<!-- results:start -->`` and
``<!-- results:end -->``) is rewritten from the same tables, figures copied
under ``--assets``; ``--section=FILE`` writes that section to FILE instead
(``make reproduce`` does; ``make readme`` updates the README).

Figures have one legend each, below the panels, and are at most
`MAX_WIDTH_INCHES` wide. A setting whose model diverged (a ``diverged`` seed,
or a mean accuracy of nan) is drawn as "diverged", never as a number: a grey
hatched heatmap cell, a labelled cross in line plots, ``diverged (k/n)`` in tables.

The package, by job: `rows` reads a workdir back (`SweepTables`, `load`);
`tables` makes the markdown tables; `plotting` holds what every figure shares
and `figures` the ``draw_*`` functions; `pages` writes ``report.md`` and the
README's Results section; `cli` is the command line. The names below are
re-exported here.
"""

from medfed_jax.report.figures import (
    EXPERIMENT_FIGURES,
    FIGURES,
    NO_ATTACK_TEXT,
    client_columns,
    client_ticks,
    draw_clients,
    draw_curves,
    draw_epsilon,
    draw_fraction,
    draw_heatmap,
    draw_scales,
    draw_worst_case,
    heatmap_matrix,
)
from medfed_jax.report.pages import END, START, machine, results_section, sweep_sentence, update_readme, write_report
from medfed_jax.report.plotting import DIVERGED_LEGEND, DPI, MAX_WIDTH_INCHES, save_figure
from medfed_jax.report.rows import (
    DIVERGED_TEXT,
    NAMES,
    SweepTables,
    client_values,
    describe,
    diverged,
    final_rows,
    load,
    pooled,
    results,
    seed_groups,
    value,
)
from medfed_jax.report.tables import (
    EXPERIMENT_TABLES,
    SECURITY_BUDGETS,
    adaptive_vs_fixed_table,
    collaboration_table,
    final_table,
    format_mean_std,
    mean_std_text,
    personalization_table,
    privacy_table,
    record_dp_table,
    security_table,
    spread_note,
    worst_case,
    worst_case_table,
)

__all__ = [
    "DIVERGED_LEGEND",
    "DIVERGED_TEXT",
    "DPI",
    "END",
    "EXPERIMENT_FIGURES",
    "EXPERIMENT_TABLES",
    "FIGURES",
    "MAX_WIDTH_INCHES",
    "NAMES",
    "NO_ATTACK_TEXT",
    "SECURITY_BUDGETS",
    "START",
    "SweepTables",
    "adaptive_vs_fixed_table",
    "client_columns",
    "client_ticks",
    "client_values",
    "collaboration_table",
    "describe",
    "diverged",
    "draw_clients",
    "draw_curves",
    "draw_epsilon",
    "draw_fraction",
    "draw_heatmap",
    "draw_scales",
    "draw_worst_case",
    "final_rows",
    "final_table",
    "format_mean_std",
    "heatmap_matrix",
    "load",
    "machine",
    "mean_std_text",
    "personalization_table",
    "pooled",
    "privacy_table",
    "record_dp_table",
    "results",
    "results_section",
    "save_figure",
    "security_table",
    "seed_groups",
    "spread_note",
    "sweep_sentence",
    "update_readme",
    "value",
    "worst_case",
    "worst_case_table",
    "write_report",
]

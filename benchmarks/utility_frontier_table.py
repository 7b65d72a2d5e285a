"""The README's utility-frontier table from a `configs/utility_frontier.py` sweep's summary.csv.

The global model's accuracy on all clients' test rows (``global_pooled_accuracy``, mean ± std over the
seeds, n each) after the first and the last evaluated round, one row per algorithm, one column pair per
dataset.

    python -m medfed_jax --config=utility_frontier --workdir=runs/utility_frontier
    python benchmarks/utility_frontier_table.py runs/utility_frontier
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

from medfed_jax import tabular

_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "utility_frontier.py"
_SPEC = importlib.util.spec_from_file_location("utility_frontier", _CONFIG)
_MODULE = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_MODULE)
ALGORITHMS = _MODULE.ALGORITHMS  # name -> the fields that select it (the config's one declaration)


def dataset_label(row: dict) -> str:
    return "heart" if row["data.name"] == "heart" else f"digits Dir({float(row['data.alpha']):g})"


def algorithm_of(row: dict) -> str:
    fields = {"drift.method": row["drift.method"], "local.prox_mu": float(row["local.prox_mu"])}
    return next(name for name, chosen in ALGORITHMS.items() if chosen == fields)


def table(workdir: str) -> str:
    """The markdown table of a utility_frontier sweep's summary.csv."""
    rows = tabular.read_csv(os.path.join(workdir, "summary.csv"))
    datasets = list(dict.fromkeys(dataset_label(r) for r in rows))
    evaluated = sorted({int(r["round"]) for r in rows})
    rounds = (evaluated[0], evaluated[-1])
    cell = {(algorithm_of(r), dataset_label(r), int(r["round"])): r for r in rows}
    header = ["algorithm", *(f"{d}, r{t}" for d in datasets for t in rounds)]
    body = []
    for name in ALGORITHMS:
        values = []
        for d in datasets:
            for t in rounds:
                r = cell[(name, d, t)]
                mean, std = (100 * float(r[f"global_pooled_accuracy_{s}"]) for s in ("mean", "std"))
                values.append(f"{mean:.1f} ± {std:.1f}")
        body.append([name, *values])
    n = sorted({r["n"] for r in rows})
    return (
        tabular.markdown_table(header, body)
        + f"\n\nGlobal model, all clients' test rows: accuracy (%), mean ± std over n = {', '.join(n)} seeds."
    )


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "runs/utility_frontier"))

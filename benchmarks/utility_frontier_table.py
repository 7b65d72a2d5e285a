"""The README's issue-18 tables from a sweep's summary.csv: `configs/utility_frontier.py` (drift
corrections under unreliable clients) or `configs/compression_frontier.py` (compressors), by the
sweep's config name.

Accuracy is the global model's on all clients' test rows (``global_pooled_accuracy``), mean ± std over
the seeds (n each). Drift table: after the first and the last evaluated round, one row per algorithm,
one column pair per dataset. Compression table: after the last round, with the bytes every client
uploaded per round (``uploaded_bytes``) and over the whole run.

    python -m medfed_jax --config=utility_frontier --workdir=runs/utility_frontier
    python benchmarks/utility_frontier_table.py runs/utility_frontier
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Any

from medfed_jax import config_files, tabular
from medfed_jax.report import format_mean_std


def _config_module(name: str) -> Any:
    """The shipped config module ``<name>`` (for its one declaration of the cells)."""
    spec = importlib.util.spec_from_file_location(name, config_files.config_path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


METRIC = "global_pooled_accuracy"


def _chosen(row: dict, choices: dict[str, dict]) -> str:
    """The name in ``choices`` whose fields the row's cell has."""
    return next(name for name, fields in choices.items() if all(row[k] == str(v) for k, v in fields.items()))


def _dataset(row: dict) -> str:
    return "heart" if row["data.name"] == "heart" else f"digits Dir({float(row['data.alpha']):g})"


def drift_table(rows: list[dict]) -> str:
    algorithms = _config_module("utility_frontier").ALGORITHMS
    datasets = list(dict.fromkeys(_dataset(r) for r in rows))
    evaluated = sorted({int(r["round"]) for r in rows})
    rounds = (evaluated[0], evaluated[-1])
    cell = {(_chosen(r, algorithms), _dataset(r), int(r["round"])): r for r in rows}
    header = ["algorithm", *(f"{d}, r{t}" for d in datasets for t in rounds)]
    accuracy = lambda name: [format_mean_std(cell[(name, d, t)], METRIC) for d in datasets for t in rounds]  # noqa: E731
    body = [[name, *accuracy(name)] for name in algorithms]
    return tabular.markdown_table(header, body)


def compression_table(rows: list[dict]) -> str:
    compressors = _config_module("compression_frontier").COMPRESSORS
    last = max(int(r["round"]) for r in rows)
    final = {_chosen(r, compressors): r for r in rows if int(r["round"]) == last}
    header = ["compressor", f"accuracy, r{last}", "kB per round", "MB in the run"]
    body = []
    for name in compressors:
        per_round = float(final[name]["uploaded_bytes_mean"])
        accuracy = format_mean_std(final[name], METRIC)
        body.append([name, accuracy, f"{per_round / 1e3:.1f}", f"{per_round * last / 1e6:.2f}"])
    return tabular.markdown_table(header, body)


def table(workdir: str) -> str:
    """The markdown table of a utility_frontier or compression_frontier sweep, with its n."""
    rows = tabular.read_csv(os.path.join(workdir, "summary.csv"))
    with open(os.path.join(workdir, "config.json")) as f:
        name = json.load(f)["name"]
    text = {"utility_frontier": drift_table, "compression_frontier": compression_table}[name](rows)
    n = ", ".join(sorted({r["n"] for r in rows}))
    return text + f"\n\nGlobal model, all clients' test rows: accuracy (%), mean ± std over n = {n} seeds."


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "runs/utility_frontier"))

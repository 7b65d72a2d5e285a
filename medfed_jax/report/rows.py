"""A sweep's workdir read back: ``sweep.json`` and ``summary.csv`` / ``results.csv`` rows (cells stay strings),
with the long per-client files (``clients_summary.csv`` / ``clients.csv``) joined on as ``<metric>[<client>]``
columns."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np

from medfed_jax import tabular
from medfed_jax.eval import pooled_score

NAMES = {
    "aggregator.name": "aggregator",
    "attack.name": "attack",
    "attack.fraction": "malicious fraction",
    "data.name": "dataset",
    "privacy.mode": "DP",
    "privacy.noise_multiplier": "noise multiplier",
    "local.lr": "client lr",
    "server.lr": "server lr",
}


@dataclasses.dataclass(frozen=True)
class SweepTables:
    """A sweep's outputs as read back from its workdir (CSV cells stay strings)."""

    workdir: str
    meta: dict
    summary: list[dict]

    @property
    def knobs(self) -> list[str]:
        return [k for k in self.meta["knobs"] if k != "seed"]

    @property
    def final(self) -> list[dict]:
        return final_rows(self.summary, self.meta["knobs"])


CLIENT_STATS = {"mean": "_mean", "std": "_std", "ci95": "_ci95"}  # clients_summary.csv -> <metric>[<client>]_mean...


def load(workdir: str) -> SweepTables:
    """Read ``sweep.json``, ``summary.csv`` and ``clients_summary.csv`` (joined on as ``<metric>[<client>]_mean``,
    `medfed_jax.tabular.join_wide`); says what is missing and how to make it."""
    for name in ("sweep.json", "summary.csv"):
        if not os.path.exists(os.path.join(workdir, name)):
            raise ValueError(
                f"{workdir} has no {name}: run a sweep there first "
                f"(python -m medfed_jax --config=configs/<sweep>.py --workdir={workdir})."
            )
    with open(os.path.join(workdir, "sweep.json")) as f:
        meta = json.load(f)
    summary = tabular.read_csv(os.path.join(workdir, "summary.csv"))
    clients = tabular.read_csv_if_present(os.path.join(workdir, "clients_summary.csv"))
    return SweepTables(workdir, meta, tabular.join_wide(summary, clients, CLIENT_STATS))


def final_rows(summary: Sequence[dict], knobs: Sequence[str]) -> list[dict]:
    """The last evaluation of every knob combination (seed excluded), in first-seen order."""
    keys = [k for k in knobs if k != "seed"]
    last: dict[tuple, dict] = {}
    for row in summary:
        key = tuple(row[k] for k in keys)
        if key not in last or int(row["round"]) > int(last[key]["round"]):
            last[key] = row
    return list(last.values())


def value(row: dict, column: str) -> float:
    """A CSV cell as a float; nan when absent or empty."""
    text = row.get(column, "")
    return float(text) if text not in ("", None) else math.nan


def describe(row: dict, knobs: Sequence[str]) -> str:
    return ", ".join(f"{NAMES.get(k, k)}={row[k]}" for k in knobs) or "all runs"


def _groups(rows: Sequence[dict], knobs: Sequence[str]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in knobs), []).append(row)
    return groups


def pooled(row: dict) -> str:
    """The column of the row's accuracy on all clients' test rows, ``<score>_accuracy``: the score its method
    reports there (`medfed_jax.eval.pooled_score`; empty cells are other methods' columns)."""
    return f"{pooled_score(k for k, v in row.items() if v not in ('', None))}_accuracy"


def _pct(row: dict, stat: str, metric: str | None = None) -> float:
    return 100 * value(row, f"{metric or pooled(row)}_{stat}")


def results(tables: SweepTables) -> list[dict]:
    """The sweep's ``results.csv`` rows (per cell, seed and evaluation), with ``clients.csv``'s values joined on
    as ``<metric>[<client>]`` (`medfed_jax.tabular.join_wide`)."""
    rows = tabular.read_csv(os.path.join(tables.workdir, "results.csv"))
    clients = tabular.read_csv_if_present(os.path.join(tables.workdir, "clients.csv"))
    return tabular.join_wide(rows, clients, {"value": ""})


def client_values(row: dict) -> np.ndarray:
    """A result row's per-client accuracies (each client's own test split)."""
    return np.asarray([float(v) for k, v in row.items() if k.startswith("client_accuracy[") and v != ""])


def seed_groups(rows: Sequence[dict], knobs: Sequence[str], round_done: int) -> dict[tuple, list[dict]]:
    """Result rows of evaluation round ``round_done``, grouped by ``knobs`` (one row per seed), first-seen order."""
    return _groups([r for r in rows if int(r["round"]) == round_done], knobs)


def _last_round(rows: Sequence[dict]) -> int:
    return max(int(r["round"]) for r in rows)


DIVERGED_TEXT = "diverged"


def diverged(row: dict, metric: str | None = None) -> bool:
    """Whether a summary row's setting diverged: a seed flagged ``diverged``, or a mean that is nan (not missing)."""
    return value(row, "diverged_mean") > 0 or row.get(f"{metric or pooled(row)}_mean") == "nan"


def _reference(row: dict, attack_knob: str) -> bool:
    return row.get(attack_knob) == "none"

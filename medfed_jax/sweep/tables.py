"""A sweep's tidy tables: scalar results per cell and evaluation, per-client values in long format, and their
summaries over seeds (mean, sample std, t-based 95% CI, n).

- ``results.csv``: one row per cell x evaluation: ``cell``, every knob, ``round``, for private sweeps
  `PRIVACY_COLUMNS`, then the scalar metrics (`result_rows`);
- ``clients.csv``: one row per cell x evaluation x client x per-client metric: ``cell``, every knob,
  ``round``, ``client``, ``metric``, ``value`` (`CLIENT_COLUMNS`; under DP-SGD each client's own
  ``epsilon`` too);
- ``summary.csv``: one row per (knobs but the seed, round, epsilons): ``n`` and ``<metric>_mean``,
  ``_std``, ``_ci95`` of the scalar metrics (`summary_rows`);
- ``clients_summary.csv``: one row per such group x client x metric: ``n``, ``mean``, ``std``, ``ci95``
  (`client_summary_rows`).

`Tables` keeps all four up to date as cells finish (equal to the functions above on the finished
cells); `TableFiles` writes them (`medfed_jax.tabular`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medfed_jax import tabular
from medfed_jax.sweep.plan import Plan, format_value
from medfed_jax.sweep.prepare import PRIVACY_COLUMNS, PreparedProgram

SUMMARY_EVERY_S = 30.0  # while a sweep runs, the summaries are rewritten at most this often (and at the end)
CLIENT_COLUMNS = ("client", "metric", "value")  # after a clients.csv row's cell, knobs and round
FILES = ("results.csv", "clients.csv", "summary.csv", "clients_summary.csv")  # `TableFiles`, in that order
STATS = ("mean", "std", "ci95")


def cell_rows(
    plan: Plan, program: PreparedProgram, index: int, history: Mapping[str, np.ndarray], private: bool
) -> tuple[list[dict], list[dict]]:
    """One finished cell's result rows (one per evaluation: scalars) and client rows (one per evaluation, client
    and per-client metric), strings ready for CSV."""
    j = program.spec.cells.index(index)
    client_epsilon = program.client_epsilon[j] if program.client_epsilon else None
    rows, client_rows = [], []
    for e, round_done in enumerate(program.rounds):
        head = {"cell": str(index), **{k: format_value(plan.cells[index].values[k]) for k in plan.knobs}}
        head["round"] = str(round_done)
        row, per_client = dict(head), {}
        if private:
            columns = program.epsilon[j] or dict.fromkeys(PRIVACY_COLUMNS)
            row.update({name: "" if v is None else format_float(v[e]) for name, v in columns.items()})
        if client_epsilon is not None:
            per_client["epsilon"] = client_epsilon[e]
        for name, values in history.items():
            value = values[e]
            if value.ndim == 0:
                row[name] = format_float(value)
            elif value.shape == (len(program.client_names),):
                per_client[name] = value
        rows.append(row)
        client_rows.extend(
            {**head, "client": c, "metric": metric, "value": format_float(v)}
            for metric, values in per_client.items()
            for c, v in zip(program.client_names, values)
        )
    return rows, client_rows


def _program_of(programs: Sequence[PreparedProgram]) -> dict[int, PreparedProgram]:
    return {index: p for p in programs for index in p.spec.cells}


def _is_private(programs: Sequence[PreparedProgram]) -> bool:
    return any(e is not None for p in programs for e in p.epsilon)


def _all_cell_rows(plan: Plan, programs: Sequence[PreparedProgram], histories: Mapping[int, dict]) -> list:
    program_of, private = _program_of(programs), _is_private(programs)
    return [cell_rows(plan, program_of[i], i, histories[i], private) for i in sorted(histories)]


def result_rows(plan: Plan, programs: Sequence[PreparedProgram], histories: Mapping[int, dict]) -> list[dict]:
    """One row per finished cell x evaluation, in cell order (strings, ready for CSV)."""
    return [row for rows, _ in _all_cell_rows(plan, programs, histories) for row in rows]


def client_rows(plan: Plan, programs: Sequence[PreparedProgram], histories: Mapping[int, dict]) -> list[dict]:
    """One row per finished cell x evaluation x per-client metric x client, in cell order (strings)."""
    return [row for _, rows in _all_cell_rows(plan, programs, histories) for row in rows]


def format_float(value: Any) -> str:
    """The shortest text that reads back as the same float32 (``nan``, ``inf`` as such)."""
    return str(np.float32(value))


def summary_keys(plan: Plan, private: bool) -> list[str]:
    """The columns a summary row is grouped by: the knobs but the seed, the round, epsilon."""
    return [k for k in plan.knobs if k != "seed"] + ["round"] + (list(PRIVACY_COLUMNS) if private else [])


def _summary_groups(keys: Sequence[str], rows: Sequence[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def summary_rows(plan: Plan, rows: Sequence[dict]) -> list[dict]:
    """Aggregate result rows over seeds: mean, sample std, t-based 95% CI half-width, n."""
    keys = summary_keys(plan, bool(rows) and "epsilon" in rows[0])
    return [summary_over_seeds(keys, members) for members in _summary_groups(keys, rows).values()]


def client_summary_rows(plan: Plan, rows: Sequence[dict], client_rows: Sequence[dict]) -> list[dict]:
    """Aggregate client rows over seeds (grouped as their evaluation's result row): one row per group, client
    and metric with n, mean, sample std, t-based 95% CI half-width."""
    keys = summary_keys(plan, bool(rows) and "epsilon" in rows[0])
    by_evaluation: dict[tuple, list[dict]] = {}
    for row in client_rows:
        by_evaluation.setdefault((row["cell"], row["round"]), []).append(row)
    return [
        summary
        for members in _summary_groups(keys, rows).values()
        for summary in client_summary_over_seeds(
            keys, members, [parse_client_values(by_evaluation.get((r["cell"], r["round"]), [])) for r in members]
        )
    ]


def parse_metrics(keys: Sequence[str], row: Mapping[str, str]) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """(metric columns, values, present) of one result row: what `summary_over_seeds` reads from it."""
    skip = {"cell", "seed", *keys}
    metrics = tuple(k for k in row if k not in skip)
    present = np.asarray([row[m] != "" for m in metrics], bool)
    values = np.asarray([float(row[m]) if row[m] != "" else 0.0 for m in metrics], np.float64)
    return metrics, values, present


def parse_client_values(client_rows: Sequence[Mapping[str, str]]) -> tuple[tuple, np.ndarray, np.ndarray]:
    """((metric, client) names, values, present) of one evaluation's client rows, as `parse_metrics` gives."""
    names = tuple((r["metric"], r["client"]) for r in client_rows)
    values = np.asarray([float(r["value"]) for r in client_rows], np.float64)
    return names, values, np.ones(len(names), bool)


def _over_seeds(parsed: Sequence[tuple]) -> tuple[list, list[list[float]], np.ndarray]:
    """(metric names in first-seen order, [mean, std, ci95] per name, present [members, names]) of the members'
    parsed values (`parse_metrics`, `parse_client_values`); a name missing from a member is absent there."""
    columns = {names for names, _, _ in parsed}
    same = len(columns) == 1  # the usual case: every member has the same columns
    metrics = [*next(iter(columns))] if same else list(dict.fromkeys(m for names, _, _ in parsed for m in names))
    if same:
        values = np.stack([v for _, v, _ in parsed]).reshape(len(parsed), len(metrics))
        present = np.stack([p for _, _, p in parsed]).reshape(values.shape)
    else:
        column = {m: j for j, m in enumerate(metrics)}
        values, present = np.zeros((len(parsed), len(metrics))), np.zeros((len(parsed), len(metrics)), bool)
        for i, (names, v, p) in enumerate(parsed):
            at = [column[m] for m in names]
            values[i, at], present[i, at] = v, p
    return metrics, [values.tolist() for values in mean_std_ci(values, present)], present


def summary_over_seeds(keys: Sequence[str], members: Sequence[dict], parsed: Sequence[tuple] | None = None) -> dict:
    """One summary row over the result rows ``members`` (which agree on ``keys``).

    ``parsed``: the members' `parse_metrics`, when already known. A metric
    missing from a member counts as absent there.
    """
    parsed = parsed if parsed is not None else [parse_metrics(keys, r) for r in members]
    metrics, stats, present = _over_seeds(parsed)
    found = present.any(axis=0).tolist()
    summary = {**{k: members[0][k] for k in keys}, "n": str(len(members))}
    for j, name in enumerate(metrics):
        for stat, value in zip(STATS, stats):
            summary[f"{name}_{stat}"] = f"{value[j]:.6g}" if found[j] else ""
    return summary


def client_summary_over_seeds(keys: Sequence[str], members: Sequence[dict], parsed: Sequence[tuple]) -> list[dict]:
    """The client summary rows of one group: the result rows ``members`` (agreeing on ``keys``) and their
    evaluations' `parse_client_values`; ``n`` counts the members holding the value."""
    if not any(names for names, _, _ in parsed):
        return []
    metrics, stats, present = _over_seeds(parsed)
    counts = present.sum(axis=0).tolist()
    group = {k: members[0][k] for k in keys}
    return [
        {**group, "client": client, "metric": metric, "n": str(counts[j])}
        | {stat: f"{value[j]:.6g}" for stat, value in zip(STATS, stats)}
        for j, (metric, client) in enumerate(metrics)
    ]


class Tables:
    """The four tables (module docstring) kept up to date as cells finish.

    Each cell's rows are computed and parsed once; a group's summaries are
    recomputed when they are asked for and the group has new cells
    (`TableFiles` asks at most every `SUMMARY_EVERY_S`). Equal to `result_rows`,
    `summary_rows` and `client_summary_rows` of the finished cells; `TableFiles` writes them.
    """

    def __init__(self, plan: Plan, programs: Sequence[PreparedProgram]):
        self.plan, self.program_of, self.private = plan, _program_of(programs), _is_private(programs)
        self.keys = summary_keys(plan, self.private)
        self.cells: dict[int, tuple[list[dict], list[dict]]] = {}  # cell -> (result rows, client rows)
        self.members: dict[tuple, dict[int, dict]] = {}  # group -> cell -> row
        self.parsed: dict[tuple, dict[int, tuple]] = {}  # group -> cell -> its row's `parse_metrics`
        self.parsed_clients: dict[tuple, dict[int, tuple]] = {}  # group -> cell -> `parse_client_values`
        self.summaries: dict[tuple, tuple[dict, list[dict]]] = {}  # group -> (summary row, client summary rows)
        self.stale: set[tuple] = set()  # groups with new cells since their summary was computed

    def add(self, histories: Mapping[int, dict]) -> tuple[list[dict], list[dict]]:
        """Add finished cells (index -> history), marking the summaries they touch stale; returns their result
        rows and client rows."""
        added, added_clients = [], []
        for index in sorted(histories):
            rows, client_rows = cell_rows(self.plan, self.program_of[index], index, histories[index], self.private)
            self.cells[index] = rows, client_rows
            added.extend(rows)
            added_clients.extend(client_rows)
            by_round: dict[str, list[dict]] = {}
            for row in client_rows:
                by_round.setdefault(row["round"], []).append(row)
            for row in rows:
                key = tuple(row[k] for k in self.keys)
                self.members.setdefault(key, {})[index] = row
                self.parsed.setdefault(key, {})[index] = parse_metrics(self.keys, row)
                self.parsed_clients.setdefault(key, {})[index] = parse_client_values(by_round.get(row["round"], []))
                self.stale.add(key)
        return added, added_clients

    def rows(self) -> list[dict]:
        return [row for index in sorted(self.cells) for row in self.cells[index][0]]

    def client_rows(self) -> list[dict]:
        return [row for index in sorted(self.cells) for row in self.cells[index][1]]

    def _groups(self) -> list[tuple]:
        """The summary groups, in the order of their first result row; stale ones recomputed first."""
        for key in self.stale:
            order = sorted(self.members[key])
            members = [self.members[key][i] for i in order]
            self.summaries[key] = (
                summary_over_seeds(self.keys, members, [self.parsed[key][i] for i in order]),
                client_summary_over_seeds(self.keys, members, [self.parsed_clients[key][i] for i in order]),
            )
        self.stale.clear()
        return list(dict.fromkeys(tuple(row[k] for k in self.keys) for row in self.rows()))

    def summary(self) -> list[dict]:
        """The summary rows (`summary_rows`)."""
        return [self.summaries[key][0] for key in self._groups()]

    def client_summary(self) -> list[dict]:
        """The client summary rows (`client_summary_rows`)."""
        return [row for key in self._groups() for row in self.summaries[key][1]]


class TableFiles:
    """The four CSV files (`FILES`) of a workdir while a sweep runs, without rewriting them per chunk.

    Each chunk's rows are appended to ``results.csv`` and ``clients.csv`` (in
    the order chunks finish; ``results.csv`` is rewritten whole only when a
    chunk brings new columns, e.g. another program's metrics); the summaries
    are rewritten at most every `SUMMARY_EVERY_S` seconds. `rewrite` writes
    all four atomically in cell order: at the start (over any torn line a kill
    left) and at the end, so a finished sweep's CSVs are byte-identical
    however it was interrupted.
    """

    def __init__(self, workdir: str, tables: Tables):
        self.results, self.clients, self.summary, self.client_summary = (os.path.join(workdir, n) for n in FILES)
        self.tables = tables
        self.columns: set[str] = set()
        self.header: list[str] = []
        self.client_header = ["cell", *tables.plan.knobs, "round", *CLIENT_COLUMNS]
        self.client_summary_header = [*tables.keys, "client", "metric", "n", *STATS]
        self.summary_written = -math.inf

    def rewrite(self) -> None:
        rows = self.tables.rows()
        self.header = tabular.columns_of(rows)
        self.columns = set(self.header)
        tabular.write_csv(self.results, rows)
        tabular.write_csv(self.clients, self.tables.client_rows(), self.client_header)
        self.write_summary()

    def write_summary(self) -> None:
        tabular.write_csv(self.summary, self.tables.summary())
        tabular.write_csv(self.client_summary, self.tables.client_summary(), self.client_summary_header)
        self.summary_written = time.perf_counter()

    def append(self, rows: Sequence[dict], client_rows: Sequence[dict]) -> None:
        if not self.header or any(k not in self.columns for row in rows for k in row):
            self.rewrite()
            return
        tabular.append_csv(self.results, self.header, rows)
        tabular.append_csv(self.clients, self.client_header, client_rows)
        if time.perf_counter() - self.summary_written >= SUMMARY_EVERY_S:
            self.write_summary()


def mean_std_ci(values: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of ``values [n, m]``, over its ``present`` entries: mean, sample std (ddof 1), t-based 95% CI.

    The half-width is ``t_{0.975, n-1} * std / sqrt(n)``; std and CI are nan
    for fewer than two entries, the mean is nan for none.
    """
    n = present.sum(axis=0)
    mean = np.where(present, values, 0.0).sum(axis=0) / np.maximum(n, 1)
    std = np.sqrt(np.square(np.where(present, values - mean, 0.0)).sum(axis=0) / np.maximum(n - 1, 1))
    few = n < 2
    if few.all():  # no CI to compute: a single run need not pay scipy.stats' import (~0.5 s)
        ci = np.full(np.shape(n), math.nan)
    else:
        import scipy.stats  # here, not at module level

        ci = scipy.stats.t.ppf(0.975, np.maximum(n - 1, 1)) * std / np.sqrt(np.maximum(n, 1))
    return np.where(n == 0, math.nan, mean), np.where(few, math.nan, std), np.where(few, math.nan, ci)

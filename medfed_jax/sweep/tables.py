"""A sweep's tables: result rows per cell and evaluation, summaries over seeds (mean, std, t-based 95% CI), files.

`Tables` keeps the rows and summaries up to date as cells finish (equal to
`result_rows` and `summary_rows` of the finished cells); `TableFiles`
writes them to ``results.csv`` and ``summary.csv`` (`medfed_jax.tabular`).
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

SUMMARY_EVERY_S = 30.0  # while a sweep runs, summary.csv is rewritten at most this often (and at the end)


def cell_rows(plan: Plan, program: PreparedProgram, index: int, history: Mapping[str, np.ndarray], private: bool):
    """The rows of one finished cell, one per evaluation (strings, ready for CSV)."""
    j = program.spec.cells.index(index)
    rows = []
    for e, round_done in enumerate(program.rounds):
        row = {"cell": str(index), **{k: format_value(plan.cells[index].values[k]) for k in plan.knobs}}
        row["round"] = str(round_done)
        if private:
            columns = program.epsilon[j] or dict.fromkeys(PRIVACY_COLUMNS)
            row.update({name: "" if v is None else format_float(v[e]) for name, v in columns.items()})
        for name, values in history.items():
            value = values[e]
            if value.ndim == 0:
                row[name] = format_float(value)
            elif value.shape == (len(program.client_names),):
                row.update({f"{name}[{c}]": format_float(v) for c, v in zip(program.client_names, value)})
        rows.append(row)
    return rows


def _program_of(programs: Sequence[PreparedProgram]) -> dict[int, PreparedProgram]:
    return {index: p for p in programs for index in p.spec.cells}


def _is_private(programs: Sequence[PreparedProgram]) -> bool:
    return any(e is not None for p in programs for e in p.epsilon)


def result_rows(plan: Plan, programs: Sequence[PreparedProgram], histories: Mapping[int, dict]) -> list[dict]:
    """One row per finished cell x evaluation, in cell order (strings, ready for CSV)."""
    program_of, private = _program_of(programs), _is_private(programs)
    return [row for i in sorted(histories) for row in cell_rows(plan, program_of[i], i, histories[i], private)]


def format_float(value: Any) -> str:
    """The shortest text that reads back as the same float32 (``nan``, ``inf`` as such)."""
    return str(np.float32(value))


def summary_keys(plan: Plan, private: bool) -> list[str]:
    """The columns a summary row is grouped by: the knobs but the seed, the round, epsilon."""
    return [k for k in plan.knobs if k != "seed"] + ["round"] + (list(PRIVACY_COLUMNS) if private else [])


def summary_rows(plan: Plan, rows: Sequence[dict]) -> list[dict]:
    """Aggregate result rows over seeds: mean, sample std, t-based 95% CI half-width, n."""
    keys = summary_keys(plan, bool(rows) and "epsilon" in rows[0])
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return [summary_over_seeds(keys, members) for members in groups.values()]


def parse_metrics(keys: Sequence[str], row: Mapping[str, str]) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """(metric columns, values, present) of one result row: what `summary_over_seeds` reads from it."""
    skip = {"cell", "seed", *keys}
    metrics = tuple(k for k in row if k not in skip)
    present = np.asarray([row[m] != "" for m in metrics], bool)
    values = np.asarray([float(row[m]) if row[m] != "" else 0.0 for m in metrics], np.float64)
    return metrics, values, present


def summary_over_seeds(keys: Sequence[str], members: Sequence[dict], parsed: Sequence[tuple] | None = None) -> dict:
    """One summary row over the result rows ``members`` (which agree on ``keys``).

    ``parsed``: the members' `parse_metrics`, when already known. A metric
    missing from a member counts as absent there.
    """
    parsed = parsed if parsed is not None else [parse_metrics(keys, r) for r in members]
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
    stats = [values.tolist() for values in mean_std_ci(values, present)]
    found = present.any(axis=0).tolist()
    summary = {**{k: members[0][k] for k in keys}, "n": str(len(members))}
    for j, name in enumerate(metrics):
        for stat, value in zip(("mean", "std", "ci95"), stats):
            summary[f"{name}_{stat}"] = f"{value[j]:.6g}" if found[j] else ""
    return summary


class Tables:
    """``results.csv`` and ``summary.csv`` kept up to date as cells finish.

    Each cell's rows are computed and parsed once; a group's summary is
    recomputed when the summary is asked for and the group has new cells
    (`TableFiles` asks at most every `SUMMARY_EVERY_S`). Equal to `result_rows` and
    `summary_rows` of the finished cells; `TableFiles` writes them.
    """

    def __init__(self, plan: Plan, programs: Sequence[PreparedProgram]):
        self.plan, self.program_of, self.private = plan, _program_of(programs), _is_private(programs)
        self.keys = summary_keys(plan, self.private)
        self.cells: dict[int, list[dict]] = {}
        self.members: dict[tuple, dict[int, dict]] = {}  # group -> cell -> row
        self.parsed: dict[tuple, dict[int, tuple]] = {}  # group -> cell -> its row's `parse_metrics`
        self.summaries: dict[tuple, dict] = {}
        self.stale: set[tuple] = set()  # groups with new cells since their summary was computed

    def add(self, histories: Mapping[int, dict]) -> list[dict]:
        """Add finished cells (index -> history), marking the summaries they touch stale; returns their rows."""
        added = []
        for index in sorted(histories):
            self.cells[index] = cell_rows(self.plan, self.program_of[index], index, histories[index], self.private)
            added.extend(self.cells[index])
            for row in self.cells[index]:
                key = tuple(row[k] for k in self.keys)
                self.members.setdefault(key, {})[index] = row
                self.parsed.setdefault(key, {})[index] = parse_metrics(self.keys, row)
                self.stale.add(key)
        return added

    def rows(self) -> list[dict]:
        return [row for index in sorted(self.cells) for row in self.cells[index]]

    def summary(self) -> list[dict]:
        """The summary rows, in the order of their first result row; stale groups recomputed first."""
        for key in self.stale:
            members, parsed = self.members[key], self.parsed[key]
            order = sorted(members)
            self.summaries[key] = summary_over_seeds(self.keys, [members[i] for i in order], [parsed[i] for i in order])
        self.stale.clear()
        order = dict.fromkeys(tuple(row[k] for k in self.keys) for row in self.rows())
        return [self.summaries[key] for key in order]


class TableFiles:
    """``results.csv`` and ``summary.csv`` of a workdir while a sweep runs, without rewriting them per chunk.

    Each chunk's rows are appended to ``results.csv`` (in the order chunks
    finish; the file is rewritten whole only when a chunk brings new columns,
    e.g. another program's clients); ``summary.csv`` is rewritten at most
    every `SUMMARY_EVERY_S` seconds. `rewrite` writes both atomically in cell
    order (`result_rows`, `summary_rows`): at the start (over any torn line a
    kill left) and at the end, so a finished sweep's CSVs are byte-identical
    however it was interrupted.
    """

    def __init__(self, workdir: str, tables: Tables):
        self.results, self.summary = (os.path.join(workdir, n) for n in ("results.csv", "summary.csv"))
        self.tables = tables
        self.columns: set[str] = set()
        self.header: list[str] = []
        self.summary_written = -math.inf

    def rewrite(self) -> None:
        rows = self.tables.rows()
        self.header = tabular.columns_of(rows)
        self.columns = set(self.header)
        tabular.write_csv(self.results, rows)
        self.write_summary()

    def write_summary(self) -> None:
        tabular.write_csv(self.summary, self.tables.summary())
        self.summary_written = time.perf_counter()

    def append(self, rows: Sequence[dict]) -> None:
        if not self.header or any(k not in self.columns for row in rows for k in row):
            self.rewrite()
            return
        tabular.append_csv(self.results, self.header, rows)
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

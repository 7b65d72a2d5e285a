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
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from medfed_jax import host_devices, sweep, tabular

START, END = "<!-- results:start -->", "<!-- results:end -->"
METRIC = "test_accuracy"
MAX_LINES, MAX_PANELS, MAX_CLIENTS = 10, 9, 24
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


def load(workdir: str) -> SweepTables:
    """Read ``sweep.json`` and ``summary.csv``; says what is missing and how to make it."""
    for name in ("sweep.json", "summary.csv"):
        if not os.path.exists(os.path.join(workdir, name)):
            raise ValueError(
                f"{workdir} has no {name}: run a sweep there first "
                f"(python -m medfed_jax --config=configs/<sweep>.py --workdir={workdir})."
            )
    with open(os.path.join(workdir, "sweep.json")) as f:
        meta = json.load(f)
    return SweepTables(workdir, meta, tabular.read_csv(os.path.join(workdir, "summary.csv")))


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


def _pct(row: dict, stat: str, metric: str = METRIC) -> float:
    return 100 * value(row, f"{metric}_{stat}")


def _bars(pairs: Sequence[tuple[dict, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Means (%) of each (summary row, metric) and the 95% CI as error bars clipped to [0, 100]."""
    mean = np.array([100 * value(r, f"{m}_mean") for r, m in pairs])
    ci = np.nan_to_num([100 * value(r, f"{m}_ci95") for r, m in pairs])
    return mean, np.stack([np.clip(ci, 0, mean), np.clip(ci, 0, 100 - mean)])


# --------------------------------------------------------------------------- tables


def format_mean_std(row: dict, metric: str = METRIC) -> str:
    """``mean ± std`` in percent; ``diverged (k/n)`` where seeds diverged, ``—`` where missing."""
    mean, std = _pct(row, "mean", metric), _pct(row, "std", metric)
    if diverged(row, metric):
        return _diverged_text(row)
    if math.isnan(mean):
        return "—"
    return f"{mean:.1f} ± {std:.1f}" if not math.isnan(std) else f"{mean:.1f}"


def _epsilon_text(row: dict) -> str:
    eps = value(row, "epsilon")
    return "∞ (no DP)" if math.isnan(eps) or math.isinf(eps) else f"{eps:.3g}"


def final_table(summary: Sequence[dict], knobs: Sequence[str]) -> str:
    """Markdown: one row per knob combination, final-round test accuracy (%) mean ± std, 95% CI, n."""
    rows = final_rows(summary, knobs)
    if not rows:
        return "(no finished cells yet)"
    labels = sweep.label_knobs(rows, [k for k in knobs if k != "seed"])
    private = "epsilon" in rows[0]
    header = [NAMES.get(k, k) for k in labels] + (["ε"] if private else [])
    header += ["round", "test accuracy (%)", "95% CI (±)", "n"]
    body = []
    for row in rows:
        ci = _pct(row, "ci95")
        body.append(
            [row[k] for k in labels]
            + ([_epsilon_text(row)] if private else [])
            + [row["round"], format_mean_std(row), "—" if math.isnan(ci) or diverged(row) else f"{ci:.1f}", row["n"]]
        )
    return tabular.markdown_table(header, body)


# --------------------------------------------------------------------------- the README's experiment tables
# Per-seed values come from results.csv (one row per cell x evaluation); every ± is a sample std (ddof 1,
# `medfed_jax.sweep.mean_std_ci`) over the seeds, each seed its own partition and train/test split.


def results(tables: SweepTables) -> list[dict]:
    """The sweep's ``results.csv`` rows (per cell, seed and evaluation)."""
    return tabular.read_csv(os.path.join(tables.workdir, "results.csv"))


def client_values(row: dict) -> np.ndarray:
    """A result row's per-client accuracies (each client's own test split)."""
    return np.asarray([float(v) for k, v in row.items() if k.startswith("client_accuracy[") and v != ""])


def mean_std_text(values: Sequence[float], scale: float = 100, digits: int = 1) -> str:
    """``mean ± sample std`` of the finite ``values`` (x ``scale``), ``(k/n diverged)`` after it where some
    are not (a diverged model scores nan), ``diverged (n/n)`` where none is; ``—`` without values."""
    v = np.asarray(values, np.float64).reshape(-1, 1)
    finite = np.isfinite(v)
    if v.size == 0:
        return "—"
    if not finite.any():
        return f"{DIVERGED_TEXT} ({v.size}/{v.size})"
    mean, std, _ = sweep.mean_std_ci(np.where(finite, v, 0.0), finite)
    text = f"{scale * mean[0]:.{digits}f}" + (f" ± {scale * std[0]:.{digits}f}" if np.isfinite(std[0]) else "")
    return text + (f" ({v.size - finite.sum()}/{v.size} {DIVERGED_TEXT})" if not finite.all() else "")


def seed_groups(rows: Sequence[dict], knobs: Sequence[str], round_done: int) -> dict[tuple, list[dict]]:
    """Result rows of evaluation round ``round_done``, grouped by ``knobs`` (one row per seed), first-seen order."""
    return _groups([r for r in rows if int(r["round"]) == round_done], knobs)


def _last_round(rows: Sequence[dict]) -> int:
    return max(int(r["round"]) for r in rows)


def spread_note(sizes: Sequence[int]) -> str:
    """``mean ± sample std, n = ... seeds (each its own split)`` and, where n allows, the t-based 95% CI
    half-width as a multiple of the std (``t_{0.975, n-1} / sqrt(n)``: 1.24 at n = 5)."""
    import scipy.stats  # here, not at module level: scipy.stats takes ~0.7 s to import

    n = sorted(set(sizes))
    ci = [f"{scipy.stats.t.ppf(0.975, k - 1) / math.sqrt(k):.2f} × std at n = {k}" for k in n if k > 1]
    return f"mean ± sample std (ddof 1), n = {'/'.join(map(str, n))} seeds (each its own split)" + (
        f"; 95% CI half-width {', '.join(ci)}" if ci else ""
    )


def _n(groups: dict[tuple, list[dict]]) -> str:
    return spread_note([len(g) for g in groups.values()])


def collaboration_table(tables: SweepTables) -> str:
    """Dataset x method: accuracy on the clients' own test splits (mean of clients, worst client) and on all
    clients' test rows together; local-only models are each scored on both (their mean)."""
    rows = results(tables)
    groups = seed_groups(rows, ["data.name", "method"], _last_round(rows))
    body = [
        [
            *key,
            mean_std_text([client_values(r).mean() for r in members]),
            mean_std_text([client_values(r).min() for r in members]),
            mean_std_text([value(r, METRIC) for r in members]),
        ]
        for key, members in groups.items()
    ]
    header = ["dataset", "method", "own clients' test splits: mean of clients", "worst client", "all clients' test set"]
    return (
        f"Test accuracy (%) after {_last_round(rows)} rounds, {_n(groups)}. Local-only: each client's own "
        "model; on all clients' test set, the mean over those models.\n\n" + tabular.markdown_table(header, body)
    )


def _attack_label(row: dict) -> str:
    return "none" if row["attack.name"] == "none" else f"{row['attack.name']} x{float(row['attack.scale']):g}"


def security_table(tables: SweepTables) -> str:
    """Partition x attack (scale), one column per aggregator, at each evaluated budget of ``BUDGETS``, then the
    verdict on the seed's claim (the median beats the mean under attack) per partition and budget."""
    rows = results(tables)
    aggregators = list(dict.fromkeys(r["aggregator.name"] for r in rows))
    settings = list(dict.fromkeys((r["data.partition"], _attack_label(r)) for r in rows))
    budgets = sorted({int(r["round"]) for r in rows} & set(SECURITY_BUDGETS)) or [_last_round(rows)]
    parts, verdicts = [], []
    for budget in budgets:
        at = [r for r in rows if int(r["round"]) == budget]
        cells = {}
        for r in at:
            cells.setdefault((r["data.partition"], _attack_label(r), r["aggregator.name"]), []).append(value(r, METRIC))
        body = [[p, a, *(mean_std_text(cells.get((p, a, g), [])) for g in aggregators)] for p, a in settings]
        parts.append(
            f"After {budget} rounds: test accuracy (%), {spread_note([len(v) for v in cells.values()])}.\n\n"
            + tabular.markdown_table(["partition", "attack (25% of clients)", *aggregators], body)
        )
        for partition in dict.fromkeys(p for p, _ in settings):
            attacked = [a for p, a in settings if p == partition and a != "none"]
            # A diverged model has no accuracy: the verdict counts it as 0%.
            score = {k: np.mean(np.nan_to_num(v)) for k, v in cells.items()}
            gaps = [score[partition, a, "coordinate_median"] - score[partition, a, "mean"] for a in attacked]
            wins = sum(g > 0 for g in gaps)
            verdicts.append(
                f"- {partition}, {budget} rounds: the median beats the mean under attack at {wins} of "
                f"{len(gaps)} scales (median − mean: {', '.join(f'{100 * g:+.1f}' for g in gaps)} points, a "
                "diverged seed counted as 0%); clean: "
                f"mean {mean_std_text(cells.get((partition, 'none', 'mean'), []))}, median "
                f"{mean_std_text(cells.get((partition, 'none', 'coordinate_median'), []))}."
            )
    return "\n\n".join(
        parts + ["Where the seed's claim holds (median above mean under attack):\n\n" + "\n".join(verdicts)]
    )


SECURITY_BUDGETS = (100, 300)  # rounds the security table reads (configs/signflip_attack.py BUDGETS)


def _epsilon_cell(row: dict, column: str) -> str:
    eps = value(row, column)
    return "—" if math.isnan(eps) else ("∞ (no DP)" if math.isinf(eps) else f"{eps:.3g}")


def privacy_table(tables: SweepTables) -> str:
    """Client-level DP-FedAvg: noise multiplier, epsilon under add/remove-one and replace-one, accuracy."""
    rows = results(tables)
    last = _last_round(rows)
    groups = seed_groups(rows, ["data.name", "privacy.mode", "privacy.noise_multiplier"], last)
    body = [
        [
            key[0],
            "none" if key[1] == "none" else key[2],
            _epsilon_cell(members[0], "epsilon") if key[1] != "none" else "∞ (no DP)",
            _epsilon_cell(members[0], "epsilon_replace_one") if key[1] != "none" else "∞ (no DP)",
            mean_std_text([value(r, METRIC) for r in members]),
        ]
        for key, members in groups.items()
    ]
    header = ["dataset", "noise multiplier", "ε add/remove one client", "ε replace one client", "test accuracy (%)"]
    return (
        f"Unit: one client (hospital); every client in every round, {last} rounds, δ = "
        f"{_delta(tables)}. Test accuracy (%) on all clients' test set, {_n(groups)}.\n\n"
        + tabular.markdown_table(header, body)
    )


def _delta(tables: SweepTables) -> str:
    found = re.search(r"delta=([0-9.e+-]+)", tables.meta.get("privacy", ""))
    return found.group(1) if found else "?"


def record_dp_table(tables: SweepTables) -> str:
    """Record-level DP-SGD inside each hospital: every hospital's epsilon (a patient the unit) and accuracy."""
    rows = results(tables)
    last = _last_round(rows)
    groups = seed_groups(rows, ["privacy.mode", "privacy.noise_multiplier"], last)
    clients = [m.group(1) for k in rows[0] for m in [re.fullmatch(r"client_accuracy\[(.+)\]", k)] if m]
    body = []
    for (mode, sigma), members in groups.items():
        eps = [_epsilon_cell(members[0], f"epsilon[{c}]") if mode != "none" else "∞" for c in clients]
        body.append(
            [
                "none" if mode == "none" else sigma,
                *eps,
                mean_std_text([value(r, METRIC) for r in members]),
                mean_std_text([client_values(r).mean() for r in members]),
                mean_std_text([client_values(r).min() for r in members]),
            ]
        )
    header = ["noise multiplier", *(f"ε {c}" for c in clients), "all test rows", "mean of hospitals", "worst"]
    return (
        f"Unit: one patient, within each hospital (DP-SGD); δ = {_delta(tables)}, {last} rounds. Each "
        f"hospital's ε from its own Poisson sampling rate. Accuracy (%), {_n(groups)}.\n\n"
        + tabular.markdown_table(header, body)
    )


def _setting(row: dict, knobs: Sequence[str]) -> str:
    """``<model> <method>``, with Ditto's lambda and FedPer's local parameters."""
    shown = {k: row[k] for k in knobs}
    text = f"{shown.get('model.name', '')} {shown.get('method', '')}".strip()
    if shown.get("method") == "ditto":
        text += f" λ={shown['personalization.ditto_lambda']}"
    if shown.get("method") == "fedper" and "personalization.local_paths" in shown:
        text += f" local={', '.join(json.loads(shown['personalization.local_paths']))}"
    return text


def personalization_table(tables: SweepTables) -> str:
    """Each setting vs local-only (same model, logistic where absent) on the hospitals' own test splits, per
    split: the splits where it beats local-only on the mean of hospitals, on the worst hospital, on both."""
    rows = results(tables)
    shown = ("model.name", "method", "personalization.ditto_lambda", "personalization.local_paths")
    knobs = [k for k in tables.knobs if k in shown]
    groups = seed_groups(rows, knobs, _last_round(rows))
    per_seed = {key: {r["seed"]: client_values(r) for r in members} for key, members in groups.items()}
    reference = next(k for k in groups if dict(zip(knobs, k)).get("method") == "local_only")
    own = per_seed[reference]
    body = []
    for key, members in groups.items():
        seeds = per_seed[key]
        beat_mean = sum(seeds[s].mean() > own[s].mean() for s in seeds if s in own)
        beat_worst = sum(seeds[s].min() > own[s].min() for s in seeds if s in own)
        both = sum(seeds[s].mean() > own[s].mean() and seeds[s].min() > own[s].min() for s in seeds if s in own)
        body.append(
            [
                _setting(members[0], knobs),
                mean_std_text([v.mean() for v in seeds.values()]),
                mean_std_text([v.min() for v in seeds.values()]),
                f"{beat_mean}/{len(seeds)}",
                f"{beat_worst}/{len(seeds)}",
                f"{both}/{len(seeds)}",
            ]
        )
    header = ["setting", "mean of hospitals", "worst hospital", "beats local-only: mean", "worst", "both"]
    return (
        f"Accuracy (%) on each hospital's own test split after {_last_round(rows)} rounds, {_n(groups)}; the "
        f"last columns count the splits on which the setting beats {_setting(groups[reference][0], knobs)} on "
        "that split.\n\n" + tabular.markdown_table(header, body)
    )


EXPERIMENT_TABLES = {  # sweep name -> the table the README shows for it (others: `final_table`)
    "collaboration": collaboration_table,
    "signflip_attack": security_table,
    "privacy_utility": privacy_table,
    "record_dp": record_dp_table,
    "personalization": personalization_table,
}


# --------------------------------------------------------------------------- figures

DPI = 120
MAX_WIDTH_INCHES = 13.3  # 1600 px at DPI: a figure reads at README width without horizontal scrolling
SINGLE_PANEL_WIDTH = 7.0  # inches: a lone panel has room for its title and legend
DIVERGED_TEXT = "diverged"
DIVERGED_LEGEND = f"× = {DIVERGED_TEXT} (non-finite model, no accuracy)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axes(num_panels: int, width: float = 5.2, height: float = 3.8, max_cols: int = 3):
    """A grid of ``num_panels`` axes, at most ``max_cols`` wide and `MAX_WIDTH_INCHES` in all."""
    width = max(width, SINGLE_PANEL_WIDTH) if num_panels == 1 else width
    cols = max(1, min(num_panels, max_cols, int(MAX_WIDTH_INCHES // width)))
    rows = -(-num_panels // cols)
    size = (min(width * cols, MAX_WIDTH_INCHES), height * rows + 0.8)
    fig, axes = _pyplot().subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
    for ax in axes.flat[num_panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:num_panels])


def _colors(rows: Sequence[dict], knobs: Sequence[str]) -> dict[tuple, str]:
    """One colour per setting of ``knobs``, the same in every panel of a figure."""
    return {key: f"C{i % 10}" for i, key in enumerate(_groups(rows, knobs))}


def _label(row: dict, knobs: Sequence[str]) -> str:
    """A legend entry: the bare value for a single knob (the knob is the legend's title), else ``knob=value``."""
    return row[knobs[0]] if len(knobs) == 1 else describe(row, knobs)


def _legend_title(knobs: Sequence[str]) -> str | None:
    return NAMES.get(knobs[0], knobs[0]) if len(knobs) == 1 else None


def _finish(fig, title: str, legend_title: str | None = None):
    """Title the figure and give it one legend (entries unique by label) below the panels, outside the data."""
    entries: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig.suptitle(textwrap.fill(title, int(fig.get_size_inches()[0] * 9)), fontsize=13)  # ~9 characters an inch
    if entries:
        width = fig.get_size_inches()[0]
        entry = 0.6 + 0.075 * max(map(len, entries))  # inches per entry at fontsize 10
        ncol = max(1, min(len(entries), int(width // entry)))
        fig.legend(
            entries.values(), entries.keys(), loc="outside lower center", ncol=ncol, fontsize=10, title=legend_title
        )
    return fig


def save_figure(fig, path: str) -> str:
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def diverged(row: dict, metric: str = METRIC) -> bool:
    """Whether a summary row's setting diverged: a seed flagged ``diverged``, or a mean that is nan (not missing)."""
    return value(row, "diverged_mean") > 0 or row.get(f"{metric}_mean") == "nan"


def _diverged_text(row: dict) -> str:
    share = value(row, "diverged_mean")
    n = int(row.get("n") or 0)
    return f"{DIVERGED_TEXT} ({round(share * n)}/{n})" if share > 0 and n else DIVERGED_TEXT


def _mark_diverged(ax, x: Sequence[float], rows: Sequence[dict], color: str) -> None:
    """Crosses at the bottom of the axes where a setting diverged (it has no accuracy); the first one labelled."""
    where = [xi for xi, row in zip(x, rows) if diverged(row)]
    if where:
        ax.plot(where, [2] * len(where), marker="X", ms=9, color=color, ls="none")
        ax.plot([], [], marker="X", ms=9, color="grey", ls="none", label=DIVERGED_LEGEND)  # the legend's entry
        ax.annotate(DIVERGED_TEXT, (where[0], 2), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=8)


def _facets(rows: Sequence[dict], labels: list[str]) -> tuple[list[str], list[str]] | None:
    """Split label knobs into (panel knobs, line knobs) so that no panel has too many lines."""
    if len(_groups(rows, labels)) <= MAX_LINES:
        data = [k for k in labels if k.startswith("data.")][:1]
        return data, [k for k in labels if k not in data]
    for knob in labels:
        panels = _groups(rows, [knob])
        lines = max(len(_groups(g, labels)) for g in panels.values())
        if len(panels) <= MAX_PANELS and lines <= MAX_LINES:
            return [knob], [k for k in labels if k != knob]
    return None


def draw_curves(tables: SweepTables):
    """Test accuracy vs round: mean over seeds with a 95% CI band, one line per setting."""
    labels = sweep.label_knobs(tables.final, tables.knobs)
    split = _facets(tables.final, labels)
    if split is None:
        return None
    panel_knobs, line_knobs = split
    panels = _groups(tables.summary, panel_knobs)
    colors = _colors(tables.summary, line_knobs)
    fig, axes = _axes(len(panels))
    for ax, rows in zip(axes, panels.values()):
        for key, points in _groups(rows, line_knobs).items():
            points = sorted(points, key=lambda r: int(r["round"]))
            x = [int(r["round"]) for r in points]
            mean = np.array([_pct(r, "mean") for r in points])
            ci = np.nan_to_num(np.array([_pct(r, "ci95") for r in points]))
            color = colors[key]
            ax.plot(x, mean, marker="o", ms=3, color=color, label=_label(points[0], line_knobs))
            ax.fill_between(x, np.clip(mean - ci, 0, 100), np.clip(mean + ci, 0, 100), color=color, alpha=0.2)
            _mark_diverged(ax, x, points, color)
        ax.set_title(describe(rows[0], panel_knobs) if panel_knobs else "")
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    n = tables.final[0]["n"]
    return _finish(fig, f"Test accuracy vs round (mean, 95% CI band over {n} seeds)", _legend_title(line_knobs))


def _reference(row: dict, attack_knob: str) -> bool:
    return row.get(attack_knob) == "none"


def _panel_rows(rows: Sequence[dict], others: list[str]) -> dict[tuple, list[dict]]:
    """Group rows into panels by ``others``; no-attack rows join every attack's and fraction's panel."""
    real = [r for r in rows if not _reference(r, "attack.name")] or list(rows)
    attack_knobs = ("attack.name", "attack.fraction")
    panels = {}
    for key in _groups(real, others):
        match = lambda r, key=key: all(  # noqa: E731
            r[k] == v for k, v in zip(others, key) if not (k in attack_knobs and _reference(r, "attack.name"))
        )
        panels[key] = [r for r in rows if match(r)]
    return panels


def heatmap_matrix(rows: Sequence[dict]) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(aggregators, attacks, final accuracy % [aggregator, attack], diverged [aggregator, attack]) of one panel.

    Accuracy is nan where a cell is missing or diverged.
    """
    aggregators = list(dict.fromkeys(r["aggregator.name"] for r in rows))
    attacks = list(dict.fromkeys(r["attack.name"] for r in rows))
    attacks.sort(key=lambda a: a != "none")
    matrix = np.full((len(aggregators), len(attacks)), np.nan)
    broken = np.zeros(matrix.shape, bool)
    for r in rows:
        at = aggregators.index(r["aggregator.name"]), attacks.index(r["attack.name"])
        broken[at] = diverged(r)
        matrix[at] = math.nan if broken[at] else _pct(r, "mean")
    return aggregators, attacks, matrix, broken


HEATMAP_CELL = (0.62, 0.36)  # inches per cell (width, height): room for "95.3" at fontsize 9
HEATMAP_LABELS = (1.9, 1.5)  # inches for the aggregator names (left) and attack names + title (per panel row)
HEATMAP_MIN_WIDTH = 7.0  # inches: room for the title


def _heatmap_grid(num_panels: int, num_rows: int, num_cols: int) -> tuple[int, int, tuple[float, float]]:
    """(panel rows, panel columns, figure size): as many panels side by side as fit `MAX_WIDTH_INCHES`."""
    panel = (num_cols * HEATMAP_CELL[0] + 0.3, num_rows * HEATMAP_CELL[1] + HEATMAP_LABELS[1])
    colorbar = 1.0
    cols = max(1, min(num_panels, int((MAX_WIDTH_INCHES - HEATMAP_LABELS[0] - colorbar) // panel[0])))
    rows = -(-num_panels // cols)
    width = max(HEATMAP_LABELS[0] + cols * panel[0] + colorbar, HEATMAP_MIN_WIDTH)
    return rows, cols, (width, rows * panel[1] + 1.4)


def draw_heatmap(tables: SweepTables):
    """Final accuracy, aggregator (rows) x attack (columns); panels by the remaining settings, one colour bar."""
    axes_knobs = ["aggregator.name", "attack.name"]
    if not all(k in tables.knobs for k in axes_knobs):
        return None
    others = sweep.label_knobs(tables.final, tables.knobs, fixed=axes_knobs)
    panels = _panel_rows(tables.final, others)
    if len(panels) > MAX_PANELS:
        return None
    matrices = [heatmap_matrix(rows) for rows in panels.values()]
    shape = max(len(m[0]) for m in matrices), max(len(m[1]) for m in matrices)
    grid_rows, grid_cols, size = _heatmap_grid(len(panels), *shape)
    plt = _pyplot()
    fig, grid = plt.subplots(grid_rows, grid_cols, figsize=size, squeeze=False, layout="constrained")
    for ax in grid.flat[len(panels) :]:
        ax.set_visible(False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    same_rows = len({tuple(m[0]) for m in matrices}) == 1
    for k, (ax, rows, (aggregators, attacks, matrix, broken)) in enumerate(zip(grid.flat, panels.values(), matrices)):
        image = ax.imshow(matrix, cmap=cmap, vmin=0, vmax=100, aspect="auto")
        for (i, j), v in np.ndenumerate(matrix):
            if broken[i, j]:
                ax.add_patch(
                    plt.Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="lightgrey", hatch="///", edgecolor="grey")
                )
                ax.text(j, i, DIVERGED_TEXT, ha="center", va="center", fontsize=8, color="black")
            elif not math.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=9, color="white" if v < 60 else "black")
        ax.set_xticks(range(len(attacks)), attacks, rotation=40, ha="right", fontsize=10)
        first_col = k % grid_cols == 0
        ax.set_yticks(range(len(aggregators)), aggregators if first_col or not same_rows else [], fontsize=10)
        ax.set_xlabel("attack")
        if first_col or not same_rows:
            ax.set_ylabel("aggregator")
        ax.set_title(describe(next((r for r in rows if not _reference(r, "attack.name")), rows[0]), others))
    fig.colorbar(image, ax=list(grid.flat[: len(panels)]), label="final test accuracy (%)", shrink=0.8)
    title = "Final test accuracy (%) by aggregator and attack (mean over seeds)"
    if any(m[3].any() for m in matrices):
        title += f"; grey hatched: {DIVERGED_TEXT} (non-finite model, no accuracy)"
    return _finish(fig, title)


NO_ATTACK_TEXT = "0\n(no attack)"


def draw_fraction(tables: SweepTables):
    """Final accuracy vs malicious fraction, one line per aggregator; the no-attack runs at 0%, labelled so."""
    final = tables.final
    if "attack.fraction" not in tables.knobs or len({r["attack.fraction"] for r in final}) < 2:
        return None
    lines = ["aggregator.name"] if "aggregator.name" in tables.knobs else []
    attack = ["attack.name"] if "attack.name" in tables.knobs else []
    others = sweep.label_knobs(final, tables.knobs, fixed=["attack.fraction", *lines, *attack])
    panels = _panel_rows(final, [*attack, *others])
    if not panels or len(panels) > MAX_PANELS:
        return None
    colors = _colors(final, lines)
    fig, axes = _axes(len(panels), width=4.4, height=3.4)
    for ax, rows in zip(axes, panels.values()):
        zero = False
        for key, points in _groups(rows, lines).items():
            points = sorted(points, key=lambda r: float(r["attack.fraction"]) * (not _reference(r, "attack.name")))
            x = [100 * float(r["attack.fraction"]) * (not _reference(r, "attack.name")) for r in points]
            mean, err = _bars([(r, METRIC) for r in points])
            label = _label(points[0], lines) if lines else None
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, color=colors[key], label=label)
            _mark_diverged(ax, x, points, colors[key])
            zero = zero or 0 in x
        if zero:  # no malicious client: the no-attack run (or an attack on nobody)
            ticks = [t for t in ax.get_xticks() if 0 < t <= 100 * max(float(r["attack.fraction"]) for r in rows)]
            ax.set_xticks([0, *ticks], [NO_ATTACK_TEXT, *(f"{t:g}" for t in ticks)])
        ax.set_title(describe(next(r for r in rows if not _reference(r, "attack.name")), [*attack, *others]))
        ax.set_xlabel("malicious clients (% of all clients)")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    return _finish(fig, "Final test accuracy vs malicious fraction (mean, 95% CI over seeds)", _legend_title(lines))


def worst_case(final: Sequence[dict], knobs: Sequence[str], among: Sequence[str] | None = None) -> list[dict]:
    """Per setting but the attack (aggregator, malicious fraction, ...): the final row of its worst attack.

    The worst attack has the lowest mean final accuracy; a diverged setting
    (non-finite model) is worse than any accuracy. Candidates: the attacks
    ``among`` (default: all), never the no-attack rows. Rows keep the
    setting's first-seen order.
    """
    others = [k for k in knobs if k not in ("seed", "attack.name")]
    worst: dict[tuple, dict] = {}
    rank = lambda r: -math.inf if diverged(r) else _pct(r, "mean")  # noqa: E731
    for row in final:
        if _reference(row, "attack.name") or (among is not None and row["attack.name"] not in among):
            continue
        key = tuple(row[k] for k in others)
        if key not in worst or rank(row) < rank(worst[key]):
            worst[key] = row
    return list(worst.values())


def _worst_case_applies(tables: SweepTables) -> bool:
    if not all(k in tables.knobs for k in ("aggregator.name", "attack.name", "attack.fraction")):
        return False
    return len({r["attack.name"] for r in tables.final if not _reference(r, "attack.name")}) > 1


def worst_case_table(tables: SweepTables) -> str:
    """Markdown: each aggregator's lowest final accuracy (%) over the attacks at each malicious fraction.

    Cells: ``mean ± std (attack)`` of the worst attack; the no-attack column
    is the reference. Rows sorted by the worst case at the largest fraction,
    best first (diverged last).
    """
    final, knobs = tables.final, tables.meta["knobs"]
    worst = worst_case(final, knobs)
    fractions = sorted({r["attack.fraction"] for r in worst}, key=float)
    clean = {r["aggregator.name"]: r for r in final if _reference(r, "attack.name")}
    by = {(r["aggregator.name"], r["attack.fraction"]): r for r in worst}
    names = list(dict.fromkeys(r["aggregator.name"] for r in worst))
    last = lambda name: by.get((name, fractions[-1]))  # noqa: E731
    names.sort(key=lambda a: math.inf if last(a) is None or diverged(last(a)) else -_pct(last(a), "mean"))
    header = ["aggregator", "no attack", *(f"{100 * float(f):g}% attackers: worst (attack)" for f in fractions)]
    body = []
    for name in names:
        cells = [format_mean_std(clean[name]) if name in clean else "—"]
        for f in fractions:
            row = by.get((name, f))
            cells.append("—" if row is None else f"{format_mean_std(row)} ({row['attack.name']})")
        body.append([name, *cells])
    return tabular.markdown_table(header, body)


def adaptive_vs_fixed_table(tables: SweepTables) -> str | None:
    """Markdown: per aggregator and fraction, the worst fixed attack, the worst adaptive one, and the gap.

    Adaptive: `medfed_jax.attacks.ADAPTIVE_ATTACKS`. None unless the sweep has both kinds.
    """
    from medfed_jax.attacks import ADAPTIVE_ATTACKS

    if not _worst_case_applies(tables):
        return None
    names = {r["attack.name"] for r in tables.final if not _reference(r, "attack.name")}
    fixed, adaptive = sorted(names - set(ADAPTIVE_ATTACKS)), sorted(names & set(ADAPTIVE_ATTACKS))
    if not fixed or not adaptive:
        return None
    knobs = tables.meta["knobs"]
    key = lambda r: (r["aggregator.name"], r["attack.fraction"])  # noqa: E731
    worst_fixed = {key(r): r for r in worst_case(tables.final, knobs, fixed)}
    header = ["aggregator", "attackers", "worst fixed attack", "worst adaptive attack", "adaptive - fixed (points)"]
    body = []
    for row in worst_case(tables.final, knobs, adaptive):
        other = worst_fixed[key(row)]
        gap = "—" if diverged(row) or diverged(other) else f"{_pct(row, 'mean') - _pct(other, 'mean'):+.1f}"
        cells = [f"{format_mean_std(r)} ({r['attack.name']})" for r in (other, row)]
        body.append([row["aggregator.name"], f"{100 * float(row['attack.fraction']):g}%", *cells, gap])
    return tabular.markdown_table(header, body)


def draw_worst_case(tables: SweepTables):
    """Each aggregator's lowest final accuracy over the attacks vs malicious fraction; no attack at 0."""
    if not _worst_case_applies(tables):
        return None
    final = tables.final
    worst = worst_case(final, tables.meta["knobs"])
    clean = {r["aggregator.name"]: r for r in final if _reference(r, "attack.name")}
    colors = _colors(worst, ["aggregator.name"])
    fig, axes = _axes(1, width=7.5, height=4.6)
    ax = axes[0]
    for key, points in _groups(worst, ["aggregator.name"]).items():
        points = sorted(points, key=lambda r: float(r["attack.fraction"]))
        points = ([clean[key[0]]] if key[0] in clean else []) + points
        x = [100 * float(r["attack.fraction"]) * (not _reference(r, "attack.name")) for r in points]
        mean, err = _bars([(r, METRIC) for r in points])
        ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, color=colors[key], label=key[0])
        _mark_diverged(ax, x, points, colors[key])
    if clean:
        ticks = sorted({100 * float(r["attack.fraction"]) for r in worst})
        ax.set_xticks([0, *ticks], [NO_ATTACK_TEXT, *(f"{t:g}" for t in ticks)])
    ax.set_xlabel("malicious clients (% of all clients)")
    ax.set_ylabel("worst final test accuracy (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    title = "Worst case over the attacks: lowest final test accuracy (mean, 95% CI over seeds of that attack)"
    return _finish(fig, title, "aggregator")


def draw_epsilon(tables: SweepTables):
    """Final accuracy vs epsilon (log scale), one line per remaining setting; non-private runs dashed."""
    final = tables.final
    private = [r for r in final if math.isfinite(value(r, "epsilon"))]
    if not private:
        return None
    candidates = [k for k in tables.knobs if not k.startswith("privacy.")]
    lines = sweep.label_knobs(final, candidates)
    colors = _colors(final, lines)
    fig, axes = _axes(1, width=7.0, height=4.4)
    ax = axes[0]
    for key, rows in _groups(final, lines).items():
        points = sorted((r for r in rows if math.isfinite(value(r, "epsilon"))), key=lambda r: value(r, "epsilon"))
        label = _label(rows[0], lines) if lines else "all runs"
        if points:
            mean, err = _bars([(r, METRIC) for r in points])
            x = [value(r, "epsilon") for r in points]
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, color=colors[key], label=label)
            _mark_diverged(ax, x, points, colors[key])
        for r in rows:
            if not math.isfinite(value(r, "epsilon")):
                ax.axhline(_pct(r, "mean"), ls="--", color=colors[key], label=f"{label}: no DP")
    ax.set_xscale("log")
    note = tables.meta.get("privacy", "")
    ax.set_xlabel(f"privacy budget ε (log scale){', ' + note.split(';')[0] if note else ''}")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3, which="both")
    return _finish(fig, "Final test accuracy vs privacy budget (mean, 95% CI over seeds)", _legend_title(lines))


def client_columns(row: dict) -> list[str]:
    """Client names with a final per-client accuracy in this summary row."""
    return [m.group(1) for c in row for m in [re.fullmatch(r"client_accuracy\[(.+)\]_mean", c)] if m and row[c] != ""]


def client_ticks(clients: Sequence[str]) -> tuple[list[str], str]:
    """(tick labels, axis label): names sharing a prefix before their numbers (``client0``...) show the numbers."""
    match = [re.fullmatch(r"(\D+?)_?(\d+)", c) for c in clients]
    prefixes = {m.group(1) for m in match if m}
    if len(clients) > 1 and all(match) and len(prefixes) == 1:
        return [m.group(2) for m in match], f"{prefixes.pop()} (its own test split)"
    return list(clients), "client (its own test split)"


def draw_clients(tables: SweepTables):
    """Grouped bars: final accuracy on each client's own test split, one bar per setting."""
    final = [r for r in tables.final if client_columns(r)]
    by_clients: dict[tuple, list[dict]] = {}
    for r in final:
        by_clients.setdefault(tuple(client_columns(r)), []).append(r)
    panels = {k: v for k, v in by_clients.items() if len(k) <= MAX_CLIENTS}
    panels = {k: v for k, v in panels.items() if len(_groups(v, sweep.label_knobs(v, tables.knobs))) <= 8}
    if not panels:
        return None
    bar_knobs = {k: sweep.label_knobs(rows, tables.knobs) for k, rows in panels.items()}
    shared = len({tuple(b) for b in bar_knobs.values()}) == 1
    colors = _colors(final, next(iter(bar_knobs.values()))) if shared else {}
    fig, axes = _axes(len(panels), width=6.6, height=3.8, max_cols=2)
    for ax, (clients, rows) in zip(axes, panels.items()):
        bars = bar_knobs[clients]
        groups = _groups(rows, bars)
        width = 0.8 / len(groups)
        for g, (key, members) in enumerate(groups.items()):
            row = members[0]
            mean, err = _bars([(row, f"client_accuracy[{c}]") for c in clients])
            x = np.arange(len(clients)) + (g - (len(groups) - 1) / 2) * width
            label = _label(row, bars) if shared else describe(row, bars)
            color = colors.get(key, f"C{g % 10}")
            ax.bar(x, mean, width, yerr=err, capsize=2, color=color, label=label)
            _mark_diverged(ax, x, members[:1] * len(clients), color)
        ticks, axis_label = client_ticks(clients)
        rotate = sum(map(len, ticks)) > 48  # about the characters a 6.6-inch axis holds at fontsize 10 unrotated
        ax.set_xticks(range(len(clients)), ticks, rotation=30 if rotate else 0, ha="right" if rotate else "center")
        ax.set_xlabel(axis_label)
        ax.set_ylabel("final test accuracy (%)")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3, axis="y")
        others = [k for k in sweep.label_knobs(tables.final, tables.knobs) if k not in bars]
        ax.set_title(describe(rows[0], others) if others else "")
    title = "Per-client final test accuracy (mean, 95% CI over seeds)"
    return _finish(fig, title, _legend_title(next(iter(bar_knobs.values()))) if shared else None)


def draw_scales(tables: SweepTables):
    """Accuracy vs the sign flip's scale (0 = no attack), one line per aggregator and budget, a panel per partition."""
    rows = [r for r in tables.summary if "attack.scale" in r and "data.partition" in r]
    budgets = [b for b in SECURITY_BUDGETS if any(int(r["round"]) == b for r in rows)]
    if not rows or not budgets or len({r["attack.scale"] for r in rows}) < 2:
        return None
    partitions = list(dict.fromkeys(r["data.partition"] for r in rows))
    colors = _colors(rows, ["aggregator.name"])
    fig, axes = _axes(len(partitions), width=4.4)
    for ax, partition in zip(axes, partitions):
        for (aggregator,), members in _groups(
            [r for r in rows if r["data.partition"] == partition], ["aggregator.name"]
        ).items():
            for budget, style in zip(budgets, ("--", "-")):
                points = [r for r in members if int(r["round"]) == budget]
                points.sort(key=lambda r: 0.0 if r["attack.name"] == "none" else float(r["attack.scale"]))
                x = [0.0 if r["attack.name"] == "none" else float(r["attack.scale"]) for r in points]
                color = colors[(aggregator,)]
                ax.plot(x, [_pct(r, "mean") for r in points], style, marker="o", ms=3, color=color,
                        label=f"{aggregator}, {budget} rounds")  # fmt: skip
                _mark_diverged(ax, x, points, color)
        ax.set_title(f"partition={partition}")
        ax.set_xlabel("sign-flip scale (0 = no attack; 25% of clients)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    return _finish(fig, f"Accuracy vs sign-flip scale (mean over {rows[0]['n']} seeds)")


FIGURES = (
    ("curves.png", draw_curves, "Test accuracy vs round"),
    ("heatmap.png", draw_heatmap, "Aggregator x attack heatmap"),
    ("fraction.png", draw_fraction, "Accuracy vs malicious fraction"),
    ("worst_case.png", draw_worst_case, "Worst case over the attacks"),
    ("epsilon.png", draw_epsilon, "Accuracy vs privacy budget"),
    ("clients.png", draw_clients, "Per-client accuracy"),
    ("scales.png", draw_scales, "Accuracy vs sign-flip scale"),
)
EXPERIMENT_FIGURES = {"signflip_attack": ("scales.png",)}  # sweep name -> the figures the README shows (else all)


# --------------------------------------------------------------------------- report.md and README


def sweep_sentence(tables: SweepTables) -> str:
    meta = tables.meta
    switched = meta.get("switched_knobs", [])
    numeric = ", ".join(f"`{k}`" for k in meta["numeric_knobs"]) or "none"
    structural = ", ".join(f"`{k}`" for k in meta["structural_knobs"] if k not in switched) or "none"
    picked = ", ".join(f"`{k}`" for k in switched)
    return (
        f"{meta['cells']} cells in {meta.get('compiled_programs', len(meta['programs']))} compiled program(s). "
        f"Numeric knobs (vmapped experiment axis): {numeric}; "
        + (f"switched knobs (compiled together, picked at run time): {picked}; " if switched else "")
        + f"structural knobs (one program each): {structural}."
    )


def _worst_case_section(tables: SweepTables) -> list[str]:
    return [
        "## Worst case over the attacks",
        "",
        "Each aggregator's lowest final test accuracy over all attacks at each malicious fraction, mean ± std "
        "over seeds, the attack in brackets (`worst_case.png`).",
        "",
        worst_case_table(tables),
        "",
        *(
            ["Worst fixed vs worst adaptive attack:", "", versus, ""]
            if (versus := adaptive_vs_fixed_table(tables))
            else []
        ),
    ]


def write_report(workdir: str) -> tuple[str, list[str]]:
    """Write ``final.csv``, the figures that apply and ``report.md``; returns (report path, figure paths)."""
    tables = load(workdir)
    tabular.write_csv(os.path.join(workdir, "final.csv"), tables.final)
    figures, notes, lines = [], [], []
    for name, draw, title in FIGURES:
        fig = draw(tables)
        if fig is not None:
            figures.append(save_figure(fig, os.path.join(workdir, name)))
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
        else:
            notes.append(f"- {title}: not drawn (the sweep does not vary what it needs, or has too many settings).")
    text = "\n".join(
        [
            f"# Sweep report: {tables.meta['name']}",
            "",
            sweep_sentence(tables),
            "",
            *([f"Privacy accounting: {tables.meta['privacy']}.", ""] if tables.meta.get("privacy") else []),
            "## Final results",
            "",
            "Final evaluation round; test accuracy on the pooled test set, mean ± sample std over seeds, "
            "t-based 95% confidence half-width, n seeds (from `summary.csv`; all rows in `final.csv`).",
            "",
            final_table(tables.summary, tables.meta["knobs"]),
            "",
            *(_worst_case_section(tables) if _worst_case_applies(tables) else []),
            "## Figures",
            "",
            *lines,
            *(["## Not drawn", "", *notes, ""] if notes else []),
        ]
    )
    path = os.path.join(workdir, "report.md")
    tabular.write_text_atomic(path, text)
    return path, figures


def machine() -> str:
    """CPU model and core count, OS, jax version and backend."""
    import jax

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            models = re.findall(r"model name\s*:\s*(.+)", f.read())
        cpu = models[0].strip() if models else cpu
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}, jax {jax.__version__} ({jax.default_backend()})"


def results_section(workdirs: Sequence[str], readme_dir: str, assets: str, command: str, wall: str) -> str:
    """The README's Results section, built from each workdir's tables and figures."""
    lines = [
        START,
        "## Results",
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()} ({machine()}){wall}. "
        "Every ± is a sample std (ddof 1) over n seeds, and each seed draws its own partition and "
        "train/test split (data.seed unset), so n counts splits x training seeds together; each table comes from "
        "`results.csv` (per seed) or `summary.csv` (with the t-based 95% CI) of the workdir named.",
        "",
    ]
    for workdir in workdirs:
        _, figures = write_report(workdir)
        tables = load(workdir)
        target = os.path.join(assets, os.path.basename(os.path.normpath(workdir)))
        os.makedirs(target, exist_ok=True)
        lines += [f"### {tables.meta['name']} (`{workdir}`)", "", sweep_sentence(tables), ""]
        if tables.meta.get("privacy"):
            lines += [f"Privacy accounting: {tables.meta['privacy']}.", ""]
        table = EXPERIMENT_TABLES.get(tables.meta["name"])
        lines += [table(tables) if table else final_table(tables.summary, tables.meta["knobs"]), ""]
        shown = EXPERIMENT_FIGURES.get(tables.meta["name"])
        for figure in [f for f in figures if shown is None or os.path.basename(f) in shown]:
            copy = os.path.join(target, os.path.basename(figure))
            shutil.copyfile(figure, copy)
            lines += [f"![{tables.meta['name']}: {os.path.basename(figure)}]({os.path.relpath(copy, readme_dir)})", ""]
    return "\n".join([*lines, END])


def update_readme(path: str, section: str) -> None:
    """Replace the marked Results section of ``path`` (appended when the markers are absent)."""
    with open(path) as f:
        text = f.read()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tabular.write_text_atomic(path, text)


def define_flags() -> None:
    """The command line's flags (defined only when run as a program, so `cli` can import this module)."""
    flags.DEFINE_multi_string("workdir", None, "Sweep workdir(s) to report on.")
    flags.DEFINE_string("readme", None, "Rewrite this README's Results section from the workdirs.")
    flags.DEFINE_string("section", None, "Write the Results section to this file (the README is left alone).")
    flags.DEFINE_string("assets", "benchmarks/figures", "Where --readme / --section copy the figures.")
    flags.DEFINE_string("command", "make reproduce", "The command named in the Results section.")
    flags.DEFINE_float("wall_seconds", None, "Wall time of the whole command, stated in the section.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    if not args.workdir:
        raise app.UsageError("--workdir=<sweep workdir> is required (repeat it for several).")
    try:
        if args.readme and args.section:
            raise ValueError("--readme and --section both name where the Results section goes: give one.")
        target = args.readme or args.section
        if target:
            wall = f"; the sweeps took {args.wall_seconds / 60:.1f} min" if args.wall_seconds else ""
            section = results_section(
                args.workdir, os.path.dirname(os.path.abspath(target)), args.assets, args.command, wall
            )
            if args.readme:
                update_readme(args.readme, section)
                print(f"updated the Results section of {args.readme} (figures under {args.assets})")
            else:
                os.makedirs(os.path.dirname(os.path.abspath(args.section)), exist_ok=True)
                tabular.write_text_atomic(args.section, section + "\n")
                print(f"wrote the Results section to {args.section} (figures under {args.assets}); README.md unchanged")
        else:
            for workdir in args.workdir:
                path, figures = write_report(workdir)
                print(f"wrote {path} and {len(figures)} figure(s): {', '.join(map(os.path.basename, figures))}")
    except ValueError as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    define_flags()
    host_devices.quiet_backend_probe()
    app.run(main)

"""The figures a sweep's columns call for (`FIGURES`: curves, heatmap, fraction, worst case, epsilon,
clients, scales); each ``draw_*`` returns a figure or None when the sweep does not vary what it needs."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from medfed_jax import sweep
from medfed_jax.report.plotting import (
    MAX_CLIENTS,
    MAX_PANELS,
    MAX_WIDTH_INCHES,
    _axes,
    _bars,
    _colors,
    _facets,
    _finish,
    _label,
    _legend_title,
    _mark_diverged,
    _pyplot,
)
from medfed_jax.report.rows import (
    DIVERGED_TEXT,
    SweepTables,
    _groups,
    _pct,
    _reference,
    describe,
    diverged,
    pooled,
    value,
)
from medfed_jax.report.tables import SECURITY_BUDGETS, _worst_case_applies, worst_case


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
            mean, err = _bars([(r, pooled(r)) for r in points])
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
        mean, err = _bars([(r, pooled(r)) for r in points])
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
            mean, err = _bars([(r, pooled(r)) for r in points])
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

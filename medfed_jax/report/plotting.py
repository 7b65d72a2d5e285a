"""What every figure shares: matplotlib (Agg, imported on first use), panel grids at most
`MAX_WIDTH_INCHES` wide, one colour per setting, one legend below the panels, diverged markers."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np

from medfed_jax.report.rows import DIVERGED_TEXT, NAMES, _groups, describe, diverged, value

MAX_LINES, MAX_PANELS, MAX_CLIENTS = 10, 9, 24


def _bars(pairs: Sequence[tuple[dict, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Means (%) of each (summary row, metric) and the 95% CI as error bars clipped to [0, 100]."""
    mean = np.array([100 * value(r, f"{m}_mean") for r, m in pairs])
    ci = np.nan_to_num([100 * value(r, f"{m}_ci95") for r, m in pairs])
    return mean, np.stack([np.clip(ci, 0, mean), np.clip(ci, 0, 100 - mean)])


DPI = 120
MAX_WIDTH_INCHES = 13.3  # 1600 px at DPI: a figure reads at README width without horizontal scrolling
SINGLE_PANEL_WIDTH = 7.0  # inches: a lone panel has room for its title and legend


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

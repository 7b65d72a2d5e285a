"""The README's issue-18 experiments from their sweeps: `configs/utility_frontier.py` (drift corrections under
unreliable clients), `configs/compression_frontier.py` (compressors) and `configs/fedbuff_frontier.py`
(FedBuff's buffer size in virtual time), tables and figures.

Accuracy is the global model's on all clients' test rows (``global_pooled_accuracy``), mean ± sample std over
the seeds (n each; each seed its own split).

- drift table: after the evaluated round nearest a third of the run and after the last, one row per
  algorithm (`utility_frontier.ALGORITHMS`), one column pair per dataset;
- ``frontier_rounds.png``: accuracy vs round, a panel per dataset, a line per algorithm, a ±std band;
- compression table: after the last round, with the bytes the clients upload per round (``uploaded_bytes``)
  and in the whole run;
- ``frontier_bytes.png``: accuracy vs MB uploaded so far (log scale), a line per compressor, ±std bars.
  Every client sends a fixed-size message every round there, so the bytes by round r are r x a round's;
- FedBuff table: per buffer size, the server steps, the virtual time at the end and the accuracy there, and the
  virtual time of the first evaluation whose seed-mean accuracy reaches `TARGET` (FedBuff's time to accuracy);
- ``frontier_async.png``: accuracy vs virtual time (mean over the seeds at each evaluation), a line per buffer
  size, a ±std band.

``make frontier`` runs both sweeps from scratch into ``runs/frontier/<sweep>`` (wall seconds in
``runs/frontier/<sweep>.wall_s``), then this script, which prints the tables, writes them with the figure links
to ``runs/frontier/frontier.md`` and the figures to ``--figures`` (the README's ``benchmarks/figures``):

    python benchmarks/frontier.py --workdir=runs/frontier --figures=benchmarks/figures

A row of a table (a line of a figure) is an entry of the config's dict of named cells
(`utility_frontier.ALGORITHMS`, `compression_frontier.COMPRESSORS`): one more entry there is one more row. One
more sweep is one more `EXPERIMENTS` entry (that dict's name, a table, a figure) and its name in the Makefile's
``FRONTIER_SWEEPS``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from medfed_jax import config, config_files, report, sweep, tabular
from medfed_jax.report.plotting import _axes, _finish, _mark_diverged
from medfed_jax.report.rows import _pct, value

METRIC = "global_pooled_accuracy"
TARGET = 85.0  # accuracy (%) whose first virtual time the FedBuff table reports


def _config_module(name: str) -> Any:
    """The shipped config module ``<name>`` (for its one declaration of the cells)."""
    spec = importlib.util.spec_from_file_location(name, config_files.config_path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def choices(name: str) -> dict[str, dict]:
    """The named cells of a sweep, ``utility_frontier``'s algorithms or ``compression_frontier``'s compressors,
    each with every field another entry sets (at the config's value where it sets none, as the sweep fills a
    cell), so that a row matches exactly one."""
    module = _config_module(name)
    named = getattr(module, EXPERIMENTS[name].entries)
    base = module.get_config()
    fields = list(dict.fromkeys(k for chosen in named.values() for k in chosen))
    return {n: {k: chosen.get(k, config.get_path(base, k)) for k in fields} for n, chosen in named.items()}


def chosen(row: dict, named: dict[str, dict]) -> str:
    """The one name in ``named`` whose fields the row's cell has (as the CSVs write values)."""
    names = [n for n, fields in named.items() if all(row[k] == sweep.format_value(v) for k, v in fields.items())]
    if len(names) != 1:
        cell = {k: row.get(k) for fields in named.values() for k in fields}
        raise ValueError(f"a summary row with {cell} matches {names or 'none'} of {list(named)}: one expected.")
    return names[0]


def dataset(row: dict) -> str:
    return "heart" if row["data.name"] == "heart" else f"digits Dir({float(row['data.alpha']):g})"


def _series(rows: Sequence[dict], named: dict[str, dict], panel: Callable[[dict], str] = lambda r: "") -> dict:
    """``{(panel, name): rows by round}`` in first-seen panel order and ``named``'s order; every pair present."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((panel(row), chosen(row, named)), []).append(row)
    panels = list(dict.fromkeys(p for p, _ in groups))
    missing = [(p, n) for p in panels for n in named if (p, n) not in groups]
    if missing:
        raise ValueError(f"the sweep has no rows of {missing[0]}: rerun it (make frontier) to fill every cell.")
    return {(p, n): sorted(groups[(p, n)], key=lambda r: int(r["round"])) for p in panels for n in named}


def _over_seeds(points: Sequence[dict], read: Callable[[dict, str], float]) -> tuple[np.ndarray, np.ndarray]:
    """``read(row, 'mean')`` and ``read(row, 'std')`` at each point; a std of nan (n = 1) as 0."""
    mean = np.array([read(r, "mean") for r in points])
    return mean, np.nan_to_num(np.array([read(r, "std") for r in points]))


def _accuracy(points: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (%) of the accuracy over seeds at each point."""
    return _over_seeds(points, lambda row, stat: _pct(row, stat, METRIC))


def _seeds(rows: Sequence[dict]) -> str:
    return ", ".join(sorted({r["n"] for r in rows}))


def drift_table(rows: list[dict]) -> str:
    algorithms = choices("utility_frontier")
    series = _series(rows, algorithms, dataset)
    datasets = list(dict.fromkeys(d for d, _ in series))
    evaluated = sorted({int(r["round"]) for r in rows})
    last = evaluated[-1]
    rounds = (min(evaluated, key=lambda r: abs(3 * r - last)), last)
    at = {(key, int(r["round"])): r for key, points in series.items() for r in points}
    header = ["algorithm", *(f"{d}, r{t}" for d in datasets for t in rounds)]
    body = [
        [name, *(report.format_mean_std(at[((d, name), t)], METRIC) for d in datasets for t in rounds)]
        for name in algorithms
    ]
    return tabular.markdown_table(header, body)


def per_round_bytes(points: Sequence[dict]) -> float:
    """The bytes uploaded in each round of one compressor's run; refused unless the same at every evaluation."""
    sizes = {float(r["uploaded_bytes_mean"]) for r in points}
    if len(sizes) != 1:
        raise ValueError(
            f"uploaded_bytes varies over the rounds ({sorted(sizes)}): the bytes of the run are not rounds x a "
            "round's; this script expects every client to send a fixed-size message every round."
        )
    return sizes.pop()


def compression_table(rows: list[dict]) -> str:
    series = _series(rows, choices("compression_frontier"))
    header = ["compressor", f"accuracy, r{max(int(r['round']) for r in rows)}", "kB per round", "MB in the run"]
    body = []
    for (_, name), points in series.items():
        per_round, final = per_round_bytes(points), points[-1]
        run = per_round * int(final["round"])
        body.append([name, report.format_mean_std(final, METRIC), f"{per_round / 1e3:.1f}", f"{run / 1e6:.2f}"])
    return tabular.markdown_table(header, body)


def draw_rounds(rows: list[dict]):
    """Accuracy vs round: a panel per dataset, a line per algorithm, mean with a ±std band over the seeds."""
    series = _series(rows, choices("utility_frontier"), dataset)
    datasets = list(dict.fromkeys(d for d, _ in series))
    names = list(dict.fromkeys(n for _, n in series))
    fig, axes = _axes(len(datasets), width=4.4, height=3.6)
    for ax, panel in zip(axes, datasets):
        for i, name in enumerate(names):
            points = series[(panel, name)]
            x = [int(r["round"]) for r in points]
            mean, std = _accuracy(points)
            color = f"C{i % 10}"
            ax.plot(x, mean, marker="o", ms=2.5, color=color, label=name)
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15)
            _mark_diverged(ax, x, points, color)
        ax.set_title(panel)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    title = f"Drift corrections under unreliable clients: accuracy vs round (mean ± std, n = {_seeds(rows)})"
    return _finish(fig, title, "algorithm")


def draw_bytes(rows: list[dict]):
    """Accuracy vs MB uploaded so far (log scale), a line per compressor, ±std error bars over the seeds."""
    series = _series(rows, choices("compression_frontier"))
    fig, axes = _axes(1, width=7.0, height=4.4)
    ax = axes[0]
    for i, ((_, name), points) in enumerate(series.items()):
        x = [int(r["round"]) * per_round_bytes(points) / 1e6 for r in points]
        mean, std = _accuracy(points)
        color = f"C{i % 10}"
        ax.errorbar(x, mean, yerr=std, marker="o", ms=3, capsize=2, elinewidth=0.8, color=color, label=name)
        _mark_diverged(ax, x, points, color)
    ax.set_xscale("log")
    ax.set_xlabel("MB uploaded by all clients so far (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    return _finish(fig, f"Compressed uploads: accuracy vs bytes (mean ± std, n = {_seeds(rows)})", "compressor")


def _virtual_time(points: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over seeds of the virtual time at each point."""
    return _over_seeds(points, lambda row, stat: value(row, f"virtual_time_{stat}"))


def time_to_target(points: Sequence[dict]) -> str:
    """The mean virtual time of the first evaluation whose mean accuracy reaches `TARGET`, or "not reached"."""
    accuracy, (time, _) = _accuracy(points)[0], _virtual_time(points)
    reached = np.flatnonzero(accuracy >= TARGET)
    return f"{time[reached[0]]:.1f} (step {points[reached[0]]['round']})" if reached.size else "not reached"


def fedbuff_table(rows: list[dict]) -> str:
    series = _series(rows, choices("fedbuff_frontier"))
    header = ["buffer", "server steps", "virtual time", "accuracy at the end", f"virtual time to {TARGET:g}%"]
    body = []
    for (_, name), points in series.items():
        final = points[-1]
        time = f"{value(final, 'virtual_time_mean'):.1f} ± {value(final, 'virtual_time_std'):.1f}"
        body.append([name, final["round"], time, report.format_mean_std(final, METRIC), time_to_target(points)])
    return tabular.markdown_table(header, body)


def draw_virtual_time(rows: list[dict]):
    """Accuracy vs virtual time, a line per buffer size, mean with a ±std band over the seeds."""
    series = _series(rows, choices("fedbuff_frontier"))
    fig, axes = _axes(1, width=7.0, height=4.4)
    ax = axes[0]
    for i, ((_, name), points) in enumerate(series.items()):
        x, _ = _virtual_time(points)
        mean, std = _accuracy(points)
        color = f"C{i % 10}"
        ax.plot(x, mean, marker="o", ms=3, color=color, label=name)
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15)
        _mark_diverged(ax, x, points, color)
    ax.axhline(TARGET, color="0.5", lw=0.8, ls=":")
    ax.set_xlabel("virtual time (1 = the typical client's median latency)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    title = f"FedBuff: accuracy vs virtual time, 300 client updates each (mean ± std, n = {_seeds(rows)})"
    return _finish(fig, title, "buffer size K")


class Experiment(NamedTuple):
    """How this script reports one sweep (the workdir ``--workdir/<sweep name>``)."""

    entries: str  # the config module's dict: name -> the fields that select it (a table row, a line)
    table: Callable[[list[dict]], str]  # summary rows -> markdown
    draw: Callable[[list[dict]], Any]  # summary rows -> figure
    figure: str  # its file under --figures


EXPERIMENTS = {
    "utility_frontier": Experiment("ALGORITHMS", drift_table, draw_rounds, "frontier_rounds.png"),
    "compression_frontier": Experiment("COMPRESSORS", compression_table, draw_bytes, "frontier_bytes.png"),
    "fedbuff_frontier": Experiment("BUFFERS", fedbuff_table, draw_virtual_time, "frontier_async.png"),
}


def table(tables: report.SweepTables) -> str:
    """The markdown table of one of `EXPERIMENTS`' sweeps, with its n."""
    text = EXPERIMENTS[tables.meta["name"]].table(tables.summary)
    n = _seeds(tables.summary)
    return text + f"\n\nGlobal model, all clients' test rows: accuracy (%), mean ± std over n = {n} seeds."


def _wall(workdir: str, name: str) -> str:
    path = os.path.join(workdir, f"{name}.wall_s")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f", {float(f.read()):.0f} s wall"


def load_sweeps(workdir: str) -> dict[str, report.SweepTables]:
    """Each of `EXPERIMENTS` from ``workdir/<name>``; refused where a workdir is missing or holds another sweep."""
    loaded = {name: report.load(os.path.join(workdir, name)) for name in EXPERIMENTS}
    for name, tables in loaded.items():
        if tables.meta["name"] != name:
            raise ValueError(
                f"{tables.workdir} holds the sweep {tables.meta['name']!r}, not {name!r}: rerun make frontier."
            )
    return loaded


def section(workdir: str, figures: str, base: str = ".") -> str:
    """Both sweeps' tables with their figures (saved under ``figures``, linked relative to ``base``: the README's
    folder, the repository root), headed by the date, the machine and each sweep's wall time. Everything is
    computed before anything is written."""
    loaded = load_sweeps(workdir)
    texts = {name: table(tables) for name, tables in loaded.items()}
    drawn = {name: EXPERIMENTS[name].draw(tables.summary) for name, tables in loaded.items()}
    os.makedirs(figures, exist_ok=True)
    lines = [f"Generated by `make frontier` on {datetime.date.today().isoformat()} ({report.machine()}).", ""]
    for name, tables in loaded.items():
        figure = report.save_figure(drawn[name], os.path.join(figures, EXPERIMENTS[name].figure))
        link = f"![{name}]({os.path.relpath(figure, base)})"
        lines += [f"`{tables.workdir}`{_wall(workdir, name)}:", "", texts[name], "", link, ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir", default="runs/frontier", help="holds the sweeps' workdirs, " + ", ".join(EXPERIMENTS)
    )
    parser.add_argument("--figures", default="benchmarks/figures", help="where the figures go")
    args = parser.parse_args(argv)
    try:
        text = section(args.workdir, args.figures)
    except ValueError as e:
        sys.exit(f"error: {e}")
    tabular.write_text_atomic(os.path.join(args.workdir, "frontier.md"), text + "\n")
    print(text + f"\n\nwrote {os.path.join(args.workdir, 'frontier.md')}, figures under {args.figures}")


if __name__ == "__main__":
    main()

"""`benchmarks/frontier.py` (``make frontier``'s tables and figures) on the shipped sweeps' real cells with made-up
per-seed accuracies, summarised as a sweep does (`medfed_jax.sweep.summary_rows`), against numpy computed here."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from medfed_jax import config_files, program, report, sweep, tabular

ROUNDS, EVAL_EVERY, SEEDS = 6, 2, (0, 1)
SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "frontier.py")


def load_script():
    spec = importlib.util.spec_from_file_location("frontier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


frontier = load_script()


def fake_sweep(workdir: str, name: str, rng) -> list[dict]:
    """The shipped sweep ``name`` cut to `ROUNDS` rounds and `SEEDS`, each cell x evaluation a made-up accuracy
    (and, per compressor, a made-up message size), written as a sweep writes ``summary.csv`` and ``sweep.json``."""
    cfg = config_files.load_config(name)
    cfg.rounds, cfg.eval_every = ROUNDS, EVAL_EVERY
    cfg.sweep.grid = {"seed": SEEDS}
    plan = sweep.plan_sweep(cfg)
    sizes: dict[str, float] = {}
    rows = []
    for cell in plan.cells:
        head = {"cell": str(cell.index), **{k: sweep.format_value(cell.values[k]) for k in plan.knobs}}
        size = sizes.setdefault(
            head.get("compression.method", "") + head.get("compression.bits", ""), int(rng.integers(10_000, 1_000_000))
        )
        for round_done in program.eval_rounds(ROUNDS, EVAL_EVERY):
            accuracy = np.float32(rng.uniform(0.3, 0.95))
            row = {**head, "round": str(round_done), "diverged": "0.0", "global_pooled_accuracy": str(accuracy)}
            rows.append({**row, "uploaded_bytes": str(float(size))} if name == "compression_frontier" else row)
    os.makedirs(os.path.join(workdir, name))
    tabular.write_csv(os.path.join(workdir, name, "summary.csv"), sweep.summary_rows(plan, rows))
    with open(os.path.join(workdir, name, "sweep.json"), "w") as f:
        json.dump({"name": name, "knobs": list(plan.knobs)}, f)
    return rows


def expected(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    values = 100 * np.array([float(r["global_pooled_accuracy"]) for r in rows], np.float64)
    return values.mean(), values.std(ddof=1)


def table_cells(text: str) -> dict[str, list[str]]:
    """A markdown table's body rows by their first cell."""
    lines = [line for line in text.splitlines() if line.startswith("|")][2:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


@pytest.fixture(scope="module")
def made_up(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("frontier"))
    rng = np.random.default_rng(0)
    rows = {name: fake_sweep(workdir, name, rng) for name in frontier.SWEEPS}
    with open(os.path.join(workdir, "utility_frontier.wall_s"), "w") as f:
        f.write("123\n")
    figures = os.path.join(workdir, "figures")
    frontier.main(["--workdir", workdir, "--figures", figures])
    with open(os.path.join(workdir, "frontier.md")) as f:
        text = f.read()
    tables = {name: frontier.table(report.load(os.path.join(workdir, name))) for name in frontier.SWEEPS}
    assert all(t in text for t in tables.values())  # the section holds both tables
    return rows, tables, text, figures


def test_drift_table_is_each_algorithm_and_dataset_over_the_seeds_at_a_third_and_the_end(made_up):
    rows, tables, text, _ = made_up
    table = table_cells(tables["utility_frontier"])
    algorithms = frontier._config_module("utility_frontier").ALGORITHMS
    assert list(table) == list(algorithms)  # every algorithm of the config, in its order
    cells = frontier.choices("utility_frontier")
    datasets = ["heart", "digits Dir(0.1)", "digits Dir(0.5)"]
    for name, fields in cells.items():
        mine = [r for r in rows["utility_frontier"] if all(r[k] == sweep.format_value(v) for k, v in fields.items())]
        want = []
        for d in datasets:
            for t in (2, ROUNDS):  # the evaluation nearest ROUNDS / 3, and the last
                mean, std = expected([r for r in mine if frontier.dataset(r) == d and r["round"] == str(t)])
                want.append(f"{mean:.1f} ± {std:.1f}")
        assert table[name] == want, name
    assert "n = 2 seeds" in text and "123 s wall" in text


def test_compression_table_and_figure_count_the_bytes_of_every_round(made_up):
    rows, tables, text, figures = made_up
    table = table_cells(tables["compression_frontier"])
    compressors = frontier.choices("compression_frontier")
    assert list(table) == list(compressors)
    for name, fields in compressors.items():
        mine = [
            r for r in rows["compression_frontier"] if all(r[k] == sweep.format_value(v) for k, v in fields.items())
        ]
        size = float(mine[0]["uploaded_bytes"])
        mean, std = expected([r for r in mine if r["round"] == str(ROUNDS)])
        assert table[name] == [f"{mean:.1f} ± {std:.1f}", f"{size / 1e3:.1f}", f"{size * ROUNDS / 1e6:.2f}"]
    for png in frontier.FIGURES.values():
        with open(os.path.join(figures, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"({os.path.relpath(os.path.join(figures, png))})" in text  # linked as from the README (the cwd)


def test_figures_plot_the_seed_means_with_std_bands_and_bars(made_up):
    rows, _, _, figures = made_up
    summary = tabular.read_csv(os.path.join(os.path.dirname(figures), "utility_frontier", "summary.csv"))
    fig = frontier.draw_rounds(summary)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["heart", "digits Dir(0.1)", "digits Dir(0.5)"]
    cells = frontier.choices("utility_frontier")
    for ax in axes:
        lines = {line.get_label(): line for line in ax.lines}
        for name, fields in cells.items():
            mine = [
                r
                for r in rows["utility_frontier"]
                if frontier.dataset(r) == ax.get_title()
                and all(r[k] == sweep.format_value(v) for k, v in fields.items())
            ]
            rounds = program.eval_rounds(ROUNDS, EVAL_EVERY)
            means = [expected([r for r in mine if r["round"] == str(t)])[0] for t in rounds]
            np.testing.assert_array_equal(lines[name].get_xdata(), rounds)
            np.testing.assert_allclose(lines[name].get_ydata(), means, atol=1e-3)  # summary.csv keeps 6 digits
    assert len(axes[0].collections) == len(cells)  # one std band per line
    fig = frontier.draw_bytes(
        tabular.read_csv(os.path.join(os.path.dirname(figures), "compression_frontier", "summary.csv"))
    )
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    compressors = frontier.choices("compression_frontier")
    for container, (name, fields) in zip(ax.containers, compressors.items()):
        mine = [
            r for r in rows["compression_frontier"] if all(r[k] == sweep.format_value(v) for k, v in fields.items())
        ]
        rounds = program.eval_rounds(ROUNDS, EVAL_EVERY)
        size = float(mine[0]["uploaded_bytes"])
        stats = [expected([r for r in mine if r["round"] == str(t)]) for t in rounds]
        line = container.lines[0]
        assert line.get_label() == name or container.get_label() == name
        np.testing.assert_allclose(np.asarray(line.get_xdata(), float), [t * size / 1e6 for t in rounds], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(line.get_ydata(), float), [m for m, _ in stats], atol=1e-3)
        bars = np.array([segment[:, 1] for segment in container.lines[2][0].get_segments()])  # [point, (low, high)]
        np.testing.assert_allclose(bars, [(m - sd, m + sd) for m, sd in stats], atol=1e-3)


def test_a_row_of_no_known_algorithm_is_named_in_one_error_before_anything_is_written(made_up, tmp_path):
    rows, _, _, _ = made_up
    row = dict(rows["utility_frontier"][0], **{"local.prox_mu": "0.5"})
    with pytest.raises(ValueError, match=r"matches none of \['fedavg', 'fedprox'"):
        frontier.chosen(row, frontier.choices("utility_frontier"))
    with pytest.raises(SystemExit, match="error: .* has no sweep.json"):
        frontier.main(["--workdir", str(tmp_path), "--figures", str(tmp_path / "figures")])
    assert not os.path.exists(tmp_path / "figures")

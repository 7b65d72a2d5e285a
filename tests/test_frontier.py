"""`benchmarks/frontier.py` (``make frontier``'s tables and figures) on the shipped sweeps' real cells with made-up
per-seed accuracies, summarised as a sweep does (`medfed_jax.sweep.summary_rows`), against numpy computed here.
Each row's algorithm or compressor comes from its cell's position (the configs list cells dataset-major, then
by entry, seeds fastest), not from the script's matching."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from medfed_jax import config_files, program, report, sweep, tabular

ROUNDS, EVAL_EVERY, SEEDS = 6, 2, (0, 1)
EVALUATED = program.eval_rounds(ROUNDS, EVAL_EVERY)
SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "frontier.py")
DATASETS = ("heart", "digits Dir(0.1)", "digits Dir(0.5)")  # utility_frontier's variants, in order


def load_script():
    spec = importlib.util.spec_from_file_location("frontier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


frontier = load_script()


def entries(name: str) -> list[str]:
    """The names the config declares, in order (the dict the script's `Experiment` names)."""
    return list(getattr(frontier._config_module(name), frontier.EXPERIMENTS[name].entries))


def fake_sweep(workdir: str, name: str, rng) -> list[dict]:
    """The shipped sweep ``name`` cut to `ROUNDS` rounds and `SEEDS`, each cell x evaluation a made-up accuracy
    (per compressor a made-up message size; FedBuff's cells keep their own schedule and get a made-up, increasing
    virtual time), written as a sweep writes ``summary.csv`` and ``sweep.json``.
    Returns the result rows, each with its ``entry`` and ``panel`` (kept out of the files)."""
    cfg = config_files.load_config(name)
    cfg.rounds, cfg.eval_every = ROUNDS, EVAL_EVERY
    cfg.sweep.grid = {"seed": SEEDS}
    if name != "fedbuff_frontier":
        cfg.sweep.cells = [{k: v for k, v in c.items() if k not in ("rounds", "eval_every")} for c in cfg.sweep.cells]
    plan = sweep.plan_sweep(cfg)
    names = entries(name)
    sizes = {n: float(rng.integers(10_000, 1_000_000)) for n in names}
    rows = []
    for cell in plan.cells:
        position = cell.index // len(SEEDS)
        entry, panel = names[position % len(names)], position // len(names)
        head = {"cell": str(cell.index), **{k: sweep.format_value(cell.values[k]) for k in plan.knobs}}
        clock = 0.0
        for round_done in evaluated(cell.values):
            accuracy = np.float32(rng.uniform(0.3, 0.95))
            row = {**head, "round": str(round_done), "diverged": "0.0", "global_pooled_accuracy": str(accuracy)}
            if name == "compression_frontier":
                row["uploaded_bytes"] = str(sizes[entry])
            if name == "fedbuff_frontier":
                clock += float(np.float32(rng.uniform(0.5, 5.0)))
                row["virtual_time"] = str(np.float32(clock))
            rows.append({**row, "entry": entry, "panel": panel})
    written = [{k: v for k, v in r.items() if k not in ("entry", "panel")} for r in rows]
    os.makedirs(os.path.join(workdir, name))
    tabular.write_csv(os.path.join(workdir, name, "summary.csv"), sweep.summary_rows(plan, written))
    with open(os.path.join(workdir, name, "sweep.json"), "w") as f:
        json.dump({"name": name, "knobs": list(plan.knobs)}, f)
    return rows


def evaluated(values: dict) -> tuple[int, ...]:
    """The evaluated rounds of a cell: its own schedule where it sets one (FedBuff's), else the cut one."""
    return program.eval_rounds(values.get("rounds", ROUNDS), values.get("eval_every", EVAL_EVERY))


def stats(rows: list[dict], entry: str, round_done: int, panel: int = 0, metric="global_pooled_accuracy"):
    """Mean and sample std over the seeds of one entry's made-up ``metric`` (accuracy in %)."""
    picked = [r for r in rows if r["entry"] == entry and r["panel"] == panel and r["round"] == str(round_done)]
    assert len(picked) == len(SEEDS)
    values = np.array([float(r[metric]) for r in picked], np.float64) * (100 if "accuracy" in metric else 1)
    return values.mean(), values.std(ddof=1)


def table_cells(text: str) -> dict[str, list[str]]:
    """A markdown table's body rows by their first cell."""
    lines = [line for line in text.splitlines() if line.startswith("|")][2:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


@pytest.fixture(scope="module")
def made_up(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("frontier"))
    rng = np.random.default_rng(0)
    rows = {name: fake_sweep(workdir, name, rng) for name in frontier.EXPERIMENTS}
    with open(os.path.join(workdir, "utility_frontier.wall_s"), "w") as f:
        f.write("123\n")
    figures = os.path.join(workdir, "figures")
    frontier.main(["--workdir", workdir, "--figures", figures])
    with open(os.path.join(workdir, "frontier.md")) as f:
        text = f.read()
    loaded = {name: report.load(os.path.join(workdir, name)) for name in frontier.EXPERIMENTS}
    tables = {name: frontier.table(t) for name, t in loaded.items()}
    assert all(t in text for t in tables.values())  # the section holds both tables
    return rows, loaded, tables, text, figures


def test_drift_table_is_each_algorithm_and_dataset_over_the_seeds_at_a_third_and_the_end(made_up):
    rows, _, tables, text, _ = made_up
    table = table_cells(tables["utility_frontier"])
    assert list(table) == entries("utility_frontier")  # every algorithm of the config, in its order
    for name, cells in table.items():
        want = []
        for panel in range(len(DATASETS)):
            for t in (2, ROUNDS):  # the evaluation nearest ROUNDS / 3, and the last
                mean, std = stats(rows["utility_frontier"], name, t, panel)
                want.append(f"{mean:.1f} ± {std:.1f}")
        assert cells == want, name
    header = [c.strip() for c in tables["utility_frontier"].splitlines()[0].strip("|").split("|")]
    assert header == ["algorithm", *(f"{d}, r{t}" for d in DATASETS for t in (2, ROUNDS))]
    assert "n = 2 seeds" in text and "123 s wall" in text


def test_compression_table_counts_the_bytes_of_every_round(made_up):
    rows, _, tables, text, figures = made_up
    table = table_cells(tables["compression_frontier"])
    assert list(table) == entries("compression_frontier")
    for name, cells in table.items():
        size = float(next(r for r in rows["compression_frontier"] if r["entry"] == name)["uploaded_bytes"])
        mean, std = stats(rows["compression_frontier"], name, ROUNDS)
        assert cells == [f"{mean:.1f} ± {std:.1f}", f"{size / 1e3:.1f}", f"{size * ROUNDS / 1e6:.2f}"]
    for png in (e.figure for e in frontier.EXPERIMENTS.values()):
        with open(os.path.join(figures, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"({os.path.relpath(os.path.join(figures, png))})" in text  # linked as from the README (the cwd)


def test_rounds_figure_draws_each_algorithm_s_seed_mean_with_a_std_band(made_up):
    rows, loaded, _, _, _ = made_up
    axes = [ax for ax in frontier.draw_rounds(loaded["utility_frontier"].summary).axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == list(DATASETS)
    for panel, ax in enumerate(axes):
        lines = {line.get_label(): line for line in ax.lines}
        assert list(lines) == entries("utility_frontier")
        for name, line in lines.items():
            want = np.array([stats(rows["utility_frontier"], name, t, panel) for t in EVALUATED])
            np.testing.assert_array_equal(line.get_xdata(), EVALUATED)
            np.testing.assert_allclose(line.get_ydata(), want[:, 0], atol=1e-3)  # summary.csv keeps 6 digits
        for band, name in zip(ax.collections, lines):  # the band spans mean ± std at every round
            want = np.array([stats(rows["utility_frontier"], name, t, panel) for t in EVALUATED])
            y = band.get_paths()[0].vertices[:, 1]
            np.testing.assert_allclose(
                [y.min(), y.max()], [(want[:, 0] - want[:, 1]).min(), want.sum(1).max()], atol=1e-3
            )


def test_bytes_figure_draws_accuracy_against_the_megabytes_uploaded_so_far_with_std_bars(made_up):
    rows, loaded, _, _, _ = made_up
    ax = frontier.draw_bytes(loaded["compression_frontier"].summary).axes[0]
    assert ax.get_xscale() == "log"
    assert [c.get_label() for c in ax.containers] == entries("compression_frontier")
    for container in ax.containers:
        name = container.get_label()
        size = float(next(r for r in rows["compression_frontier"] if r["entry"] == name)["uploaded_bytes"])
        want = np.array([stats(rows["compression_frontier"], name, t) for t in EVALUATED])
        line = container.lines[0]
        np.testing.assert_allclose(np.asarray(line.get_xdata(), float), [t * size / 1e6 for t in EVALUATED], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(line.get_ydata(), float), want[:, 0], atol=1e-3)
        bars = np.array([segment[:, 1] for segment in container.lines[2][0].get_segments()])  # [point, (low, high)]
        np.testing.assert_allclose(bars, np.stack([want[:, 0] - want[:, 1], want.sum(1)], 1), atol=1e-3)


def test_a_row_of_no_known_algorithm_and_a_missing_sweep_are_refused_before_anything_is_written(made_up, tmp_path):
    rows, _, _, _, _ = made_up
    row = dict(rows["utility_frontier"][0], **{"local.prox_mu": "0.5"})
    with pytest.raises(ValueError, match=r"matches none of \['fedavg', 'fedprox'"):
        frontier.chosen(row, frontier.choices("utility_frontier"))
    with pytest.raises(SystemExit, match="error: .* has no sweep.json"):
        frontier.main(["--workdir", str(tmp_path), "--figures", str(tmp_path / "figures")])
    assert not os.path.exists(tmp_path / "figures")


def _fedbuff_rounds(rows: list[dict], name: str) -> list[int]:
    return sorted({int(r["round"]) for r in rows if r["entry"] == name})


def test_fedbuff_table_is_each_buffer_s_end_and_first_time_at_the_target(made_up):
    rows, _, tables, _, _ = made_up
    table = table_cells(tables["fedbuff_frontier"])
    assert list(table) == entries("fedbuff_frontier")
    for name, cells in table.items():
        steps = _fedbuff_rounds(rows["fedbuff_frontier"], name)
        accuracy = np.array([stats(rows["fedbuff_frontier"], name, t)[0] for t in steps])
        times = [stats(rows["fedbuff_frontier"], name, t, metric="virtual_time") for t in steps]
        reached = [t for t, a in zip(steps, accuracy) if a >= frontier.TARGET]
        first = f"{times[steps.index(reached[0])][0]:.1f} (step {reached[0]})" if reached else "not reached"
        mean, std = stats(rows["fedbuff_frontier"], name, steps[-1])
        end_time = f"{times[-1][0]:.1f} ± {times[-1][1]:.1f}"
        assert cells == [str(steps[-1]), end_time, f"{mean:.1f} ± {std:.1f}", first], name


def test_fedbuff_figure_draws_accuracy_against_the_seed_mean_virtual_time(made_up):
    rows, loaded, _, _, _ = made_up
    ax = frontier.draw_virtual_time(loaded["fedbuff_frontier"].summary).axes[0]
    lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    assert list(lines) == entries("fedbuff_frontier")
    for name, line in lines.items():
        steps = _fedbuff_rounds(rows["fedbuff_frontier"], name)
        want_x = [stats(rows["fedbuff_frontier"], name, t, metric="virtual_time")[0] for t in steps]
        want_y = [stats(rows["fedbuff_frontier"], name, t)[0] for t in steps]
        np.testing.assert_allclose(np.asarray(line.get_xdata(), float), want_x, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(line.get_ydata(), float), want_y, atol=1e-3)

"""Sweeps: vmapped cells equal single runs, resume is byte-identical, bad grids are refused."""

from __future__ import annotations

import math
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from medfed_jax import config as config_lib
from medfed_jax import runner, sweep, tabular
from medfed_jax.config import split
from medfed_jax.server import build_engine
from medfed_jax.types import ClientData

SEEDS, LRS, NOISES, FRACTIONS = (0, 1), (0.05, 0.3), (0.1, 2.0), (0.0, 0.25)


def tiny_config():
    """4 synthetic clients, logistic model, central DP and a sign-flip attack: one small program."""
    cfg = config_lib.default_config()
    cfg.data.samples_per_client = 16
    cfg.model.name = "logistic"
    cfg.rounds, cfg.eval_every = 4, 2
    cfg.local.batch_size = 8
    cfg.client_parallelism = "vmap"
    cfg.baselines = ()
    cfg.aggregator.name = "mean"
    cfg.attack.name = "sign_flip"
    cfg.privacy.mode = "central"
    cfg.privacy.clip_norm = 1.0
    cfg.privacy.noise_multiplier = 0.5
    return cfg


def tiny_sweep():
    """16 cells (seed x client lr x noise multiplier x malicious fraction) in chunks of 4."""
    cfg = tiny_config()
    cfg.sweep.grid = {
        "seed": SEEDS,
        "local": {"lr": LRS},
        "privacy": {"noise_multiplier": NOISES},
        "attack": {"fraction": FRACTIONS},
    }
    cfg.sweep.chunk_size = 4
    return cfg


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted run of `tiny_sweep` in a workdir."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    return workdir, sweep.run_sweep(tiny_sweep(), workdir, log=None)


def test_plan_orders_cells_and_groups_programs():
    cfg = tiny_sweep()
    cfg.sweep.grid.aggregator = {"name": ("mean", "coordinate_median")}
    cfg.privacy.mode = "none"
    plan = sweep.plan_sweep(cfg)
    assert plan.knobs == ("aggregator.name", "attack.fraction", "local.lr", "privacy.noise_multiplier", "seed")
    assert len(plan.cells) == 2 * 16
    # Sorted knobs, the last varying fastest: cell 1 differs from cell 0 in its seed only.
    assert [c.values["seed"] for c in plan.cells[:3]] == [0, 1, 0]
    assert [p.structural for p in plan.programs] == [
        {"aggregator.name": "mean"},
        {"aggregator.name": "coordinate_median"},
    ]
    assert [len(p.cells) for p in plan.programs] == [16, 16]
    assert sweep.chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert sweep.chunk_bounds(9, 8) == [(0, 5), (5, 9)]  # two balanced chunks, not 8 + 1
    # Groups sharing a compiled program share its batch size: the one padding the fewest cells.
    assert sweep.shared_batch([15, 5, 15], 32) == 5  # 15 = 3 x 5: no padding, where 15 would pad 10
    assert sweep.shared_batch([15, 15, 14], 32) == 15
    assert sweep.shared_batch([40, 40], 32) == 20


def _alone(cell_values, base=tiny_config):
    """The cell's whole run as one un-vmapped program, built by the engine directly."""
    cfg = sweep.with_overrides(base(), cell_values)
    prepared = runner.prepare(cfg)
    engine = build_engine(split(cfg).static, prepared.context)
    train = ClientData(*map(jnp.asarray, prepared.dataset.train))
    test = ClientData(*map(jnp.asarray, prepared.dataset.test))
    return engine.program(cfg.seed, train, test, config_lib.split(cfg).hparams)


def test_each_vmapped_cell_equals_the_cell_run_alone(finished):
    _, result = finished
    worst = 0.0
    for cell in result.plan.cells:
        alone = _alone(cell.values)
        swept = result.histories[cell.index]
        assert set(swept) == set(alone)
        for name, value in alone.items():
            np.testing.assert_allclose(swept[name], np.asarray(value), rtol=1e-5, atol=1e-5, err_msg=name)
            worst = max(worst, float(np.max(np.abs(swept[name] - np.asarray(value)), initial=0.0)))
    print(f"largest |vmapped - alone| over every metric of every cell: {worst:g}")


@pytest.mark.parametrize("knob", ["local.lr", "privacy.noise_multiplier", "attack.fraction", "seed"])
def test_every_swept_knob_changes_the_result(finished, knob):
    """Cells that differ in one knob only must differ (so the equality above is not vacuous)."""
    _, result = finished
    cells = result.plan.cells
    for a in cells:
        b = next(
            c
            for c in cells
            if c.values[knob] != a.values[knob]
            and all(c.values[k] == a.values[k] for k in result.plan.knobs if k != knob)
        )
        assert not np.array_equal(
            result.histories[a.index]["global_pooled_loss"], result.histories[b.index]["global_pooled_loss"]
        )


def test_results_and_summary_tables(finished):
    workdir, result = finished
    rows = tabular.to_csv(result.rows)
    with open(os.path.join(workdir, "results.csv")) as f:
        assert f.read() == rows
    header = rows.splitlines()[0].split(",")
    assert header[:7] == ["cell", "attack.fraction", "local.lr", "privacy.noise_multiplier", "seed", "round", "epsilon"]
    assert "global_pooled_accuracy" in header and not any("[" in column for column in header)  # per-client: clients.csv
    assert len(result.rows) == 16 * 2  # cells x evaluations
    # One summary row per (knobs without seed, round), over the 2 seeds: mean, ddof-1 std, t-based CI.
    assert len(result.summary) == 8 * 2
    row = result.summary[-1]
    values = [
        float(r["global_pooled_accuracy"])
        for r in result.rows
        if all(r[k] == row[k] for k in ("attack.fraction", "local.lr", "privacy.noise_multiplier", "round"))
    ]
    assert len(values) == 2 and row["n"] == "2"
    mean, std = sum(values) / 2, abs(values[0] - values[1]) / math.sqrt(2)
    assert float(row["global_pooled_accuracy_mean"]) == pytest.approx(mean, rel=1e-5)
    assert float(row["global_pooled_accuracy_std"]) == pytest.approx(std, rel=1e-5, abs=1e-9)
    assert float(row["global_pooled_accuracy_ci95"]) == pytest.approx(
        12.7062047 * std / math.sqrt(2), rel=1e-5, abs=1e-9
    )
    assert scipy.stats.t.ppf(0.975, 1) == pytest.approx(12.7062047)


def test_per_client_values_are_long_and_their_summary_is_over_seeds(finished):
    workdir, result = finished
    with open(os.path.join(workdir, "clients.csv")) as f:
        assert f.read() == tabular.to_csv(result.client_rows)
    knobs = ["attack.fraction", "local.lr", "privacy.noise_multiplier", "seed"]
    assert list(result.client_rows[0]) == ["cell", *knobs, "round", "client", "metric", "value"]
    metrics = {r["metric"] for r in result.client_rows}
    assert "client_accuracy" in metrics
    # cells x evaluations x clients x per-client metrics: one row each, every history [C] value once
    per_client = {m for m, v in result.histories[0].items() if np.ndim(v) == 2 and v.shape[1] == 4}
    assert metrics == per_client and len(result.client_rows) == 16 * 2 * 4 * len(per_client)
    first = result.client_rows[0]
    history = result.histories[int(first["cell"])][first["metric"]]
    assert float(first["value"]) == float(np.float32(history[0][0]))
    with open(os.path.join(workdir, "clients_summary.csv")) as f:
        assert f.read() == tabular.to_csv(result.client_summary)
    assert len(result.client_summary) == 8 * 2 * 4 * len(per_client)  # groups (no seed) x evaluations x ...
    group = ("attack.fraction", "local.lr", "privacy.noise_multiplier", "round", "client", "metric")
    row = result.client_summary[-1]
    values = [float(r["value"]) for r in result.client_rows if all(r[k] == row[k] for k in group)]
    assert len(values) == 2 and row["n"] == "2"
    assert float(row["mean"]) == pytest.approx(np.mean(values), rel=1e-5)
    assert float(row["std"]) == pytest.approx(np.std(values, ddof=1), rel=1e-5, abs=1e-9)


def test_epsilon_column_matches_the_accountant(finished):
    _, result = finished
    from medfed_jax import privacy

    for r in result.rows[:4]:
        cfg = sweep.with_overrides(tiny_config(), {"privacy.noise_multiplier": float(r["privacy.noise_multiplier"])})
        # 4 clients, all in every round: Poisson(1.0)-composed Gaussian, one step per round.
        expected = privacy.epsilon(cfg.privacy.noise_multiplier, 1.0, int(r["round"]), cfg.privacy.delta)
        assert float(r["epsilon"]) == pytest.approx(expected, rel=1e-6)


def interrupt_after(workdir: str, chunks: int) -> None:
    """Run `tiny_sweep` into ``workdir`` and kill it (KeyboardInterrupt) once ``chunks`` chunks are computed."""

    def crash(k):
        if k == chunks:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(tiny_sweep(), workdir, log=None, on_chunk=crash)


def test_resume_after_an_interruption_is_byte_identical(finished, tmp_path):
    reference, _ = finished
    workdir = str(tmp_path)
    interrupt_after(workdir, chunks=2)
    assert len(os.listdir(os.path.join(workdir, "chunks"))) == 2
    with open(os.path.join(workdir, "results.csv")) as f:
        assert len(f.read().splitlines()) == 1 + 8 * 2  # header + the 8 finished cells x 2 evaluations
    computed = []
    sweep.run_sweep(tiny_sweep(), workdir, log=None, on_chunk=computed.append)
    assert computed == [1, 2]  # only the two missing chunks ran
    for name in (*sweep.FILES, "sweep.json"):
        with open(os.path.join(workdir, name), "rb") as a, open(os.path.join(reference, name), "rb") as b:
            assert a.read() == b.read(), name


def test_resume_after_a_crash_mid_append_is_byte_identical(finished, tmp_path):
    """A kill while appending leaves a torn last line in results.csv and a stale summary.csv; both are rebuilt."""
    reference, _ = finished
    workdir = str(tmp_path)
    interrupt_after(workdir, chunks=3)
    with open(os.path.join(workdir, "results.csv")) as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 + 12 * 2  # the header, then 3 chunks' rows appended as they finished
    with open(os.path.join(workdir, "results.csv"), "a") as f:
        f.write(lines[-1][: len(lines[-1]) // 2])  # torn: half a row, no newline
    sweep.run_sweep(tiny_sweep(), workdir, log=None)
    for name in sweep.FILES:
        with open(os.path.join(workdir, name), "rb") as a, open(os.path.join(reference, name), "rb") as b:
            assert a.read() == b.read(), name


def test_sweep_logs_its_size_and_cost_first_then_compiles_and_chunks_with_an_eta():
    lines = []
    sweep.run_sweep(tiny_sweep(), log=lines.append)
    cost = sweep.sweep_cost(tiny_sweep(), sweep.plan_sweep(tiny_sweep()))
    # 16 cells of 4 rounds in one program; compiles overlap the runs, the first one does not.
    assert (cost.cells, cost.programs, cost.cell_rounds) == (16, 1, 64)
    assert cost.seconds == max(sweep.NOMINAL_COMPILE_S, sweep.NOMINAL_COMPILE_S + 64 / (250.0 * cost.workers))
    assert lines[0].startswith("[sweep] 16 cells, 1 compiled program(s), 64 cell-rounds; estimated")
    assert "estimate" in lines[0]
    program_lines = [i for i, line in enumerate(lines) if line.startswith("[sweep] program 1/1 ")]
    chunk_lines = [i for i, line in enumerate(lines) if line.startswith("[sweep] cells ")]
    assert len(program_lines) == 1 and len(chunk_lines) == 4 and program_lines[0] < chunk_lines[0]
    assert all("cell-rounds/s per chunk" in lines[i] and " ETA " in lines[i] for i in chunk_lines)


def test_eta_counts_the_cells_not_yet_recorded_at_the_measured_chunk_rate():
    """10 chunks of 10 cells x 10 rounds, 2 at once; chunk time 2 s each (no clock involved)."""
    program = types.SimpleNamespace(
        engine="engine",
        train=None,
        test=None,
        switch_index={},
        split_index=None,
        rounds=(5, 10),
        spec=sweep.ProgramSpec({}, tuple(range(100))),
    )
    chunks = [sweep.Chunk(program, lo, lo + 10, 10, None) for lo in range(0, 100, 10)]
    progress = sweep.Progress(chunks, start=0.0, workers=2)
    for chunk in chunks[:3]:
        progress.ran(chunk, 2.0)  # 100 cell-rounds in 2 s: 0.02 s per cell-round
    progress.recorded(chunks[0])
    # Ran but not yet recorded still count as left (the main loop had fallen behind: 'ETA 0m00s' at 14%).
    assert progress.eta() == pytest.approx(9 * 100 * 0.02 / 2)
    for chunk in chunks[1:9]:
        progress.ran(chunk, 2.0)
        progress.recorded(chunk)
    assert progress.eta() == pytest.approx(100 * 0.02 / 1)  # the last chunk runs alone
    progress.compiles_done, progress.programs = 1, 3  # two compiles of 30 s each still to come
    progress.stats.update(compiled=1, compile_s=30.0)
    assert progress.eta() == pytest.approx(60.0)


def test_large_sweeps_are_refused_before_loading_data_unless_allowed(monkeypatch):
    monkeypatch.setattr(sweep.progress, "MAX_CELLS", 15)  # tiny_sweep has 16 cells

    def no_data(*args):
        raise AssertionError("data loaded before the size check")

    monkeypatch.setattr(sweep.prepare.data_lib, "load_dataset", no_data)
    with pytest.raises(ValueError, match=r"^the sweep is large: 16 cells.*limits are 15 cells.*--allow_large_sweep"):
        sweep.prepare_sweep(tiny_sweep())
    monkeypatch.undo()
    monkeypatch.setattr(sweep.progress, "MAX_PROGRAMS", 0)
    with pytest.raises(ValueError, match=r"1 compiled program\(s\).*limits are .* 0 compiled programs"):
        sweep.prepare_sweep(tiny_sweep())
    assert len(sweep.prepare_sweep(tiny_sweep(), allow_large=True).plan.cells) == 16


def _sweep_with(**fields):
    cfg = tiny_config()
    for key, value in fields.items():
        cfg.sweep[key] = value
    return cfg


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"grid": {"local": {"lrr": (0.1,)}}}, "'local.lrr' is unknown.*'local.lr'"),
        ({"grid": {"seed": ()}}, r"sweep.grid.seed is empty"),
        ({"chunk_size": 2}, "the sweep is empty"),
        ({"grid": {"local": {"steps": (1, 2)}}, "numeric": ("local.steps",)}, "local.steps is structural"),
        ({"grid": {"local": {"lr": ("fast",)}}}, "numeric knob"),
        ({"grid": {"local": {"lr": 0.1}}}, "must be a list or tuple"),
        ({"cells": [{"seed": 1}], "grid": {"seed": (0,)}}, "in both sweep.cells and sweep.grid"),
        ({"cells": [{"seed": 1}, {"seed": 1}]}, "cells 0 and 1 are identical"),
        ({"cells": [{"method": "centralised"}]}, "choose from"),
        ({"grid": {"seed": (0,)}, "chunks": 3}, "unknown fields"),
        ({"grid": {"local": {"steps": (1, 2)}}, "switch": ("local.steps",)}, "only .* can be switched"),
        ({"grid": {"seed": (0, 1)}, "switch": ("attack.name",)}, "does not vary"),
        ({"grid": {"seed": (0, 1)}, "switch": "attack.name"}, "must be a tuple of knobs"),
    ],
)
def test_grid_errors_name_the_problem(fields, message):
    with pytest.raises(ValueError, match=message):
        sweep.plan_sweep(_sweep_with(**fields))


def test_seeds_flag_adds_an_axis_and_conflicts_with_a_seed_knob():
    cfg = _sweep_with(grid={"local": {"lr": (0.1, 0.2)}})
    cfg.seed = 7
    plan = sweep.plan_sweep(cfg, num_seeds=3)
    assert [c.values["seed"] for c in plan.cells] == [7, 8, 9, 7, 8, 9]
    with pytest.raises(ValueError, match="--seeds=3 conflicts"):
        sweep.plan_sweep(_sweep_with(grid={"seed": (0, 1)}), num_seeds=3)


def test_bad_cell_values_are_refused_before_compiling():
    cfg = _sweep_with(cells=[{"attack.fraction": 0.25}, {"attack.fraction": 1.5}])
    with pytest.raises(ValueError, match=r"sweep cell 1 \(attack.fraction=1.5\): attack.fraction=1.5"):
        sweep.prepare_sweep(cfg)
    cfg = _sweep_with(cells=[{"aggregator.name": "coordinate_median"}])
    with pytest.raises(ValueError, match="privacy.mode='central' with aggregator.name='coordinate_median'"):
        sweep.prepare_sweep(cfg)


def matrix_sweep(switch=None):
    """2 aggregators x 2 attacks x 2 seeds, no DP: 4 structural groups."""
    cfg = tiny_config()
    cfg.privacy.mode = "none"
    cfg.attack.fraction = 0.25
    cfg.sweep.grid = {
        "aggregator": {"name": ("mean", "coordinate_median")},
        "attack": {"name": ("sign_flip", "ipm")},
        "seed": SEEDS,
    }
    if switch is not None:
        cfg.sweep.switch = switch
    return cfg


def test_switched_matrix_compiles_once_and_each_cell_equals_the_cell_run_alone():
    """Aggregator and attack picked at run time: one program, every cell as if run by its own engine."""
    switched = sweep.plan_sweep(matrix_sweep())
    assert switched.switches == (
        ("aggregator.name", ("mean", "coordinate_median")),
        ("attack.name", ("sign_flip", "ipm")),
    )
    assert (len(switched.programs), switched.num_compiled) == (4, 1)
    assert sweep.plan_sweep(matrix_sweep(switch=())).num_compiled == 4  # opt out: one program per choice
    result = sweep.run_sweep(matrix_sweep(), log=None)
    assert result.programs_compiled <= 1  # 0 when an earlier test compiled the same program
    finals = set()
    for cell in result.plan.cells:
        alone = _alone(cell.values, matrix_sweep)
        swept = result.histories[cell.index]
        for name, value in alone.items():
            np.testing.assert_allclose(swept[name], np.asarray(value), rtol=1e-5, atol=1e-5, err_msg=name)
        finals.add(float(swept["global_pooled_loss"][-1]))
    assert len(finals) == len(result.plan.cells)  # every aggregator x attack x seed differs


def test_incremental_tables_equal_a_full_rebuild(finished):
    """Cells arriving in any order, a few at a time, give the tables rebuilt from scratch."""
    _, result = finished
    prepared = sweep.prepare_sweep(tiny_sweep())
    tables = sweep.Tables(prepared.plan, prepared.programs)
    order = sorted(result.histories, reverse=True)
    for start in range(0, len(order), 3):
        tables.add({i: result.histories[i] for i in order[start : start + 3]})
    rows = sweep.result_rows(prepared.plan, prepared.programs, result.histories)
    assert tables.rows() == rows
    assert tabular.to_csv(tables.summary()) == tabular.to_csv(sweep.summary_rows(prepared.plan, rows))
    client_rows = sweep.client_rows(prepared.plan, prepared.programs, result.histories)
    assert tables.client_rows() == client_rows
    rebuilt = sweep.client_summary_rows(prepared.plan, rows, client_rows)
    assert tabular.to_csv(tables.client_summary()) == tabular.to_csv(rebuilt)

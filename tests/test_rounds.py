"""One meaning of ``rounds``: every path trains exactly ``rounds`` rounds and evaluates at the same rounds.

For rounds in {1, 3, 7, 10, 25} x eval_every in {1, 5, 10}, the single run
(`runner.train_method`) and the seed-vmapped run (`runner.run_seeds`), and for
13 of these 15 the whole-run program (`Engine.program`) or a sweep (one
compile per combination), then resume and the CLI are checked
against an independent reference: a plain Python loop of ``engine.round_step``
called once per round, evaluated after every round. The schedule is computed
here as ``sorted(set(range(e, r + 1, e)) | {r})``, the central-DP epsilon with
`dp_accounting` directly. The model is tiny, and configs that differ only in
``rounds``/``eval_every`` share the compiled round functions (one compile for
every chunk length), so the whole file compiles about two dozen small programs.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from medfed_jax import cli, runner, sweep
from medfed_jax import config as config_lib
from medfed_jax.config import split
from medfed_jax.server import build_engine

logging.getLogger("absl").setLevel(logging.ERROR)  # RDP order warnings

ROUNDS, EVERY = (1, 3, 7, 10, 25), (1, 5, 10)
COMBOS = [(r, e) for r in ROUNDS for e in EVERY]
SEEDS = (3, 4)
NOISE, DELTA = 0.5, 1e-5
# Float32 paths (plain loop, host chunks, vmapped seeds, scanned program) differ by rounding only.
# Each round is non-expansive (a gradient step at lr 0.2 on a convex loss of curvature < 10, then a
# clip to norm 1 and fixed noise), so the per-round error of a few ulp adds up to < 25 * 1e-6 of O(1)
# values after 25 rounds. The reference's consecutive rounds differ by far more than these tolerances
# (checked in `reference`), so a round too many or too few fails.
RTOL, ATOL = 1e-4, 1e-5
COMPARED = ("global_pooled_loss", "train_loss", "update_norm")


def schedule(rounds: int, every: int) -> list[int]:
    return sorted(set(range(every, rounds + 1, every)) | {rounds})


def reference_epsilon(rounds: int) -> float:
    """Central DP, every client every round: ``rounds`` compositions of the Gaussian of multiplier NOISE."""
    return rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(NOISE), rounds).get_epsilon(DELTA)


def tiny_config(rounds: int = 25, every: int = 5):
    """3 random clients, logistic model, one local step per round (fixed batch), central DP."""
    cfg = config_lib.default_config()
    cfg.data.num_clients, cfg.data.samples_per_client, cfg.data.num_classes = 3, 16, 3
    cfg.model.name = "logistic"
    cfg.local.epochs, cfg.local.steps, cfg.local.sampling, cfg.local.batch_size = 0, 1, "fixed", 4
    cfg.local.lr = 0.2
    cfg.client_parallelism = "vmap"
    cfg.baselines = ()
    cfg.aggregator.name = "mean"
    cfg.privacy.mode, cfg.privacy.accountant = "central", "rdp"
    cfg.privacy.clip_norm, cfg.privacy.noise_multiplier, cfg.privacy.delta = 1.0, NOISE, DELTA
    cfg.rounds, cfg.eval_every, cfg.seed = rounds, every, SEEDS[0]
    cfg.data.seed = 0  # one pinned split: the reference loop trains every seed on the prepared dataset
    return cfg


@pytest.fixture(scope="module")
def prepared_by_combo():
    cache = {}

    def get(rounds, every):
        if (rounds, every) not in cache:
            cache[rounds, every] = runner.prepare(tiny_config(rounds, every))
        return cache[rounds, every]

    return get


@pytest.fixture(scope="module")
def reference(prepared_by_combo):
    """seed -> metric -> ``[max(ROUNDS) + 1]`` values after each number of rounds (index 0 unused)."""
    prepared = prepared_by_combo(max(ROUNDS), 1)
    engine = build_engine(split(prepared.cfg).static, prepared.context)
    train, test, knobs = prepared.dataset.train, prepared.dataset.test, prepared.hparams
    out = {}
    for seed in SEEDS:
        state = engine.init(np.uint32(seed), train, knobs)
        values = {k: [math.nan] for k in COMPARED}
        for _ in range(max(ROUNDS)):
            state, metrics = engine.round_step(state, train, knobs)
            metrics = {**metrics, **engine.evaluate(engine.eval_params(state, train, knobs), test)}
            for k in COMPARED:
                values[k].append(float(metrics[k]))
        assert int(state.round) == max(ROUNDS)
        out[seed] = {k: np.asarray(v) for k, v in values.items()}
        # one round more or less is visible in at least one compared metric, far beyond the tolerance
        gaps = np.max([np.abs(np.diff(v[1:])) / (ATOL + RTOL * np.abs(v[2:])) for v in out[seed].values()], axis=0)
        assert gaps.min() > 100, gaps.min()
    return out


def expect(reference, seed, rounds, every, got: dict, where: str) -> None:
    """``got[metric]`` (one value per evaluation) equals the reference at the schedule's rounds."""
    at = schedule(rounds, every)
    for k in COMPARED:
        np.testing.assert_allclose(
            got[k], reference[seed][k][at], rtol=RTOL, atol=ATOL, err_msg=f"{where} {k} rounds={rounds} every={every}"
        )


def test_eval_rounds_is_the_schedule():
    for rounds, every in COMBOS + [(12, 4), (13, 4), (2, 3)]:
        assert list(runner.eval_rounds(rounds, every)) == schedule(rounds, every)


@pytest.mark.parametrize("rounds,every", COMBOS)
def test_single_run_trains_rounds_and_evaluates_on_schedule(rounds, every, prepared_by_combo, reference):
    rows = runner.train_method("federated", prepared_by_combo(rounds, every), seed=SEEDS[0], log=None)
    assert [r["round"] for r in rows] == schedule(rounds, every)
    expect(reference, SEEDS[0], rounds, every, {k: [r[k] for r in rows] for k in COMPARED}, "train_method")
    for row in rows:
        assert row["epsilon"] == pytest.approx(reference_epsilon(row["round"]), rel=1e-6)
        assert row["diverged"] == 0.0
    assert all(0 < a <= b for a, b in zip([r["elapsed_s"] for r in rows], [r["elapsed_s"] for r in rows[1:]]))


@pytest.mark.parametrize("rounds,every", COMBOS)
def test_seeds_train_rounds_and_evaluate_on_schedule(rounds, every, prepared_by_combo, reference):
    history = runner.run_seeds(prepared_by_combo(rounds, every), "federated", list(SEEDS))
    for s, seed in enumerate(SEEDS):
        assert history["global_pooled_loss"].shape == (len(SEEDS), len(schedule(rounds, every)))
        expect(reference, seed, rounds, every, {k: history[k][s] for k in COMPARED}, "run_seeds")


# A whole-run program compiles per (rounds, eval_every): the program and sweep paths share out the
# combinations (13 of the 15, every kind: fewer rounds than eval_every, a remainder, an exact multiple).
PROGRAM_COMBOS = [(1, 1), (1, 10), (10, 5), (10, 10)]
SWEEP_ROUNDS = (3, 7, 25)


@pytest.mark.parametrize("rounds,every", PROGRAM_COMBOS)
def test_program_trains_rounds_and_evaluates_on_schedule(rounds, every, prepared_by_combo, reference):
    prepared = prepared_by_combo(rounds, every)
    engine = build_engine(split(prepared.cfg).static, prepared.context)
    history = engine.program(np.uint32(SEEDS[1]), prepared.dataset.train, prepared.dataset.test, prepared.hparams)
    expect(reference, SEEDS[1], rounds, every, {k: np.asarray(history[k]) for k in COMPARED}, "program")


def test_sweep_over_rounds_and_eval_every(reference):
    cfg = tiny_config()
    cfg.sweep.grid = {"rounds": SWEEP_ROUNDS, "eval_every": EVERY, "seed": (SEEDS[0],)}
    result = sweep.run_sweep(cfg, log=None)
    assert len(result.plan.cells) == len(SWEEP_ROUNDS) * len(EVERY)
    for cell in result.plan.cells:
        rounds, every = cell.values["rounds"], cell.values["eval_every"]
        rows = [r for r in result.rows if r["cell"] == str(cell.index)]
        assert [int(r["round"]) for r in rows] == schedule(rounds, every)
        for row in rows:
            assert float(row["epsilon"]) == pytest.approx(reference_epsilon(int(row["round"])), rel=1e-6)
            assert row["diverged"] == "0.0"
        expect(reference, SEEDS[0], rounds, every, result.histories[cell.index], "sweep")


@pytest.mark.parametrize("seed_axis", [False, True])
def test_resume_trains_the_remaining_rounds(seed_axis, tmp_path, prepared_by_combo, reference):
    prepared, checkpoint = prepared_by_combo(7, 5), str(tmp_path / "checkpoint.npz")
    seeds = list(SEEDS) if seed_axis else [SEEDS[0]]

    def killed_after_first_chunk(line):
        if "round" in line and "/7" in line:
            raise KeyboardInterrupt

    def run(log):
        return runner.train_evaluations("federated", prepared, seeds, seed_axis, checkpoint, log)

    with pytest.raises(KeyboardInterrupt):
        run(killed_after_first_chunk)
    lines = []
    evaluations = run(lines.append)
    assert any("resumed" in line and "round 5" in line for line in lines)
    assert sum("/7" in line for line in lines) == 1  # only the last chunk (2 rounds) is trained again
    assert [e.round for e in evaluations] == [5, 7]
    history = runner.stack_evaluations(evaluations)
    for s, seed in enumerate(seeds):
        expect(reference, seed, 7, 5, {k: history[k][s] for k in COMPARED}, "resumed")


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("num_seeds", [1, 2])
def test_cli_reports_the_rounds_trained(num_seeds, tmp_path, capsys, prepared_by_combo, reference):
    prepared, workdir = prepared_by_combo(7, 5), str(tmp_path)
    if num_seeds == 1:
        cli.run_single(prepared, workdir)
    else:
        cli.run_many_seeds(prepared, workdir, num_seeds)
    out = capsys.readouterr().out.splitlines()
    assert sum("compiled in" in line for line in out) == 1
    progress = [line for line in out if line.startswith("[federated] round")]
    assert [line.split()[2] for line in progress] == ["5/7", "7/7"]  # a line per evaluation chunk
    assert all("rounds/s" in line and "ETA" in line for line in progress)
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["rounds"] == 7
    assert summary["privacy"]["epsilon"] == pytest.approx(reference_epsilon(7), rel=1e-6)
    assert summary["privacy"]["steps"] == 7
    assert "7 rounds" in "\n".join(out)
    rows = _csv(os.path.join(workdir, "history.csv"))
    assert [int(r["round"]) for r in rows] == [5, 7] * num_seeds
    assert all(float(r["elapsed_s"]) > 0 for r in rows) and all(r["diverged"] == "0.0" for r in rows)
    for seed in SEEDS[:num_seeds]:
        mine = [r for r in rows if r.get("seed", str(seed)) == str(seed)]
        expect(reference, seed, 7, 5, {k: [float(r[k]) for r in mine] for k in COMPARED}, "cli")
        assert [float(r["epsilon"]) for r in mine] == pytest.approx([reference_epsilon(5), reference_epsilon(7)])


@pytest.mark.parametrize("field,value", [("rounds", 0), ("rounds", -3), ("eval_every", 0)])
def test_rounds_and_eval_every_below_one_are_refused_before_compiling(field, value, forbid_compile):
    cfg = tiny_config()
    cfg[field] = value
    # 0 fails the run-settings bound, a negative value already the integer-range check of every field.
    with pytest.raises(ValueError, match=f"{field}={value!r} (must be an integer >= 1|is out of range)"):
        runner.prepare(cfg)

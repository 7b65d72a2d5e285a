"""Sweep throughput: the robustness matrix as a vmapped sweep vs loops of single-run calls.

The matrix: 6 aggregators x 6 attacks x malicious fractions {0.1, 0.2, 0.3} x
5 seeds = 540 cells, 100 rounds each, digits over 20 Dirichlet(0.5) clients
(`configs/robustness_matrix.py`). Timed in the same run:

- *sweep*: `medfed_jax.sweep.run_sweep`, compile included: ONE program with
  the aggregator and the attack as run-time switches, the 15 cells of each
  (aggregator, attack) vmapped, one chunk per core at once;
- *sweep, one program per (aggregator, attack)*: the same with
  ``sweep.switch = ()`` (the earlier design), on the loop's subset;
- *CLI per cell*: ``python -m medfed_jax --config=configs/digits_dirichlet.py
  --config.<knob>=...`` in a fresh process per cell, the way a shell loop
  over the grid would run it;
- *in-process loop*: every cell as its own single-run call in one process,
  ``runner.train_method('federated', runner.prepare(cell_config))``; the
  engine cache compiles each (aggregator, attack) once, as a careful user's
  Python loop over this library would.

All but the sweep run a subset of the cells (``--loop_programs``
(aggregator, attack) pairs spread over the matrix, 15 cells each;
``--cli_cells`` cells for the CLI) and are extrapolated to the whole matrix by
cell count; the output says so. Every loop cell's final accuracy is checked
against the sweep's.

``--compare=devices`` instead times the ways a sweep uses the devices
(``--sweep_devices``, `medfed_jax.sweep.Execution`: ``cells`` split over the
devices, ``threads`` of one-device chunks, ``clients`` split over the devices)
on the same matrix, interleaved in one process (A B A B ...): every mode's
sweep is prepared and compiled once, then each pass runs every mode's whole
sweep in turn (`medfed_jax.sweep.run_prepared`, compile excluded). The table
gives the median seconds, cells/s, and the median and min-max of the per-pass
ratios ``threads / mode``; every mode's histories must equal the first mode's
bit for bit. On a CPU the host has one device per core (``MEDFED_JAX_DEVICES``).

    python benchmarks/sweep_throughput.py                      # writes benchmarks/sweep_results.md
    python benchmarks/sweep_throughput.py --rounds=20 --loop_programs=1 --cli_cells=1 --out=/tmp/quick.md
    python benchmarks/sweep_throughput.py --compare=devices    # writes benchmarks/sweep_devices.md
    python benchmarks/sweep_throughput.py --compare=devices --aggregators=1 --attacks=1 --rounds=2 --passes=2
"""

from __future__ import annotations

import datetime
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags

from medfed_jax import report, runner, sweep, tabular
from medfed_jax.server import build_engine

AGGREGATORS = ("mean", "coordinate_median", "trimmed_mean", "krum", "geometric_median", "centered_clipping")
ATTACKS = ("sign_flip", "ipm", "alie", "gaussian", "scaling", "label_flip")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ROUNDS = flags.DEFINE_integer("rounds", 100, "Rounds per cell.")
_LOOP_PROGRAMS = flags.DEFINE_integer("loop_programs", 3, "(aggregator, attack) pairs whose cells the loops run.")
_CLI_CELLS = flags.DEFINE_integer("cli_cells", 3, "Cells run through the CLI, one process each.")
_COMPARE = flags.DEFINE_enum(
    "compare", "loops", ["loops", "devices"], "The sweep against loops, or the sweep's device modes against each other."
)
_MODES = flags.DEFINE_list("modes", [], "--compare=devices: the modes to time (default: all the devices allow).")
_PASSES = flags.DEFINE_integer("passes", 5, "--compare=devices: interleaved passes.")
_AGGREGATORS = flags.DEFINE_integer("aggregators", len(AGGREGATORS), "The matrix's first N aggregators.")
_ATTACKS = flags.DEFINE_integer("attacks", len(ATTACKS), "The matrix's first N attacks.")
_OUT = flags.DEFINE_string(
    "out", None, "Markdown results file (default: benchmarks/sweep_results.md, or sweep_devices.md for devices)."
)


def matrix_config(rounds: int):
    path = os.path.join(ROOT, "configs", "robustness_matrix.py")
    names, attacks = AGGREGATORS[: _AGGREGATORS.value], ATTACKS[: _ATTACKS.value]
    return runpy.run_path(path)["matrix_config"](names, attacks, rounds=rounds)


def submatrix_flags() -> str:
    """``--aggregators``/``--attacks`` as given, when not the whole matrix."""
    given = ((_AGGREGATORS, len(AGGREGATORS)), (_ATTACKS, len(ATTACKS)))
    return "".join(f" --{flag.name}={flag.value}" for flag, whole in given if flag.value != whole)


def matrix_line(total: int) -> str:
    """What the matrix is and where it ran."""
    return (
        f"{_AGGREGATORS.value} aggregators x {_ATTACKS.value} attacks x fractions {{0.1, 0.2, 0.3}} x 5 seeds = "
        f"{total} cells, {_ROUNDS.value} rounds each, digits over 20 Dirichlet(0.5) clients. "
        f"{datetime.date.today().isoformat()}, {report.machine()}, {len(jax.devices())} "
        f"{jax.default_backend()} device(s)"
    )


def spread(programs: tuple, k: int) -> list:
    """``k`` programs spread over the matrix, each with another aggregator and attack."""
    step = len(programs) // k
    return [programs[(i * step + i) % len(programs)] for i in range(k)]


def clear_compiled() -> None:
    """Empty every compilation cache, so that nothing compiled before counts."""
    jax.clear_caches()
    build_engine.cache_clear()
    sweep.PROGRAMS.clear()


def time_loop(cfg, plan: sweep.Plan, cells: list[int], result: sweep.SweepResult) -> tuple[float, float]:
    """Each cell as one single-run call in this process: (seconds, largest |final accuracy - sweep's|)."""
    clear_compiled()
    start, gap = time.perf_counter(), 0.0
    for index in cells:
        prepared = runner.prepare(sweep.with_overrides(cfg, plan.cells[index].values))
        history = runner.train_method("federated", prepared, log=None)
        gap = max(
            gap,
            abs(history[-1]["global_pooled_accuracy"] - float(result.histories[index]["global_pooled_accuracy"][-1])),
        )
    return time.perf_counter() - start, gap


def time_per_choice_sweep(cfg, plan: sweep.Plan, cells: list[int], result) -> tuple[float, float]:
    """The sweep of ``cells`` with ``sweep.switch = ()``: one compiled program per (aggregator, attack)."""
    clear_compiled()
    subset = cfg.copy_and_resolve_references()
    subset.sweep = ml_collections.ConfigDict({"cells": [plan.cells[i].values for i in cells], "switch": ()})
    start = time.perf_counter()
    own = sweep.run_sweep(subset, log=None)
    seconds = time.perf_counter() - start
    gap = max(
        abs(
            float(own.histories[j]["global_pooled_accuracy"][-1])
            - float(result.histories[i]["global_pooled_accuracy"][-1])
        )
        for j, i in enumerate(cells)
    )
    return seconds, gap


def time_cli(plan: sweep.Plan, cells: list[int], result: sweep.SweepResult) -> tuple[float, float]:
    """Each cell as its own ``python -m medfed_jax`` process: (seconds, largest accuracy gap)."""
    start, gap = time.perf_counter(), 0.0
    for index in cells:
        values = plan.cells[index].values
        overrides = [f"--config.{k}={v}" for k, v in values.items()]
        with tempfile.TemporaryDirectory() as workdir:
            subprocess.run(
                [sys.executable, "-m", "medfed_jax", "--config=configs/digits_dirichlet.py", f"--workdir={workdir}"]
                + [f"--config.rounds={_ROUNDS.value}", "--config.aggregator.f=4", "--config.baselines=()", *overrides],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            with open(os.path.join(workdir, "summary.json")) as f:
                accuracy = json.load(f)["final"]["federated"]["global_pooled_accuracy_mean"]
        gap = max(gap, abs(accuracy - float(result.histories[index]["global_pooled_accuracy"][-1])))
    return time.perf_counter() - start, gap


def difference(a: sweep.SweepResult, b: sweep.SweepResult) -> str:
    """'bit for bit' when every metric of every cell is equal (nan where nan), else the largest |a - b|."""
    assert a.histories.keys() == b.histories.keys()
    pairs = [(a.histories[i][k], b.histories[i][k]) for i in a.histories for k in a.histories[i]]
    if all(np.array_equal(x, y, equal_nan=True) for x, y in pairs):
        return "bit for bit"
    gaps = [np.where(np.isnan(x) & np.isnan(y), 0.0, np.nan_to_num(np.abs(x - y), nan=np.inf)) for x, y in pairs]
    return f"largest abs difference {max(float(np.max(g, initial=0.0)) for g in gaps):.1e}"


def compare_devices() -> str:
    """The sweep in every mode, interleaved; a markdown section."""
    load_before = os.getloadavg()[0]
    cfg = matrix_config(_ROUNDS.value)
    modes = _MODES.value or list(sweep.allowed_sweep_devices())
    prepared = {mode: sweep.prepare_sweep(cfg, sweep_devices=mode) for mode in modes}
    first = {mode: sweep.run_prepared(p, log=None) for mode, p in prepared.items()}  # compiles every mode's program
    equal = {mode: difference(first[modes[0]], result) for mode, result in first.items()}
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(_PASSES.value):
        for mode in modes:
            start = time.perf_counter()
            sweep.run_prepared(prepared[mode], log=None)
            seconds[mode].append(time.perf_counter() - start)
    total = len(first[modes[0]].histories)
    reference = "threads" if "threads" in modes else modes[0]
    table = [
        f"| mode | how | s (median) | cells/s | {reference} / mode (min-max) | compile s | vs {modes[0]} |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in modes:
        ratios = [r / t for r, t in zip(seconds[reference], seconds[mode])]
        median = statistics.median(seconds[mode])
        table.append(
            f"| {mode} | {prepared[mode].run_on.describe()} | {median:.2f} | {total / median:.1f} | "
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{first[mode].compile_seconds:.1f} | {equal[mode]} |"
        )
    command = (
        f"python benchmarks/sweep_throughput.py --compare=devices --rounds={_ROUNDS.value} --passes={_PASSES.value}"
        f"{submatrix_flags()}" + (f" --modes={','.join(_MODES.value)}" if _MODES.value else "")
    )
    return "\n".join(
        [
            "## Sweep devices: cells over devices vs threads vs clients (`benchmarks/sweep_throughput.py`)",
            "",
            f"{matrix_line(total)}; 1-minute load average {load_before:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end. Each mode's sweep compiled once, then {_PASSES.value} "
            "interleaved passes of the whole sweep per mode (compile excluded).",
            "",
            f"Command: `{command}`",
            "",
            *table,
        ]
    )


def compare_loops() -> str:
    """The sweep against a CLI and an in-process loop over cells; a markdown section."""
    load_before = os.getloadavg()[0]
    cfg = matrix_config(_ROUNDS.value)
    clear_compiled()
    start = time.perf_counter()
    result = sweep.run_sweep(cfg, log=print)  # parsing, data, validation, compile and run
    sweep_seconds = time.perf_counter() - start
    plan, total = result.plan, len(result.plan.cells)
    subset = spread(plan.programs, _LOOP_PROGRAMS.value)
    loop_cells = [i for spec in subset for i in spec.cells]
    run_on = sweep.execution().describe()
    rows = [
        (
            f"sweep: 1 program, aggregator and attack switched at run time, {run_on}",
            total,
            sweep_seconds,
            "all cells",
        )
    ]
    gaps = []
    for name, timer, cells in (
        (
            "sweep, one program per (aggregator, attack) (`sweep.switch = ()`)",
            lambda c: time_per_choice_sweep(cfg, plan, c, result),
            loop_cells,
        ),
        ("CLI per cell (a fresh process each)", lambda c: time_cli(plan, c, result), loop_cells[: _CLI_CELLS.value]),
        ("in-process loop of single-run calls", lambda c: time_loop(cfg, plan, c, result), loop_cells),
    ):
        seconds, gap = timer(cells)
        gaps.append(gap)
        print(f"[{name}] {len(cells)} cells in {seconds:.1f}s; largest |final accuracy - sweep's| = {gap:.2g}")
        rows.append((name, len(cells), seconds, f"{len(cells)} cells timed, x{total / len(cells):.0f}"))
    pairs = ", ".join(f"{s.structural['aggregator.name']} x {s.structural['attack.name']}" for s in subset)
    table = [
        "| way | cells timed | wall (s) | whole matrix (s) | cells/s | sweep is x faster | extrapolation |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, cells, seconds, how in rows:
        whole = seconds * total / cells
        table.append(
            f"| {name} | {cells} | {seconds:.1f} | {whole:.0f} | {total / whole:.2f} | {whole / sweep_seconds:.1f} "
            f"| {how} |"
        )
    return "\n".join(
        [
            "## Sweep throughput: robustness matrix (`benchmarks/sweep_throughput.py`)",
            "",
            f"{matrix_line(total)}; 1-minute load average {load_before:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end.",
            "",
            f"Command: `python benchmarks/sweep_throughput.py --rounds={_ROUNDS.value} "
            f"--loop_programs={_LOOP_PROGRAMS.value} --cli_cells={_CLI_CELLS.value}{submatrix_flags()}`",
            "",
            *table,
            "",
            f"Sweep: {result.programs_compiled} program compiled in {result.compile_seconds:.0f}s, {total} cells "
            f"run in {result.run_seconds:.0f}s of chunk time ({run_on}), wall {sweep_seconds:.0f}s "
            "(parsing, data loading and validating every cell included, as for the loops). "
            f"The other rows ran the cells of {len(subset)} (aggregator, attack) pairs ({pairs}); the CLI the "
            f"first {_CLI_CELLS.value} of them; all extrapolated by cell count. Every cell they ran ends with the "
            f"sweep's final test accuracy (largest difference {max(gaps):.1g}).",
        ]
    )


def main(argv):
    del argv
    text = compare_loops() if _COMPARE.value == "loops" else compare_devices()
    name = "sweep_results.md" if _COMPARE.value == "loops" else "sweep_devices.md"
    tabular.write_text_atomic(_OUT.value or os.path.join(ROOT, "benchmarks", name), text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    app.run(main)

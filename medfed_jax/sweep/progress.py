"""What a sweep costs before it runs (`SweepCost`, the size refusal) and how far it is while it runs (`Progress`).

The estimate is nominal (`NOMINAL_COMPILE_S`, `NOMINAL_CELL_ROUNDS_PER_S`);
the progress lines' rate and ETA come from measured chunk times only.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import TYPE_CHECKING, Any

from medfed_jax.sweep.devices import execution
from medfed_jax.sweep.plan import Plan, format_value, label_knobs

if TYPE_CHECKING:
    from medfed_jax.sweep.execute import Chunk

# The cost estimate printed before compiling (nominal: measured on a 2-core AMD EPYC with the digits
# robustness matrix, benchmarks/sweep_results.md: 23 s to compile, 54,000 cell-rounds in 205 s of chunk time).
NOMINAL_COMPILE_S = 20.0  # per compiled program
NOMINAL_CELL_ROUNDS_PER_S = 250.0  # per running chunk; bigger models and datasets run slower
MAX_CELLS, MAX_PROGRAMS = 20_000, 100  # larger sweeps run only with allow_large (--allow_large_sweep)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@dataclasses.dataclass(frozen=True)
class SweepCost:
    """What a sweep will take, before compiling: its size, and a nominal estimate of its wall time.

    Compiles run one at a time on a background thread while compiled
    programs' chunks run (``workers`` one-device chunks' worth at once,
    `Execution.parallel`), so the estimate is the longer of the two, plus the
    first compile that nothing overlaps.
    """

    cells: int
    programs: int
    cell_rounds: int
    workers: int

    @property
    def compile_seconds(self) -> float:
        return self.programs * NOMINAL_COMPILE_S

    @property
    def run_seconds(self) -> float:
        return self.cell_rounds / (NOMINAL_CELL_ROUNDS_PER_S * self.workers)

    @property
    def seconds(self) -> float:
        return max(self.compile_seconds, NOMINAL_COMPILE_S + self.run_seconds)

    @property
    def large(self) -> bool:
        return self.cells > MAX_CELLS or self.programs > MAX_PROGRAMS

    def describe(self) -> str:
        return (
            f"{self.cells} cells, {self.programs} compiled program(s), {self.cell_rounds} cell-rounds; estimated "
            f"~{format_duration(self.seconds)} (an estimate from nominal rates: {NOMINAL_COMPILE_S:g}s per compile, "
            f"{NOMINAL_CELL_ROUNDS_PER_S:g} cell-rounds/s per one-device chunk, {self.workers} at once; "
            "bigger models and datasets are slower)"
        )


def sweep_cost(cfg: Any, plan: Plan, workers: int | None = None) -> SweepCost:
    """`SweepCost` of a parsed sweep (no data loaded): each cell trains its ``rounds`` (a knob, or the config's);
    ``workers`` one-device chunks' worth at once (default: the default `execution`'s `Execution.parallel`)."""
    cell_rounds = sum(int(c.values.get("rounds", cfg.rounds)) for c in plan.cells)
    return SweepCost(len(plan.cells), plan.num_compiled, cell_rounds, workers or execution().parallel)


def check_size(cost: SweepCost, allow_large: bool) -> None:
    """Refuse a sweep above `MAX_CELLS` cells or `MAX_PROGRAMS` compiled programs unless ``allow_large``."""
    if cost.large and not allow_large:
        raise ValueError(
            f"the sweep is large: {cost.describe()}; the limits are {MAX_CELLS} cells and {MAX_PROGRAMS} compiled "
            "programs. Rerun with --allow_large_sweep (Python: allow_large=True) to run it anyway, or shrink "
            "sweep.grid / sweep.cells."
        )


class Progress:
    """Timings of a sweep's compiles and chunks, and its log lines.

    Rates and the ETA come from measured chunk times only (compiling
    excluded): seconds of chunk time per cell-round, over the chunks run so
    far, times the cell-rounds not yet recorded, divided by the chunks that
    run at once; never less than the compiles still to come.
    """

    def __init__(self, todo: list[Chunk], start: float, workers: int):
        self.start, self.todo, self.workers = start, todo, workers
        self.programs = len({c.compile_key for c in todo})
        self.stats = {"compiled": 0, "compile_s": 0.0, "run_s": 0.0, "cells": 0, "cell_rounds": 0}
        self.compiles_done = 0
        self.left = {"chunks": len(todo), "cell_rounds": sum(_cell_rounds(c) for c in todo)}
        self.lock = threading.Lock()

    def compiled(self, chunk: Chunk, seconds: float, fresh: bool) -> str:
        """Record a finished compile (main thread); its log line."""
        self.compiles_done += 1
        self.stats["compiled"] += fresh
        self.stats["compile_s"] += seconds * fresh
        how = f"compiled in {seconds:.1f}s" if fresh else "already compiled in this process"
        return f"[sweep] program {self.compiles_done}/{self.programs} {how}  | {chunk.program.spec.label()}"

    def ran(self, chunk: Chunk, seconds: float) -> None:
        """Record a chunk's run (run threads)."""
        with self.lock:
            self.stats["run_s"] += seconds
            self.stats["cells"] += chunk.stop - chunk.start
            self.stats["cell_rounds"] += _cell_rounds(chunk)

    def recorded(self, chunk: Chunk) -> None:
        """A chunk's results are saved (main thread)."""
        self.left["chunks"] -= 1
        self.left["cell_rounds"] -= _cell_rounds(chunk)

    def eta(self) -> float:
        with self.lock:
            per_cell_round = self.stats["run_s"] / max(self.stats["cell_rounds"], 1)
        at_once = max(1, min(self.workers, self.left["chunks"]))
        mean_compile = self.stats["compile_s"] / max(self.stats["compiled"], 1)
        compile_left = (self.programs - self.compiles_done) * mean_compile
        return max(self.left["cell_rounds"] * per_cell_round / at_once, compile_left)

    def line(self, chunk: Chunk, done: int, total: int) -> str:
        now = time.perf_counter()
        with self.lock:
            rate = self.stats["cell_rounds"] / max(self.stats["run_s"], 1e-9)
        specs = list({id(c.program): c.program.spec for c in self.todo}.values())
        rows = [{key: format_value(v) for key, v in p.structural.items()} for p in specs]
        shown = label_knobs(rows, list(chunk.program.spec.structural))
        return (
            f"[sweep] cells {done}/{total}  {rate:.0f} cell-rounds/s per chunk ({self.workers} at once)  "
            f"elapsed {format_duration(now - self.start)}  ETA {format_duration(self.eta())}  "
            f"| {chunk.program.spec.label(shown)}"
        )


def _cell_rounds(chunk: Chunk) -> int:
    """Rounds the chunk's cells train in all (the last evaluation is the last round)."""
    return (chunk.stop - chunk.start) * max(chunk.program.rounds, default=0)

"""Running a prepared sweep: compiled programs (`ProgramCache`), chunks, workers, chunk files for resume.

Programs compile in order on a background thread (`ProgramCache.compile`:
the engine's whole-run program vmapped over a chunk's cells); chunks run as
their programs become ready, on the devices of the sweep's `Execution`; each
finished chunk is saved as ``chunks/<hash>.json`` (`chunk_key`) so that a
sweep started again recomputes only the missing chunks.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medfed_jax import config as config_lib
from medfed_jax import mesh as mesh_lib
from medfed_jax import runner, tabular
from medfed_jax.server import Engine, Switches
from medfed_jax.sweep.devices import Execution
from medfed_jax.sweep.plan import Cell, Plan, ProgramSpec, canonical, numeric_knobs
from medfed_jax.sweep.prepare import PreparedProgram, PreparedSweep, prepare_sweep
from medfed_jax.sweep.progress import Progress
from medfed_jax.sweep.tables import TableFiles, Tables
from medfed_jax.types import ClientData

AUTO_CHUNK = {"cpu": 32}  # cells per chunk and device when chunk_size = 0; accelerators: 256
AUTO_CHUNK_DEFAULT = 256
CHUNK_DIR = "chunks"


def chunk_bounds(num_cells: int, chunk_size: int) -> list[tuple[int, int]]:
    """Balanced ``[start, stop)`` chunks of at most ``chunk_size`` cells."""
    num_chunks = -(-num_cells // chunk_size)
    size = -(-num_cells // num_chunks)
    return [(s, min(s + size, num_cells)) for s in range(0, num_cells, size)]


def effective_chunk_size(plan: Plan, devices: int = 1) -> int:
    """``plan.chunk_size``, or when it is 0 the backend's automatic size for each of the ``devices`` a chunk is
    split over (`Execution.parallel` in ``cells`` mode)."""
    return plan.chunk_size or AUTO_CHUNK.get(jax.default_backend(), AUTO_CHUNK_DEFAULT) * devices


def vmapped_program(program: Callable, cells: jax.sharding.Mesh | None = None, own_splits: bool = False) -> Callable:
    """The program vmapped over cells: seeds and hparams batched, switch indices (choices) shared, data shared
    (or batched too: ``own_splits``, each cell its own split); with a ``cells`` mesh, the cells split over its
    devices (`medfed_jax.mesh.over_cells`)."""
    data = 0 if own_splits else None
    in_axes = (0, data, data, 0, None)
    batched = jax.vmap(program, in_axes=in_axes)
    return jax.jit(batched) if cells is None else mesh_lib.over_cells(batched, cells, in_axes)


def _spec_of(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


class ProgramCache:
    """Compiled whole-run programs vmapped over cells, each compiled once (`compile`); `clear` empties it.

    A program is keyed by everything its executable depends on: the engine,
    the batch, the data's shapes and placement, the switched knobs, the
    ``cells`` mesh and whether cells bring their own splits. `PROGRAMS`, the
    default of `run_prepared`, lives as long as the process, so a later sweep
    reuses what an earlier one compiled.
    """

    def __init__(self) -> None:
        self._compiled: dict[tuple, Any] = {}

    def compile(
        self,
        engine: Engine,
        batch: int,
        train_spec: ClientData,
        test_spec: ClientData,
        switched: tuple[str, ...] = (),
        cells: jax.sharding.Mesh | None = None,
        own_splits: bool = False,
    ) -> tuple[Any, bool]:
        """The engine's whole-run program vmapped over ``batch`` cells, compiled; and whether it was compiled now.

        ``switched``: knobs the program reads as shared int32 switch indices;
        ``cells``: a mesh the cells are split over (``batch`` a multiple of its
        size); ``own_splits``: the data specs are ``[S, ...]`` stacks of splits
        and the program takes ``batch`` of them, one per cell.
        """
        key = (engine, batch, train_spec, test_spec, switched, cells, own_splits)
        if key in self._compiled:
            return self._compiled[key], False
        seeds = jax.ShapeDtypeStruct((batch,), jnp.uint32)
        hparams = config_lib.filled_hparams(jax.ShapeDtypeStruct((batch,), jnp.float32))
        choices = config_lib.Choices(*(jax.ShapeDtypeStruct((), jnp.int32) for _ in config_lib.Choices._fields))
        if own_splits:
            train_spec, test_spec = (
                jax.tree.map(lambda a: jax.ShapeDtypeStruct((batch, *a.shape[1:]), a.dtype), spec)
                for spec in (train_spec, test_spec)
            )
        program = vmapped_program(engine.program, cells, own_splits)
        self._compiled[key] = program.lower(seeds, train_spec, test_spec, hparams, choices).compile()
        return self._compiled[key], True

    def clear(self) -> None:
        self._compiled.clear()


PROGRAMS = ProgramCache()  # the process's compiled programs (`run_prepared`'s default)


def run_chunk(program: PreparedProgram, start: int, stop: int, batch: int, compiled: Any) -> dict[str, np.ndarray]:
    """Histories of the program's cells ``[start, stop)``, padded to ``batch`` with the last cell (dropped)."""
    take = np.minimum(np.arange(start, start + batch), stop - 1)
    hparams = jax.tree.map(lambda v: v[take], program.hparams)
    choices = config_lib.Choices.of(program.switch_index)
    train, test = program.train, program.test
    if program.split_index is not None:  # each cell's own split, gathered from the host stacks
        train, test = (type(d)(*(np.asarray(a)[program.split_index[take]] for a in d)) for d in (train, test))
    history = jax.device_get(compiled(program.seeds[take], train, test, hparams, choices))
    return {k: np.asarray(v)[: stop - start] for k, v in history.items()}


def chunk_key(
    cfg_json: str,
    spec: ProgramSpec,
    cells: Sequence[Cell],
    batch: int,
    switches: Switches = (),
    layout: tuple = (),
) -> str:
    """A stable hash naming a chunk: the base config, its program and switches, its cells and batch size, and
    ``layout`` (`Execution.layout`: how the devices split it, () for one device)."""
    payload = json.dumps(
        [
            cfg_json,
            canonical(list(spec.structural.items())),
            [canonical(list(c.values.items())) for c in cells],
            batch,
            *([canonical(list(switches))] if switches else []),
            *([list(layout)] if layout else []),
        ]
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def save_chunk(path: str, cells: Sequence[int], history: dict[str, np.ndarray]) -> None:
    payload = {"cells": list(cells), "history": {k: v.astype(np.float64).tolist() for k, v in history.items()}}
    tabular.write_text_atomic(path, json.dumps(payload))


def load_chunk(path: str) -> tuple[list[int], dict[str, np.ndarray]]:
    """A saved chunk's cells and histories; `runner.CorruptFile` naming the file and the remedy if unreadable."""
    try:
        with open(path) as f:
            payload = json.load(f)
        return payload["cells"], {k: np.asarray(v, np.float32) for k, v in payload["history"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise runner.CorruptFile(
            f"{path} is corrupt (truncated or not a chunk of this sweep: {error}); delete it to recompute that "
            "chunk, or rerun with --overwrite."
        ) from error


@dataclasses.dataclass
class SweepResult:
    """What a sweep produced: the plan, per-cell histories and the four tables (`medfed_jax.sweep.tables`)."""

    plan: Plan
    histories: dict[int, dict[str, np.ndarray]]
    rows: list[dict]  # results.csv
    summary: list[dict]  # summary.csv
    client_rows: list[dict]  # clients.csv
    client_summary: list[dict]  # clients_summary.csv
    programs_compiled: int
    compile_seconds: float
    run_seconds: float
    seconds: float


@dataclasses.dataclass(frozen=True)
class Chunk:
    program: PreparedProgram
    start: int
    stop: int
    batch: int
    path: str | None

    @property
    def cells(self) -> tuple[int, ...]:
        return self.program.spec.cells[self.start : self.stop]

    @property
    def compile_key(self) -> tuple:
        """What the chunk's compiled program depends on (`ProgramCache.compile`'s arguments but the padding):
        chunks with equal keys share one compile."""
        program = self.program
        own_splits = program.split_index is not None  # host stacks of splits: shapes only, placed by the program
        spec = (lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)) if own_splits else _spec_of
        train, test = spec(program.train), spec(program.test)
        return (program.engine, self.batch, train, test, tuple(program.switch_index), own_splits)


def _metadata(cfg: Any, plan: Plan, programs: Sequence[PreparedProgram]) -> dict:
    return {
        "name": cfg.name,
        "knobs": list(plan.knobs),
        "numeric_knobs": [k for k in plan.knobs if k in numeric_knobs()],
        "structural_knobs": list(plan.structural),
        "switched_knobs": list(plan.switched),
        "cells": len(plan.cells),
        "compiled_programs": plan.num_compiled,
        "privacy": " | ".join(dict.fromkeys(p.privacy_note for p in programs if p.privacy_note)),
        "programs": [
            {"structural": canonical(p.spec.structural), "cells": len(p.spec.cells), "clients": list(p.client_names)}
            for p in programs
        ],
    }


def shared_batch(sizes: Sequence[int], chunk_size: int) -> int:
    """One batch size for groups of ``sizes`` cells that share a compiled program.

    Among the groups' own chunk sizes, the one that pads the fewest cells (the
    larger on a tie): groups of 5 and 15 cells run as chunks of 5, not 15.
    """
    natural = {hi - lo for n in sizes for lo, hi in chunk_bounds(n, chunk_size)[:1]}
    padded = lambda b: sum(-(-n // b) * b for n in sizes)  # noqa: E731
    return min(natural, key=lambda b: (padded(b), -b))


def _chunks(
    cfg: Any, plan: Plan, programs: Sequence[PreparedProgram], chunk_dir: str | None, run_on: Execution
) -> list[Chunk]:
    """Every chunk of every program, in program order; programs sharing a compiled one share its batch size."""
    cfg_json = config_lib.to_json(cfg)
    sizes: dict[Engine, list[int]] = {}
    for program in programs:
        sizes.setdefault(program.engine, []).append(len(program.spec.cells))
    chunk_size = effective_chunk_size(plan, run_on.split)
    batches = {engine: shared_batch(n, chunk_size) for engine, n in sizes.items()}
    chunks = []
    for program in programs:
        batch = batches[program.engine]
        for lo, hi in chunk_bounds(len(program.spec.cells), batch):
            cells = [plan.cells[i] for i in program.spec.cells[lo:hi]]
            name = f"{chunk_key(cfg_json, program.spec, cells, batch, plan.switches, run_on.layout)}.json"
            chunks.append(Chunk(program, lo, hi, batch, os.path.join(chunk_dir, name) if chunk_dir else None))
    return chunks


def _compile_job(chunk: Chunk, run_on: Execution, cache: ProgramCache) -> tuple[Any, float, bool]:
    """(compiled program, seconds, whether it was compiled now rather than found)."""
    start = time.perf_counter()
    engine, batch, train, test, switched, own_splits = chunk.compile_key
    compiled, fresh = cache.compile(engine, run_on.padded(batch), train, test, switched, run_on.cell_mesh(), own_splits)
    return compiled, time.perf_counter() - start, fresh


def run_sweep(
    cfg: Any,
    workdir: str | None = None,
    num_seeds: int = 1,
    log: Callable[[str], None] | None = print,
    on_chunk: Callable[[int], None] | None = None,
    allow_large: bool = False,
    sweep_devices: str | None = None,
) -> SweepResult:
    """Run every cell of ``cfg.sweep`` (`prepare_sweep`, then `run_prepared`)."""
    return run_prepared(prepare_sweep(cfg, num_seeds, allow_large, sweep_devices), workdir, log, on_chunk)


def run_prepared(
    prepared: PreparedSweep,
    workdir: str | None = None,
    log: Callable[[str], None] | None = print,
    on_chunk: Callable[[int], None] | None = None,
    cache: ProgramCache = PROGRAMS,
) -> SweepResult:
    """Run a prepared sweep chunk by chunk; see `medfed_jax.sweep`'s docstring.

    With a ``workdir``, finished chunks found there are reused and every new
    chunk is saved, its rows appended to ``results.csv`` (`TableFiles`).
    Programs compile in order on a background thread; chunks run as their
    programs become ready, on the devices of ``prepared.run_on``
    (`Execution`). The log gets the sweep's size and estimated cost first,
    then a line per compiled program and per chunk (with an ETA from the
    measured chunk times). ``on_chunk(k)`` is called after
    the k-th chunk computed in this call (tests use it to simulate a crash);
    chunks still running when it raises are dropped, not saved. ``cache``: where compiled programs are
    found and kept (default: the process's `PROGRAMS`).
    """
    start = time.perf_counter()
    plan, programs = prepared.plan, prepared.programs
    chunk_dir = os.path.join(workdir, CHUNK_DIR) if workdir else None
    if workdir:
        os.makedirs(chunk_dir, exist_ok=True)
        meta = json.dumps(_metadata(prepared.cfg, plan, programs), indent=2)
        tabular.write_text_atomic(os.path.join(workdir, "sweep.json"), meta)
    histories: dict[int, dict[str, np.ndarray]] = {}
    todo = []
    for chunk in _chunks(prepared.cfg, plan, programs, chunk_dir, prepared.run_on):
        if chunk.path and os.path.exists(chunk.path):
            cells, history = load_chunk(chunk.path)
            histories.update({i: {k: v[j] for k, v in history.items()} for j, i in enumerate(cells)})
        else:
            todo.append(chunk)

    tables = Tables(plan, programs)
    tables.add(histories)
    files = TableFiles(workdir, tables) if workdir else None
    run_on = prepared.run_on
    workers = run_on.workers
    if log:
        log(f"[sweep] {prepared.cost.describe()}")
        log(
            f"[sweep] {len(plan.cells)} cells in {len(programs)} group(s), {plan.num_compiled} compiled program(s)"
            + (f" switching {', '.join(plan.switched)} at run time" if plan.switches else "")
            + f"; {len(histories)} cells already done, {len(todo)} chunk(s) to run (chunk size "
            f"{effective_chunk_size(plan, run_on.split)}; {run_on.describe()})"
        )
    if files:
        files.rewrite()
    progress = Progress(todo, start, workers)
    compile_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    run_pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
        compiles: dict[concurrent.futures.Future, Chunk] = {}
        by_key: dict[tuple, concurrent.futures.Future] = {}
        for chunk in todo:
            key = chunk.compile_key
            if key not in by_key:
                by_key[key] = compile_pool.submit(_compile_job, chunk, run_on, cache)
                compiles[by_key[key]] = chunk
        runs = {
            run_pool.submit(_run_job, chunk, run_on.padded(chunk.batch), by_key[chunk.compile_key], progress): chunk
            for chunk in todo
        }
        pending, computed = {*compiles, *runs}, 0
        while pending:
            finished, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in sorted(finished, key=lambda f: f not in compiles):  # compile lines first
                if future in compiles:
                    line = progress.compiled(compiles[future], *future.result()[1:])
                    if log:
                        log(line)
                    continue
                chunk, history = runs[future], future.result()
                new = {i: {key: v[j] for key, v in history.items()} for j, i in enumerate(chunk.cells)}
                histories.update(new)
                rows, client_rows = tables.add(new)
                if chunk.path:
                    save_chunk(chunk.path, chunk.cells, history)
                if files:
                    files.append(rows, client_rows)
                progress.recorded(chunk)
                if log:
                    log(progress.line(chunk, len(histories), len(plan.cells)))
                computed += 1
                if on_chunk:
                    on_chunk(computed)
    finally:
        run_pool.shutdown(wait=True, cancel_futures=True)
        compile_pool.shutdown(wait=True, cancel_futures=True)
    if files and todo:
        files.rewrite()
    seconds = time.perf_counter() - start
    stats = progress.stats
    if log:
        log(
            f"[sweep] done: {len(plan.cells)} cells; {stats['compiled']} program(s) compiled in "
            f"{stats['compile_s']:.1f}s on a background thread, {stats['cells']} cells run in {stats['run_s']:.1f}s "
            f"of chunk time ({run_on.describe()}); wall {seconds:.1f}s"
        )
    return SweepResult(
        plan,
        histories,
        tables.rows(),
        tables.summary(),
        tables.client_rows(),
        tables.client_summary(),
        stats["compiled"],
        stats["compile_s"],
        stats["run_s"],
        seconds,
    )


def _run_job(
    chunk: Chunk, batch: int, compile_future: concurrent.futures.Future, progress: Progress
) -> dict[str, np.ndarray]:
    """Wait for the chunk's program, run the chunk as ``batch`` cells, record the timings."""
    compiled, _, _ = compile_future.result()
    t0 = time.perf_counter()
    history = run_chunk(chunk.program, chunk.start, chunk.stop, batch, compiled)
    progress.ran(chunk, time.perf_counter() - t0)
    return history

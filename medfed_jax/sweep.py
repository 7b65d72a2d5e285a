"""What-if sweeps: many runs as few compiled programs, with tidy results and resume.

A config declares its sweep in ``cfg.sweep``:

- ``grid``: knob -> list of values, nested like the config
  (``{'seed': (0, 1, 2), 'local': {'lr': (0.01, 0.1)}}``); the cells are the
  outer product (knobs in sorted order, the last one varying fastest);
- ``cells``: a list of dicts of dotted knobs (``{'attack.name': 'none'}``),
  each one cell; with a ``grid`` too, every listed cell is crossed with it;
- ``numeric`` (optional): knobs that must ride the vmapped experiment axis; a
  structural knob listed here is refused (a guard for sweeps meant to compile once);
- ``chunk_size``: cells per vmapped call, 0 = automatic.

A knob is a config field (``'local.lr'``), ``'seed'`` (the run seed) or
``'method'`` (`medfed_jax.runner.METHODS`: ``'federated'``, the default, the
baselines ``'local_only'`` and ``'pooled'``, and the personalised methods).
`variant_cells` turns whole configs into cells (e.g. one per dataset).

**Numeric knobs** (traced into the program; sweeping them never recompiles):
``seed`` and `medfed_jax.config.numeric_fields`: ``local.lr``,
``local.momentum``, ``local.prox_mu``, ``server.lr``/``momentum``/``b1``/``b2``/
``eps``, ``aggregator.nu``/``tau``/``clip_tau``, ``attack.fraction`` (the
malicious mask is drawn inside the program) and the attack strengths
(``scale``, ``eps``, ``z``, ``sigma``, ``gamma``), ``privacy.noise_multiplier``,
``clip_norm`` and the adaptive-clipping rates, ``personalization.ditto_lambda``
and ``alpha``. The cells of one structural combination run as ``vmap`` of the
whole multi-round program over a leading experiment axis, in chunks of
``chunk_size`` cells; each cell's result equals the cell run alone (bitwise on
a CPU in `tests/test_sweep.py`).

**Structural knobs** (everything else) change shapes or code: ``method``,
``aggregator.name``/``f``/``pre``, ``attack.name``, ``privacy.mode``, the
model, every ``data.*`` field (dataset, client count, partition, its seed),
``local.epochs``/``steps``/``batch_size``/``optimizer`` (loop lengths and batch
shapes), ``rounds``, ``eval_every``, ``cohort_size``. Each combination compiles
one program, reused for all its numeric cells; the next program compiles on a
background thread while the current one runs. On a CPU, compiling (~15 s a
program) dominates: vmapping does not speed up the cells themselves there,
it saves the compiles a loop over seeds would make (`benchmarks/sweep_results.md`).

Results (workdir): ``results.csv``, one row per cell x evaluation (every knob
a column, then ``round``, ``epsilon`` for private runs, the metrics and
per-client metrics ``<metric>[<client>]``); ``summary.csv``, the same over
seeds (mean, sample std, t-based 95% confidence half-width, n); both rebuilt
atomically after every chunk. Each chunk's histories are kept in
``chunks/<hash>.json`` (a hash of the chunk's cells), so a sweep killed at any
point and started again recomputes only the missing chunks and ends with
byte-identical CSVs.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import difflib
import functools
import hashlib
import io
import itertools
import json
import math
import os
import runpy
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.stats

from medfed_jax import baselines, privacy, runner
from medfed_jax import config as config_lib
from medfed_jax import data as data_lib
from medfed_jax.server import Engine
from medfed_jax.types import ClientData, FederatedDataset

SWEEP_FIELDS = ("grid", "cells", "numeric", "chunk_size")
SPECIAL_KNOBS = ("seed", "method")
AUTO_CHUNK = {"cpu": 32}  # cells per chunk when chunk_size = 0; accelerators: 256
AUTO_CHUNK_DEFAULT = 256
CHUNK_DIR = "chunks"
COMPILE_WORKERS = 1  # programs compiled on background threads while the current one runs


def numeric_knobs() -> tuple[str, ...]:
    """Knobs that ride the experiment axis: ``seed`` and every traced config field."""
    return ("seed", *config_lib.numeric_fields())


def is_sweep(cfg: Any) -> bool:
    """Whether a config declares a sweep (a non-empty ``cfg.sweep``)."""
    return "sweep" in cfg and len(cfg.sweep) > 0


# --------------------------------------------------------------------------- parsing


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a sweep: ``values`` holds every swept knob."""

    index: int
    values: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """One structural combination: a compiled program and the cells it runs."""

    structural: dict[str, Any]
    cells: tuple[int, ...]

    def label(self, knobs: Sequence[str] | None = None) -> str:
        """``knob=value`` of the structural knobs (of ``knobs`` only, when given)."""
        shown = self.structural if knobs is None else {k: self.structural[k] for k in knobs}
        return " ".join(f"{k}={format_value(v)}" for k, v in shown.items()) or "(single program)"


@dataclasses.dataclass(frozen=True)
class Plan:
    """A parsed sweep: knob columns, cells in order, programs, chunk size."""

    knobs: tuple[str, ...]
    cells: tuple[Cell, ...]
    programs: tuple[ProgramSpec, ...]
    chunk_size: int

    @property
    def structural(self) -> tuple[str, ...]:
        return tuple(k for k in self.knobs if k not in numeric_knobs())


def flatten(mapping: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested or dotted mapping -> ``{'section.field': value}`` (insertion order)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _leaf_paths(cfg: Any, prefix: str = "") -> list[str]:
    paths = []
    for key, value in cfg.items():
        if key == "sweep":
            continue
        if isinstance(value, ml_collections.ConfigDict):
            paths.extend(_leaf_paths(value, f"{prefix}{key}."))
        else:
            paths.append(f"{prefix}{key}")
    return paths


def _check_knob(cfg: Any, knob: str) -> None:
    if knob in SPECIAL_KNOBS:
        return
    paths = _leaf_paths(cfg)
    if knob not in paths:
        close = difflib.get_close_matches(knob, [*paths, *SPECIAL_KNOBS], n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"sweep knob {knob!r} is unknown: it is not a config field (like 'local.lr'), 'seed' or 'method'.{hint}"
        )


def _check_value(knob: str, value: Any) -> None:
    where = f"sweep knob {knob!r} has value {value!r}"
    if knob == "seed":
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**32:
            raise ValueError(f"{where}: seeds must be integers in [0, 2**32).")
    elif knob == "method":
        if value not in runner.METHODS:
            raise ValueError(f"{where}: choose from {runner.METHODS}.")
    elif knob in numeric_knobs():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{where}: {knob} is a numeric knob; give numbers.")


def _values_list(knob: str, values: Any) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(
            f"sweep.grid.{knob}={values!r} must be a list or tuple of values (e.g. (0.01, 0.1)); "
            "use sweep.cells for one-off settings."
        )
    if len(values) == 0:
        raise ValueError(f"sweep.grid.{knob} is empty: give at least one value, or remove the knob.")
    return list(values)


def _base_value(cfg: Any, knob: str) -> Any:
    if knob == "seed":
        return cfg.seed
    if knob == "method":
        return "federated"
    return config_lib.get_path(cfg, knob)


def _canonical(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def format_value(value: Any) -> str:
    """A knob value as written in the CSVs (strings bare, numbers by repr, sequences as JSON)."""
    value = _canonical(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return json.dumps(value)
    return repr(value)


def _raw_sweep(cfg: Any, num_seeds: int) -> tuple[list[dict], dict[str, list], tuple[str, ...], int]:
    sweep = cfg.sweep.to_dict() if isinstance(cfg.sweep, ml_collections.ConfigDict) else dict(cfg.sweep)
    unknown = [k for k in sweep if k not in SWEEP_FIELDS]
    if unknown:
        raise ValueError(
            f"cfg.sweep has unknown fields {unknown}; a sweep has {SWEEP_FIELDS} "
            "(knobs go inside sweep.grid, e.g. sweep.grid = {'local': {'lr': (0.01, 0.1)}})."
        )
    grid = {k: _values_list(k, v) for k, v in flatten(sweep.get("grid") or {}).items()}
    cells = sweep.get("cells") or []
    if isinstance(cells, Mapping) or not isinstance(cells, Sequence):
        raise ValueError(f"sweep.cells must be a list of dicts of knobs, got {type(cells).__name__}.")
    cells = [flatten(c) if isinstance(c, Mapping) else c for c in cells]
    bad = [c for c in cells if not isinstance(c, dict)]
    if bad:
        raise ValueError(f"sweep.cells entries must be dicts of knobs like {{'attack.name': 'none'}}; got {bad[0]!r}.")
    if num_seeds > 1:
        if "seed" in grid or any("seed" in c for c in cells):
            raise ValueError(f"--seeds={num_seeds} conflicts with the sweep's own 'seed' knob; drop one of them.")
        grid["seed"] = [cfg.seed + s for s in range(num_seeds)]
    if not grid and not cells:
        raise ValueError(
            "the sweep is empty: cfg.sweep declares no grid values and no cells. Add e.g. "
            "sweep.grid = {'seed': (0, 1, 2)} or sweep.cells = [{'local.lr': 0.1}], or remove cfg.sweep."
        )
    numeric = tuple(sweep.get("numeric") or ())
    chunk_size = sweep.get("chunk_size", 0)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(f"sweep.chunk_size={chunk_size!r} must be 0 (automatic) or a positive integer.")
    return cells, grid, numeric, chunk_size


def _check_declared_numeric(declared: tuple[str, ...], knobs: tuple[str, ...]) -> None:
    for knob in declared:
        if knob not in knobs:
            raise ValueError(f"sweep.numeric lists {knob!r}, which the sweep does not vary; remove it.")
        if knob not in numeric_knobs():
            raise ValueError(
                f"sweep.numeric lists {knob!r}, but {knob} is structural: it changes the shapes or the code "
                "of the compiled program (loop lengths, array shapes, which functions run), so it cannot "
                "ride the vmapped experiment axis. Remove it from sweep.numeric: as a grid knob it compiles "
                f"one program per value. Numeric knobs: {', '.join(numeric_knobs())}."
            )


def plan_sweep(cfg: Any, num_seeds: int = 1) -> Plan:
    """Parse and check ``cfg.sweep`` (no data, no compile); ``num_seeds > 1`` adds a seed axis."""
    cells, grid, declared, chunk_size = _raw_sweep(cfg, num_seeds)
    knobs: list[str] = []
    for entry in cells:
        knobs.extend(k for k in entry if k not in knobs)
    for knob in grid:
        if knob in knobs:
            raise ValueError(f"sweep knob {knob!r} is in both sweep.cells and sweep.grid; keep it in one.")
        knobs.append(knob)
    for knob in knobs:
        _check_knob(cfg, knob)
    knobs = tuple(knobs)
    _check_declared_numeric(declared, knobs)
    base = {k: _base_value(cfg, k) for k in knobs}
    combos = list(itertools.product(*grid.values()))
    values = [{**base, **entry, **dict(zip(grid, combo))} for entry in (cells or [{}]) for combo in combos]
    seen: dict[str, int] = {}
    for i, v in enumerate(values):
        for knob in knobs:
            _check_value(knob, v[knob])
        key = json.dumps([_canonical(v[k]) for k in knobs])
        if key in seen:
            raise ValueError(f"sweep cells {seen[key]} and {i} are identical ({v}); list each cell once.")
        seen[key] = i
    structural = [k for k in knobs if k not in numeric_knobs()]
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(json.dumps([_canonical(v[k]) for k in structural]), []).append(i)
    programs = tuple(ProgramSpec({k: values[idx[0]][k] for k in structural}, tuple(idx)) for idx in groups.values())
    return Plan(knobs, tuple(Cell(i, v) for i, v in enumerate(values)), programs, chunk_size)


def _determined(rows: Sequence[Mapping], by: Sequence[str], knob: str) -> bool:
    seen: dict[tuple, Any] = {}
    return all(seen.setdefault(tuple(r[b] for b in by), r[knob]) == r[knob] for r in rows)


def label_knobs(rows: Sequence[Mapping], candidates: Sequence[str], fixed: Sequence[str] = ()) -> list[str]:
    """The ``candidates`` that tell ``rows`` apart: varying, and not determined by earlier kept knobs or ``fixed``.

    A dataset swept with its own partition and model, for example, is labelled
    by ``data.name`` alone.
    """
    kept = list(fixed)
    for knob in candidates:
        if knob not in kept and not _determined(rows, kept, knob):
            kept.append(knob)
    return kept[len(fixed) :]


def with_overrides(cfg: Any, values: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` (sweep removed) with dotted config knobs set; ``method`` is not a field."""
    cfg = cfg.copy_and_resolve_references()
    cfg.sweep = ml_collections.ConfigDict()
    for knob, value in values.items():
        if knob == "method":
            continue
        *parents, leaf = knob.split(".")
        section = cfg
        for part in parents:
            section = section[part]
        value = _canonical(value)
        if isinstance(value, list) and isinstance(section[leaf], tuple):
            value = tuple(value)
        try:
            section[leaf] = value
        except TypeError as e:
            raise ValueError(f"sweep knob {knob!r}={value!r} has the wrong type for that field: {e}") from None
    return cfg


def load_config(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file, for sweep configs built from other configs."""
    return runpy.run_path(path)["get_config"]()


def variant_cells(variants: Sequence[Any], first: Sequence[str] = ("data.name",)) -> list[dict[str, Any]]:
    """One cell per config in ``variants``: every field on which they differ (``name`` excluded).

    All cells set the same knobs, ``first`` ones first (they label the cells in reports).
    """
    flat = [flatten(v.to_dict()) for v in variants]
    for f in flat:
        f.pop("name", None)
        f.pop("sweep", None)
    differ = [k for k in flat[0] if any(_canonical(f[k]) != _canonical(flat[0][k]) for f in flat)]
    differ = [k for k in first if k in differ] + [k for k in differ if k not in first]
    return [{k: f[k] for k in differ} for f in flat]


# --------------------------------------------------------------------------- preparation (host, before compute)


@dataclasses.dataclass(frozen=True)
class PreparedProgram:
    """A program's engine and data, and what every one of its cells needs."""

    spec: ProgramSpec
    engine: Engine
    train: ClientData
    test: ClientData
    client_names: tuple[str, ...]
    rounds: tuple[int, ...]  # the round of each evaluation
    seeds: np.ndarray  # [n] uint32
    knobs: dict[str, np.ndarray]  # path -> [n] float32
    epsilon: tuple[tuple[float, ...] | None, ...]  # per cell: epsilon after each evaluation, None if no DP
    privacy_note: str  # how epsilon is accounted (unit, delta, accountant); '' without DP


def _dataset(cfg: Any, cache: dict) -> FederatedDataset:
    key = config_lib.to_json(cfg.data)
    if key not in cache:
        cache[key] = data_lib.load_dataset(cfg.data)
    return cache[key]


def _cell_epsilon(cfg: Any, method: str, dataset: FederatedDataset, rounds: tuple[int, ...]):
    """(epsilon after each evaluation round, accounting note), or (None, '') without DP."""
    if method != "federated" or cfg.privacy.mode == "none":
        return None, ""
    sizes = [int(n) for n in np.asarray(dataset.train.count)]
    privacy.validate_with_run(cfg, sizes)
    accounting = privacy.accounting_for_run(cfg, dataset.num_clients, sizes)
    note = f"delta={accounting.delta:g} per {accounting.unit}; {accounting.description}"
    return tuple(accounting.epsilon_after(r) for r in rounds), note


def prepare_program(cfg: Any, plan: Plan, spec: ProgramSpec, datasets: dict) -> PreparedProgram:
    """Load data, validate every cell of ``spec``, compute epsilons: everything short of compiling.

    The program is built from its first cell's config (its numeric knobs are
    traced, so any cell would build the same program).
    """
    struct_cfg = with_overrides(cfg, plan.cells[spec.cells[0]].values)
    method = spec.structural.get("method", "federated")
    try:
        prepared = runner.prepare(struct_cfg, _dataset(struct_cfg, datasets))
    except ValueError as e:
        raise ValueError(f"sweep program {spec.label()}: {e}") from None
    engine, view, _ = runner.engine_for(method, prepared)
    rounds = tuple(range(struct_cfg.eval_every, struct_cfg.rounds + 1, struct_cfg.eval_every))
    seeds, knobs, epsilons, notes = [], [], [], []
    for index in spec.cells:
        cell = plan.cells[index]
        cell_cfg = with_overrides(cfg, cell.values)
        try:
            config_lib.validate(cell_cfg, prepared.context)
            epsilon, note = _cell_epsilon(cell_cfg, method, prepared.dataset, rounds)
        except ValueError as e:
            raise ValueError(f"sweep cell {index} ({_describe(cell.values)}): {e}") from None
        epsilons.append(epsilon)
        notes.extend([note] if note and note not in notes else [])
        seeds.append(cell_cfg.seed)
        knob_cfg = baselines.pooled_config(cell_cfg) if method == "pooled" else cell_cfg
        knobs.append({k: float(config_lib.get_path(knob_cfg, k)) for k in config_lib.numeric_fields()})
    return PreparedProgram(
        spec=spec,
        engine=engine,
        train=ClientData(*(jnp.asarray(a) for a in view.train)),
        test=ClientData(*(jnp.asarray(a) for a in view.test)),
        client_names=tuple(prepared.dataset.client_names),
        rounds=rounds,
        seeds=np.asarray(seeds, np.uint32),
        knobs={k: np.asarray([kn[k] for kn in knobs], np.float32) for k in config_lib.numeric_fields()},
        epsilon=tuple(epsilons),
        privacy_note="; ".join(notes),
    )


def _describe(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in values.items())


# --------------------------------------------------------------------------- compute


def chunk_bounds(num_cells: int, chunk_size: int) -> list[tuple[int, int]]:
    """Balanced ``[start, stop)`` chunks of at most ``chunk_size`` cells."""
    num_chunks = -(-num_cells // chunk_size)
    size = -(-num_cells // num_chunks)
    return [(s, min(s + size, num_cells)) for s in range(0, num_cells, size)]


def effective_chunk_size(plan: Plan) -> int:
    """``plan.chunk_size``, or the backend's automatic size when it is 0."""
    return plan.chunk_size or AUTO_CHUNK.get(jax.default_backend(), AUTO_CHUNK_DEFAULT)


@functools.lru_cache(maxsize=64)
def _vmapped(program: Callable) -> Callable:
    return jax.jit(jax.vmap(program, in_axes=(0, None, None, 0)))


def _spec_of(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


_COMPILED: dict[tuple, Any] = {}


def compile_batched(engine: Engine, batch: int, train_spec: ClientData, test_spec: ClientData) -> tuple[Any, bool]:
    """The engine's whole-run program vmapped over ``batch`` cells, compiled; and whether it was compiled now.

    Compiled programs are kept for the life of the process.
    """
    key = (engine, batch, train_spec, test_spec)
    if key in _COMPILED:
        return _COMPILED[key], False
    seeds = jax.ShapeDtypeStruct((batch,), jnp.uint32)
    knobs = {k: jax.ShapeDtypeStruct((batch,), jnp.float32) for k in config_lib.numeric_fields()}
    _COMPILED[key] = _vmapped(engine.program).lower(seeds, train_spec, test_spec, knobs).compile()
    return _COMPILED[key], True


def run_chunk(program: PreparedProgram, start: int, stop: int, batch: int, compiled: Any) -> dict[str, np.ndarray]:
    """Histories of the program's cells ``[start, stop)``, padded to ``batch`` with the last cell."""
    take = np.minimum(np.arange(start, start + batch), stop - 1)
    knobs = {k: v[take] for k, v in program.knobs.items()}
    history = jax.device_get(compiled(program.seeds[take], program.train, program.test, knobs))
    return {k: np.asarray(v)[: stop - start] for k, v in history.items()}


def chunk_key(cfg_json: str, spec: ProgramSpec, cells: Sequence[Cell], batch: int) -> str:
    """A stable hash naming a chunk: the base config, its program, its cells and batch size."""
    payload = json.dumps(
        [
            cfg_json,
            _canonical(list(spec.structural.items())),
            [_canonical(list(c.values.items())) for c in cells],
            batch,
        ]
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _save_chunk(path: str, cells: Sequence[int], history: dict[str, np.ndarray]) -> None:
    payload = {"cells": list(cells), "history": {k: v.astype(np.float64).tolist() for k, v in history.items()}}
    runner.write_text_atomic(path, json.dumps(payload))


def _load_chunk(path: str) -> tuple[list[int], dict[str, np.ndarray]]:
    with open(path) as f:
        payload = json.load(f)
    return payload["cells"], {k: np.asarray(v, np.float32) for k, v in payload["history"].items()}


# --------------------------------------------------------------------------- tables


def result_rows(plan: Plan, programs: Sequence[PreparedProgram], histories: Mapping[int, dict]) -> list[dict]:
    """One row per finished cell x evaluation, in cell order (strings, ready for CSV)."""
    info = {}
    for p in programs:
        for j, index in enumerate(p.spec.cells):
            info[index] = (p, j)
    private = any(e is not None for p in programs for e in p.epsilon)
    rows = []
    for index in sorted(histories):
        program, j = info[index]
        history = histories[index]
        for e, round_done in enumerate(program.rounds):
            row = {"cell": str(index), **{k: format_value(plan.cells[index].values[k]) for k in plan.knobs}}
            row["round"] = str(round_done)
            if private:
                eps = program.epsilon[j]
                row["epsilon"] = "" if eps is None else format_float(eps[e])
            for name, values in history.items():
                value = values[e]
                if value.ndim == 0:
                    row[name] = format_float(value)
                elif value.shape == (len(program.client_names),):
                    row.update({f"{name}[{c}]": format_float(v) for c, v in zip(program.client_names, value)})
            rows.append(row)
    return rows


def format_float(value: Any) -> str:
    """The shortest text that reads back as the same float32 (``nan``, ``inf`` as such)."""
    return str(np.float32(value))


def summary_rows(plan: Plan, rows: Sequence[dict]) -> list[dict]:
    """Aggregate result rows over seeds: mean, sample std, t-based 95% CI half-width, n."""
    keys = [k for k in plan.knobs if k != "seed"] + ["round"] + (["epsilon"] if rows and "epsilon" in rows[0] else [])
    skip = {"cell", "seed", *keys}
    metrics: list[str] = []
    for row in rows:
        metrics.extend(k for k in row if k not in skip and k not in metrics)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, members in groups.items():
        summary = {**dict(zip(keys, key)), "n": str(len(members))}
        for name in metrics:
            values = np.asarray([float(r[name]) for r in members if r.get(name, "") != ""], np.float64)
            for stat, value in zip(("mean", "std", "ci95"), mean_std_ci(values)):
                summary[f"{name}_{stat}"] = "" if values.size == 0 else f"{value:.6g}"
        out.append(summary)
    return out


def mean_std_ci(values: np.ndarray) -> tuple[float, float, float]:
    """Mean, sample standard deviation (ddof 1) and the t-based 95% CI half-width (nan for n < 2)."""
    n = values.size
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = float(np.mean(values))
    if n < 2:
        return mean, math.nan, math.nan
    std = float(np.std(values, ddof=1))
    return mean, std, float(scipy.stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))


def to_csv(rows: Sequence[dict]) -> str:
    """CSV text; columns are the union of the rows' keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# --------------------------------------------------------------------------- driver


@dataclasses.dataclass
class SweepResult:
    """What a sweep produced: the plan, per-cell histories and the two tables."""

    plan: Plan
    histories: dict[int, dict[str, np.ndarray]]
    rows: list[dict]
    summary: list[dict]
    programs_compiled: int
    compile_seconds: float
    run_seconds: float
    seconds: float


@dataclasses.dataclass(frozen=True)
class _Chunk:
    program: PreparedProgram
    start: int
    stop: int
    batch: int
    path: str | None

    @property
    def cells(self) -> tuple[int, ...]:
        return self.program.spec.cells[self.start : self.stop]


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _metadata(cfg: Any, plan: Plan, programs: Sequence[PreparedProgram]) -> dict:
    return {
        "name": cfg.name,
        "knobs": list(plan.knobs),
        "numeric_knobs": [k for k in plan.knobs if k in numeric_knobs()],
        "structural_knobs": list(plan.structural),
        "cells": len(plan.cells),
        "privacy": " | ".join(dict.fromkeys(p.privacy_note for p in programs if p.privacy_note)),
        "programs": [
            {"structural": _canonical(p.spec.structural), "cells": len(p.spec.cells), "clients": list(p.client_names)}
            for p in programs
        ],
    }


def _chunks(cfg: Any, plan: Plan, programs: Sequence[PreparedProgram], chunk_dir: str | None) -> list[_Chunk]:
    """Every chunk of every program, in program order; each program's chunks share one batch size."""
    cfg_json = config_lib.to_json(cfg)
    chunks = []
    for program in programs:
        bounds = chunk_bounds(len(program.spec.cells), effective_chunk_size(plan))
        batch = bounds[0][1] - bounds[0][0]
        for lo, hi in bounds:
            cells = [plan.cells[i] for i in program.spec.cells[lo:hi]]
            name = f"{chunk_key(cfg_json, program.spec, cells, batch)}.json"
            chunks.append(_Chunk(program, lo, hi, batch, os.path.join(chunk_dir, name) if chunk_dir else None))
    return chunks


def _compile_job(chunk: _Chunk) -> tuple[Any, float, bool]:
    """(compiled program, seconds, whether it was compiled now rather than found)."""
    start, program = time.perf_counter(), chunk.program
    compiled, fresh = compile_batched(program.engine, chunk.batch, _spec_of(program.train), _spec_of(program.test))
    return compiled, time.perf_counter() - start, fresh


@dataclasses.dataclass(frozen=True)
class PreparedSweep:
    """A parsed, loaded and validated sweep: nothing compiled yet."""

    cfg: Any
    plan: Plan
    programs: tuple[PreparedProgram, ...]


def prepare_sweep(cfg: Any, num_seeds: int = 1) -> PreparedSweep:
    """Parse ``cfg.sweep``, load each program's data, validate every cell and compute epsilons.

    Raises ValueError naming the knob or cell and the fix, before any compile.
    """
    plan = plan_sweep(cfg, num_seeds)
    datasets: dict = {}
    return PreparedSweep(cfg, plan, tuple(prepare_program(cfg, plan, spec, datasets) for spec in plan.programs))


def run_sweep(
    cfg: Any,
    workdir: str | None = None,
    num_seeds: int = 1,
    log: Callable[[str], None] | None = print,
    on_chunk: Callable[[int], None] | None = None,
) -> SweepResult:
    """Run every cell of ``cfg.sweep`` (`prepare_sweep`, then `run_prepared`)."""
    return run_prepared(prepare_sweep(cfg, num_seeds), workdir, log, on_chunk)


def run_prepared(
    prepared: PreparedSweep,
    workdir: str | None = None,
    log: Callable[[str], None] | None = print,
    on_chunk: Callable[[int], None] | None = None,
) -> SweepResult:
    """Run a prepared sweep chunk by chunk; see the module docstring.

    With a ``workdir``, finished chunks found there are reused and every new
    chunk is saved, then ``results.csv`` and ``summary.csv`` are rebuilt. The
    next program compiles on a background thread while the current one runs.
    ``on_chunk(k)`` is called after the k-th chunk computed in this call (tests
    use it to simulate a crash).
    """
    start = time.perf_counter()
    plan, programs = prepared.plan, prepared.programs
    chunk_dir = os.path.join(workdir, CHUNK_DIR) if workdir else None
    if workdir:
        os.makedirs(chunk_dir, exist_ok=True)
        meta = json.dumps(_metadata(prepared.cfg, plan, programs), indent=2)
        runner.write_text_atomic(os.path.join(workdir, "sweep.json"), meta)
    histories: dict[int, dict[str, np.ndarray]] = {}
    todo = []
    for chunk in _chunks(prepared.cfg, plan, programs, chunk_dir):
        if chunk.path and os.path.exists(chunk.path):
            cells, history = _load_chunk(chunk.path)
            histories.update({i: {k: v[j] for k, v in history.items()} for j, i in enumerate(cells)})
        else:
            todo.append(chunk)

    def write_tables() -> tuple[list[dict], list[dict]]:
        rows = result_rows(plan, programs, histories)
        summary = summary_rows(plan, rows)
        if workdir:
            runner.write_text_atomic(os.path.join(workdir, "results.csv"), to_csv(rows))
            runner.write_text_atomic(os.path.join(workdir, "summary.csv"), to_csv(summary))
        return rows, summary

    if log:
        log(
            f"[sweep] {len(plan.cells)} cells in {len(programs)} program(s); {len(histories)} cells already done, "
            f"{len(todo)} chunk(s) to run (chunk size {effective_chunk_size(plan)}, backend {jax.default_backend()})"
        )
    rows, summary = write_tables()
    firsts = [k for k, c in enumerate(todo) if k == 0 or c.program is not todo[k - 1].program]
    stats = {"compiled": 0, "compile_s": 0.0, "run_s": 0.0, "cells": 0}
    with concurrent.futures.ThreadPoolExecutor(max_workers=COMPILE_WORKERS) as pool:
        futures: dict[int, concurrent.futures.Future] = {}
        compiled = None
        for k, chunk in enumerate(todo):
            if k in firsts:
                ahead = [f for f in firsts if f >= k][: 1 + COMPILE_WORKERS]
                futures.update({f: pool.submit(_compile_job, todo[f]) for f in ahead if f not in futures})
                compiled, seconds, fresh = futures.pop(k).result()
                stats["compiled"] += fresh
                stats["compile_s"] += seconds * fresh
            t0 = time.perf_counter()
            history = run_chunk(chunk.program, chunk.start, chunk.stop, chunk.batch, compiled)
            stats["run_s"] += time.perf_counter() - t0
            stats["cells"] += chunk.stop - chunk.start
            histories.update({i: {key: v[j] for key, v in history.items()} for j, i in enumerate(chunk.cells)})
            if chunk.path:
                _save_chunk(chunk.path, chunk.cells, history)
            rows, summary = write_tables()
            if log:
                log(_progress(k, todo, firsts, stats, len(histories), len(plan.cells), start))
            if on_chunk:
                on_chunk(k + 1)
    seconds = time.perf_counter() - start
    if log:
        log(
            f"[sweep] done: {len(plan.cells)} cells; {stats['compiled']} program(s) compiled in "
            f"{stats['compile_s']:.1f}s (overlapping the runs), {stats['cells']} cells run in {stats['run_s']:.1f}s; "
            f"wall {seconds:.1f}s"
        )
    return SweepResult(plan, histories, rows, summary, stats["compiled"], stats["compile_s"], stats["run_s"], seconds)


def _progress(k: int, todo: list[_Chunk], firsts: list[int], stats: dict, done: int, total: int, start: float) -> str:
    """One progress line after chunk ``k``: cells, programs compiled, elapsed, ETA, the program's settings."""
    specs = [todo[f].program.spec for f in firsts]
    rows = [{key: format_value(v) for key, v in p.structural.items()} for p in specs]
    shown = label_knobs(rows, list(todo[k].program.spec.structural))
    chunk = todo[k]
    cells_left = sum(c.stop - c.start for c in todo[k + 1 :])
    compiles_left = sum(1 for f in firsts if f > k)
    run_left = cells_left * stats["run_s"] / max(stats["cells"], 1)
    compile_left = compiles_left * stats["compile_s"] / max(stats["compiled"], 1)
    return (
        f"[sweep] chunk {k + 1}/{len(todo)}  cells {done}/{total}  programs compiled {stats['compiled']}/"
        f"{len(firsts)}  elapsed {_duration(time.perf_counter() - start)}  ETA {_duration(max(run_left, compile_left))}"
        f"  | {chunk.program.spec.label(shown)}"
    )

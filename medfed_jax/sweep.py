"""What-if sweeps: many runs as few compiled programs, with tidy results and resume.

A config declares its sweep in ``cfg.sweep``:

- ``grid``: knob -> list of values, nested like the config
  (``{'seed': (0, 1, 2), 'local': {'lr': (0.01, 0.1)}}``); the cells are the
  outer product (knobs in sorted order, the last one varying fastest);
- ``cells``: a list of dicts of dotted knobs (``{'attack.name': 'none'}``),
  each one cell; with a ``grid`` too, every listed cell is crossed with it;
- ``numeric`` (optional): knobs that must ride the vmapped experiment axis; a
  structural knob listed here is refused (a guard for sweeps meant to compile once);
- ``chunk_size``: cells per vmapped call, 0 = automatic;
- ``switch`` (optional): the switched knobs (below); unset = every switchable
  knob the sweep varies, ``()`` = compile one program per value instead.

A knob is a config field (``'local.lr'``), ``'seed'`` (the run seed: training and split) or
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
one program, reused for all its numeric cells.

**Switched knobs** (``aggregator.name``, ``attack.name``) change code but not
shapes: a sweep over several of them compiles every choice into one program as
`jax.lax.switch` branches (`medfed_jax.server.build_engine`) and passes the
choice as an int32 index that is *shared* by the cells of a chunk (not
vmapped), so only the chosen branch runs. The 6 x 6 aggregator x attack matrix
is then one compile instead of 36. Chunks never mix choices.

Programs compile in order on a background thread. How chunks use the devices
is an `Execution` (``--sweep_devices``, `execution`):

- ``cells``: each chunk's cells split over the local devices, each cell whole
  on one device (`medfed_jax.mesh.over_cells`: `jax.shard_map` over a
  ``'cells'`` mesh); a chunk is padded to a multiple of the device count with
  copies of its last cell, computed and dropped, and the automatic chunk size
  is per device;
- ``threads``: every program on one device, one chunk per core at once on a
  CPU (one XLA run keeps about one core busy), one at a time elsewhere;
- ``clients``: one chunk at a time, each cell's cohort split over the devices
  (the client mesh, `medfed_jax.mesh`).

A sweep runs in one process. The default is ``cells`` on several GPUs or
TPUs, ``threads`` on one device and on a CPU: there the host devices
share the same cores, and on the 2-core CPU a 60-cell robustness sub-matrix
ran as fast either way (``threads / cells`` 0.95 and 1.06, medians of
interleaved passes in two runs, `benchmarks/RESULTS.md`), while threads pad
no cells and give the one-device results bit for bit. Each mode runs the same program per cell, but a program split over
several devices is compiled anew and XLA may round its float32 sums
differently (a few ulps; equal to 1e-5 in `tests/test_sharding.py`), so chunk
files are named by the mode and device count (`Execution.layout`): a sweep
resumed in another mode recomputes its chunks. On a CPU, vmapping does not
speed up the cells themselves much: a sweep wins by compiling once and by
filling every core (`benchmarks/sweep_results.md`).

**Seeds and splits**: a cell's ``seed`` is its training seed and, unless
``data.seed`` pins the data (`medfed_jax.data.resolve_seed`), also its
partition and train/test split: cells of one program that differ in seed get
their own splits, stacked on the experiment axis (`PreparedProgram`), still
one compile. Summaries over seeds are then over splits x training seeds.

Results (workdir): ``results.csv``, one row per cell x evaluation (every knob
a column, then ``round``, for private runs ``epsilon`` (the run's relation,
named in ``sweep.json``'s privacy note), ``epsilon_replace_one`` and under
DP-SGD ``epsilon[<client>]``, then the metrics and per-client metrics
``<metric>[<client>]``); ``summary.csv``, the same over seeds (mean, sample
std (ddof 1), t-based 95% confidence half-width, n). While the
sweep runs, each chunk's rows are appended to ``results.csv`` and
``summary.csv`` is refreshed every `SUMMARY_EVERY_S` seconds; at the end both
are written atomically in cell order (`TableFiles`). Each chunk's histories
are kept in ``chunks/<hash>.json`` (a hash of the chunk's cells), so a sweep
killed at any point and started again recomputes only the missing chunks and
ends with byte-identical CSVs.

Before compiling, a sweep logs its cells, compiled programs, cell-rounds and
an estimated cost (`SweepCost`, from nominal rates); a sweep above
`MAX_CELLS` cells or `MAX_PROGRAMS` programs is refused unless
``allow_large`` (``--allow_large_sweep``). Progress lines give the rate after
compiling and an ETA from the measured chunk times.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medfed_jax import baselines, privacy, runner, tabular
from medfed_jax import config as config_lib
from medfed_jax import data as data_lib
from medfed_jax import mesh as mesh_lib
from medfed_jax.data import base as data_base
from medfed_jax.server import SWITCHABLE, Engine, Switches
from medfed_jax.types import ClientData, FederatedDataset

SWEEP_FIELDS = ("grid", "cells", "numeric", "chunk_size", "switch")
SPECIAL_KNOBS = ("seed", "method")
AUTO_CHUNK = {"cpu": 32}  # cells per chunk and device when chunk_size = 0; accelerators: 256
AUTO_CHUNK_DEFAULT = 256
CHUNK_DIR = "chunks"
SUMMARY_EVERY_S = 30.0  # while a sweep runs, summary.csv is rewritten at most this often (and at the end)
# The cost estimate printed before compiling (nominal: measured on a 2-core AMD EPYC with the digits
# robustness matrix, benchmarks/sweep_results.md: 23 s to compile, 54,000 cell-rounds in 205 s of chunk time).
NOMINAL_COMPILE_S = 20.0  # per compiled program
NOMINAL_CELL_ROUNDS_PER_S = 250.0  # per running chunk; bigger models and datasets run slower
MAX_CELLS, MAX_PROGRAMS = 20_000, 100  # larger sweeps run only with allow_large (--allow_large_sweep)


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
    """One structural combination and its cells, run in vmapped chunks.

    Specs that differ only in switched knobs (`Plan.switches`) share one
    compiled program, each with its own switch setting.
    """

    structural: dict[str, Any]
    cells: tuple[int, ...]

    def label(self, knobs: Sequence[str] | None = None) -> str:
        """``knob=value`` of the structural knobs (of ``knobs`` only, when given)."""
        shown = self.structural if knobs is None else {k: self.structural[k] for k in knobs}
        return " ".join(f"{k}={format_value(v)}" for k, v in shown.items()) or "(single program)"


@dataclasses.dataclass(frozen=True)
class Plan:
    """A parsed sweep: knob columns, cells in order, structural combinations, chunk size, switches.

    ``switches``: ``(knob, choices)`` for each structural knob that the
    compiled programs pick at run time (`medfed_jax.server.build_engine`)
    instead of compiling once per value.
    """

    knobs: tuple[str, ...]
    cells: tuple[Cell, ...]
    programs: tuple[ProgramSpec, ...]
    chunk_size: int
    switches: Switches = ()

    @property
    def structural(self) -> tuple[str, ...]:
        return tuple(k for k in self.knobs if k not in numeric_knobs())

    @property
    def switched(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.switches)

    @property
    def num_compiled(self) -> int:
        """Programs to compile: structural combinations, switched knobs aside."""
        compiled = {
            json.dumps([_canonical(v) for k, v in p.structural.items() if k not in self.switched])
            for p in self.programs
        }
        return len(compiled)


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
    switch = sweep.get("switch")
    if switch is not None and (isinstance(switch, str) or not isinstance(switch, Sequence)):
        raise ValueError(f"sweep.switch={switch!r} must be a tuple of knobs (e.g. ('aggregator.name',)) or ().")
    return cells, grid, numeric, chunk_size, switch


def _switches(declared: Sequence[str] | None, knobs: tuple[str, ...], values: list[dict]) -> Switches:
    """``(knob, choices)`` of the switched knobs: ``declared``, or every switchable knob with 2+ values."""
    for knob in declared or ():
        if knob not in SWITCHABLE:
            raise ValueError(
                f"sweep.switch lists {knob!r}; only {SWITCHABLE} can be switched at run time. Other "
                "structural knobs compile one program per value."
            )
        if knob not in knobs:
            raise ValueError(f"sweep.switch lists {knob!r}, which the sweep does not vary; remove it.")
    candidates = SWITCHABLE if declared is None else tuple(declared)
    switches = []
    for knob in (k for k in candidates if k in knobs):
        choices = tuple(dict.fromkeys(v[knob] for v in values))
        if len(choices) > 1 or declared is not None:
            switches.append((knob, choices))
    return tuple(switches)


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
    cells, grid, declared, chunk_size, switch = _raw_sweep(cfg, num_seeds)
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
    cells = tuple(Cell(i, v) for i, v in enumerate(values))
    return Plan(knobs, cells, programs, chunk_size, _switches(switch, knobs, values))


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
    """A program's engine and data, and what every one of its cells needs.

    ``split_index`` None: every cell trains on ``train``/``test``. Else the
    cells' splits differ (``data.seed`` follows each cell's seed): ``train``
    and ``test`` stack the distinct splits ``[S, C, N, ...]`` (padded to one
    size, `medfed_jax.data.base.stack_splits`) and cell ``j`` uses split
    ``split_index[j]``.
    """

    spec: ProgramSpec
    engine: Engine
    train: ClientData
    test: ClientData
    client_names: tuple[str, ...]
    rounds: tuple[int, ...]  # the round of each evaluation
    seeds: np.ndarray  # [n] uint32
    knobs: dict[str, np.ndarray]  # path -> [n] float32
    epsilon: tuple[dict[str, tuple[float, ...]] | None, ...]  # per cell: `PRIVACY_COLUMNS` (and DP-SGD's
    # per-client epsilon[<client>]) -> the value after each evaluation; None without DP
    privacy_note: str  # how epsilon is accounted (unit, delta, accountant); '' without DP
    switch_index: dict[str, int] = dataclasses.field(default_factory=dict)  # switched knob -> choice index
    split_index: np.ndarray | None = None  # [n] int32: each cell's split in train/test, None = one shared


def _dataset(cfg: Any, cache: dict) -> FederatedDataset:
    """The dataset of a run config, its ``data.seed`` resolved (`medfed_jax.data.resolve_seed`); cached."""
    data = data_lib.resolve_seed(cfg.data, cfg.seed)
    key = config_lib.to_json(data)
    if key not in cache:
        cache[key] = data_lib.load_dataset(data)
    return cache[key]


# A private sweep's epsilon columns: the run's own accounting (its relation in the privacy note), and replace-one.
PRIVACY_COLUMNS = ("epsilon", "epsilon_replace_one")


def _cell_epsilon(cfg: Any, method: str, dataset: FederatedDataset, rounds: tuple[int, ...]):
    """(privacy column -> value after each evaluation round, accounting note), or (None, '') without DP.

    Columns: `PRIVACY_COLUMNS`; with DP-SGD (a record the unit) also
    ``epsilon[<client>]``, each client's own (`medfed_jax.privacy.client_record_epsilons`).
    """
    if method != "federated" or cfg.privacy.mode == "none":
        return None, ""
    sizes = [int(n) for n in np.asarray(dataset.train.count)]
    privacy.validate_with_run(cfg, sizes)
    accounting = privacy.accounting_for_run(cfg, dataset.num_clients, sizes)
    note = f"delta={accounting.delta:g} per {accounting.unit}; {accounting.description}"
    columns = {
        "epsilon": tuple(accounting.epsilon_after(r) for r in rounds),
        "epsilon_replace_one": tuple(accounting.replace_one_epsilon_after(r) for r in rounds),
    }
    if accounting.unit == "record":
        per_client = [privacy.client_record_epsilons(cfg, sizes, r) for r in rounds]
        columns.update({f"epsilon[{c}]": tuple(e[i] for e in per_client) for i, c in enumerate(dataset.client_names)})
    return columns, note


def _check_same_clients(first: runner.Prepared, dataset: FederatedDataset, seed: int) -> None:
    """A cell's own split must fit the program built from the first cell's (same clients and input shapes)."""
    data_lib.validate_dataset(dataset)
    if not isinstance(dataset.train, ClientData):
        raise ValueError(
            f"data.storage={first.cfg.data.storage!r}: cells of a flat or generated population cannot each draw "
            "their own split; pin it with data.seed=<int> (the training seed still varies)."
        )
    if runner.build_context(first.cfg, dataset) != first.context:
        raise ValueError(f"seed {seed}'s split has other clients or shapes than the first cell's; pin data.seed.")


def prepare_program(cfg: Any, plan: Plan, spec: ProgramSpec, datasets: dict, run_on: Execution) -> PreparedProgram:
    """Load data, validate every cell of ``spec``, compute epsilons: everything short of compiling.

    The program is built from its first cell's config (its numeric knobs are
    traced, so any cell would build the same program), on ``run_on``'s devices. Each cell trains on its
    own seed's split unless ``data.seed`` pins one (`PreparedProgram`).
    """
    struct_cfg = with_overrides(cfg, plan.cells[spec.cells[0]].values)
    method = spec.structural.get("method", "federated")
    try:
        prepared = runner.prepare(struct_cfg, _dataset(struct_cfg, datasets))
    except ValueError as e:
        raise ValueError(f"sweep program {spec.label()}: {e}") from None
    engine, view, _ = runner.engine_for(method, prepared, plan.switches, run_on.program_mesh())
    rounds = runner.eval_rounds(struct_cfg.rounds, struct_cfg.eval_every)
    seeds, knobs, epsilons, notes, splits, cell_split = [], [], [], [], [], []
    for index in spec.cells:
        cell = plan.cells[index]
        cell_cfg = with_overrides(cfg, cell.values)
        try:
            dataset = _dataset(cell_cfg, datasets)
            if dataset is not prepared.dataset:
                _check_same_clients(prepared, dataset, cell_cfg.seed)
            config_lib.validate(cell_cfg, prepared.context)
            epsilon, note = _cell_epsilon(cell_cfg, method, dataset, rounds)
        except ValueError as e:
            raise ValueError(f"sweep cell {index} ({_describe(cell.values)}): {e}") from None
        epsilons.append(epsilon)
        notes.extend([note] if note and note not in notes else [])
        splits.extend([dataset] if all(d is not dataset for d in splits) else [])
        cell_split.append(next(i for i, d in enumerate(splits) if d is dataset))
        seeds.append(cell_cfg.seed)
        knob_cfg = baselines.pooled_config(cell_cfg) if method == "pooled" else cell_cfg
        knobs.append({k: float(config_lib.get_path(knob_cfg, k)) for k in config_lib.numeric_fields()})
    if len(splits) == 1:
        (train, test), split_index = place_program_data(run_on, engine, view), None
    else:  # host arrays [S, ...]: `run_chunk` gathers each chunk's splits and the program places them
        views = [runner.method_view(method, d) for d in splits]
        train, test = (data_base.stack_splits([getattr(v, part) for v in views]) for part in ("train", "test"))
        split_index = np.asarray(cell_split, np.int32)
    return PreparedProgram(
        spec=spec,
        engine=engine,
        train=train,
        test=test,
        client_names=tuple(prepared.dataset.client_names),
        rounds=rounds,
        seeds=np.asarray(seeds, np.uint32),
        knobs={k: np.asarray([kn[k] for kn in knobs], np.float32) for k in config_lib.numeric_fields()},
        epsilon=tuple(epsilons),
        privacy_note="; ".join(notes),
        switch_index={knob: choices.index(spec.structural[knob]) for knob, choices in plan.switches},
        split_index=split_index,
    )


def _describe(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in values.items())


# --------------------------------------------------------------------------- compute


def chunk_bounds(num_cells: int, chunk_size: int) -> list[tuple[int, int]]:
    """Balanced ``[start, stop)`` chunks of at most ``chunk_size`` cells."""
    num_chunks = -(-num_cells // chunk_size)
    size = -(-num_cells // num_chunks)
    return [(s, min(s + size, num_cells)) for s in range(0, num_cells, size)]


def effective_chunk_size(plan: Plan, devices: int = 1) -> int:
    """``plan.chunk_size``, or when it is 0 the backend's automatic size for each of the ``devices`` a chunk is
    split over (`Execution.parallel` in ``cells`` mode)."""
    return plan.chunk_size or AUTO_CHUNK.get(jax.default_backend(), AUTO_CHUNK_DEFAULT) * devices


@functools.lru_cache(maxsize=64)
def _vmapped(
    program: Callable, switched: tuple[str, ...], cells: jax.sharding.Mesh | None = None, own_splits: bool = False
) -> Callable:
    """The program vmapped over cells: seeds and numeric knobs batched, switch indices shared, data shared (or
    batched too: ``own_splits``, each cell its own split); with a ``cells`` mesh, the cells split over its
    devices (`medfed_jax.mesh.over_cells`)."""
    knob_axes = {**{k: 0 for k in config_lib.numeric_fields()}, **{k: None for k in switched}}
    data = 0 if own_splits else None
    in_axes = (0, data, data, knob_axes)
    batched = jax.vmap(program, in_axes=in_axes)
    return jax.jit(batched) if cells is None else mesh_lib.over_cells(batched, cells, in_axes)


def _spec_of(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


_COMPILED: dict[tuple, Any] = {}


def compile_batched(
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
    size); ``own_splits``: the data specs are ``[S, ...]`` stacks of splits and
    the program takes ``batch`` of them, one per cell. Compiled programs are
    kept for the life of the process.
    """
    key = (engine, batch, train_spec, test_spec, switched, cells, own_splits)
    if key in _COMPILED:
        return _COMPILED[key], False
    seeds = jax.ShapeDtypeStruct((batch,), jnp.uint32)
    knobs = {k: jax.ShapeDtypeStruct((batch,), jnp.float32) for k in config_lib.numeric_fields()}
    knobs.update({k: jax.ShapeDtypeStruct((), jnp.int32) for k in switched})
    if own_splits:
        train_spec, test_spec = (
            jax.tree.map(lambda a: jax.ShapeDtypeStruct((batch, *a.shape[1:]), a.dtype), spec)
            for spec in (train_spec, test_spec)
        )
    program = _vmapped(engine.program, switched, cells, own_splits)
    _COMPILED[key] = program.lower(seeds, train_spec, test_spec, knobs).compile()
    return _COMPILED[key], True


def run_chunk(program: PreparedProgram, start: int, stop: int, batch: int, compiled: Any) -> dict[str, np.ndarray]:
    """Histories of the program's cells ``[start, stop)``, padded to ``batch`` with the last cell (dropped)."""
    take = np.minimum(np.arange(start, start + batch), stop - 1)
    knobs = {k: v[take] for k, v in program.knobs.items()}
    knobs.update({k: np.int32(i) for k, i in program.switch_index.items()})
    train, test = program.train, program.test
    if program.split_index is not None:  # each cell's own split, gathered from the host stacks
        train, test = (type(d)(*(np.asarray(a)[program.split_index[take]] for a in d)) for d in (train, test))
    history = jax.device_get(compiled(program.seeds[take], train, test, knobs))
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
            _canonical(list(spec.structural.items())),
            [_canonical(list(c.values.items())) for c in cells],
            batch,
            *([_canonical(list(switches))] if switches else []),
            *([list(layout)] if layout else []),
        ]
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _save_chunk(path: str, cells: Sequence[int], history: dict[str, np.ndarray]) -> None:
    payload = {"cells": list(cells), "history": {k: v.astype(np.float64).tolist() for k, v in history.items()}}
    tabular.write_text_atomic(path, json.dumps(payload))


def _load_chunk(path: str) -> tuple[list[int], dict[str, np.ndarray]]:
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


# --------------------------------------------------------------------------- tables


def cell_rows(plan: Plan, program: PreparedProgram, index: int, history: Mapping[str, np.ndarray], private: bool):
    """The rows of one finished cell, one per evaluation (strings, ready for CSV)."""
    j = program.spec.cells.index(index)
    rows = []
    for e, round_done in enumerate(program.rounds):
        row = {"cell": str(index), **{k: format_value(plan.cells[index].values[k]) for k in plan.knobs}}
        row["round"] = str(round_done)
        if private:
            columns = program.epsilon[j] or dict.fromkeys(PRIVACY_COLUMNS)
            row.update({name: "" if v is None else format_float(v[e]) for name, v in columns.items()})
        for name, values in history.items():
            value = values[e]
            if value.ndim == 0:
                row[name] = format_float(value)
            elif value.shape == (len(program.client_names),):
                row.update({f"{name}[{c}]": format_float(v) for c, v in zip(program.client_names, value)})
        rows.append(row)
    return rows


def _program_of(programs: Sequence[PreparedProgram]) -> dict[int, PreparedProgram]:
    return {index: p for p in programs for index in p.spec.cells}


def _is_private(programs: Sequence[PreparedProgram]) -> bool:
    return any(e is not None for p in programs for e in p.epsilon)


def result_rows(plan: Plan, programs: Sequence[PreparedProgram], histories: Mapping[int, dict]) -> list[dict]:
    """One row per finished cell x evaluation, in cell order (strings, ready for CSV)."""
    program_of, private = _program_of(programs), _is_private(programs)
    return [row for i in sorted(histories) for row in cell_rows(plan, program_of[i], i, histories[i], private)]


def format_float(value: Any) -> str:
    """The shortest text that reads back as the same float32 (``nan``, ``inf`` as such)."""
    return str(np.float32(value))


def summary_keys(plan: Plan, private: bool) -> list[str]:
    """The columns a summary row is grouped by: the knobs but the seed, the round, epsilon."""
    return [k for k in plan.knobs if k != "seed"] + ["round"] + (list(PRIVACY_COLUMNS) if private else [])


def summary_rows(plan: Plan, rows: Sequence[dict]) -> list[dict]:
    """Aggregate result rows over seeds: mean, sample std, t-based 95% CI half-width, n."""
    keys = summary_keys(plan, bool(rows) and "epsilon" in rows[0])
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return [summarize(keys, members) for members in groups.values()]


def parse_metrics(keys: Sequence[str], row: Mapping[str, str]) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """(metric columns, values, present) of one result row: what `summarize` reads from it."""
    skip = {"cell", "seed", *keys}
    metrics = tuple(k for k in row if k not in skip)
    present = np.asarray([row[m] != "" for m in metrics], bool)
    values = np.asarray([float(row[m]) if row[m] != "" else 0.0 for m in metrics], np.float64)
    return metrics, values, present


def summarize(keys: Sequence[str], members: Sequence[dict], parsed: Sequence[tuple] | None = None) -> dict:
    """One summary row over the result rows ``members`` (which agree on ``keys``).

    ``parsed``: the members' `parse_metrics`, when already known. A metric
    missing from a member counts as absent there.
    """
    parsed = parsed if parsed is not None else [parse_metrics(keys, r) for r in members]
    columns = {names for names, _, _ in parsed}
    same = len(columns) == 1  # the usual case: every member has the same columns
    metrics = [*next(iter(columns))] if same else list(dict.fromkeys(m for names, _, _ in parsed for m in names))
    if same:
        values = np.stack([v for _, v, _ in parsed]).reshape(len(parsed), len(metrics))
        present = np.stack([p for _, _, p in parsed]).reshape(values.shape)
    else:
        column = {m: j for j, m in enumerate(metrics)}
        values, present = np.zeros((len(parsed), len(metrics))), np.zeros((len(parsed), len(metrics)), bool)
        for i, (names, v, p) in enumerate(parsed):
            at = [column[m] for m in names]
            values[i, at], present[i, at] = v, p
    stats = [values.tolist() for values in mean_std_ci(values, present)]
    found = present.any(axis=0).tolist()
    summary = {**{k: members[0][k] for k in keys}, "n": str(len(members))}
    for j, name in enumerate(metrics):
        for stat, value in zip(("mean", "std", "ci95"), stats):
            summary[f"{name}_{stat}"] = f"{value[j]:.6g}" if found[j] else ""
    return summary


class Tables:
    """``results.csv`` and ``summary.csv`` kept up to date as cells finish.

    Each cell's rows are computed and parsed once; a group's summary is
    recomputed when the summary is asked for and the group has new cells
    (`TableFiles` asks at most every `SUMMARY_EVERY_S`). Equal to `result_rows` and
    `summary_rows` of the finished cells; `TableFiles` writes them.
    """

    def __init__(self, plan: Plan, programs: Sequence[PreparedProgram]):
        self.plan, self.program_of, self.private = plan, _program_of(programs), _is_private(programs)
        self.keys = summary_keys(plan, self.private)
        self.cells: dict[int, list[dict]] = {}
        self.members: dict[tuple, dict[int, dict]] = {}  # group -> cell -> row
        self.parsed: dict[tuple, dict[int, tuple]] = {}  # group -> cell -> its row's `parse_metrics`
        self.summaries: dict[tuple, dict] = {}
        self.stale: set[tuple] = set()  # groups with new cells since their summary was computed

    def add(self, histories: Mapping[int, dict]) -> list[dict]:
        """Add finished cells (index -> history), marking the summaries they touch stale; returns their rows."""
        added = []
        for index in sorted(histories):
            self.cells[index] = cell_rows(self.plan, self.program_of[index], index, histories[index], self.private)
            added.extend(self.cells[index])
            for row in self.cells[index]:
                key = tuple(row[k] for k in self.keys)
                self.members.setdefault(key, {})[index] = row
                self.parsed.setdefault(key, {})[index] = parse_metrics(self.keys, row)
                self.stale.add(key)
        return added

    def rows(self) -> list[dict]:
        return [row for index in sorted(self.cells) for row in self.cells[index]]

    def summary(self) -> list[dict]:
        """The summary rows, in the order of their first result row; stale groups recomputed first."""
        for key in self.stale:
            members, parsed = self.members[key], self.parsed[key]
            order = sorted(members)
            self.summaries[key] = summarize(self.keys, [members[i] for i in order], [parsed[i] for i in order])
        self.stale.clear()
        order = dict.fromkeys(tuple(row[k] for k in self.keys) for row in self.rows())
        return [self.summaries[key] for key in order]


class TableFiles:
    """``results.csv`` and ``summary.csv`` of a workdir while a sweep runs, without rewriting them per chunk.

    Each chunk's rows are appended to ``results.csv`` (in the order chunks
    finish; the file is rewritten whole only when a chunk brings new columns,
    e.g. another program's clients); ``summary.csv`` is rewritten at most
    every `SUMMARY_EVERY_S` seconds. `rewrite` writes both atomically in cell
    order (`result_rows`, `summary_rows`): at the start (over any torn line a
    kill left) and at the end, so a finished sweep's CSVs are byte-identical
    however it was interrupted.
    """

    def __init__(self, workdir: str, tables: Tables):
        self.results, self.summary = (os.path.join(workdir, n) for n in ("results.csv", "summary.csv"))
        self.tables = tables
        self.columns: set[str] = set()
        self.header: list[str] = []
        self.summary_written = -math.inf

    def rewrite(self) -> None:
        rows = self.tables.rows()
        self.header = tabular.columns_of(rows)
        self.columns = set(self.header)
        tabular.write_csv(self.results, rows)
        self.write_summary()

    def write_summary(self) -> None:
        tabular.write_csv(self.summary, self.tables.summary())
        self.summary_written = time.perf_counter()

    def append(self, rows: Sequence[dict]) -> None:
        if not self.header or any(k not in self.columns for row in rows for k in row):
            self.rewrite()
            return
        tabular.append_csv(self.results, self.header, rows)
        if time.perf_counter() - self.summary_written >= SUMMARY_EVERY_S:
            self.write_summary()


def mean_std_ci(values: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of ``values [n, m]``, over its ``present`` entries: mean, sample std (ddof 1), t-based 95% CI.

    The half-width is ``t_{0.975, n-1} * std / sqrt(n)``; std and CI are nan
    for fewer than two entries, the mean is nan for none.
    """
    n = present.sum(axis=0)
    mean = np.where(present, values, 0.0).sum(axis=0) / np.maximum(n, 1)
    std = np.sqrt(np.square(np.where(present, values - mean, 0.0)).sum(axis=0) / np.maximum(n - 1, 1))
    few = n < 2
    if few.all():  # no CI to compute: a single run need not pay scipy.stats' import (~0.5 s)
        ci = np.full(np.shape(n), math.nan)
    else:
        import scipy.stats  # here, not at module level

        ci = scipy.stats.t.ppf(0.975, np.maximum(n - 1, 1)) * std / np.sqrt(np.maximum(n, 1))
    return np.where(n == 0, math.nan, mean), np.where(few, math.nan, std), np.where(few, math.nan, ci)


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
        "switched_knobs": list(plan.switched),
        "cells": len(plan.cells),
        "compiled_programs": plan.num_compiled,
        "privacy": " | ".join(dict.fromkeys(p.privacy_note for p in programs if p.privacy_note)),
        "programs": [
            {"structural": _canonical(p.spec.structural), "cells": len(p.spec.cells), "clients": list(p.client_names)}
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
) -> list[_Chunk]:
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
            chunks.append(_Chunk(program, lo, hi, batch, os.path.join(chunk_dir, name) if chunk_dir else None))
    return chunks


def _compile_key(chunk: _Chunk) -> tuple:
    program = chunk.program
    own_splits = program.split_index is not None  # host stacks of splits: shapes only, placed by the program
    spec = (lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)) if own_splits else _spec_of
    train, test = spec(program.train), spec(program.test)
    return (program.engine, chunk.batch, train, test, tuple(program.switch_index), own_splits)


def _compile_job(chunk: _Chunk, run_on: Execution) -> tuple[Any, float, bool]:
    """(compiled program, seconds, whether it was compiled now rather than found)."""
    start = time.perf_counter()
    engine, batch, train, test, switched, own_splits = _compile_key(chunk)
    compiled, fresh = compile_batched(
        engine, run_on.padded(batch), train, test, switched, run_on.cell_mesh(), own_splits
    )
    return compiled, time.perf_counter() - start, fresh


MAX_CPU_WORKERS = 8  # each running chunk holds its own buffers: bound the memory on big hosts
SWEEP_DEVICES = ("cells", "threads", "clients")  # how a sweep's chunks use the devices (`Execution`)
CPU_DEFAULT = "threads"  # measured on the host devices: see the module docstring


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a sweep's chunks use the devices (``--sweep_devices``; `execution` picks and checks it).

    - ``cells``: one chunk at a time, its cells split over ``devices`` devices
      (`medfed_jax.mesh.over_cells`), each cell whole on one device; a chunk is
      padded to a multiple of ``devices`` with copies of its last cell, whose
      results are dropped; `effective_chunk_size` is per device;
    - ``threads``: every program on one device, ``workers`` chunks at once
      (one per core on a CPU, where one XLA run keeps about one core busy);
    - ``clients``: one chunk at a time, each cell's cohort split over the
      devices (the client mesh of `medfed_jax.mesh`).
    """

    mode: str
    devices: int

    @property
    def workers(self) -> int:
        """Chunks run at once."""
        if self.mode == "threads" and jax.default_backend() == "cpu":
            return min(MAX_CPU_WORKERS, os.cpu_count() or 1)
        return 1

    def program_mesh(self) -> jax.sharding.Mesh | None:
        """The mesh each program is built on: one device, or the default client mesh (None) in ``clients``."""
        return None if self.mode == "clients" else mesh_lib.one_device_mesh()

    def cell_mesh(self) -> jax.sharding.Mesh | None:
        """The ``'cells'`` mesh a chunk is split over, in ``cells`` mode."""
        return mesh_lib.cell_mesh(self.devices) if self.mode == "cells" else None

    def padded(self, batch: int) -> int:
        """Cells a chunk of ``batch`` runs as: a multiple of `split`."""
        return -(-batch // self.split) * self.split

    @property
    def split(self) -> int:
        """Devices a chunk's cells are split over: the device count in ``cells`` mode, else 1."""
        return self.devices if self.mode == "cells" else 1

    @property
    def parallel(self) -> int:
        """One-device chunks' worth of cells running at once: ``workers``, or the device count in ``cells``."""
        return self.split * self.workers

    @property
    def layout(self) -> tuple:
        """What a chunk's results depend on besides its cells: () on one device (``threads``), else the mode and
        device count (another device split compiles another program, which may round differently)."""
        return () if self.mode == "threads" else (self.mode, self.devices)

    def describe(self) -> str:
        if self.mode == "cells":
            return f"cells split over {self.devices} {jax.default_backend()} devices"
        if self.mode == "clients":
            return f"each cohort split over {self.devices} {jax.default_backend()} device(s)"
        return f"{self.workers} chunk(s) at once on one {jax.default_backend()} device"


def place_program_data(run_on: Execution, engine: Engine, view: FederatedDataset) -> tuple[ClientData, ClientData]:
    """A program's train and test data where it runs: on every device of the cell mesh, else on the engine's."""
    cells = run_on.cell_mesh()
    if cells is None:
        return runner.place_data(engine, view)
    return tuple(type(d)(*mesh_lib.put(tuple(d), cells)) for d in (view.train, view.test))


def default_sweep_devices(devices: int) -> str:
    """The mode when none is asked for: on several devices ``cells`` (``CPU_DEFAULT`` on a CPU's host devices),
    else ``threads``."""
    if devices > 1:
        return CPU_DEFAULT if jax.default_backend() == "cpu" else "cells"
    return "threads"


def execution(mode: str | None = None) -> Execution:
    """The `Execution` for ``mode`` (one of `SWEEP_DEVICES`; None: `default_sweep_devices`), checked.

    Raises ValueError (one line, naming the fix) for an unknown mode,
    ``cells`` or ``clients`` on one device, or a launch of several processes
    (a sweep runs in one: its chunk files and tables are not shared out).
    """
    if jax.process_count() > 1:
        raise ValueError(
            f"a sweep runs in one process, but this launch has {jax.process_count()} (MEDFED_JAX_NUM_PROCESSES); "
            "run it on one host without the MEDFED_JAX_COORDINATOR/NUM_PROCESSES/PROCESS_ID variables."
        )
    devices = len(mesh_lib.local_devices())
    if mode is None:
        return Execution(default_sweep_devices(devices), devices)
    where = f"--sweep_devices={mode!r}"
    if mode not in SWEEP_DEVICES:
        raise ValueError(f"{where} is unknown: choose one of {', '.join(SWEEP_DEVICES)} (or leave it unset).")
    if mode != "threads" and devices < 2:
        raise ValueError(
            f"{where} splits work over several devices, but this process has 1 {jax.default_backend()} device; "
            "use --sweep_devices=threads, or give it more (--devices=N or MEDFED_JAX_DEVICES=N on a CPU)."
        )
    return Execution(mode, devices)


def allowed_sweep_devices() -> tuple[str, ...]:
    """The `SWEEP_DEVICES` modes `execution` accepts on this machine, the default first."""
    allowed = []
    for mode in SWEEP_DEVICES:
        try:
            execution(mode)
        except ValueError:
            continue
        allowed.append(mode)
    default = execution().mode
    return (default, *(m for m in allowed if m != default))


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
            f"~{_duration(self.seconds)} (an estimate from nominal rates: {NOMINAL_COMPILE_S:g}s per compile, "
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


@dataclasses.dataclass(frozen=True)
class PreparedSweep:
    """A parsed, loaded and validated sweep, and the devices it runs on: nothing compiled yet."""

    cfg: Any
    plan: Plan
    programs: tuple[PreparedProgram, ...]
    cost: SweepCost
    run_on: Execution


def prepare_sweep(
    cfg: Any, num_seeds: int = 1, allow_large: bool = False, sweep_devices: str | None = None
) -> PreparedSweep:
    """Parse ``cfg.sweep``, check its size (`check_size`), load each program's data, validate every cell, epsilons.

    ``sweep_devices``: how chunks use the devices (`execution`; None: the
    backend's default). Raises ValueError naming the knob, cell or setting and
    the fix, before any compile.
    """
    run_on = execution(sweep_devices)
    plan = plan_sweep(cfg, num_seeds)
    cost = sweep_cost(cfg, plan, run_on.parallel)
    check_size(cost, allow_large)
    datasets: dict = {}
    programs = tuple(prepare_program(cfg, plan, spec, datasets, run_on) for spec in plan.programs)
    return PreparedSweep(cfg, plan, programs, cost, run_on)


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
) -> SweepResult:
    """Run a prepared sweep chunk by chunk; see the module docstring.

    With a ``workdir``, finished chunks found there are reused and every new
    chunk is saved, its rows appended to ``results.csv`` (`TableFiles`).
    Programs compile in order on a background thread; chunks run as their
    programs become ready, on the devices of ``prepared.run_on``
    (`Execution`). The log gets the sweep's size and estimated cost first,
    then a line per compiled program and per chunk (with an ETA from the
    measured chunk times). ``on_chunk(k)`` is called after
    the k-th chunk computed in this call (tests use it to simulate a crash);
    chunks still running when it raises are dropped, not saved.
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
            cells, history = _load_chunk(chunk.path)
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
    progress = _Progress(todo, start, workers)
    compile_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    run_pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
        compiles: dict[concurrent.futures.Future, _Chunk] = {}
        by_key: dict[tuple, concurrent.futures.Future] = {}
        for chunk in todo:
            key = _compile_key(chunk)
            if key not in by_key:
                by_key[key] = compile_pool.submit(_compile_job, chunk, run_on)
                compiles[by_key[key]] = chunk
        runs = {
            run_pool.submit(_run_job, chunk, run_on.padded(chunk.batch), by_key[_compile_key(chunk)], progress): chunk
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
                rows = tables.add(new)
                if chunk.path:
                    _save_chunk(chunk.path, chunk.cells, history)
                if files:
                    files.append(rows)
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
        plan, histories, tables.rows(), tables.summary(), stats["compiled"], stats["compile_s"], stats["run_s"], seconds
    )


def _run_job(
    chunk: _Chunk, batch: int, compile_future: concurrent.futures.Future, progress: _Progress
) -> dict[str, np.ndarray]:
    """Wait for the chunk's program, run the chunk as ``batch`` cells, record the timings."""
    compiled, _, _ = compile_future.result()
    t0 = time.perf_counter()
    history = run_chunk(chunk.program, chunk.start, chunk.stop, batch, compiled)
    progress.ran(chunk, time.perf_counter() - t0)
    return history


class _Progress:
    """Timings of a sweep's compiles and chunks, and its log lines.

    Rates and the ETA come from measured chunk times only (compiling
    excluded): seconds of chunk time per cell-round, over the chunks run so
    far, times the cell-rounds not yet recorded, divided by the chunks that
    run at once; never less than the compiles still to come.
    """

    def __init__(self, todo: list[_Chunk], start: float, workers: int):
        self.start, self.todo, self.workers = start, todo, workers
        self.programs = len({_compile_key(c) for c in todo})
        self.stats = {"compiled": 0, "compile_s": 0.0, "run_s": 0.0, "cells": 0, "cell_rounds": 0}
        self.compiles_done = 0
        self.left = {"chunks": len(todo), "cell_rounds": sum(_cell_rounds(c) for c in todo)}
        self.lock = threading.Lock()

    def compiled(self, chunk: _Chunk, seconds: float, fresh: bool) -> str:
        """Record a finished compile (main thread); its log line."""
        self.compiles_done += 1
        self.stats["compiled"] += fresh
        self.stats["compile_s"] += seconds * fresh
        how = f"compiled in {seconds:.1f}s" if fresh else "already compiled in this process"
        return f"[sweep] program {self.compiles_done}/{self.programs} {how}  | {chunk.program.spec.label()}"

    def ran(self, chunk: _Chunk, seconds: float) -> None:
        """Record a chunk's run (run threads)."""
        with self.lock:
            self.stats["run_s"] += seconds
            self.stats["cells"] += chunk.stop - chunk.start
            self.stats["cell_rounds"] += _cell_rounds(chunk)

    def recorded(self, chunk: _Chunk) -> None:
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

    def line(self, chunk: _Chunk, done: int, total: int) -> str:
        now = time.perf_counter()
        with self.lock:
            rate = self.stats["cell_rounds"] / max(self.stats["run_s"], 1e-9)
        specs = list({id(c.program): c.program.spec for c in self.todo}.values())
        rows = [{key: format_value(v) for key, v in p.structural.items()} for p in specs]
        shown = label_knobs(rows, list(chunk.program.spec.structural))
        return (
            f"[sweep] cells {done}/{total}  {rate:.0f} cell-rounds/s per chunk ({self.workers} at once)  "
            f"elapsed {_duration(now - self.start)}  ETA {_duration(self.eta())}  | {chunk.program.spec.label(shown)}"
        )


def _cell_rounds(chunk: _Chunk) -> int:
    """Rounds the chunk's cells train in all (the last evaluation is the last round)."""
    return (chunk.stop - chunk.start) * max(chunk.program.rounds, default=0)

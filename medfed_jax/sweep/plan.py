"""The grid mini-language: ``cfg.sweep`` -> cells, their structural combinations (programs), labels, overrides.

`plan_sweep` parses and checks a sweep without data or compiling (the
language is in `medfed_jax.sweep`'s docstring): the knob columns, every
`Cell` in order (grid knobs in sorted order, the last varying fastest,
crossed with ``sweep.cells``), one `ProgramSpec` per structural combination,
and the switched knobs. `with_overrides` turns a cell into its run config,
`variant_cells` whole configs into cells, `label_knobs` picks the knobs that
tell rows apart, `format_value` writes a knob value as the CSVs do.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from medfed_jax import config as config_lib
from medfed_jax import runner
from medfed_jax.server import SWITCHABLE, Switches

SWEEP_FIELDS = ("grid", "cells", "numeric", "chunk_size", "switch")
SPECIAL_KNOBS = ("seed", "method")


def numeric_knobs() -> tuple[str, ...]:
    """Knobs that ride the experiment axis: ``seed`` and every traced config field."""
    return ("seed", *config_lib.numeric_fields())


def is_sweep(cfg: Any) -> bool:
    """Whether a config declares a sweep (a non-empty ``cfg.sweep``)."""
    return "sweep" in cfg and len(cfg.sweep) > 0


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
            json.dumps([canonical(v) for k, v in p.structural.items() if k not in self.switched]) for p in self.programs
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


def canonical(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def format_value(value: Any) -> str:
    """A knob value as written in the CSVs (strings bare, numbers by repr, sequences as JSON)."""
    value = canonical(value)
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
        key = json.dumps([canonical(v[k]) for k in knobs])
        if key in seen:
            raise ValueError(f"sweep cells {seen[key]} and {i} are identical ({v}); list each cell once.")
        seen[key] = i
    structural = [k for k in knobs if k not in numeric_knobs()]
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(json.dumps([canonical(v[k]) for k in structural]), []).append(i)
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
        value = canonical(value)
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
    differ = [k for k in flat[0] if any(canonical(f[k]) != canonical(flat[0][k]) for f in flat)]
    differ = [k for k in first if k in differ] + [k for k in differ if k not in first]
    return [{k: f[k] for k in differ} for f in flat]

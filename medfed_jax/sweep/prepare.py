"""Everything short of compiling: each program's engine and data, every cell validated, its knobs and epsilons.

`prepare_sweep` parses the sweep (`medfed_jax.sweep.plan`), refuses one
too large (`medfed_jax.sweep.progress.check_size`), loads each program's data
once per distinct split and checks every cell, so that bad input fails with
one line before anything compiles. A `PreparedProgram` holds what its cells
need on the experiment axis: seeds, numeric knobs, split indices, epsilons.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from medfed_jax import config as config_lib
from medfed_jax import data as data_lib
from medfed_jax import privacy, runner
from medfed_jax.data import base as data_base
from medfed_jax.server import Engine
from medfed_jax.sweep.devices import Execution, execution, place_program_data
from medfed_jax.sweep.plan import Plan, ProgramSpec, format_value, plan_sweep, with_overrides
from medfed_jax.sweep.progress import SweepCost, check_size, sweep_cost
from medfed_jax.types import ClientData, FederatedDataset


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
    hparams: config_lib.HParams  # leaves [n] float32, one per cell
    epsilon: tuple[dict[str, tuple[float, ...]] | None, ...]  # per cell: `PRIVACY_COLUMNS` -> the value after
    # each evaluation; None without DP
    privacy_note: str  # how epsilon is accounted (unit, delta, accountant); '' without DP
    switch_index: dict[str, int] = dataclasses.field(default_factory=dict)  # switched knob -> choice index
    split_index: np.ndarray | None = None  # [n] int32: each cell's split in train/test, None = one shared
    client_epsilon: tuple[np.ndarray | None, ...] = ()  # per cell under DP-SGD: [evaluations, clients], each
    # client's own record-level epsilon (`medfed_jax.privacy.client_record_epsilons`); else None


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
    """(privacy column -> value after each evaluation round, per-client epsilons, accounting note), or
    (None, None, '') without DP.

    Columns: `PRIVACY_COLUMNS`. Per-client: with DP-SGD (a record the unit), each client's own epsilon after
    each evaluation round, ``[evaluations, clients]`` (`medfed_jax.privacy.client_record_epsilons`); else None.
    """
    if method != "federated" or cfg.privacy.mode == "none":
        return None, None, ""
    sizes = [int(n) for n in np.asarray(dataset.train.count)]
    privacy.validate_with_run(cfg, sizes)
    accounting = privacy.accounting_for_run(cfg, dataset.num_clients, sizes)
    note = f"delta={accounting.delta:g} per {accounting.unit}; {accounting.description}"
    columns = {
        "epsilon": tuple(accounting.epsilon_after(r) for r in rounds),
        "epsilon_replace_one": tuple(accounting.replace_one_epsilon_after(r) for r in rounds),
    }
    per_client = None
    if accounting.unit == "record":
        per_client = np.asarray([privacy.client_record_epsilons(cfg, sizes, r) for r in rounds], np.float64)
    return columns, per_client, note


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
    seeds, hparams, epsilons, client_epsilons, notes, splits, cell_split = [], [], [], [], [], [], []
    for index in spec.cells:
        cell = plan.cells[index]
        cell_cfg = with_overrides(cfg, cell.values)
        try:
            dataset = _dataset(cell_cfg, datasets)
            if dataset is not prepared.dataset:
                _check_same_clients(prepared, dataset, cell_cfg.seed)
            config_lib.validate(cell_cfg, prepared.context)
            epsilon, client_epsilon, note = _cell_epsilon(cell_cfg, method, dataset, rounds)
        except ValueError as e:
            raise ValueError(f"sweep cell {index} ({_describe(cell.values)}): {e}") from None
        epsilons.append(epsilon)
        client_epsilons.append(client_epsilon)
        notes.extend([note] if note and note not in notes else [])
        splits.extend([dataset] if all(d is not dataset for d in splits) else [])
        cell_split.append(next(i for i, d in enumerate(splits) if d is dataset))
        seeds.append(cell_cfg.seed)
        hparams.append(config_lib.split(runner.method_config(method, cell_cfg)).hparams)
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
        hparams=jax.tree.map(lambda *cells: np.asarray(cells, np.float32), *hparams),
        epsilon=tuple(epsilons),
        privacy_note="; ".join(notes),
        switch_index={knob: choices.index(spec.structural[knob]) for knob, choices in plan.switches},
        split_index=split_index,
        client_epsilon=tuple(client_epsilons),
    )


def _describe(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in values.items())


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

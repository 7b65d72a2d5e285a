"""Host side of a run: validate, build, loop over evaluation chunks, save, resume.

A run trains exactly ``cfg.rounds`` rounds and evaluates after each of
`medfed_jax.program.eval_rounds` (every ``eval_every`` rounds and the last).
The device work of each chunk (its rounds, then one evaluation:
`medfed_jax.program.make_chunk`) is one call of a program compiled ahead of
time, once for every chunk length, for one seed or vmapped over seeds
(`train_evaluations`, shared by single runs and ``--seeds``). Each seed
trains on its own split (`seed_datasets`: ``data.seed`` None follows the run
seed; an integer, or a dataset handed to `prepare`, pins one split for every
seed); vmapped seeds' splits are stacked, padded to a common size
(`medfed_jax.data.base.stack_splits`). Between chunks
the host prints a progress line (rounds/s measured after compiling, ETA) and,
when given a checkpoint path, writes a checkpoint atomically so that a killed
run resumes where it stopped with the same results.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from medfed_jax import baselines, client_results, compilation_cache, personalize, privacy, tabular
from medfed_jax import config as config_lib
from medfed_jax import data as data_lib
from medfed_jax import mesh as mesh_lib
from medfed_jax.data import base as data_base
from medfed_jax.data import population
from medfed_jax.eval import pooled_score
from medfed_jax.models import check_input_fits, make_model, param_shapes
from medfed_jax.program import (
    chunk_lengths,
    eval_rounds,  # noqa: F401  (re-exported: the one schedule of evaluation rounds)
    jit_on,
    make_chunk,
)
from medfed_jax.server import Engine, Switches, build_engine
from medfed_jax.types import ClientData, FederatedDataset

# federated (as configured), the baselines, and the personalised methods of `medfed_jax.personalize`.
METHODS = ("federated", "local_only", "pooled", *personalize.PERSONAL_METHODS)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A validated config with its data: everything needed before compiling."""

    cfg: Any
    dataset: FederatedDataset
    context: config_lib.BuildContext
    hparams: config_lib.HParams  # the numeric settings of ``cfg``, traced (`medfed_jax.config.split`)
    accounting: privacy.Accounting  # the (epsilon, delta) bookkeeping of the run's DP settings
    split_follows_seed: bool = False  # each seed draws its own split (data.seed None, data loaded here)


def build_context(cfg: Any, dataset: FederatedDataset) -> config_lib.BuildContext:
    """Facts about the data that validation and builders need."""
    flat = not isinstance(dataset.train, ClientData)  # a flat or generated population
    return config_lib.BuildContext(
        num_clients=dataset.num_clients,
        cohort_size=config_lib.cohort_slots(cfg, dataset.num_clients),
        num_classes=dataset.num_classes,
        feature_shape=dataset.feature_shape,
        cohort_cap=population.resolve_cap(cfg.data, dataset.train.count) if flat else 0,
        sampling_rate=cfg.sampling_rate if cfg.cohort_sampling == "poisson" else 0.0,
        dropout=float(cfg.unreliable.dropout),
    )


def prepare(cfg: Any, dataset: FederatedDataset | None = None) -> Prepared:
    """Load the data (unless given) and validate everything; nothing compiles.

    Turns on the persistent compilation cache unless this process already chose
    (`medfed_jax.compilation_cache.enable_once`), and splits a CPU host into one
    device per core unless JAX's backend already started (`medfed_jax.mesh`).
    """
    compilation_cache.enable_once()
    mesh_lib.configure_default_devices()
    config_lib.validate_run_settings(cfg, num_clients=1 << 62)
    follows = dataset is None and data_lib.follows_run_seed(cfg.data)
    if dataset is None:
        dataset = data_lib.load_dataset(cfg.data, cfg.seed)
    data_lib.validate_dataset(dataset)
    population.validate_run(cfg, dataset)
    context = build_context(cfg, dataset)
    config_lib.validate(cfg, context)
    client_sizes = [int(n) for n in np.asarray(dataset.train.count)]
    privacy.validate_with_run(cfg, client_sizes)
    accounting = privacy.accounting_for_run(cfg, dataset.num_clients, client_sizes)
    model = make_model(cfg.model.name, dataset.num_classes, tuple(cfg.model.widths))
    check_input_fits(model, cfg.model.name, dataset.feature_shape)
    for name in cfg.baselines:
        if name not in METHODS[1:]:
            raise ValueError(f"baselines={tuple(cfg.baselines)!r}: {name!r} is unknown; choose from {METHODS[1:]}.")
    if "fedper" in (cfg.personalization.method, *cfg.baselines):
        params = param_shapes(model, dataset.feature_shape)
        personalize.validate_local_paths(cfg.personalization, personalize.param_paths(params))
    return Prepared(cfg, dataset, context, config_lib.split(cfg).hparams, accounting, follows)


def seed_datasets(prepared: Prepared, seeds: Sequence[int]) -> list[FederatedDataset]:
    """Each seed's dataset: ``prepared.dataset`` for all when the split is pinned, else seed ``s``'s own split.

    A new split is checked like the first (`prepare`): same clients and shapes
    of the model's input, privacy limits; its DP accounting must equal the
    first's (client-level DP depends on the clients only; record-level DP on
    their sizes: pin ``data.seed`` where those vary).
    """
    if not prepared.split_follows_seed:
        return [prepared.dataset] * len(seeds)
    cfg, datasets = prepared.cfg, []
    for seed in seeds:
        dataset = prepared.dataset if seed == cfg.seed else data_lib.load_dataset(cfg.data, seed)
        if dataset is not prepared.dataset:
            data_lib.validate_dataset(dataset)
            if not isinstance(dataset.train, ClientData):
                raise ValueError(
                    f"data.storage={cfg.data.storage!r}: several seeds of a flat or generated population cannot "
                    "stack their splits; pin the population with data.seed=<int> (the training seed still varies)."
                )
            sizes = [int(n) for n in np.asarray(dataset.train.count)]
            privacy.validate_with_run(cfg, sizes)
            if privacy.accounting_for_run(cfg, dataset.num_clients, sizes) != prepared.accounting:
                raise ValueError(
                    f"seed {seed}'s split gives a different privacy accounting than seed {cfg.seed}'s (client "
                    "sizes differ); pin the split with data.seed=<int> to report one epsilon."
                )
        datasets.append(dataset)
    return datasets


def method_view(method: str, dataset: FederatedDataset) -> FederatedDataset:
    """The data a method trains on: the dataset, or for pooled training its training rows as one client."""
    return baselines.pooled_training_view(dataset) if method == "pooled" else dataset


def method_config(method: str, cfg: Any) -> Any:
    """The config a method runs: ``cfg`` (federated), the baselines' (`medfed_jax.baselines`), or ``cfg``
    with ``personalization.method`` set (the personalised methods)."""
    if method == "federated":
        return cfg
    if method == "local_only":
        return baselines.local_only_config(cfg)
    if method == "pooled":
        return baselines.pooled_config(cfg)
    if method in personalize.PERSONAL_METHODS:
        personal_cfg = cfg.copy_and_resolve_references()
        personal_cfg.personalization.method = method
        return personal_cfg
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")


def engine_for(
    method: str, prepared: Prepared, switches: Switches = (), mesh: jax.sharding.Mesh | None = None
) -> tuple[Engine, FederatedDataset, Any]:
    """The engine, data view and config (`method_config`) of one method of a prepared run.

    ``switches`` (`medfed_jax.server.build_engine`): structural choices the
    program picks at run time from its ``choices`` argument; the baselines
    ignore them (no attack, a plain mean). ``mesh``: the devices the cohort is
    split over (`build_engine`'s default: every device; local-only: one).
    """
    cfg, view = method_config(method, prepared.cfg), method_view(method, prepared.dataset)
    if method == "local_only":
        return baselines.build_local_only(config_lib.split(cfg).static, build_context(cfg, view)), view, cfg
    if method == "pooled":
        return build_engine(config_lib.split(cfg).static, build_context(cfg, view), (), mesh), view, cfg
    return build_engine(config_lib.split(cfg, switches).static, prepared.context, switches, mesh), view, cfg


class CorruptFile(ValueError):
    """A file medfed_jax wrote earlier that cannot be read back (truncated, overwritten, not ours)."""


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluation of a run: after ``round`` rounds, ``elapsed_s`` wall seconds into it (compiling
    included, resumed runs counting their earlier sessions); ``metrics`` carry a leading seed axis."""

    round: int
    elapsed_s: float
    metrics: dict[str, np.ndarray]


class DeviceLoop(NamedTuple):
    """The jitted functions the host loop calls: for one seed, or vmapped over a leading seed axis.

    ``init(seed, train, hparams) -> state``;
    ``chunk(state, train, test, hparams, num_rounds) -> (state, metrics)``
    (`medfed_jax.program.make_chunk`, ``num_rounds`` traced: one compile for
    every chunk length). ``split_axis``: train and test carry the seed axis
    too (each seed its own split), else every seed shares them.
    """

    init: Callable
    chunk: Callable
    seed_axis: bool
    split_axis: bool = False


@functools.lru_cache(maxsize=64)
def _device_loop(engine: Engine, seed_axis: bool, split_axis: bool) -> DeviceLoop:
    init = engine.init
    chunk = make_chunk(engine.round_step, engine.evaluate, engine.eval_params)
    if seed_axis:
        data = 0 if split_axis else None
        init = jax.vmap(init, in_axes=(0, data, None))
        chunk = jax.vmap(chunk, in_axes=(0, data, data, None, None))
    jit = jit_on(engine.mesh)
    return DeviceLoop(jit(init), jit(chunk), seed_axis, split_axis)


def device_loop(engine: Engine, seed_axis: bool, split_axis: bool = False) -> DeviceLoop:
    """The `DeviceLoop` of an engine (cached; engines that differ only in their schedule share it)."""
    return _device_loop(engine._replace(program=None), seed_axis, split_axis)


def compile_loop(loop: DeviceLoop, seed: Any, train: ClientData, test: ClientData, hparams: config_lib.HParams):
    """``(init, chunk)`` compiled ahead of time for these arguments' shapes, and the seconds it took."""
    start = time.perf_counter()
    init = loop.init.lower(seed, train, hparams).compile()
    state = jax.eval_shape(loop.init, seed, train, hparams)
    chunk = loop.chunk.lower(state, train, test, hparams, jax.ShapeDtypeStruct((), np.int32)).compile()
    return init, chunk, time.perf_counter() - start


def _evaluations_to_json(evaluations: list[Evaluation]) -> str:
    return json.dumps(
        [{**dataclasses.asdict(e), "metrics": jax.tree.map(np.ndarray.tolist, e.metrics)} for e in evaluations]
    )


def _evaluations_from_json(text: str) -> list[Evaluation]:
    return [
        Evaluation(e["round"], e["elapsed_s"], {k: np.asarray(v, np.float32) for k, v in e["metrics"].items()})
        for e in json.loads(text)
    ]


def save_checkpoint(path: str, state: Any, evaluations: list[Evaluation]) -> None:
    """State leaves and the evaluations so far, written atomically."""
    leaves = {f"leaf{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(state))}
    history = _evaluations_to_json(evaluations)
    tabular.write_atomic(path, lambda f: np.savez(f, history=history, **leaves), mode="wb")


def load_checkpoint(path: str, like: Any) -> tuple[Any, list[Evaluation]]:
    """Restore a checkpoint into the tree structure, leaf shapes, dtypes and devices of ``like``.

    Raises `CorruptFile` naming the file and the remedy when it cannot be read.
    """
    treedef, expected = jax.tree.structure(like), jax.tree.leaves(like)
    try:
        with np.load(path, allow_pickle=False) as saved:
            leaves = [saved[f"leaf{i}"] for i in range(treedef.num_leaves)]
            history = _evaluations_from_json(str(saved["history"]))
        for i, (leaf, want) in enumerate(zip(leaves, expected)):
            if leaf.shape != np.shape(want):
                raise ValueError(f"leaf{i} has shape {leaf.shape}, this run's state {np.shape(want)}")
    except (OSError, EOFError, KeyError, TypeError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        raise CorruptFile(
            f"{path} is corrupt (truncated or not a checkpoint of this run: {error}); rerun with --overwrite "
            "or delete it."
        ) from error
    state = jax.tree.map(lambda a, x: jax.device_put(a.astype(x.dtype)), jax.tree.unflatten(treedef, leaves), like)
    return state, history


def _is_private(cfg: Any, method: str) -> bool:
    """Whether a method of the run ``cfg`` releases a DP model (the baselines train without DP)."""
    return cfg.privacy.mode != "none" and method not in ("local_only", "pooled")


def _spread(values: np.ndarray, digits: int = 4) -> str:
    """``mean`` of one seed's value, ``mean±std`` (sample std, ddof 1) over several."""
    values = np.asarray(values, np.float64)
    return f"{values.mean():.{digits}f}" + (f"±{values.std(ddof=1):.{digits}f}" if values.size > 1 else "")


def progress_line(method: str, evaluation: Evaluation, cfg: Any, accounting: privacy.Accounting, rate: float) -> str:
    """``[method] round r/R`` with accuracy, losses, epsilon, elapsed, rounds/s after compiling and the ETA.

    ``acc`` and ``loss`` are the method's score on all test rows (`medfed_jax.eval.pooled_score`). Over
    several seeds each metric is ``mean±std``; diverged seeds are counted.
    """
    m, left = evaluation.metrics, cfg.rounds - evaluation.round
    score = pooled_score(m)
    seeds = len(m["diverged"])
    diverged = int(np.sum(m["diverged"] > 0))
    return (
        f"[{method}] round {evaluation.round:4d}/{cfg.rounds}  acc {_spread(m[f'{score}_accuracy'])}  "
        f"loss {_spread(m[f'{score}_loss'])}  train_loss {_spread(m['train_loss'])}  "
        + (
            f"eps {accounting.epsilon_after(evaluation.round):.3g} (delta {cfg.privacy.delta:g})  "
            if _is_private(cfg, method)
            else ""
        )
        + (f"DIVERGED {diverged}/{seeds} seed(s)  " if diverged else "")
        + f"elapsed {evaluation.elapsed_s:7.1f}s  {rate:6.1f} rounds/s  ETA {left / max(rate, 1e-9):6.1f}s"
    )


def _resume(method: str, checkpoint: str | None, state: Any, log: Callable[[str], None] | None):
    """``(state, evaluations)`` from the checkpoint when there is one, else ``(state, [])``."""
    if not checkpoint or not os.path.exists(checkpoint):
        return state, []
    state, evaluations = load_checkpoint(checkpoint, state)
    if log:
        log(f"[{method}] resumed from {checkpoint} at round {evaluations[-1].round if evaluations else 0}")
    return state, evaluations


def place_data(engine: Engine, view: FederatedDataset) -> tuple[ClientData, ClientData]:
    """Train and test data on the engine's devices (`medfed_jax.mesh.put`): the population split
    over the client mesh when every client trains each round, else replicated."""
    full = engine.context.cohort_size >= engine.context.num_clients and not engine.context.sampling_rate
    train = mesh_lib.put(tuple(view.train), engine.mesh, shard_clients=full)
    return type(view.train)(*train), type(view.test)(*mesh_lib.put(tuple(view.test), engine.mesh))


def place_splits(engine: Engine, views: Sequence[FederatedDataset]) -> tuple[ClientData, ClientData]:
    """Each seed's train and test data stacked on a leading seed axis, replicated on the engine's devices."""
    stacked = [data_base.stack_splits([getattr(v, part) for v in views]) for part in ("train", "test")]
    return tuple(ClientData(*mesh_lib.put(tuple(data), engine.mesh)) for data in stacked)


def train_evaluations(
    method: str,
    prepared: Prepared,
    seeds: Sequence[int],
    seed_axis: bool = True,
    checkpoint: str | None = None,
    log: Callable[[str], None] | None = print,
) -> list[Evaluation]:
    """Train one method for every seed in evaluation chunks (`medfed_jax.program.eval_rounds`); the evaluations.

    The host loop of every run: compile `device_loop` ahead of time (its own
    progress line), then one compiled call per chunk and a progress line (and
    a checkpoint, when given: a killed run resumes at its last evaluation)
    after each. ``seed_axis``: vmap over ``seeds`` (else exactly one seed, plain).
    """
    engine, _, cfg = engine_for(method, prepared)
    hparams = config_lib.split(cfg).hparams
    if not seed_axis and len(seeds) != 1:
        raise ValueError(f"train_evaluations: without a seed axis give exactly one seed, got {list(seeds)}.")
    seed = np.asarray(seeds, np.uint32) if seed_axis else np.uint32(seeds[0])
    datasets = seed_datasets(prepared, seeds)
    split_axis = seed_axis and any(d is not datasets[0] for d in datasets)
    if split_axis:
        train, test = place_splits(engine, [method_view(method, d) for d in datasets])
    else:
        train, test = place_data(engine, method_view(method, datasets[0]))
    start = time.perf_counter()
    loop = device_loop(engine, seed_axis, split_axis)
    init, chunk, compile_s = compile_loop(loop, seed, train, test, hparams)
    if log:
        log(f"[{method}] compiled in {compile_s:.1f}s" + (f" ({len(seeds)} seeds vmapped)" if seed_axis else ""))
    state, evaluations = _resume(method, checkpoint, init(seed, train, hparams), log)
    done = evaluations[-1].round if evaluations else 0
    before = evaluations[-1].elapsed_s if evaluations else 0.0
    run_start, first = time.perf_counter(), done
    for num_rounds in chunk_lengths(cfg.rounds, cfg.eval_every, done):
        state, metrics = chunk(state, train, test, hparams, np.int32(num_rounds))
        metrics = {k: np.asarray(v) if seed_axis else np.asarray(v)[None] for k, v in jax.device_get(metrics).items()}
        done += num_rounds
        now = time.perf_counter()
        evaluations.append(Evaluation(done, round(before + now - start, 3), metrics))
        if checkpoint:
            save_checkpoint(checkpoint, state, evaluations)
        if log:
            log(
                progress_line(
                    method, evaluations[-1], cfg, prepared.accounting, (done - first) / max(now - run_start, 1e-9)
                )
            )
    return evaluations


def history_rows(method: str, prepared: Prepared, evaluations: list[Evaluation], seeds: Sequence[int] | None = None):
    """history.csv rows: per seed (a ``seed`` column when ``seeds`` is given, else the one seed), per evaluation.

    Scalars as they are, ``client_accuracy`` as ``accuracy[<client>]`` (or
    quantiles beyond `client_results.PER_CLIENT_COLUMNS` clients), then
    ``epsilon`` for private methods and ``elapsed_s``.
    """
    names, cfg = prepared.dataset.eval_names, prepared.cfg
    rows = []
    for s in range(len(seeds) if seeds is not None else 1):
        for evaluation in evaluations:
            row = {"seed": seeds[s]} if seeds is not None else {}
            row.update({"method": method, "round": evaluation.round})
            for name, values in evaluation.metrics.items():
                value = values[s]
                if value.ndim == 0:
                    row[name] = float(value)
                elif name == "client_accuracy":  # named columns, or quantiles and clients.csv values
                    per_client = {
                        m: evaluation.metrics[m][s] for m in client_results.LONG_METRICS if m in evaluation.metrics
                    }
                    row.update(client_results.columns(per_client, names))
            if _is_private(cfg, method):
                row["epsilon"] = prepared.accounting.epsilon_after(evaluation.round)
            row["elapsed_s"] = evaluation.elapsed_s
            rows.append(row)
    return rows


def train_method(
    method: str,
    prepared: Prepared,
    seed: int | None = None,
    checkpoint: str | None = None,
    log: Callable[[str], None] | None = print,
) -> list[dict]:
    """Train one method (one seed, default ``cfg.seed``) in evaluation chunks; one history row per evaluation."""
    seed = prepared.cfg.seed if seed is None else seed
    evaluations = train_evaluations(method, prepared, [seed], seed_axis=False, checkpoint=checkpoint, log=log)
    return history_rows(method, prepared, evaluations)


def methods_of(cfg: Any) -> tuple[str, ...]:
    """The methods a config runs: federated, then its baselines."""
    return ("federated", *cfg.baselines)


def run(cfg: Any, dataset: FederatedDataset | None = None, log: Callable[[str], None] | None = print) -> dict:
    """Run a config's federated training and baselines; returns method -> history."""
    prepared = prepare(cfg, dataset)
    return {method: train_method(method, prepared, log=log) for method in methods_of(cfg)}


def stack_evaluations(evaluations: list[Evaluation]) -> dict[str, np.ndarray]:
    """Metrics ``[seeds, evaluations, ...]`` of a run's evaluations."""
    return {k: np.stack([e.metrics[k] for e in evaluations], axis=1) for k in evaluations[0].metrics}


def run_seeds(
    prepared: Prepared,
    method: str,
    seeds: list[int],
    checkpoint: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Every seed of one method, vmapped, in evaluation chunks (`train_evaluations`).

    Returns the history arrays with a leading seed axis: ``[seeds, evaluations, ...]``.
    """
    return stack_evaluations(train_evaluations(method, prepared, seeds, checkpoint=checkpoint, log=log))

"""Host side of a run: validate, build, loop over evaluation chunks, save, resume.

The device work of each chunk (``eval_every`` rounds under `lax.scan`, then one
evaluation) is one compiled call; between chunks the host prints a progress
line and, when given a workdir, writes a checkpoint atomically so that a
killed run resumes where it stopped with the same results.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from medfed_jax import baselines, client_results, personalize, privacy
from medfed_jax import config as config_lib
from medfed_jax import data as data_lib
from medfed_jax.data import population
from medfed_jax.models import check_input_fits, make_model
from medfed_jax.server import Engine, Switches, build_engine, static_config
from medfed_jax.types import ClientData, FederatedDataset, Knobs

# federated (as configured), the baselines, and the personalised methods of `medfed_jax.personalize`.
METHODS = ("federated", "local_only", "pooled", *personalize.PERSONAL_METHODS)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A validated config with its data: everything needed before compiling."""

    cfg: Any
    dataset: FederatedDataset
    context: config_lib.BuildContext
    knobs: Knobs
    accounting: privacy.Accounting  # the (epsilon, delta) bookkeeping of the run's DP settings


def build_context(cfg: Any, dataset: FederatedDataset) -> config_lib.BuildContext:
    """Facts about the data that validation and builders need."""
    flat = not isinstance(dataset.train, ClientData)  # a flat or generated population
    return config_lib.BuildContext(
        num_clients=dataset.num_clients,
        cohort_size=cfg.cohort_size or dataset.num_clients,
        num_classes=dataset.num_classes,
        feature_shape=dataset.feature_shape,
        cohort_cap=population.resolve_cap(cfg.data, dataset.train.count) if flat else 0,
    )


def prepare(cfg: Any, dataset: FederatedDataset | None = None) -> Prepared:
    """Load the data (unless given) and validate everything; nothing compiles."""
    config_lib.validate_run_settings(cfg, num_clients=1 << 62)
    if dataset is None:
        dataset = data_lib.load_dataset(cfg.data)
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
        example = jax.ShapeDtypeStruct((1, *dataset.feature_shape), np.float32)
        params = jax.eval_shape(model.init, jax.random.key(0), example)
        personalize.validate_local_paths(cfg.personalization, personalize.param_paths(params))
    return Prepared(cfg, dataset, context, config_lib.knobs_from_config(cfg), accounting)


def engine_for(method: str, prepared: Prepared, switches: Switches = ()) -> tuple[Engine, FederatedDataset, Any]:
    """The engine, data view and config of one method of a prepared run.

    ``switches`` (`medfed_jax.server.build_engine`): structural choices the
    program picks at run time from ``knobs``; pooled training ignores them (it
    has no attack and a plain mean), local-only training has no use for them.
    """
    cfg, dataset = prepared.cfg, prepared.dataset
    switched = [path for path, _ in switches]
    if method == "federated":
        return build_engine(static_config(cfg, switched), prepared.context, switches), dataset, cfg
    if method == "local_only":
        return baselines.build_local_only(static_config(cfg, switched), prepared.context), dataset, cfg
    if method == "pooled":
        pooled_cfg = baselines.pooled_config(cfg)
        view = baselines.pooled_training_view(dataset)
        return build_engine(static_config(pooled_cfg), build_context(pooled_cfg, view)), view, pooled_cfg
    if method in personalize.PERSONAL_METHODS:
        personal_cfg = cfg.copy_and_resolve_references()
        personal_cfg.personalization.method = method
        engine = build_engine(static_config(personal_cfg, switched), prepared.context, switches)
        return engine, dataset, personal_cfg
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")


def _write_atomic(path: str, write: Callable[[Any], None], mode: str = "w") -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    """Write a text file so that a crash leaves either the old or the new file."""
    _write_atomic(path, lambda f: f.write(text))


def save_checkpoint(path: str, state: Any, history: list[dict]) -> None:
    """State leaves and the history so far, written atomically."""
    leaves = {f"leaf{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(state))}
    _write_atomic(path, lambda f: np.savez(f, history=json.dumps(history), **leaves), mode="wb")


def load_checkpoint(path: str, like: Any) -> tuple[Any, list[dict]]:
    """Restore a checkpoint into the tree structure of ``like``."""
    with np.load(path) as saved:
        treedef = jax.tree.structure(like)
        leaves = [saved[f"leaf{i}"] for i in range(treedef.num_leaves)]
        return jax.tree.unflatten(treedef, leaves), json.loads(str(saved["history"]))


def _row(metrics: dict, method: str, round_done: int, elapsed: float, client_names: tuple[str, ...]) -> dict:
    metrics = jax.device_get(metrics)
    row = {"method": method, "round": round_done}
    for name, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 0:
            row[name] = float(value)
        elif name == "client_accuracy":
            row.update(client_results.columns(metrics, client_names))
    row["elapsed_s"] = round(elapsed, 3)
    return row


def train_method(
    method: str,
    prepared: Prepared,
    seed: int | None = None,
    checkpoint: str | None = None,
    log: Callable[[str], None] | None = print,
) -> list[dict]:
    """Train one method in evaluation chunks; returns one history row per evaluation."""
    engine, view, cfg = engine_for(method, prepared)
    seed = cfg.seed if seed is None else seed
    train, test = jax.device_put(tuple(view.train)), jax.device_put(tuple(view.test))
    train, test = type(view.train)(*train), type(view.test)(*test)
    start = time.perf_counter()
    state = engine.init(seed, train, prepared.knobs)
    history: list[dict] = []
    if checkpoint and os.path.exists(checkpoint):
        state, history = load_checkpoint(checkpoint, state)
        if log:
            log(f"[{method}] resumed from {checkpoint} at round {int(state.round)}")
    previous = history[-1]["elapsed_s"] if history else 0.0
    while int(state.round) < cfg.rounds:
        chunk_start = time.perf_counter()
        state, metrics = engine.run_rounds(state, train, prepared.knobs, cfg.eval_every)
        evaluation = engine.evaluate(engine.eval_params(state, train, prepared.knobs), test)
        last = jax.tree.map(lambda m: m[-1], metrics)
        elapsed = previous + time.perf_counter() - start
        row = _row({**last, **evaluation}, method, int(state.round), elapsed, view.eval_names)
        private = cfg.privacy.mode != "none" and method != "local_only"
        if private:
            row["epsilon"] = prepared.accounting.epsilon_after(row["round"])
        history.append(row)
        if checkpoint:
            save_checkpoint(checkpoint, state, history)
        if log:
            rate = cfg.eval_every / max(time.perf_counter() - chunk_start, 1e-9)
            log(
                f"[{method}] round {row['round']:4d}/{cfg.rounds}  acc {row['test_accuracy']:.4f}  "
                f"loss {row['test_loss']:.4f}  train_loss {row['train_loss']:.4f}  "
                + (f"eps {row['epsilon']:.3g} (delta {cfg.privacy.delta:g})  " if private else "")
                + f"elapsed {elapsed:7.1f}s  {rate:6.1f} rounds/s"
            )
    return history


def methods_of(cfg: Any) -> tuple[str, ...]:
    """The methods a config runs: federated, then its baselines."""
    return ("federated", *cfg.baselines)


def run(cfg: Any, dataset: FederatedDataset | None = None, log: Callable[[str], None] | None = print) -> dict:
    """Run a config's federated training and baselines; returns method -> history."""
    prepared = prepare(cfg, dataset)
    return {method: train_method(method, prepared, log=log) for method in methods_of(cfg)}


def run_seeds(prepared: Prepared, method: str, seeds: list[int]) -> dict:
    """Every seed of one method as ONE compiled program (vmap over seeds).

    Returns the history arrays with a leading seed axis.
    """
    engine, view, _ = engine_for(method, prepared)
    seeds = np.asarray(seeds, np.uint32)
    return jax.device_get(
        jax.vmap(engine.program, in_axes=(0, None, None, None))(seeds, view.train, view.test, prepared.knobs)
    )

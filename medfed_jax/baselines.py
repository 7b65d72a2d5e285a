"""Baselines beside federated training, vmapped the same way.

- *local-only*: each client trains its own model on its own data alone, with
  the same local work per round as in the federation and the same number of
  rounds (so the same total budget); no communication.
- *pooled*: centralised training on the union of all clients' training rows
  (the federated engine with a single client), same epochs and rounds.

Both are evaluated on every client's own test split and on all clients' test
rows together: pooled training's one model as the federated model
(``global_pooled_*``), local-only's client models each on all rows and then
averaged (``mean_client_model_*``; `medfed_jax.eval`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from medfed_jax import config as config_lib
from medfed_jax.client import LocalSpec, make_local_update, map_clients
from medfed_jax.data.base import pool_clients
from medfed_jax.eval import make_evaluate_per_client_models
from medfed_jax.models import make_model
from medfed_jax.server import Engine, default_parallelism, local_hparams, make_program
from medfed_jax.types import Array, ClientData, FederatedDataset, Knobs


class LocalOnlyState(NamedTuple):
    """Per-client models ``params`` (leading client axis), round, base key."""

    params: Any
    round: Array
    key: Array


@functools.lru_cache(maxsize=16)
def build_local_only(cfg: ml_collections.FrozenConfigDict, context: config_lib.BuildContext) -> Engine:
    """An `Engine` whose state holds one model per client, trained alone."""
    model = make_model(cfg.model.name, context.num_classes, tuple(cfg.model.widths))
    parallelism, chunk = default_parallelism(cfg)

    def init(seed: Array, train: ClientData, knobs: Knobs) -> LocalOnlyState:
        del knobs
        model_key, _, run_key = jax.random.split(jax.random.PRNGKey(seed), 3)
        params = model.init(model_key, jnp.zeros((1, *train.x.shape[2:]), jnp.float32))
        stacked = jax.tree.map(lambda p: jnp.broadcast_to(p, (context.num_clients, *p.shape)), params)
        return LocalOnlyState(stacked, jnp.zeros((), jnp.int32), run_key)

    def round_step(state: LocalOnlyState, train: ClientData, knobs: Knobs):
        spec = LocalSpec.from_config(cfg.local, train.y.shape[1])
        local_update = make_local_update(model, spec)
        round_key = jax.random.fold_in(state.key, state.round)
        keys = jax.vmap(lambda i: jax.random.fold_in(round_key, i))(jnp.arange(context.num_clients))
        deltas, metrics = map_clients(
            local_update, (state.params, tuple(train), keys, local_hparams(knobs)), (0, 0, 0, None), parallelism, chunk
        )
        params = jax.tree.map(jnp.add, state.params, deltas)
        weights = train.count.astype(jnp.float32)
        loss = jnp.sum(weights * metrics["train_loss"]) / jnp.sum(weights)
        return LocalOnlyState(params, state.round + 1, state.key), {"train_loss": loss}

    def run_rounds(state, train, knobs, num_rounds: int):
        return jax.lax.scan(lambda s, _: round_step(s, train, knobs), state, None, length=num_rounds)

    evaluate = make_evaluate_per_client_models(model)
    return Engine(
        init=jax.jit(init),
        round_step=jax.jit(round_step),
        run_rounds=jax.jit(run_rounds, static_argnums=3),
        evaluate=jax.jit(evaluate),
        program=jax.jit(make_program(init, round_step, evaluate, cfg.rounds, cfg.eval_every)),
        context=context,
    )


def pooled_training_view(dataset: FederatedDataset) -> FederatedDataset:
    """Training rows pooled into one client; the test splits stay per client."""
    return FederatedDataset(
        name=f"{dataset.name}-pooled",
        train=pool_clients(dataset.train),
        test=dataset.test,
        client_names=dataset.client_names,
        num_classes=dataset.num_classes,
        info=dataset.info,
    )


def pooled_config(cfg: Any) -> Any:
    """The run config for centralised training: one client, no attack, no DP, plain mean, no personalisation."""
    cfg = cfg.copy_and_resolve_references()
    cfg.cohort_size, cfg.cohort_sampling, cfg.sampling_rate, cfg.max_cohort = 0, "fixed", 0.0, 0
    defaults = config_lib.default_config()
    cfg.attack = defaults.attack
    cfg.aggregator = defaults.aggregator
    cfg.privacy = defaults.privacy
    cfg.personalization = defaults.personalization
    return cfg

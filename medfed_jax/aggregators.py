"""Aggregation rules as pure functions over the stacked client axis.

Every rule is a factory returning `Aggregator(init, aggregate)`; see
`medfed_jax.types.Aggregator` for the contract. Clients with ``mask == False``
have no influence on any output.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from medfed_jax.types import Aggregator, Knobs


def broadcast_clients(v: jax.Array, leaf: jax.Array) -> jax.Array:
    """Reshape a ``[C]`` vector so that it broadcasts against a ``[C, ...]`` leaf."""
    return v.reshape(v.shape + (1,) * (leaf.ndim - 1))


def zero_masked(updates: Any, mask: jax.Array) -> Any:
    """Replace the rows of masked-out clients by zeros (NaN-safe)."""
    return jax.tree.map(
        lambda u: jnp.where(broadcast_clients(mask, u), u, jnp.zeros_like(u)), updates
    )


def count_nonfinite(updates: Any, mask: jax.Array) -> jax.Array:
    """Number of taking-part clients whose update has a NaN or an Inf."""
    bad = jnp.zeros(mask.shape, bool)
    for leaf in jax.tree.leaves(updates):
        bad = bad | ~jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
    return jnp.sum(bad & mask)


def _stateless_init(params: Any) -> tuple:
    del params
    return ()


def weighted_mean() -> Aggregator:
    """Sample-count-weighted mean of the taking-part clients (FedAvg).

    ``update = sum_i m_i w_i u_i / sum_i m_i w_i``. A non-finite update is
    *not* filtered (the mean is not robust): it poisons the result, and the
    diagnostic ``nonfinite_clients`` reports how many clients sent one.
    """

    def aggregate(updates, weights, mask, state, key):
        del key
        w = jnp.where(mask, weights.astype(jnp.float32), 0.0)
        w = w / jnp.maximum(jnp.sum(w), jnp.finfo(jnp.float32).tiny)
        clean = zero_masked(updates, mask)
        update = jax.tree.map(lambda u: jnp.tensordot(w, u, axes=1), clean)
        return update, state, {"nonfinite_clients": count_nonfinite(updates, mask)}

    return Aggregator(_stateless_init, aggregate)


def mean() -> Aggregator:
    """Unweighted mean of the taking-part clients: ``sum_i m_i u_i / sum_i m_i``."""
    inner = weighted_mean()

    def aggregate(updates, weights, mask, state, key):
        return inner.aggregate(updates, jnp.ones_like(weights), mask, state, key)

    return Aggregator(_stateless_init, aggregate)


AGGREGATOR_NAMES = ("weighted_mean", "mean")
NUMERIC_FIELDS: tuple[str, ...] = ()


def default_config() -> ml_collections.ConfigDict:
    """The ``aggregator`` section of a run config."""
    return ml_collections.ConfigDict(dict(name="weighted_mean"))


def validate_config(cfg: Any, context: Any) -> None:
    """Raise a ValueError naming ``aggregator.<field>`` and the fix."""
    del context
    if cfg.name not in AGGREGATOR_NAMES:
        raise ValueError(f"aggregator.name={cfg.name!r} is unknown; choose one of {AGGREGATOR_NAMES}.")


def build_aggregator(cfg: Any, knobs: Knobs) -> Aggregator:
    """The aggregator named by ``cfg.name`` (the config's ``aggregator`` section).

    Called inside the traced program: numeric settings come from ``knobs``
    (traced), structural ones from ``cfg`` (static).
    """
    del knobs
    if cfg.name == "weighted_mean":
        return weighted_mean()
    if cfg.name == "mean":
        return mean()
    raise ValueError(
        f"aggregator.name={cfg.name!r} is unknown; choose one of {AGGREGATOR_NAMES}."
    )

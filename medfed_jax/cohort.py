"""Who takes part in a round: the round's static facts (`RoundSpec`), the cohort draw, per-client state rows.

`draw_cohort` picks the round's clients (all of them, ``cohort_size`` uniformly
without replacement, or a Poisson cohort in padded slots) and their data block;
`gather_clients` / `scatter_clients` read and write the cohort's rows of
per-client state ``[N, ...]`` (personal models, drift control variates,
error-feedback residuals). Used by `medfed_jax.server.round_step`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from medfed_jax import asynchronous, unreliable
from medfed_jax import config as config_lib
from medfed_jax.data import population
from medfed_jax.types import Array, ClientData, Model


class RoundSpec(NamedTuple):
    """The static facts of a round besides its components: the data's shape, the model, the client mapping."""

    context: config_lib.BuildContext
    model: Model
    parallelism: str  # 'vmap' or 'map' (`default_parallelism`)
    chunk: int  # clients per vmapped chunk under 'map'
    mesh: jax.sharding.Mesh | None  # the 'clients' mesh local training is split over; None: one device
    by_coordinate: bool  # re-split updates over coordinates before aggregating (`mesh.spread_coordinates`)
    own_keys: bool = False  # local-only: client i trains with fold_in(round key, i), its key stream (no purpose)
    unreliable: unreliable.Unreliable | None = None  # dropout, stragglers, compute budgets; None: every client sends
    asynchronous: asynchronous.FedBuff | None = None  # FedBuff server steps (`medfed_jax.server.fedbuff_step`)

    @property
    def poisson(self) -> bool:
        """Poisson cohorts in ``cohort_size`` slots (`population.poisson_cohort`)."""
        return self.context.sampling_rate > 0

    @property
    def flat(self) -> bool:
        """A flat or generated population, in ``[cohort, cohort_cap]`` blocks."""
        return self.context.cohort_cap > 0

    @property
    def sampled(self) -> bool:
        return self.context.cohort_size < self.context.num_clients or self.poisson

    @property
    def indexed(self) -> bool:
        """The round's clients are ``train[index]``, not ``train`` itself."""
        return self.sampled or self.flat

    def block_rows(self, train: Any) -> int:
        """Rows per client of a round's cohort block."""
        return self.context.cohort_cap if self.flat else train.y.shape[1]


def draw_cohort(
    spec: RoundSpec, sample_key: Array, subsample_key: Array, train: Any
) -> tuple[Array, Array | None, ClientData]:
    """``(index [cohort], taking [cohort] or None, data)``: the round's clients, which slots take part
    (Poisson cohorts; None: all), and their data block (slots not taking part hold no rows).

    ``sample_key`` draws the cohort, ``subsample_key`` the rows of a flat population's larger clients."""
    context, taking = spec.context, None
    num_clients, cohort = context.num_clients, context.cohort_size
    if spec.poisson:
        index, taking = population.poisson_cohort(sample_key, num_clients, context.sampling_rate, cohort)
        if spec.flat:
            index, taking = population.by_size(train, index, taking)
    elif spec.flat:
        sampled = spec.sampled
        index = population.draw_cohort(sample_key, train, cohort) if sampled else jnp.argsort(train.count, stable=True)
    elif spec.sampled:
        index = jax.random.choice(sample_key, num_clients, (cohort,), replace=False)
    else:
        index = jnp.arange(num_clients)
    if spec.flat:
        data = population.cohort_block(train, index, context.cohort_cap, subsample_key)
    else:
        data = train.take(index) if spec.sampled else train
    if taking is not None:
        data = data._replace(count=jnp.where(taking, data.count, 0))
    return index, taking, data


def gather_clients(spec: RoundSpec, index: Array, tree: Any) -> Any:
    """The cohort's rows of per-client state ``[N, ...]``."""
    return jax.tree.map(lambda s: s[index], tree) if spec.indexed else tree


def scatter_clients(spec: RoundSpec, index: Array, taking: Array | None, tree: Any, new: Any) -> Any:
    """Per-client state ``[N, ...]`` with the cohort's ``new`` rows; clients outside it, or not taking part, keep
    theirs."""
    if not spec.indexed and taking is None:
        return new
    kept = index if taking is None else jnp.where(taking, index, spec.context.num_clients)
    return jax.tree.map(lambda s, n: s.at[kept].set(n, mode="drop"), tree, new)

"""Unreliable clients and asynchronous rounds, as pure functions of explicit keys.

Every draw for a client comes from ``fold_in(key, client)`` with ``client``
its index in the *population*, so a client's fate does not depend on the
order or size of the cohort it is in (the convention of `medfed_jax.server`).
The round folds a purpose into its round key first (one key per purpose).

- `dropout_mask`: each client independently fails to send with probability
  ``rate`` (a scalar or one rate per client); a dropped client sends nothing,
  so the round multiplies its mask (aggregation, bytes, DP accounting) by it.
- `straggler_steps`: each client is a straggler with probability ``rate`` and
  then completes only ``ceil(U tau)`` of its ``tau`` local steps, ``U ~
  Uniform(0, 1]``, i.e. uniformly one of ``1..tau`` (FedProx's systems
  heterogeneity, Li et al. 2020, "Federated Optimization in Heterogeneous
  Networks", which draws local epochs uniformly from ``1..E``).
- `compute_budgets`: heterogeneous per-client compute, local epochs uniform
  on ``low..high``, fixed for a run by the run's key (FedNova's experiments,
  Wang et al. 2020, draw them from 2..5).
- `cohort_work`: the three above for one round's cohort, as the engine's round
  uses them (config section ``unreliable``, `default_config`; `Unreliable`).
- FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous
  Aggregation"), simulated in virtual time with no threads: ``M`` clients
  train concurrently, each on the model of the server version it was
  dispatched at, and its update arrives after a latency drawn from its own
  distribution (`latency`: median ``mean_latency[c]``, log-normal spread).
  `fedbuff_step` takes the ``K`` earliest arrivals as the server's buffer,
  advances the clock to the last of them, weights each by its staleness
  ``s(tau) = (1 + tau)**-exponent / K`` (``tau`` the server versions since its
  dispatch; the paper's ``1 / sqrt(1 + tau)`` at ``exponent = 0.5``) and
  dispatches ``K`` idle clients, uniformly at random, on the new model. Since
  a client's update depends only on the model it was dispatched with, the
  round trains it at dispatch and holds its update in its slot until it
  arrives (``[M, ...]`` pending updates). With ``K = M`` every slot arrives
  at every step with staleness 0: synchronous FedAvg on a uniform cohort of
  ``M``, whatever the latencies.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from medfed_jax.client import epoch_steps
from medfed_jax.types import Array, PRNGKey, per_client_keys


def default_config() -> ml_collections.ConfigDict:
    """Unreliable clients in the synchronous round (all off by default; each value is structural)."""
    return ml_collections.ConfigDict(
        dict(
            dropout=0.0,  # probability in [0, 1) that a sampled client fails to send in a round (it sends nothing)
            straggler_rate=0.0,  # probability in [0, 1] that a client straggles: it does uniformly 1..tau of tau steps
            min_local=0,  # compute budgets: a client's local epochs (or steps) uniform on min_local..local's, per run
        )
    )


def validate_config(cfg: Any, local: Any) -> None:
    """Refuse rates outside their ranges and budgets above the configured local work (one line each)."""
    if not (isinstance(cfg.dropout, (int, float)) and 0 <= cfg.dropout < 1):
        raise ValueError(
            f"unreliable.dropout={cfg.dropout!r} must lie in [0, 1) (a client's probability of not sending); "
            "e.g. unreliable.dropout=0.3."
        )
    if not (isinstance(cfg.straggler_rate, (int, float)) and 0 <= cfg.straggler_rate <= 1):
        raise ValueError(
            f"unreliable.straggler_rate={cfg.straggler_rate!r} must lie in [0, 1] (a client's probability of "
            "straggling); e.g. unreliable.straggler_rate=0.5."
        )
    work = local.epochs or local.steps
    if not 0 <= cfg.min_local <= work:
        unit = "local.epochs" if local.epochs else "local.steps"
        raise ValueError(
            f"unreliable.min_local={cfg.min_local!r} must lie in [0, {work}] ({unit}={work} is the most a client "
            f"does); set it <= {work}, or 0 for equal budgets."
        )


class Unreliable(NamedTuple):
    """The static settings of unreliable clients and the local work they cut (`cohort_work`)."""

    dropout: float
    straggler_rate: float
    min_local: int
    epochs: int  # local.epochs (0 with local.steps)
    steps: int  # local.steps (0 with local.epochs)
    batch_size: int

    @classmethod
    def from_config(cls, cfg: Any, local: Any) -> Unreliable | None:
        """The settings of an ``unreliable`` section, or None when every effect is off (the round skips the hook)."""
        if not (cfg.dropout or cfg.straggler_rate or cfg.min_local):
            return None
        return cls(float(cfg.dropout), float(cfg.straggler_rate), int(cfg.min_local), *local_work(local))


def local_work(local: Any) -> tuple[int, int, int]:
    """``(epochs, steps, batch_size)`` of a ``local`` section."""
    return local.epochs, local.steps, local.batch_size


class CohortWork(NamedTuple):
    """Keys of `cohort_work`: one per purpose, each folded with a client's population index."""

    dropout: PRNGKey  # per round
    straggle: PRNGKey  # per round
    budget: PRNGKey  # per run (one budget per client and run)


def cohort_work(settings: Unreliable, keys: CohortWork, clients: Array, count: Array) -> tuple[Array, Array]:
    """``(sent [C] bool, steps [C] int32)`` of a cohort: who sends, and each client's local steps.

    A client's steps are its compute budget's (`compute_budgets`: epochs
    ``min_local..epochs`` give ``ceil(count E_c / B)`` steps, or steps
    ``min_local..steps``), cut by `straggler_steps`; a dropped client
    (`dropout_mask`) or one without rows does none.
    """
    sent = dropout_mask(keys.dropout, clients, settings.dropout) & (count > 0)
    work = settings.epochs or settings.steps
    budget = jnp.full(clients.shape, work, jnp.int32)
    if settings.min_local:
        budget = compute_budgets(keys.budget, clients, settings.min_local, work)
    steps = epoch_steps(count, budget, settings.batch_size) if settings.epochs else budget
    steps = straggler_steps(keys.straggle, clients, steps, settings.straggler_rate)
    return sent, jnp.where(sent, steps, 0).astype(jnp.int32)


def _per_client(key: PRNGKey, clients: Array, draw) -> Array:
    """``draw`` of each client's key (`per_client_keys`) for every population index in ``clients``."""
    return jax.vmap(draw)(per_client_keys(key, clients))


def _check_rate(name: str, rate) -> None:
    if isinstance(rate, (int, float)) and not isinstance(rate, bool) and not 0 <= rate <= 1:
        raise ValueError(f"{name}: rate={rate!r} must lie in [0, 1] (a probability per client and round).")


def dropout_mask(key: PRNGKey, clients: Array, rate: Array | float) -> Array:
    """``[C]`` bool, True where the update arrives: each client drops with probability ``rate`` (scalar or ``[C]``)."""
    _check_rate("dropout_mask", rate)
    u = _per_client(key, clients, lambda k: jax.random.uniform(k))
    return u >= jnp.broadcast_to(jnp.asarray(rate, jnp.float32), u.shape)


def straggler_steps(key: PRNGKey, clients: Array, steps: Array, rate: Array | float) -> Array:
    """``[C]`` int32 local steps done: ``steps``, or for a straggler (probability ``rate``) uniformly one of
    ``1..steps`` (0 stays 0)."""
    _check_rate("straggler_steps", rate)
    steps = jnp.asarray(steps, jnp.int32)
    u = _per_client(key, clients, lambda k: jax.random.uniform(k, (2,)))
    straggles = u[:, 0] < jnp.broadcast_to(jnp.asarray(rate, jnp.float32), u.shape[:1])
    done = jnp.ceil((1.0 - u[:, 1]) * steps).astype(jnp.int32)  # 1 - U in (0, 1]: ceil gives 1..steps
    return jnp.where(straggles, jnp.clip(done, jnp.minimum(steps, 1), steps), steps)


def compute_budgets(key: PRNGKey, clients: Array, low: int, high: int) -> Array:
    """``[C]`` int32 local epochs of ``clients``, each uniform on ``low..high``; a run's key gives each client
    one budget for the whole run (no state: recomputed for each cohort)."""
    if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
        raise ValueError(
            f"compute_budgets: low={low!r}, high={high!r} must be integers with 1 <= low <= high "
            "(the fewest and most local epochs a client can afford)."
        )
    return _per_client(key, clients, lambda k: jax.random.randint(k, (), low, high + 1))


def unreliable_cohort(settings: Unreliable, keys: CohortWork, clients: Array, taking: Array | None, data: Any):
    """A drawn cohort's ``(taking, data)`` (`medfed_jax.cohort.draw_cohort`) after `cohort_work`, and ``(steps,)``:
    a dropped client is a slot not taking part (no rows, no steps); ``steps [C]`` each client's local steps."""
    sent, steps = cohort_work(settings, keys, clients, data.count)
    taking = sent if taking is None else taking & sent
    return taking, data._replace(count=jnp.where(sent, data.count, 0)), (steps,)


def client_medians(key: PRNGKey, num_clients: int, spread: Array | float) -> Array:
    """``[N]`` float32 per-client median latencies ``exp(spread Z_c)``, ``Z_c ~ N(0, 1)`` from client ``c``'s key
    (one draw per run: slow and fast clients; `latency`'s ``mean_latency``)."""
    z = _per_client(key, jnp.arange(num_clients), lambda k: jax.random.normal(k))
    return jnp.exp(jnp.asarray(spread, jnp.float32) * z)


def latency(key: PRNGKey, clients: Array, mean_latency: Array | float, spread: Array | float) -> Array:
    """``[C]`` float32 times to train and upload: ``mean_latency[c] exp(spread Z)``, ``Z ~ N(0, 1)``.

    ``mean_latency`` is a scalar or ``[N]`` over the population (indexed by
    ``clients``); it is the median. ``spread = 0`` is deterministic.
    """
    z = _per_client(key, clients, lambda k: jax.random.normal(k))
    median = jnp.asarray(mean_latency, jnp.float32)
    median = median[clients] if median.ndim else median
    return median * jnp.exp(jnp.asarray(spread, jnp.float32) * z)


class InFlight(NamedTuple):
    """FedBuff's ``M`` concurrent training slots in virtual time.

    Attributes:
      client: ``[M]`` int32, the client each slot is training.
      version: ``[M]`` int32, the server version its model was dispatched at.
      finish: ``[M]`` float32, the virtual time its update arrives.
      clock: scalar float32, the time of the last server step.
      server_version: scalar int32, the number of server steps applied.
    """

    client: Array
    version: Array
    finish: Array
    clock: Array
    server_version: Array


class Buffer(NamedTuple):
    """One FedBuff server step: the ``K`` arrivals and who replaces them.

    Attributes:
      slots: ``[K]`` int32 slots whose updates arrived (earliest first).
      clients: ``[K]`` int32 their clients.
      staleness: ``[K]`` int32 server versions since each was dispatched.
      weights: ``[K]`` float32 ``discount / K``: the server update is
        ``sum_k weights_k delta_k``.
      dispatched: ``[K]`` int32 clients now training in ``slots``, on the new model.
      discount: ``[K]`` float32 ``(1 + staleness)**-exponent``, each arrival's
        staleness weight (``mean_k discount_k delta_k`` is the server update).
    """

    slots: Array
    clients: Array
    staleness: Array
    weights: Array
    dispatched: Array
    discount: Array


def _idle_draw(key: PRNGKey, num_clients: int, busy: Array, count: int) -> Array:
    """``count`` distinct clients uniformly among those not ``busy`` (``[N]`` bool): random scores, smallest first."""
    scores = jnp.where(busy, jnp.inf, jax.random.uniform(key, (num_clients,)))
    return jnp.argsort(scores)[:count].astype(jnp.int32)


def _check_fedbuff(num_clients: int, concurrency: int, buffer_size: int) -> None:
    if not 1 <= buffer_size <= concurrency <= num_clients:
        raise ValueError(
            f"fedbuff: buffer_size={buffer_size}, concurrency={concurrency}, num_clients={num_clients} need "
            "1 <= buffer_size <= concurrency <= num_clients (K arrivals per server step out of M clients training "
            "at once, drawn from N)."
        )


def fedbuff_init(
    key: PRNGKey, num_clients: int, concurrency: int, mean_latency: Array | float, spread: Array | float
) -> InFlight:
    """``concurrency`` distinct clients, uniformly drawn, dispatched at time 0 on version 0."""
    _check_fedbuff(num_clients, concurrency, 1)
    draw_key, latency_key = jax.random.split(key)
    clients = _idle_draw(draw_key, num_clients, jnp.zeros(num_clients, bool), concurrency)
    return InFlight(
        client=clients,
        version=jnp.zeros(concurrency, jnp.int32),
        finish=latency(latency_key, clients, mean_latency, spread),
        clock=jnp.zeros((), jnp.float32),
        server_version=jnp.zeros((), jnp.int32),
    )


def fedbuff_step(
    state: InFlight,
    key: PRNGKey,
    num_clients: int,
    buffer_size: int,
    mean_latency: Array | float,
    spread: Array | float,
    exponent: Array | float = 0.5,
) -> tuple[Buffer, InFlight]:
    """One FedBuff server step: the ``buffer_size`` earliest arrivals, their staleness weights, the new dispatches.

    Ties in arrival time go to the lower slot. The clock moves to the last
    arrival's time, the server version advances by one, and the dispatched
    clients (idle ones: not in a slot still training) finish at ``clock +
    latency``.
    """
    concurrency = state.client.shape[0]
    _check_fedbuff(num_clients, concurrency, buffer_size)
    draw_key, latency_key = jax.random.split(key)
    slots = jnp.argsort(state.finish, stable=True)[:buffer_size].astype(jnp.int32)
    clock = state.finish[slots[-1]]
    staleness = state.server_version - state.version[slots]
    discount = (1.0 + staleness.astype(jnp.float32)) ** -jnp.asarray(exponent, jnp.float32)
    still_training = jnp.ones(concurrency, bool).at[slots].set(False)
    busy = jnp.zeros(num_clients, bool).at[state.client].max(still_training)
    dispatched = _idle_draw(draw_key, num_clients, busy, buffer_size)
    version = state.server_version + 1
    new_state = InFlight(
        client=state.client.at[slots].set(dispatched),
        version=state.version.at[slots].set(version),
        finish=state.finish.at[slots].set(clock + latency(latency_key, dispatched, mean_latency, spread)),
        clock=clock,
        server_version=version,
    )
    return Buffer(slots, state.client[slots], staleness, discount / buffer_size, dispatched, discount), new_state

"""Asynchronous rounds (FedBuff) as an engine server mode: config section, static settings, state.

FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous
Aggregation", Algorithm 1), simulated in virtual time inside the compiled
program (no threads; the bookkeeping is `medfed_jax.unreliable.fedbuff_init`
/ `fedbuff_step`):

- ``M = cohort_size`` clients (all, when 0) train at once, each on the model
  of the server version it was dispatched at; each update arrives after a
  latency ``median_c exp(latency_spread Z)``, ``Z ~ N(0, 1)`` per dispatch,
  with per-client medians ``median_c = exp(client_latency_spread Z_c)`` drawn
  once per run (slow and fast hospitals).
- One engine *round* is one server step: the ``K = buffer_size`` earliest
  arrivals, each discounted by its staleness ``tau`` (server steps since its
  dispatch) as ``(1 + tau)**-staleness_exponent``, go through the configured
  attack and aggregator; with the mean that is the paper's ``x <- x + (1/K)
  sum_k (1 + tau_k)**-a delta_k`` (server learning rate 1), and the server
  optimizer applies it. Then ``K`` idle clients, uniformly at random, are
  dispatched on the new model.
- A client's update depends only on the model it was dispatched with, so the
  engine trains it at dispatch (with the key of that server version, as the
  synchronous round of that number would) and holds it in its slot until it
  arrives (`FedBuffState.pending`, ``[M, ...]``). ``init`` trains the first
  ``M``.

With ``K = M`` every slot arrives at every step with staleness 0, whatever
the latencies: synchronous FedAvg on a uniformly drawn cohort of ``M`` (with
``M`` the population: the synchronous run itself, to float32 summation order).

Refused, each with one line: DP (the accountants assume synchronous rounds
of sampled clients), Poisson cohorts, unreliable clients (latency is this
mode's model of slow clients; a drop would be a client that never arrives),
drift corrections and personalisation (their per-client state assumes the
client trains on the current model), flat or generated populations.
Compression composes (each update is compressed at upload and its bytes
counted when it arrives), as do the attacks (data attacks at training, model
attacks on the arrivals) and every aggregator (over the ``K`` arrivals).
Metrics of a server step: ``staleness`` (mean over the buffer),
``virtual_time`` (the clock), and the synchronous round's ``train_loss``
(honest arrivals, weighted by their rows) and ``update_norm``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import ml_collections

from medfed_jax import unreliable
from medfed_jax.types import Array

MODES = ("synchronous", "fedbuff")


def default_config() -> ml_collections.ConfigDict:
    """Server mode (structural settings: each value compiles its own program; 'synchronous' is every other round)."""
    return ml_collections.ConfigDict(
        dict(
            mode="synchronous",  # one of MODES: synchronous rounds, or FedBuff (cohort_size clients in flight)
            buffer_size=0,  # fedbuff: K arrivals per server step, in [1, cohort]; 0 = the cohort (synchronous limit)
            latency_spread=0.5,  # fedbuff: log-normal sigma of each dispatch's latency around its client's median
            client_latency_spread=1.0,  # fedbuff: log-normal sigma of the per-client median latencies (one per run)
            staleness_exponent=0.5,  # fedbuff: an update tau server steps stale is weighted (1 + tau)**-exponent
        )
    )


class FedBuff(NamedTuple):
    """The static settings of a FedBuff run (`from_config`)."""

    concurrency: int  # M: clients training at once (the cohort's slots)
    buffer_size: int  # K: arrivals per server step
    latency_spread: float
    client_latency_spread: float
    staleness_exponent: float

    @classmethod
    def from_config(cls, cfg: Any, concurrency: int) -> FedBuff | None:
        """The settings of an ``asynchronous`` section for ``concurrency`` slots, or None in synchronous mode."""
        if cfg.mode != "fedbuff":
            return None
        spreads = float(cfg.latency_spread), float(cfg.client_latency_spread), float(cfg.staleness_exponent)
        return cls(concurrency, cfg.buffer_size or concurrency, *spreads)


def _refusal(cfg: Any, context: Any) -> str | None:
    """Why a whole config cannot run FedBuff (the combinations named in the module docstring), or None."""
    reliable = unreliable.Unreliable.from_config(cfg.unreliable, cfg.local) is None
    checks = (  # (field, value, allowed, reason)
        ("privacy.mode", cfg.privacy.mode, cfg.privacy.mode == "none", "the DP accountants assume synchronous rounds"),
        ("cohort_sampling", cfg.cohort_sampling, cfg.cohort_sampling == "fixed", "FedBuff keeps cohort_size in flight"),
        (
            "unreliable",
            cfg.unreliable.to_dict(),
            reliable,
            "latency is FedBuff's model of slow clients; set unreliable.dropout, straggler_rate and min_local to 0",
        ),
        (
            "drift.method",
            cfg.drift.method,
            cfg.drift.method == "none",
            "its state assumes training on the current model",
        ),
        (
            "personalization.method",
            cfg.personalization.method,
            cfg.personalization.method == "none",
            "personal state assumes training on the current model",
        ),
        (
            "data.storage",
            cfg.data.storage,
            context.cohort_cap == 0,
            "FedBuff needs padded storage (data.storage='padded')",
        ),
    )
    for field, value, allowed, reason in checks:
        if not allowed:
            return f"asynchronous.mode='fedbuff' with {field}={value!r}: {reason}; or asynchronous.mode='synchronous'."
    return None


def validate_config(cfg: Any, context: Any) -> None:
    """Refuse unknown modes, settings out of range and unsound combinations (one line each), before any compute.

    ``cfg`` is the whole run config (the refusals read other sections), ``context`` its `BuildContext`.
    """
    section = cfg.asynchronous
    if section.mode not in MODES:
        raise ValueError(f"asynchronous.mode={section.mode!r} is unknown; choose one of {MODES}.")
    concurrency = context.cohort_size
    if not 0 <= section.buffer_size <= concurrency:
        raise ValueError(
            f"asynchronous.buffer_size={section.buffer_size} must lie in [1, {concurrency}] (cohort_size, the "
            f"clients in flight), or 0 for all {concurrency}; e.g. asynchronous.buffer_size={max(1, concurrency // 4)}."
        )
    for name in ("latency_spread", "client_latency_spread", "staleness_exponent"):
        value = section[name]
        if not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
            raise ValueError(f"asynchronous.{name}={value!r} must be a finite number >= 0; e.g. 0.5.")
    if section.mode == "fedbuff":
        refusal = _refusal(cfg, context)
        if refusal:
            raise ValueError(refusal)


def aggregation_context(cfg: Any, context: Any) -> Any:
    """The `BuildContext` the aggregator and attack see: a FedBuff server step aggregates ``K`` arrivals."""
    settings = FedBuff.from_config(cfg.asynchronous, context.cohort_size)
    return context if settings is None else context._replace(cohort_size=settings.buffer_size)


class FedBuffState(NamedTuple):
    """FedBuff's state beside the model (`medfed_jax.server.FedState.asynchronous`).

    Attributes:
      in_flight: the ``M`` slots in virtual time (`medfed_jax.unreliable.InFlight`).
      pending: each slot's update, trained at dispatch, leaves ``[M, ...]``.
      train_loss: ``[M]`` each slot's local training loss.
      uploaded_bytes: ``[M]`` each slot's message size (0 without compression).
      median_latency: ``[N]`` each client's median latency (`medfed_jax.unreliable.client_medians`).
    """

    in_flight: unreliable.InFlight
    pending: Any
    train_loss: Array
    uploaded_bytes: Array
    median_latency: Array


def discounted(buffer: unreliable.Buffer, updates: Any) -> Any:
    """The arrivals ``[K, ...]`` each times its staleness discount ``(1 + tau_k)**-a``: their mean is the
    paper's server update."""
    return jax.tree.map(lambda u: u * buffer.discount.reshape(-1, *(1,) * (u.ndim - 1)), updates)


def take_slots(tree: Any, slots: Array) -> Any:
    """The rows ``slots`` of every leaf ``[M, ...]``."""
    return jax.tree.map(lambda leaf: leaf[slots], tree)


def put_slots(tree: Any, slots: Array, rows: Any) -> Any:
    """Every leaf ``[M, ...]`` with its rows ``slots`` replaced by ``rows``."""
    return jax.tree.map(lambda leaf, row: leaf.at[slots].set(row), tree, rows)

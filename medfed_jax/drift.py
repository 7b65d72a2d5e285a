"""Client-drift corrections (SCAFFOLD, FedNova, FedDyn) as pure pieces of a round over the client axis.

Under non-IID data each client's local steps drift toward its own optimum.
Each method here is a factory returning `Drift(name, init, local_terms,
client_update, server_update)`, the three places a round changes:

1. **Local gradient** (every local step, one client): ``g + linear + prox (w -
   w_start)`` (`corrected_gradient`), with ``LocalTerms(linear, prox) =
   local_terms(server, client)``; ``w_start`` is the round's global model.
2. **Per-client state** (after local training, one client, vmapped):
   ``client_update(server, client, delta, steps, sent) -> client``, where
   ``delta = y_i - x`` is the client's update, ``steps`` its number of local
   optimizer steps and ``sent`` whether the server received it (a client that
   did not send keeps its state).
3. **Server** (once per round): ``server_update(server, cohort, aggregate) ->
   ((update, *rest), server)`` with the round's `Cohort`; ``aggregate(deltas)
   -> (update, *rest)`` is the round's aggregator with weights, mask, state and
   key bound (`Aggregator.aggregate`'s ``(update, agg_state, diagnostics)``
   passes through with ``update`` corrected), so the robust rules compose. The
   server optimizer then applies ``update`` (plain SGD with learning rate 1 is
   each paper's server step).

``init(params, num_clients) -> DriftState(server, clients)``: ``clients`` has
a leading client axis over the whole population, like personalisation's
``FedState.clients``; the round gathers the cohort's rows and scatters them back.

Methods (definitions checked against the papers and the authors' code):

- ``none()``: FedAvg, nothing changed.
- ``scaffold(lr)`` (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled
  Averaging for Federated Learning", Algorithm 1 with option II): local
  gradient ``g - c_i + c``; ``c_i+ = c_i - c + (x - y_i) / (K lr)`` with ``K``
  the client's own step count (``steps``; the paper's equal ``K`` is the
  special case, pfl-research's ``pfl/algorithm/scaffold.py`` uses each
  client's own ``K`` too); server ``c <- c + (|S| / N) mean_S (c_i+ - c_i)``.
  Option II assumes local SGD at learning rate ``lr``.
- ``fednova(momentum)`` (Wang et al. 2020, "Tackling the Objective
  Inconsistency Problem in Heterogeneous Federated Optimization", eq. 6-7;
  JYWa/FedNova, Flower's fednova baseline): client ``i`` sends
  ``d_i = delta_i / ||a_i||_1`` and the server applies ``tau_eff sum_i p_i d_i``,
  ``tau_eff = sum_i p_i ||a_i||_1``, ``p_i`` the taking-part clients'
  normalised weights. ``||a_i||_1 = tau_i`` for SGD and ``(tau_i - rho (1 -
  rho^tau_i) / (1 - rho)) / (1 - rho)`` for heavy-ball momentum ``rho``
  (`fednova_norm`). Implemented as a rescaling of each update by ``tau_eff /
  ||a_i||_1`` before the aggregator: with ``weighted_mean`` that is FedNova.
- ``feddyn(alpha)`` (Acar et al. 2021, "Federated Learning Based on Dynamic
  Regularization", Algorithm 1): client ``k`` minimises ``L_k(w) - <g_k, w> +
  alpha/2 ||w - x||^2`` (local gradient ``g - g_k + alpha (w - x)``) and
  updates ``g_k <- g_k - alpha delta_k``; server ``h <- h - alpha (1/N)
  sum_{k in P} delta_k`` and ``x <- mean_P(y_k) - h / alpha``, i.e. ``update =
  aggregate(deltas) - h / alpha``.

In the engine (config section ``drift``, `default_config`): `build_drift`
gives the method, `client_round` the mapped per-client function (local
training with the method's terms, then `Drift.client_update`); the round keeps
`DriftState` in ``FedState.drift`` and calls ``server_update`` around its
aggregator (`medfed_jax.server.round_step`).

Everything is jittable and vmappable over the client axis; nothing is random.
Bad arguments are refused where the factory is built from Python numbers; a
traced knob is validated by the config layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from medfed_jax.aggregators import broadcast_clients, zero_masked
from medfed_jax.types import Array, Params, Updates, broadcast_to_clients

DRIFT_METHODS = ("none", "scaffold", "fednova", "feddyn")


def default_config() -> ml_collections.ConfigDict:
    """Client-drift correction of the federated round (structural settings)."""
    return ml_collections.ConfigDict(
        dict(
            method="none",  # one of DRIFT_METHODS: none (FedAvg/FedProx), scaffold, fednova, feddyn
            feddyn_alpha=0.01,  # feddyn: the dynamic regulariser's strength alpha > 0 (the paper: 0.01 to 0.1)
        )
    )


def validate_config(cfg: Any, local: Any, privacy_mode: str, personal_method: str) -> None:
    """Refuse unknown methods and the combinations whose derivation does not hold (one line each)."""
    method = cfg.method
    if method not in DRIFT_METHODS:
        raise ValueError(f"drift.method={method!r} is unknown; choose one of {DRIFT_METHODS}.")
    if not (isinstance(cfg.feddyn_alpha, (int, float)) and cfg.feddyn_alpha > 0):
        raise ValueError(f"drift.feddyn_alpha={cfg.feddyn_alpha!r} must be > 0; e.g. drift.feddyn_alpha=0.01.")
    if method == "none":
        return
    if personal_method != "none":
        raise ValueError(
            f"drift.method={method!r} with personalization.method={personal_method!r}: both own the local "
            "gradient; set one of them to 'none'."
        )
    if method == "scaffold" and local.optimizer != "sgd":
        raise ValueError(
            f"drift.method='scaffold' with local.optimizer={local.optimizer!r}: option II's control variates "
            "(x - y_i) / (K lr) assume plain local SGD; set local.optimizer='sgd'."
        )
    if method == "scaffold" and privacy_mode != "none":
        raise ValueError(
            f"drift.method='scaffold' with privacy.mode={privacy_mode!r}: the control variate change c_i+ - c_i "
            "would leave the client unprivatised; set privacy.mode='none' or another drift.method."
        )
    if method == "fednova" and local.optimizer == "adam":
        raise ValueError(
            "drift.method='fednova' with local.optimizer='adam': ||a_i||_1 is derived for SGD and heavy-ball "
            "momentum only; set local.optimizer to 'sgd' or 'momentum'."
        )
    if method == "fednova" and local.prox_mu:
        raise ValueError(
            f"drift.method='fednova' with local.prox_mu={local.prox_mu!r}: FedNova's a_i with a proximal term is "
            "not modelled; set local.prox_mu=0."
        )


def build_drift(cfg: Any, local: Any, hparams: Any) -> Drift | None:
    """The configured method (``hparams``: `medfed_jax.client.LocalHParams`, traced), or None for ``'none'``."""
    if cfg.method == "scaffold":
        return scaffold(hparams.lr)
    if cfg.method == "fednova":
        return fednova(hparams.momentum if local.optimizer == "momentum" else 0.0)
    if cfg.method == "feddyn":
        return feddyn(cfg.feddyn_alpha)
    return None


class LocalTerms(NamedTuple):
    """What a method adds to each local gradient of one client: ``linear + prox (w - w_start)``.

    ``linear`` is a parameter tree (or None: nothing), ``prox`` a scalar
    (a pull toward the round's global model, like FedProx's ``mu``).
    """

    linear: Params | None
    prox: Array | float


class DriftState(NamedTuple):
    """A method's state: ``server`` (SCAFFOLD's ``c``, FedDyn's ``h``) and ``clients`` ``[N, ...]``."""

    server: Any
    clients: Any


class Cohort(NamedTuple):
    """What the server sees of a round's cohort of ``C`` clients.

    Attributes:
      deltas: updates ``y_i - x``, leaves ``[C, ...]``.
      steps: ``[C]`` local optimizer steps each client took.
      weights: ``[C]`` aggregation weights (sample counts).
      mask: ``[C]`` bool, the clients whose update the server received.
      before: the cohort's per-client states at the start of the round ``[C, ...]``.
      after: their states after `Drift.client_update` ``[C, ...]``.
      num_clients: ``N``, the population size (static).
    """

    deltas: Updates
    steps: Array
    weights: Array
    mask: Array
    before: Any
    after: Any
    num_clients: int


class Drift(NamedTuple):
    """A drift correction as pure functions; see the module docstring."""

    name: str
    init: Callable[[Params, int], DriftState]
    local_terms: Callable[[Any, Any], LocalTerms]
    client_update: Callable[[Any, Any, Params, Array, Array], Any]
    server_update: Callable[[Any, Cohort, Callable[[Updates], tuple]], tuple[tuple, Any]]
    side_uploads: int = 0  # model-sized float32 vectors a client sends beside its update (SCAFFOLD: c_i+ - c_i)


def side_upload_bytes(method: Drift, shared: Params, sent: Array) -> Array:
    """Bytes the senders upload beside their (compressed) updates: ``side_uploads x 4 x coordinates`` each."""
    coordinates = sum(leaf.size for leaf in jax.tree.leaves(shared))
    return jnp.float32(method.side_uploads * 4 * coordinates) * jnp.sum(sent)


class DriftRound(NamedTuple):
    """A method and its mapped per-client function (`client_round`), as the round uses them."""

    method: Drift
    client_update: Callable


def client_round(method: Drift, local_update: Callable) -> DriftRound:
    """``((params, server), client, data, key, hparams) -> (delta, client+, metrics)`` for one client: local
    training under ``method.local_terms`` (`medfed_jax.client.make_local_update`'s ``terms``), then the
    client's new state; a client without rows (dropped, or a slot not taking part) keeps it."""

    def client_update(shared, client, data, key, hparams):
        params, server = shared
        delta, metrics = local_update(params, data, key, hparams, terms=method.local_terms(server, client))
        return delta, method.client_update(server, client, delta, metrics["num_steps"], data[2] > 0), metrics

    return DriftRound(method, client_update)


def server_round(
    drift_round: DriftRound, state: DriftState, cohort: Cohort, aggregate: Callable, clients: Any
) -> tuple[tuple, DriftState]:
    """The round's aggregate through the method's server step, and the new state (``clients``: the population's
    client states after the round, the cohort's scattered back)."""
    aggregated, server = drift_round.method.server_update(state.server, cohort, aggregate)
    return aggregated, DriftState(server, clients)


def corrected_gradient(grads: Params, params: Params, start: Params, terms: LocalTerms) -> Params:
    """``grads + linear + prox (params - start)``: one local step's gradient under a drift correction."""
    pulled = jax.tree.map(lambda g, w, w0: g + terms.prox * (w - w0), grads, params, start)
    if terms.linear is None:
        return pulled
    return jax.tree.map(jnp.add, pulled, terms.linear)


def _zeros_like(params: Params) -> Params:
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)


def _masked_sum(mask: Array, tree: Updates) -> Params:
    """``sum_i mask_i tree_i`` over the client axis (NaN-safe: masked rows are selected away)."""
    return jax.tree.map(lambda u: jnp.sum(u, axis=0), zero_masked(tree, mask))


def _keep_unsent(sent: Array, old: Any, new: Any) -> Any:
    return jax.tree.map(lambda o, n: jnp.where(sent, n, o), old, new)


def _check_positive(name: str, field: str, value: Any, hint: str) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not value > 0:
        raise ValueError(f"{name}: {field}={value!r} must be > 0 ({hint}).")


def _zero_state(params: Params, num_clients: int) -> DriftState:
    """A server tree and ``[num_clients, ...]`` client trees of zeros shaped like ``params``."""
    zeros = _zeros_like(params)
    return DriftState(zeros, broadcast_to_clients(zeros, num_clients))


def _stateless_init(params: Params, num_clients: int) -> DriftState:
    del params, num_clients
    return DriftState((), ())


def _no_terms(server: Any, client: Any) -> LocalTerms:
    del server, client
    return LocalTerms(None, 0.0)


def _keep_client(server: Any, client: Any, delta: Params, steps: Array, sent: Array) -> Any:
    del server, delta, steps, sent
    return client


def none() -> Drift:
    """FedAvg: no drift correction (the identity in all three places)."""

    def server_update(server, cohort, aggregate):
        return aggregate(cohort.deltas), server

    return Drift("none", _stateless_init, _no_terms, _keep_client, server_update)


def scaffold(lr: Array | float) -> Drift:
    """SCAFFOLD with option II control variates (Karimireddy et al. 2020); ``lr`` is the local SGD step size."""
    _check_positive("scaffold", "lr", lr, "the local learning rate of option II's (x - y_i) / (K lr)")

    def local_terms(c, c_i):
        return LocalTerms(jax.tree.map(jnp.subtract, c, c_i), 0.0)

    def client_update(c, c_i, delta, steps, sent):
        per_step = 1.0 / (jnp.maximum(steps, 1) * lr)  # option II: (x - y_i) / (K lr), and x - y_i = -delta
        new = jax.tree.map(lambda ci, cs, d: ci - cs - d * per_step, c_i, c, delta)
        return _keep_unsent(sent & (steps > 0), c_i, new)

    def server_update(c, cohort, aggregate):
        change = jax.tree.map(jnp.subtract, cohort.after, cohort.before)
        total = _masked_sum(cohort.mask, change)  # (|S| / N) mean_S = sum_S / N
        c = jax.tree.map(lambda cs, t: cs + t / cohort.num_clients, c, total)
        return aggregate(cohort.deltas), c

    return Drift("scaffold", _zero_state, local_terms, client_update, server_update, side_uploads=1)


def fednova_norm(steps: Array, momentum: Array | float = 0.0) -> Array:
    """``||a_i||_1`` of FedNova (Wang et al. 2020): ``tau`` for SGD, ``(tau - rho (1 - rho^tau)/(1 - rho))/(1 - rho)``
    for heavy-ball momentum ``rho < 1`` (local steps ``u <- rho u + g``, ``w <- w - lr u``)."""
    tau = jnp.asarray(steps, jnp.float32)
    rho = jnp.asarray(momentum, jnp.float32)
    return (tau - rho * (1.0 - rho**tau) / (1.0 - rho)) / (1.0 - rho)


def fednova_scale(norms: Array, weights: Array, mask: Array) -> Array:
    """``[C]`` factors ``tau_eff / ||a_i||_1`` with ``tau_eff = sum_i p_i ||a_i||_1`` over the taking-part clients.

    ``p_i`` are ``weights`` normalised over ``mask``. A client with no steps
    (``||a_i||_1 = 0``, its update is zero) or not taking part gets 0.
    """
    w = jnp.where(mask, weights.astype(jnp.float32), 0.0)
    p = w / jnp.maximum(jnp.sum(w), jnp.finfo(jnp.float32).tiny)
    tau_eff = jnp.sum(p * norms)
    return jnp.where(mask & (norms > 0), tau_eff / jnp.where(norms > 0, norms, 1.0), 0.0)


def fednova(momentum: Array | float = 0.0) -> Drift:
    """FedNova (Wang et al. 2020): normalised averaging for unequal local step counts; ``momentum`` is local rho."""
    if isinstance(momentum, (int, float)) and not 0 <= momentum < 1:
        raise ValueError(f"fednova: momentum={momentum!r} must lie in [0, 1) (the local heavy-ball factor rho).")

    def server_update(server, cohort, aggregate):
        scale = fednova_scale(fednova_norm(cohort.steps, momentum), cohort.weights, cohort.mask)
        normalised = jax.tree.map(lambda u: u * broadcast_clients(scale, u), cohort.deltas)
        return aggregate(normalised), server

    return Drift("fednova", _stateless_init, _no_terms, _keep_client, server_update)


def feddyn(alpha: Array | float) -> Drift:
    """FedDyn (Acar et al. 2021): a per-client linear term ``g_k`` and the server's ``h``; ``alpha`` > 0."""
    _check_positive("feddyn", "alpha", alpha, "the dynamic regulariser's strength; the paper uses 0.01 to 0.1")

    def local_terms(h, g_k):
        del h
        return LocalTerms(jax.tree.map(jnp.negative, g_k), alpha)

    def client_update(h, g_k, delta, steps, sent):
        del h, steps
        return _keep_unsent(sent, g_k, jax.tree.map(lambda g, d: g - alpha * d, g_k, delta))

    def server_update(h, cohort, aggregate):
        total = _masked_sum(cohort.mask, cohort.deltas)
        h = jax.tree.map(lambda hh, t: hh - alpha * t / cohort.num_clients, h, total)
        update, *rest = aggregate(cohort.deltas)
        return (jax.tree.map(lambda u, hh: u - hh / alpha, update, h), *rest), h

    return Drift("feddyn", _zero_state, local_terms, client_update, server_update)

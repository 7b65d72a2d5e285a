"""Byzantine behaviour as pure functions over the stacked client axis.

Each attack is a factory returning `Attack(apply, poison_labels)`; see
`medfed_jax.types.Attack`. ``malicious`` is a ``[C]`` bool mask, fixed for a
run and drawn from the run's key (`attack_mask`). Model-poisoning attacks
replace the malicious rows of the stacked updates after local training; the
honest rows are returned untouched. Data-poisoning attacks rewrite the
malicious clients' labels before local training.

Threat model: omniscient attackers who see every honest update of the round.
Honest statistics (mean, standard deviation) are over the clients that are
honest *and* take part this round, ``H = mask & ~malicious``; ``n`` is the
number of taking-part clients and ``f`` the number of malicious ones among
them. Strength parameters may be traced (numeric knobs).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medfed_jax.aggregators import broadcast_clients
from medfed_jax.types import Attack, AttackContext, Knobs, Updates, numeric_setting


def _replace(updates: Updates, malicious: jax.Array, new: Updates) -> Updates:
    """Rows of ``malicious`` clients from ``new`` (leaves ``[C, ...]`` or one row ``[...]``)."""
    return jax.tree.map(lambda u, v: jnp.where(broadcast_clients(malicious, u), v.astype(u.dtype), u), updates, new)


def _keep_updates(updates, malicious, key, context):
    del malicious, key, context
    return updates


def _keep_labels(y, malicious, num_classes):
    del malicious, num_classes
    return y


def honest_mean_std(updates: Updates, honest: jax.Array) -> tuple[Updates, Updates]:
    """Per-coordinate mean and sample standard deviation (ddof=1) over the ``honest`` clients.

    Zeros where there are no honest clients (mean) or fewer than two (std).
    Sums over the client axis are matrix-vector products (fast on XLA's CPU
    backend, unlike ``sum(axis=0)``).
    """
    h = jnp.sum(honest)
    w = honest.astype(jnp.float32)

    def weighted_sum(x, coeffs):  # rows outside `honest` may hold garbage (NaN): select, then dot
        x = jnp.where(broadcast_clients(honest, x), x, 0.0)
        return jnp.tensordot(coeffs.astype(x.dtype), x, axes=1, precision=jax.lax.Precision.HIGHEST)

    mean = jax.tree.map(lambda u: weighted_sum(u, w / jnp.maximum(h, 1)), updates)
    std = jax.tree.map(
        lambda u, mu: jnp.sqrt(weighted_sum(jnp.square(u - mu), w / jnp.maximum(h - 1, 1))), updates, mean
    )
    return mean, std


def no_attack() -> Attack:
    """Every client is honest: updates and labels pass unchanged."""
    return Attack(_keep_updates, _keep_labels)


def sign_flip(scale: Any = 1.0) -> Attack:
    """Sign flipping: ``u_i <- -scale * u_i`` for malicious ``i`` (its own honest update, reversed)."""

    def apply(updates, malicious, key, context):
        del key, context
        return _replace(updates, malicious, jax.tree.map(lambda u: -scale * u, updates))

    return Attack(apply, _keep_labels)


def ipm(eps: Any = 0.1) -> Attack:
    """Inner-product manipulation (Xie, Koyejo and Gupta 2020): ``u_i <- -eps * mean_{j in H} u_j``."""

    def apply(updates, malicious, key, context: AttackContext):
        del key
        mu, _ = honest_mean_std(updates, context.mask & ~malicious)
        return _replace(updates, malicious, jax.tree.map(lambda m: -eps * m, mu))

    return Attack(apply, _keep_labels)


def alie_z_max(n: Any, f: Any) -> jax.Array:
    """Baruch et al. (2019)'s z_max: ``s = floor(n/2 + 1) - f``, ``z_max = Phi^-1((n - s) / n)``.

    The largest shift (in honest standard deviations) for which the ``f``
    attackers plus ``s`` honest clients still form a majority around the
    attackers' value. ``n`` clients in all, ``f`` of them malicious.
    """
    n = jnp.asarray(n, jnp.float32)
    s = jnp.floor(n / 2 + 1) - f
    return jax.scipy.special.ndtri((n - s) / jnp.maximum(n, 1))


def alie(z: Any = None) -> Attack:
    """A little is enough (Baruch, Baruch and Goldberg 2019): ``u_i <- mu_H - z * sigma_H``.

    ``mu_H`` and ``sigma_H`` are the per-coordinate mean and sample standard
    deviation of the honest taking-part updates. ``z = None`` (or 0) uses
    `alie_z_max` of the round's ``n`` taking-part clients and ``f`` malicious.
    """
    z = 0.0 if z is None else z

    def apply(updates, malicious, key, context: AttackContext):
        del key
        taking_part = context.mask
        z_used = jnp.where(z == 0, alie_z_max(jnp.sum(taking_part), jnp.sum(taking_part & malicious)), z)
        mu, sigma = honest_mean_std(updates, taking_part & ~malicious)
        return _replace(updates, malicious, jax.tree.map(lambda m, s: m - z_used * s, mu, sigma))

    return Attack(apply, _keep_labels)


def gaussian(sigma: Any = 1.0) -> Attack:
    """Random updates: ``u_i <- N(0, sigma^2 I)`` for malicious ``i``, drawn from ``key``."""

    def apply(updates, malicious, key, context):
        del context
        leaves, treedef = jax.tree.flatten(updates)
        keys = jax.random.split(key, len(leaves))
        noise = [sigma * jax.random.normal(k, u.shape, jnp.float32) for k, u in zip(keys, leaves)]
        return _replace(updates, malicious, jax.tree.unflatten(treedef, noise))

    return Attack(apply, _keep_labels)


def scaling(gamma: Any = 0.0) -> Attack:
    """Model replacement (Bagdasaryan et al. 2020): ``u_i <- gamma * u_i`` for malicious ``i``.

    ``gamma = 0`` boosts by ``n``, the number of taking-part clients, which
    makes one attacker's update dominate a plain mean (server lr 1).
    """

    def apply(updates, malicious, key, context: AttackContext):
        del key
        boost = jnp.where(gamma == 0, jnp.sum(context.mask).astype(jnp.float32), gamma)
        return _replace(updates, malicious, jax.tree.map(lambda u: boost * u, updates))

    return Attack(apply, _keep_labels)


def label_flip() -> Attack:
    """Label flipping (data poisoning): malicious clients train on ``y <- K - 1 - y``; updates pass."""

    def poison_labels(y, malicious, num_classes):
        return jnp.where(malicious[:, None], num_classes - 1 - y, y)

    return Attack(_keep_updates, poison_labels)


def non_finite() -> Attack:
    """Crashed or hostile clients: ``u_i <- NaN`` for even ``i``, ``u_i <- +Inf`` for odd ``i`` (malicious ``i``)."""

    def apply(updates, malicious, key, context):
        del key, context
        bad = jnp.where(jnp.arange(malicious.shape[0]) % 2 == 0, jnp.nan, jnp.inf)
        return _replace(updates, malicious, jax.tree.map(lambda u: broadcast_clients(bad, u), updates))

    return Attack(apply, _keep_labels)


# --------------------------------------------------------------------------
# The malicious set.


def malicious_mask(key: jax.Array, num_clients: int, num_malicious: jax.Array) -> jax.Array:
    """``[C]`` bool with exactly ``num_malicious`` True entries, uniformly placed.

    ``num_malicious`` may be traced, so the attacker fraction can be swept
    without recompiling.
    """
    rank = jnp.argsort(jax.random.permutation(key, num_clients))
    return rank < num_malicious


def num_malicious(fraction: Any, num_clients: int) -> Any:
    """Malicious clients for a fraction of the population: ``round(fraction * C)``."""
    return jnp.round(fraction * num_clients).astype(jnp.int32)


_knob = functools.partial(numeric_setting, "attack")  # (cfg, knobs, field) -> value


def attack_mask(cfg: Any, key: jax.Array, knobs: Knobs, num_clients: int) -> jax.Array:
    """The run's ``[C]`` malicious mask over the whole population of ``num_clients``.

    ``cfg.clients`` (explicit indices) when given; otherwise
    ``round(fraction * C)`` clients drawn uniformly from ``key``.
    """
    if cfg.clients:
        mask = np.zeros(num_clients, bool)
        mask[list(cfg.clients)] = True
        return jnp.asarray(mask)
    return malicious_mask(key, num_clients, num_malicious(_knob(cfg, knobs, "fraction"), num_clients))


def switch(choices: Sequence[Attack], index: Any) -> Attack:
    """One of ``choices``, picked at run time by the traced integer ``index`` (`jax.lax.switch`).

    Every choice is compiled into the program; with an ``index`` that is not
    batched (one value for a whole vmapped sweep chunk) only the chosen one runs.
    """
    choices = tuple(choices)

    def apply(updates, malicious, key, context):
        branches = [lambda u, m, k, c=c: c.apply(u, m, k, context) for c in choices]
        return jax.lax.switch(index, branches, updates, malicious, key)

    def poison_labels(y, malicious, num_classes):
        branches = [lambda y, m, c=c: c.poison_labels(y, m, num_classes) for c in choices]
        return jax.lax.switch(index, branches, y, malicious)

    return Attack(apply, poison_labels)


# --------------------------------------------------------------------------
# Config section.

_ATTACKS = {
    "none": lambda cfg, knobs: no_attack(),
    "sign_flip": lambda cfg, knobs: sign_flip(_knob(cfg, knobs, "scale")),
    "ipm": lambda cfg, knobs: ipm(_knob(cfg, knobs, "eps")),
    "alie": lambda cfg, knobs: alie(_knob(cfg, knobs, "z")),
    "gaussian": lambda cfg, knobs: gaussian(_knob(cfg, knobs, "sigma")),
    "scaling": lambda cfg, knobs: scaling(_knob(cfg, knobs, "gamma")),
    "label_flip": lambda cfg, knobs: label_flip(),
    "non_finite": lambda cfg, knobs: non_finite(),
}
ATTACK_NAMES = tuple(_ATTACKS)
NUMERIC_FIELDS = ("fraction", "scale", "eps", "z", "sigma", "gamma")


def default_config() -> ml_collections.ConfigDict:
    """The ``attack`` section of a run config."""
    return ml_collections.ConfigDict(
        {
            "name": "none",  # one of ATTACK_NAMES
            "fraction": 0.0,  # malicious share of the population, in [0, 1) (numeric knob)
            "clients": (),  # explicit malicious client indices; overrides fraction when non-empty
            "scale": 1.0,  # sign_flip: -scale * own update
            "eps": 0.1,  # ipm: -eps * honest mean
            "z": 0.0,  # alie: shift in honest stds; 0 = Baruch et al.'s z_max from n and f
            "sigma": 1.0,  # gaussian: std of the random update
            "gamma": 0.0,  # scaling: boost factor; 0 = n (clients per round)
        }
    )


def _finite(cfg: Any, field: str, low: float | None = None, strict: bool = False, hint: str = "") -> None:
    value = cfg[field]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low}"
        raise ValueError(f"attack.{field}={value!r} must be a finite number{bound}.{' ' + hint if hint else ''}")


def validate_config(cfg: Any, context: Any) -> None:
    """Raise a ValueError naming ``attack.<field>`` and the fix."""
    if cfg.name not in _ATTACKS:
        raise ValueError(f"attack.name={cfg.name!r} is unknown; choose one of {ATTACK_NAMES}.")
    _finite(cfg, "fraction", 0.0)
    if not cfg.fraction < 1.0:
        raise ValueError(f"attack.fraction={cfg.fraction!r} must lie in [0, 1); some clients must be honest.")
    c = context.num_clients
    clients = tuple(cfg.clients)
    if clients:
        bad = [i for i in clients if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < c]
        if bad:
            raise ValueError(f"attack.clients has {bad}, not client indices in [0, {c}); use indices 0..{c - 1}.")
        if len(set(clients)) != len(clients):
            raise ValueError(f"attack.clients={clients!r} repeats a client; list each malicious client once.")
        if len(clients) >= c:
            raise ValueError(f"attack.clients names all {c} clients; leave at least one honest client.")
    elif round(cfg.fraction * c) >= c:
        raise ValueError(
            f"attack.fraction={cfg.fraction} makes all {c} clients malicious (round(fraction * C)); "
            f"use fraction < {(c - 0.5) / c:.4g}."
        )
    _finite(cfg, "scale", 0.0, strict=True, hint="sign_flip sends -scale x the client's own update.")
    _finite(cfg, "eps", 0.0, strict=True, hint="Xie et al. use 0.1 (small) to 100 (large).")
    _finite(cfg, "z", hint="Use 0 for Baruch et al.'s z_max.")
    _finite(cfg, "sigma", 0.0)
    _finite(cfg, "gamma", 0.0, hint="Use 0 to boost by the number of clients per round.")


def build_attack(cfg: Any, knobs: Knobs) -> Attack:
    """The attack named by ``cfg.name`` (the config's ``attack`` section).

    Called inside the traced program: strengths come from ``knobs`` (traced;
    the config's values where a knob is absent).
    """
    if cfg.name not in _ATTACKS:
        raise ValueError(f"attack.name={cfg.name!r} is unknown; choose one of {ATTACK_NAMES}.")
    return _ATTACKS[cfg.name](cfg, knobs)

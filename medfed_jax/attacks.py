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

Adaptive attacks (`ADAPTIVE_ATTACKS`) choose their update each round: Opt-IPM,
Opt-ALIE and `mimic_ipm` search their factor against the round's aggregator, Fang et
al.'s attacks target Krum and trimmed mean / median, min-max and min-sum
bound their distance to the honest updates, and `grad_ascent` differentiates
the honest loss through the aggregator and the server optimizer. Those that
need the server side read it from `AttackContext` (``aggregate``, ``step``,
``loss``), which the engine fills in every round.

As a library: ``apply(updates, malicious, key=None, context=None)``.
Without a context every client takes part with equal weight (what ``ipm``,
``alie``, ``scaling`` and the Fang attacks read); attacks needing the server
side refuse a missing one, randomised ones (``gaussian``, ``fang_trim``) a
missing key. Masks may be bool or 0/1 (int or float).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medfed_jax import aggregators
from medfed_jax.aggregators import as_mask, broadcast_clients, num_rows, require_key
from medfed_jax.types import Attack, AttackContext, Updates, hparams_of


def _replace(updates: Updates, malicious: jax.Array, new: Updates) -> Updates:
    """Rows of ``malicious`` clients from ``new`` (leaves ``[C, ...]`` or one row ``[...]``)."""
    return jax.tree.map(lambda u, v: jnp.where(broadcast_clients(malicious, u), v.astype(u.dtype), u), updates, new)


def _keep_updates(updates, malicious, key, context):
    del malicious, key, context
    return updates


def _keep_labels(y, malicious, num_classes):
    del malicious, num_classes
    return y


def make_attack(apply: Callable[..., Updates], poison_labels: Callable[..., jax.Array]) -> Attack:
    """An `Attack` whose ``apply(updates, malicious, key=None, context=None)`` fills in defaults.

    No ``context``: every client takes part, equal weights (no attack's
    ``apply`` reads ``num_classes``). 0/1 masks become bool. The given
    functions receive every argument, as the engine passes them.
    """

    def public_apply(updates, malicious, key=None, context=None):
        if context is None:
            rows = num_rows(updates)
            context = AttackContext(jnp.ones(rows, jnp.float32), jnp.ones(rows, bool), 0)
        elif context.mask.dtype != jnp.bool_:
            context = context._replace(mask=as_mask(context.mask))
        return apply(updates, as_mask(malicious), key, context)

    def public_poison_labels(y, malicious, num_classes):
        return poison_labels(y, as_mask(malicious), num_classes)

    return Attack(public_apply, public_poison_labels)


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
    return make_attack(_keep_updates, _keep_labels)


def sign_flip(scale: Any = 1.0) -> Attack:
    """Sign flipping: ``u_i <- -scale * u_i`` for malicious ``i`` (its own honest update, reversed)."""

    def apply(updates, malicious, key, context):
        del key, context
        return _replace(updates, malicious, jax.tree.map(lambda u: -scale * u, updates))

    return make_attack(apply, _keep_labels)


def ipm(eps: Any = 0.1) -> Attack:
    """Inner-product manipulation (Xie, Koyejo and Gupta 2020): ``u_i <- -eps * mean_{j in H} u_j``."""

    def apply(updates, malicious, key, context: AttackContext):
        del key
        mu, _ = honest_mean_std(updates, context.mask & ~malicious)
        return _replace(updates, malicious, jax.tree.map(lambda m: -eps * m, mu))

    return make_attack(apply, _keep_labels)


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

    return make_attack(apply, _keep_labels)


def gaussian(sigma: Any = 1.0) -> Attack:
    """Random updates: ``u_i <- N(0, sigma^2 I)`` for malicious ``i``, drawn from ``key``."""

    def apply(updates, malicious, key, context):
        del context
        require_key(key, "gaussian")
        leaves, treedef = jax.tree.flatten(updates)
        keys = jax.random.split(key, len(leaves))
        noise = [sigma * jax.random.normal(k, u.shape, jnp.float32) for k, u in zip(keys, leaves)]
        return _replace(updates, malicious, jax.tree.unflatten(treedef, noise))

    return make_attack(apply, _keep_labels)


def scaling(gamma: Any = 0.0) -> Attack:
    """Model replacement (Bagdasaryan et al. 2020): ``u_i <- gamma * u_i`` for malicious ``i``.

    ``gamma = 0`` boosts by ``n``, the number of taking-part clients, which
    makes one attacker's update dominate a plain mean (server lr 1).
    """

    def apply(updates, malicious, key, context: AttackContext):
        del key
        boost = jnp.where(gamma == 0, jnp.sum(context.mask).astype(jnp.float32), gamma)
        return _replace(updates, malicious, jax.tree.map(lambda u: boost * u, updates))

    return make_attack(apply, _keep_labels)


def label_flip() -> Attack:
    """Label flipping (data poisoning): malicious clients train on ``y <- K - 1 - y``; updates pass."""

    def poison_labels(y, malicious, num_classes):
        return jnp.where(malicious[:, None], num_classes - 1 - y, y)

    return make_attack(_keep_updates, poison_labels)


def non_finite() -> Attack:
    """Crashed or hostile clients: ``u_i <- NaN`` for even ``i``, ``u_i <- +Inf`` for odd ``i`` (malicious ``i``)."""

    def apply(updates, malicious, key, context):
        del key, context
        bad = jnp.where(jnp.arange(malicious.shape[0]) % 2 == 0, jnp.nan, jnp.inf)
        return _replace(updates, malicious, jax.tree.map(lambda u: broadcast_clients(bad, u), updates))

    return make_attack(apply, _keep_labels)


# --------------------------------------------------------------------------
# Adaptive attacks: the malicious update is chosen each round, knowing the honest updates and the rule.
#
# The malicious clients send one shared vector ``u`` (the searched attacks) or one row each (Fang's
# trimmed-mean attack). The honest set ``H``, ``n`` and ``f`` are as above; ``mu_H`` and ``sigma_H``
# come from `honest_mean_std`. Searches have a static number of evaluations (a `jax.lax.fori_loop`),
# so each compiles the aggregator once however many candidates it tries.

LINE_START, LINE_DELTA, LINE_RATIO = 0.0, 10.0, 0.8  # ByzFL's Opt-IPM / Opt-ALIE line search defaults
GAMMA_INIT = 10.0  # Shejwalkar and Houmansadr's initial gamma (their min-max / min-sum code)
FANG_B = 2.0  # Fang et al.'s b: trimmed-mean attack values lie within a factor b beyond the honest extremes
FANG_THRESHOLD = 1e-5  # Fang et al.'s Krum attack stops halving lambda below this
PERTURBATIONS = ("unit_vec", "sign", "std")
STEALTH = ("distance", "norm")
KNOWLEDGE = ("omniscient", "own_data")
_TINY = float(jnp.finfo(jnp.float32).tiny)  # guards the divisions by a norm


def _needs(context: AttackContext, attack_name: str, *fields: str) -> None:
    missing = [f for f in fields if getattr(context, f) is None]
    if missing:
        raise ValueError(
            f"attack {attack_name!r} needs AttackContext.{'/'.join(missing)} (the round's server side); "
            "the engine provides it: run it through medfed_jax.server, or pass them when calling apply."
        )


def line_maximize(objective: Any, evals: int, start: Any = LINE_START, delta: Any = LINE_DELTA, ratio=LINE_RATIO):
    """ByzFL's line search: a best-effort ``argmax_{tau >= start} objective(tau)`` in ``evals`` evaluations.

    Expansion: from ``start``, try ``best + delta`` and double ``delta`` while
    that improves; at the first failure multiply ``delta`` by ``ratio`` and
    contract: try ``best + delta``, keep it if better, multiply ``delta`` by
    ``ratio``, until the evaluations are spent. Returns ``(tau, objective(tau))``.
    One loop evaluates ``start`` first, so ``objective`` is traced (compiled) once.
    """

    def step(i, carry):
        best_x, best_y, step_size, expanding = carry
        first = i == 0
        x = jnp.where(first, best_x, best_x + step_size)
        y = objective(x)
        better = (y > best_y) | first
        step_size = jnp.where(first, step_size, jnp.where(expanding & better, 2.0 * step_size, ratio * step_size))
        return jnp.where(better, x, best_x), jnp.where(better, y, best_y), step_size, expanding & better

    init = (jnp.asarray(start, jnp.float32), jnp.float32(-jnp.inf), jnp.asarray(delta, jnp.float32), jnp.array(True))
    best_x, best_y, _, _ = jax.lax.fori_loop(0, evals, step, init)
    return best_x, best_y


def _optimized_line(name: str, line: Any, evals: int) -> Attack:
    """``u(tau) = base + tau * direction`` with ``tau`` from `line_maximize` of ``|agg(u(tau)) - mu_H|``.

    ``line(mu, sigma) -> (base, direction)``; ``agg`` is the round's aggregator
    (``context.aggregate``) over the honest updates and ``f`` copies of ``u``.
    """

    def apply(updates, malicious, key, context: AttackContext):
        del key
        _needs(context, name, "aggregate")
        mu, sigma = honest_mean_std(updates, context.mask & ~malicious)
        base, direction = line(mu, sigma)
        at = lambda tau: jax.tree.map(lambda b, d: b + tau * d, base, direction)  # noqa: E731

        def distance(tau):
            aggregate = context.aggregate(_replace(updates, malicious, at(tau)))
            return optax.global_norm(jax.tree.map(jnp.subtract, aggregate, mu))

        tau, _ = line_maximize(distance, evals)
        return _replace(updates, malicious, at(tau))

    return make_attack(apply, _keep_labels)


def opt_ipm(evals: int = 20) -> Attack:
    """Opt-IPM (ByzFL; Allouah et al. 2023): ``u = -tau * mu_H``, ``tau`` by `line_maximize` against the rule in use.

    ``tau`` maximises ``|agg(honest, f copies of u) - mu_H|`` over ``evals`` evaluations.
    """
    return _optimized_line("opt_ipm", lambda mu, sigma: (jax.tree.map(jnp.zeros_like, mu), _neg(mu)), evals)


def opt_alie(evals: int = 20) -> Attack:
    """Opt-ALIE (ByzFL): ``u = mu_H + tau * sigma_H``, ``tau`` by `line_maximize` against the rule in use.

    ByzFL's sign convention (``+ tau sigma``); ``tau`` maximises ``|agg(honest, f copies of u) - mu_H|``.
    """
    return _optimized_line("opt_alie", lambda mu, sigma: (mu, sigma), evals)


def reversal(aggregate: Updates, mu: Updates) -> jax.Array:
    """IPM's goal as a distance: ``<mu_H - aggregate, mu_H> / |mu_H|`` (Xie, Koyejo and Gupta 2020).

    How far the aggregate falls short of the honest mean along it: 0 at
    ``mu_H``, ``|mu_H|`` at a zero aggregate, more when it points backwards.
    Unlike ``|aggregate - mu_H|`` it does not reward honest noise, such as Krum
    picking an honest update other than the mean.
    """
    dot = sum(jnp.vdot(m - a, m) for m, a in zip(jax.tree.leaves(mu), jax.tree.leaves(aggregate)))
    return dot / jnp.maximum(optax.global_norm(mu), _TINY)


def mimic_ipm(evals: int = 20) -> Attack:
    """Mimic, then reverse: ``u = b - tau * mu_H`` maximising `reversal` against the rule in use.

    The base ``b`` is 0 (Opt-IPM's line) or one honest update ``u_j`` (the Mimic
    attack of Karimireddy, He and Jaggi, ICLR 2022: every attacker copies
    ``u_j``), whichever gives the largest `reversal` of ``agg(honest, f copies
    of b)`` (ties: 0, then the lowest ``j``); then ``tau >= 0`` by
    `line_maximize` of the same objective (``evals`` evaluations, ``tau = 0``
    first). Against Krum, ``|agg - mu_H|`` (Opt-IPM) also rewards the honest
    noise of an honest pick, so its search can settle where no attacker is
    selected; `reversal` grows with ``tau`` only while Krum selects ``u``, so
    the search ends near the largest selected ``tau``. Where even ``tau = 0``
    is not selected, ``f`` copies of an honest ``u_j`` lower its Krum score
    (``f`` zero distances), so Krum picks the honest update the attackers
    choose. ``C + evals`` aggregator evaluations per round.
    """

    def apply(updates, malicious, key, context: AttackContext):
        del key
        _needs(context, "mimic_ipm", "aggregate")
        honest = context.mask & ~malicious
        mu, _ = honest_mean_std(updates, honest)
        score = lambda u: reversal(context.aggregate(_replace(updates, malicious, u)), mu)  # noqa: E731

        def best_base(j, carry):  # rows outside `honest` (absent, malicious) are never a base
            best_j, best = carry
            value = jnp.where(honest[j], score(jax.tree.map(lambda x: x[j], updates)), -jnp.inf)
            return jnp.where(value > best, j, best_j), jnp.maximum(value, best)

        zero = jax.tree.map(jnp.zeros_like, mu)
        j, _ = jax.lax.fori_loop(0, honest.shape[0], best_base, (jnp.int32(-1), score(zero)))
        base = jax.tree.map(lambda x, z: jnp.where(j >= 0, x[jnp.maximum(j, 0)], z), updates, zero)
        at = lambda tau: jax.tree.map(lambda b, m: b - tau * m, base, mu)  # noqa: E731
        tau, _ = line_maximize(lambda tau: score(at(tau)), evals)
        return _replace(updates, malicious, at(tau))

    return make_attack(apply, _keep_labels)


def _neg(tree: Any) -> Any:
    return jax.tree.map(jnp.negative, tree)


def _honest_extremes(updates: Updates, honest: jax.Array) -> tuple[Updates, Updates]:
    """Per-coordinate max and min over the ``honest`` clients."""
    big = jnp.finfo(jnp.float32).max
    hi = jax.tree.map(lambda u: jnp.max(jnp.where(broadcast_clients(honest, u), u, -big), axis=0), updates)
    lo = jax.tree.map(lambda u: jnp.min(jnp.where(broadcast_clients(honest, u), u, big), axis=0), updates)
    return hi, lo


def fang_krum_lambda_max(updates: Updates, honest: jax.Array, f: Any) -> jax.Array:
    """The upper bound on lambda of Fang et al. (2020), Sec. 4.2, in update space (``w_i - w_Re = u_i``).

    ``lambda_max = min_{i in H} sum_{l in G_i} |u_l - u_i| / ((n - 2f - 1) sqrt(d))
    + max_{i in H} |u_i| / sqrt(d)``, ``G_i`` the ``n - f - 2`` honest updates
    nearest to ``u_i`` (self excluded), ``n`` taking-part clients, ``f``
    malicious, ``d`` parameters. ``n - 2f - 1`` (the crafted update's Krum
    score counts ``n - f - 2`` neighbours, ``f - 1`` of them its own copies)
    is the paper's and Fang's published code's; the widely copied
    reimplementation of Shejwalkar and Houmansadr (NDSS 2021, ``compute_lambda_fang``)
    writes the right denominator in honest-count terms, ``n_benign - f - 1``,
    but sums ``n_benign - f - 2 = n - 2f - 2`` neighbours where the paper has
    ``n - f - 2``; we follow the paper.
    """
    h = jnp.sum(honest)
    d = sum(leaf[0].size for leaf in jax.tree.leaves(updates))
    others = honest[:, None] & honest[None, :] & ~jnp.eye(honest.shape[0], dtype=bool)
    dist = jnp.where(others, jnp.sqrt(aggregators.pairwise_sqdistances(updates)), jnp.inf)
    near = jnp.arange(honest.shape[0])[None, :] < jnp.maximum(h - 2, 1)
    sums = jnp.sum(jnp.where(near, jnp.sort(dist, axis=1), 0.0), axis=1)
    n = jnp.sum(honest) + f
    term_1 = jnp.min(jnp.where(honest, sums, jnp.inf)) / (jnp.maximum(n - 2 * f - 1, 1) * math.sqrt(d))
    norms = jnp.sqrt(aggregators.client_sqnorms(updates))
    return term_1 + jnp.max(jnp.where(honest, norms, 0.0)) / math.sqrt(d)


def fang_krum() -> Attack:
    """Fang et al. (2020)'s full-knowledge attack on Krum: ``u = -lambda * sign(mu_H)`` for every attacker.

    ``lambda`` starts at `fang_krum_lambda_max` and is halved until Krum
    (with ``f`` = the round's malicious count, as in Fang's code) selects one
    of the ``f`` identical crafted updates; if ``lambda`` falls to
    `FANG_THRESHOLD` first, the attackers send their genuine updates (as
    Fang's code does). The check is Krum's whichever rule the server runs:
    the attack targets Krum.
    """

    def apply(updates, malicious, key, context: AttackContext):
        honest = context.mask & ~malicious
        f = jnp.sum(context.mask & malicious)
        mu, _ = honest_mean_std(updates, honest)
        direction = jax.tree.map(jnp.sign, mu)
        krum = aggregators.krum(f)
        crafted = lambda lam: _replace(updates, malicious, jax.tree.map(lambda s: -lam * s, direction))  # noqa: E731

        def selected(lam):
            _, _, diag = krum.aggregate(crafted(lam), context.weights, context.mask, (), key)
            return jnp.any(diag["selected"] & malicious) & (lam > FANG_THRESHOLD)

        def halve(carry):  # tries lambda_max first: selected() is traced once
            lam, _ = carry
            return lam / 2, selected(lam / 2)

        start = (2 * fang_krum_lambda_max(updates, honest, f), jnp.array(False))
        lam, found = jax.lax.while_loop(lambda c: ~c[1] & (c[0] / 2 > FANG_THRESHOLD), halve, start)
        return jax.tree.map(lambda u, c: jnp.where(found, c, u), updates, crafted(lam))

    return make_attack(apply, _keep_labels)


def fang_trim_values(updates: Updates, honest: jax.Array, r: Updates) -> Updates:
    """Fang et al. (2020)'s full-knowledge trimmed-mean (and median) values, ``[C, ...]``, before masking.

    Per coordinate, ``s = sign(mu_H)``: where ``s > 0`` (honest clients move
    the parameter up) the attackers send values below the honest minimum
    ``m``: ``m / r`` if ``m > 0`` else ``m * r``; elsewhere values above the
    honest maximum ``M``: ``M * r`` if ``M > 0`` else ``M / r``. ``r`` (leaves
    ``[C, ...]``) holds each attacker's factors in ``[1, b]``.
    """
    mu, _ = honest_mean_std(updates, honest)
    hi, lo = _honest_extremes(updates, honest)

    def leaf(m, top, bottom, rr):
        below = jnp.where(bottom > 0, bottom / rr, bottom * rr)
        above = jnp.where(top > 0, top * rr, top / rr)
        return jnp.where(m > 0, below, above)

    return jax.tree.map(leaf, mu, hi, lo, r)


def fang_trim(b: float = FANG_B) -> Attack:
    """Fang et al. (2020)'s full-knowledge attack on trimmed mean and median: `fang_trim_values`, ``r ~ U[1, b]``.

    Each attacker draws its own factors per coordinate from ``key``.
    """

    def apply(updates, malicious, key, context: AttackContext):
        require_key(key, "fang_trim")
        leaves, treedef = jax.tree.flatten(updates)
        keys = jax.random.split(key, len(leaves))
        r = [jax.random.uniform(k, u.shape, jnp.float32, 1.0, b) for k, u in zip(keys, leaves)]
        values = fang_trim_values(updates, context.mask & ~malicious, jax.tree.unflatten(treedef, r))
        return _replace(updates, malicious, values)

    return make_attack(apply, _keep_labels)


def perturbation(kind: str, mu: Updates, sigma: Updates) -> Updates:
    """Shejwalkar and Houmansadr's ``p``: ``-mu/|mu|`` (unit_vec), ``-sign(mu)`` (sign), ``-sigma`` (std)."""
    if kind == "unit_vec":
        norm = jnp.maximum(optax.global_norm(mu), _TINY)
        return jax.tree.map(lambda m: -m / norm, mu)
    if kind == "sign":
        return jax.tree.map(lambda m: -jnp.sign(m), mu)
    if kind == "std":
        return _neg(sigma)
    raise ValueError(f"attack.perturbation={kind!r} is unknown; choose one of {PERTURBATIONS}.")


def gamma_search(feasible: Any, evals: int, gamma_init: float = GAMMA_INIT) -> jax.Array:
    """Shejwalkar and Houmansadr's search for the largest feasible gamma, ``evals`` bisection steps.

    From ``gamma = step = gamma_init``: if ``feasible(gamma)`` it becomes the
    answer and ``gamma += step / 2``, else ``gamma -= step / 2``; then
    ``step /= 2``. Returns the last feasible gamma (0 if none was).
    """

    def body(_, carry):
        gamma, step, best = carry
        ok = feasible(gamma)
        return gamma + jnp.where(ok, step, -step) / 2, step / 2, jnp.where(ok, gamma, best)

    init = (jnp.float32(gamma_init), jnp.float32(gamma_init), jnp.float32(0.0))
    return jax.lax.fori_loop(0, evals, body, init)[2]


def _min_max_or_sum(reduce: str, kind: str, evals: int) -> Attack:
    def apply(updates, malicious, key, context: AttackContext):
        del key
        honest = context.mask & ~malicious
        mu, sigma = honest_mean_std(updates, honest)
        p = perturbation(kind, mu, sigma)
        pairwise = jnp.where(honest[:, None] & honest[None, :], aggregators.pairwise_sqdistances(updates), 0.0)
        at = lambda gamma: jax.tree.map(lambda m, q: m + gamma * q, mu, p)  # noqa: E731
        if reduce == "max":  # max_i |u - u_i|^2 <= max_{i,j} |u_i - u_j|^2
            bound, combine = jnp.max(pairwise), jnp.max
        else:  # sum_i |u - u_i|^2 <= max_i sum_j |u_i - u_j|^2
            bound, combine = jnp.max(jnp.sum(pairwise, axis=1)), jnp.sum

        def feasible(gamma):
            d2 = aggregators.client_sqdistances(updates, at(gamma))
            return combine(jnp.where(honest, d2, 0.0)) <= bound

        return _replace(updates, malicious, at(gamma_search(feasible, evals)))

    return make_attack(apply, _keep_labels)


def min_max(kind: str = "std", evals: int = 20) -> Attack:
    """Min-Max (Shejwalkar and Houmansadr, NDSS 2021): ``u = mu_H + gamma p`` with `perturbation` ``kind``.

    The largest ``gamma`` (`gamma_search`) with ``max_{i in H} |u - u_i| <=
    max_{i, j in H} |u_i - u_j|``: no farther from any honest update than the
    honest updates are from each other. Aggregator-agnostic.
    """
    return _min_max_or_sum("max", kind, evals)


def min_sum(kind: str = "std", evals: int = 20) -> Attack:
    """Min-Sum (Shejwalkar and Houmansadr, NDSS 2021): ``u = mu_H + gamma p``.

    The largest ``gamma`` with ``sum_{i in H} |u - u_i|^2 <= max_{i in H}
    sum_{j in H} |u_i - u_j|^2`` (the paper's bound; their code compares with
    the minimum instead). Aggregator-agnostic.
    """
    return _min_max_or_sum("sum", kind, evals)


def mean_loss(apply_fn: Any, params: Any, x: jax.Array, y: jax.Array, rows: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the ``rows`` (``[C, N]`` bool) of client data ``x [C, N, ...]``."""
    logits = apply_fn(params, x.reshape(-1, *x.shape[2:]))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y.reshape(-1))
    rows = rows.reshape(-1)
    return jnp.sum(jnp.where(rows, losses, 0.0)) / jnp.maximum(jnp.sum(rows), 1).astype(losses.dtype)


def stealth_radius(updates: Updates, honest: jax.Array, mu: Updates, stealth: str, budget: Any) -> jax.Array:
    """Stealth radius: ``budget * max_{i in H} |u_i - mu_H|`` (distance), ``budget * max_{i in H} |u_i|`` (norm)."""
    center = mu if stealth == "distance" else jax.tree.map(jnp.zeros_like, mu)
    d = jnp.sqrt(aggregators.client_sqdistances(updates, center))
    return budget * jnp.max(jnp.where(honest, d, 0.0))


def project(u: Updates, center: Updates, radius: jax.Array) -> Updates:
    """``u`` moved onto the ball ``|u - center| <= radius`` (unchanged inside it)."""
    offset = jax.tree.map(jnp.subtract, u, center)
    scale = jnp.minimum(1.0, radius / jnp.maximum(optax.global_norm(offset), _TINY))
    return jax.tree.map(lambda c, o: c + scale * o, center, offset)


def poison_objective(u: Updates, updates: Updates, malicious: jax.Array, clients: jax.Array, context) -> jax.Array:
    """The loss on ``clients``' training rows after the round's server step with every attacker sending ``u``.

    ``context.loss(context.step(context.aggregate(updates with u))), clients)``:
    aggregator and server optimizer in the graph, differentiable in ``u``
    (sub-gradients through sorts and selections).
    """
    return context.loss(context.step(context.aggregate(_replace(updates, malicious, u))), clients)


def grad_ascent(
    steps: int = 5, step_size: Any = 0.5, budget: Any = 1.0, stealth: str = "distance", knowledge: str = "omniscient"
) -> Attack:
    """A differentiable attacker: projected gradient ascent on `poison_objective`, run inside the round.

    Every attacker sends one shared ``u``, started at ``mu_H``; ``steps``
    steps of ``u <- project(u + step_size * R * g / |g|)`` (optax SGD on the
    normalised gradient ``g`` of the loss) inside the stealth ball of radius
    ``R`` = `stealth_radius` (around ``mu_H`` for ``distance``, around 0 for
    ``norm``). It keeps the best iterate seen, so the loss is never below the
    one at ``mu_H``. Through median, trimmed mean, Krum and Bulyan the
    gradient is the sub-gradient of the sort or selection (zero while Krum
    selects an honest client, which starting at ``mu_H`` makes unlikely).
    ``knowledge``: ``omniscient`` maximises the honest clients' loss on their
    own training data; ``own_data`` the loss on the attackers' own data.
    Both see the round's honest updates and the server side.
    """

    def apply(updates, malicious, key, context: AttackContext):
        del key
        _needs(context, "grad_ascent", "aggregate", "step", "loss")
        honest = context.mask & ~malicious
        clients = honest if knowledge == "omniscient" else context.mask & malicious
        mu, _ = honest_mean_std(updates, honest)
        radius = stealth_radius(updates, honest, mu, stealth, budget)
        center = mu if stealth == "distance" else jax.tree.map(jnp.zeros_like, mu)
        value_and_grad = jax.value_and_grad(lambda u: poison_objective(u, updates, malicious, clients, context))
        opt = optax.sgd(step_size * radius)

        def body(_, carry):  # the last of the steps + 1 passes only scores the final iterate
            u, state, best_u, best = carry
            value, g = value_and_grad(u)
            better = value > best
            best_u, best = jax.tree.map(lambda a, b: jnp.where(better, a, b), u, best_u), jnp.where(better, value, best)
            unit = jax.tree.map(lambda x: -x / jnp.maximum(optax.global_norm(g), _TINY), g)
            step, state = opt.update(unit, state, u)
            return project(optax.apply_updates(u, step), center, radius), state, best_u, best

        _, _, best_u, _ = jax.lax.fori_loop(0, steps + 1, body, (mu, opt.init(mu), mu, -jnp.inf))
        return _replace(updates, malicious, best_u)

    return make_attack(apply, _keep_labels)


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


def attack_mask(cfg: Any, key: jax.Array, fraction: Any, num_clients: int) -> jax.Array:
    """The run's ``[C]`` malicious mask over the whole population of ``num_clients``.

    ``cfg.clients`` (explicit indices) when given; otherwise
    ``round(fraction * C)`` clients drawn uniformly from ``key`` (``fraction``
    may be traced: `AttackHParams.fraction`).
    """
    if cfg.clients:
        mask = np.zeros(num_clients, bool)
        mask[list(cfg.clients)] = True
        return jnp.asarray(mask)
    return malicious_mask(key, num_clients, num_malicious(fraction, num_clients))


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

    return make_attack(apply, poison_labels)


# --------------------------------------------------------------------------
# Config section.


class AttackHParams(NamedTuple):
    """The ``attack`` section's numeric settings (traced: sweeping them never recompiles)."""

    fraction: Any  # malicious share of the population
    scale: Any  # sign_flip
    eps: Any  # ipm
    z: Any  # alie
    sigma: Any  # gaussian
    gamma: Any  # scaling
    step_size: Any  # grad_ascent
    budget: Any  # grad_ascent


_ATTACKS: dict[str, Callable[[Any, AttackHParams], Attack]] = {
    "none": lambda cfg, hp: no_attack(),
    "sign_flip": lambda cfg, hp: sign_flip(hp.scale),
    "ipm": lambda cfg, hp: ipm(hp.eps),
    "alie": lambda cfg, hp: alie(hp.z),
    "gaussian": lambda cfg, hp: gaussian(hp.sigma),
    "scaling": lambda cfg, hp: scaling(hp.gamma),
    "label_flip": lambda cfg, hp: label_flip(),
    "non_finite": lambda cfg, hp: non_finite(),
    "opt_ipm": lambda cfg, hp: opt_ipm(cfg.evals),
    "opt_alie": lambda cfg, hp: opt_alie(cfg.evals),
    "fang_krum": lambda cfg, hp: fang_krum(),
    "fang_trim": lambda cfg, hp: fang_trim(),
    "min_max": lambda cfg, hp: min_max(cfg.perturbation, cfg.evals),
    "min_sum": lambda cfg, hp: min_sum(cfg.perturbation, cfg.evals),
    "grad_ascent": lambda cfg, hp: grad_ascent(cfg.steps, hp.step_size, hp.budget, cfg.stealth, cfg.knowledge),
    "mimic_ipm": lambda cfg, hp: mimic_ipm(cfg.evals),
}
ATTACK_NAMES = tuple(_ATTACKS)
ADAPTIVE_ATTACKS = ("opt_ipm", "opt_alie", "fang_krum", "fang_trim", "min_max", "min_sum", "grad_ascent", "mimic_ipm")


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
            "evals": 20,  # evaluations per round: opt_ipm/opt_alie/mimic_ipm (line search), min_max/min_sum (bisection)
            "perturbation": "std",  # min_max/min_sum: one of PERTURBATIONS (inverse unit vector, sign, std)
            "steps": 5,  # grad_ascent: gradient-ascent steps per round
            "step_size": 0.5,  # grad_ascent: step length as a fraction of the stealth radius (numeric knob)
            "budget": 1.0,  # grad_ascent: stealth radius in units of the farthest honest update (numeric knob)
            "stealth": "distance",  # grad_ascent: one of STEALTH, a ball around the honest mean or around 0
            "knowledge": "omniscient",  # grad_ascent: one of KNOWLEDGE, whose data the loss is on (honest, own)
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
    for field, hint in (("evals", "ByzFL's line search uses 20."), ("steps", "grad_ascent: try 5.")):
        value = cfg[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"attack.{field}={value!r} must be an integer >= 1; {hint}")
    for field, choices in (("perturbation", PERTURBATIONS), ("stealth", STEALTH), ("knowledge", KNOWLEDGE)):
        if cfg[field] not in choices:
            raise ValueError(f"attack.{field}={cfg[field]!r} is unknown; choose one of {choices}.")
    _finite(cfg, "step_size", 0.0, strict=True, hint="grad_ascent steps this fraction of the stealth radius; try 0.5.")
    _finite(cfg, "budget", 0.0, strict=True, hint="grad_ascent's radius in farthest-honest-update units; try 1.")


def build_attack(cfg: Any, hparams: AttackHParams | None = None) -> Attack:
    """The attack named by ``cfg.name`` (the config's ``attack`` section).

    Structural settings come from ``cfg`` (static), strengths from ``hparams``
    (traced inside the engine; the config's values when None).
    """
    if cfg.name not in _ATTACKS:
        raise ValueError(f"attack.name={cfg.name!r} is unknown; choose one of {ATTACK_NAMES}.")
    return _ATTACKS[cfg.name](cfg, hparams_of(AttackHParams, cfg) if hparams is None else hparams)

"""Aggregation rules as pure functions over the stacked client axis.

Every rule is a factory returning `Aggregator(init, aggregate)`; see
`medfed_jax.types.Aggregator` for the contract. Updates are pytrees whose
leaves carry a leading client axis ``[C, ...]``; rules that need whole vectors
(norms, distances) sum per-leaf contributions, so nothing is concatenated.

Rules:

- ``mean``, ``weighted_mean``: (sample-weighted) average, not robust.
- ``coordinate_median`` (Yin et al. 2018), ``trimmed_mean(f)``.
- ``krum(f)``, ``multi_krum(f, m)`` (Blanchard et al. 2017).
- ``geometric_median(nu, iters)``: smoothed Weiszfeld (RFA, Pillutla et al.).
- ``centered_clipping(tau, iters)`` (Karimireddy et al. 2021).
- ``bulyan(f)`` (El Mhamdi et al. 2018).
- pre-aggregators, composed with any rule by `chain`: ``norm_clip(tau)``,
  ``nearest_neighbor_mixing(f)`` (Allouah et al. 2023), ``bucketing(s)``
  (Karimireddy et al. 2022).

Coordinate-wise rules sort along the client axis with `sort_clients`: a
bitonic sorting network on CPU (3-4x faster there than XLA's ``sort``), XLA's
sort on GPU and TPU (``aggregator.sort`` overrides).

Masking: a client with ``mask == False`` has no influence on any output. The
number of taking-part clients ``n = sum(mask)`` is traced, so every rule works
for any ``n <= C``; the published preconditions (Krum ``n > 2f + 2``, ...)
are checked on the configured cohort by `validate_config`, when a rule is
built with ``num_clients`` (``krum(f, num_clients=10)``), and when it is
called without a mask (then ``n`` is the leading axis, static while tracing:
``krum(4).aggregate(ten_rows)`` raises a ValueError). When a round has
fewer clients than a bound needs (clients dropped), rules degrade gracefully
instead of failing: trimmed mean trims ``min(f, (n - 1) // 2)`` per side (the
median at the limit), Krum scores over ``max(n - f - 2, 1)`` neighbours,
Bulyan selects ``max(n - 2f, 1)`` and averages ``max(n - 4f, 1)``.

Non-finite updates: every robust rule (everything except ``mean`` and
``weighted_mean``) treats a client whose update holds any NaN or Inf as an
outlier and drops it: it is masked out before the rule runs, exactly as if it
had not taken part. The plain means do not filter (they are not robust): a
non-finite update poisons their output. Every rule reports
``nonfinite_clients`` (taking-part clients with a non-finite update) and the
spread of finite client update norms, ``norm_min``, ``norm_median``,
``norm_max``. Rules that select clients (Krum, Multi-Krum, Bulyan) return the
``[C]`` bool ``selected``; clipping rules return ``clipped`` counts.

As a library: every ``aggregate`` takes defaults for its optional arguments,
``aggregate(updates, weights=None, mask=None, state=None, key=None)`` (equal
weights, every client taking part, the rule's initial state), so a stateless
rule is ``coordinate_median().aggregate(updates)``; masks may be bool or 0/1
(int or float). Deterministic rules ignore the key; randomised ones
(``bucketing``, `medfed_jax.privacy.dp_fedavg`) refuse ``key=None``. A new
rule built with `make_aggregator` gets the same defaults.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medfed_jax.types import Aggregator, Metrics, hparams_of, no_precondition, no_state

_HIGHEST = jax.lax.Precision.HIGHEST
_TINY = float(jnp.finfo(jnp.float32).tiny)
_BIG = float(jnp.finfo(jnp.float32).max)

# --------------------------------------------------------------------------
# Helpers over pytrees with a leading client axis.


def broadcast_clients(v: jax.Array, leaf: jax.Array) -> jax.Array:
    """Reshape a ``[C]`` vector so that it broadcasts against a ``[C, ...]`` leaf."""
    return v.reshape(v.shape + (1,) * (leaf.ndim - 1))


def zero_masked(updates: Any, mask: jax.Array) -> Any:
    """Replace the rows of masked-out clients by zeros (NaN-safe)."""
    return jax.tree.map(lambda u: jnp.where(broadcast_clients(mask, u), u, jnp.zeros_like(u)), updates)


def client_finite(updates: Any) -> jax.Array:
    """``[C]`` bool: True where a client's update has no NaN and no Inf."""
    finite = [jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1) for leaf in jax.tree.leaves(updates)]
    return jnp.logical_and.reduce(jnp.stack(finite), axis=0)


def count_nonfinite(updates: Any, mask: jax.Array) -> jax.Array:
    """Number of taking-part clients whose update has a NaN or an Inf."""
    return jnp.sum(mask & ~client_finite(updates))


def client_sqnorms(updates: Any) -> jax.Array:
    """``[C]`` squared L2 norm of each client's whole update."""
    return sum(jnp.sum(jnp.square(leaf.reshape(leaf.shape[0], -1)), axis=1) for leaf in jax.tree.leaves(updates))


def client_sqdistances(updates: Any, center: Any) -> jax.Array:
    """``[C]`` squared L2 distance of each client's update to ``center`` (no client axis)."""
    diffs = jax.tree.map(lambda u, c: u - c[None], updates, center)
    return client_sqnorms(diffs)


def pairwise_sqdistances(updates: Any) -> jax.Array:
    """``[C, C]`` squared distances ``|u_i|^2 + |u_j|^2 - 2 <u_i, u_j>`` (clamped at 0).

    One Gram matrix per leaf at full float32 precision (no TF32). Overflow
    (NaN from ``inf - inf``) reads as ``+inf``; the diagonal is exactly 0.
    """
    gram = sum(
        jnp.dot(a, a.T, precision=_HIGHEST)
        for a in (leaf.reshape(leaf.shape[0], -1) for leaf in jax.tree.leaves(updates))
    )
    sq = jnp.diagonal(gram)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
    d2 = jnp.where(jnp.isnan(d2), jnp.inf, d2)
    return jnp.where(jnp.eye(d2.shape[0], dtype=bool), 0.0, d2)


def combine(coeffs: jax.Array, updates: Any) -> Any:
    """``sum_i coeffs[..., i] u_i`` per leaf: ``[C]`` gives one vector, ``[K, C]`` gives ``K``."""
    return jax.tree.map(lambda u: jnp.tensordot(coeffs, u, axes=1, precision=_HIGHEST), updates)


def num_rows(updates: Any) -> int:
    """The length of the leading client axis of ``updates`` (static, also while tracing)."""
    return int(jax.tree.leaves(updates)[0].shape[0])


def as_mask(mask: Any) -> jax.Array:
    """A ``[C]`` bool mask from bool or 0/1 values (int or float): nonzero is True."""
    if getattr(mask, "dtype", None) == jnp.bool_:
        return mask
    return jnp.asarray(mask) != 0


def require_key(key: Any, name: str) -> None:
    """Refuse ``key=None`` in a randomised rule: there is no default key."""
    if key is None:
        raise TypeError(f"{name} is randomised: pass key=jax.random.key(seed); it has no default key.")


# (least number of inputs for f, largest f for n inputs, the bound as text) per rule that needs f.
_BOUNDS = {
    "trimmed_mean": (lambda f: 2 * f + 1, lambda n: (n - 1) // 2, "2f < n"),
    "krum": (lambda f: 2 * f + 3, lambda n: (n - 3) // 2, "n > 2f + 2"),
    "multi_krum": (lambda f: 2 * f + 3, lambda n: (n - 3) // 2, "n > 2f + 2"),
    "bulyan": (lambda f: 4 * f + 3, lambda n: (n - 3) // 4, "n >= 4f + 3"),
    "nnm": (lambda f: 2 * f + 1, lambda n: (n - 1) // 2, "2f < n"),
}


def _shortfall(name: str, f: int, n: int) -> str | None:
    """None when ``name`` tolerates ``f`` of ``n`` inputs, else the start of the fix (``'use f <= k, or'``)."""
    least, largest, _ = _BOUNDS[name]
    if n >= least(f):
        return None
    return f"use f <= {largest(n)}, or" if largest(n) >= 0 else "use"


def bound_check(name: str, f: int) -> Callable[[int], None]:
    """``n -> None``: raise a ValueError naming ``f``, ``n`` and the bound when ``name`` cannot run on ``n`` inputs."""
    least, _, bound = _BOUNDS[name]

    def check(n: int) -> None:
        fix = _shortfall(name, f, n)
        if fix is not None:
            raise ValueError(
                f"{name}(f={f}) needs {bound} (at least {least(f)} clients for f={f}) but got n={n} clients; "
                f"{fix} at least {least(f)} clients."
            )

    return check


def make_aggregator(
    init: Callable[[Any], Any],
    aggregate: Callable[..., tuple[Any, Any, Metrics]],
    check: Callable[[int], None] = no_precondition,
) -> Aggregator:
    """An `Aggregator` whose ``aggregate`` fills in defaults for its optional arguments.

    ``aggregate(updates, weights=None, mask=None, state=None, key=None)``:
    equal weights, every client taking part (then ``check(C)`` runs on the
    leading axis ``C``: a precondition that fails raises while tracing),
    ``init`` of one client's row as the state; a 0/1 mask becomes bool. The
    given ``aggregate`` receives all five, as the engine passes them.
    """

    def public(updates, weights=None, mask=None, state=None, key=None):
        rows = num_rows(updates)
        if mask is None:
            check(rows)
            mask = jnp.ones(rows, bool)
        if weights is None:
            weights = jnp.ones(rows, jnp.float32)
        if state is None:
            state = init(jax.tree.map(lambda u: jnp.zeros(u.shape[1:], u.dtype), updates))
        return aggregate(updates, weights, as_mask(mask), state, key)

    return Aggregator(init, public, check)


def _check_now(aggregator: Aggregator, num_clients: int | None) -> Aggregator:
    """``aggregator``, after checking its precondition on ``num_clients`` (when given)."""
    if num_clients is not None:
        aggregator.check(num_clients)
    return aggregator


SORTS = ("auto", "xla", "bitonic")


def _resolve_sort(method: str) -> str:
    if method not in SORTS:
        raise ValueError(f"sort method {method!r} is unknown; choose one of {SORTS}.")
    if method == "auto":
        return "bitonic" if jax.default_backend() == "cpu" else "xla"
    return method


def _bitonic(x: jax.Array) -> jax.Array:
    """Bitonic sorting network along axis 0, padded to a power of two with ``+inf``.

    Only elementwise min / max / select passes over the whole array, which
    XLA's CPU backend runs 3-4x faster than its ``sort``.
    """
    n0, rest = x.shape[0], x.shape[1:]
    n = 1 << max(n0 - 1, 0).bit_length()
    if n > n0:
        x = jnp.concatenate([x, jnp.full((n - n0, *rest), jnp.inf, x.dtype)])
    k = 2
    while k <= n:
        j = k // 2
        while j >= 1:
            pairs = x.reshape((n // (2 * j), 2, j, *rest))
            lo, hi = jnp.minimum(pairs[:, 0], pairs[:, 1]), jnp.maximum(pairs[:, 0], pairs[:, 1])
            ascending = ((np.arange(n // (2 * j)) * 2 * j) & k) == 0
            ascending = jnp.asarray(ascending).reshape((-1,) + (1,) * (1 + len(rest)))
            x = jnp.stack([jnp.where(ascending, lo, hi), jnp.where(ascending, hi, lo)], axis=1).reshape((n, *rest))
            j //= 2
        k *= 2
    return x[:n0]


def sort_clients(x: jax.Array, method: str = "auto") -> jax.Array:
    """Sort ``x [C, ...]`` ascending along the client axis.

    ``method``: ``'xla'`` (``jnp.sort``), ``'bitonic'`` (`_bitonic`), or
    ``'auto'`` (bitonic on CPU, XLA's sort on GPU and TPU).
    """
    return _bitonic(x) if _resolve_sort(method) == "bitonic" else jnp.sort(x, axis=0)


def masked_sort(x: jax.Array, valid: jax.Array, method: str = "auto") -> jax.Array:
    """Sort ``x [C, ...]`` along the client axis, invalid clients moved to the end.

    They are replaced by the largest float32 (not ``inf``), so a zero
    coefficient on them in a weighted sum gives 0, not NaN.
    """
    return sort_clients(jnp.where(broadcast_clients(valid, x), x, _BIG), method)


def _row(s: jax.Array, i: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(s, i, axis=0, keepdims=False)


def sorted_median(s: jax.Array, n: jax.Array) -> jax.Array:
    """Median of the first ``n`` rows of an ascending ``s`` (mean of the two middle ones when even).

    Zero when ``n == 0``.
    """
    lo = _row(s, jnp.maximum((n - 1) // 2, 0))
    hi = _row(s, n // 2)
    return jnp.where(n > 0, (lo + hi) / 2, jnp.zeros_like(lo))


def masked_median(x: jax.Array, valid: jax.Array, method: str = "xla") -> jax.Array:
    """Median over the valid clients of ``x [C, ...]`` (per coordinate); see `sort_clients`."""
    return sorted_median(masked_sort(x, valid, method), jnp.sum(valid))


def norm_stats(updates: Any, valid: jax.Array) -> Metrics:
    """Min / median / max of the L2 norms of the valid clients' updates (0 if none)."""
    s = masked_sort(jnp.sqrt(client_sqnorms(updates)), valid, "xla")
    n = jnp.sum(valid)
    return {
        "norm_min": jnp.where(n > 0, s[0], 0.0),
        "norm_median": sorted_median(s, n),
        "norm_max": jnp.where(n > 0, _row(s, jnp.maximum(n - 1, 0)), 0.0),
    }


# A rule over finite inputs: (updates, weights, valid, state, key) -> (update, state, diag).
Rule = Callable[..., tuple[Any, Any, Metrics]]


def robust(
    rule: Rule, init: Callable[[Any], Any] = no_state, check: Callable[[int], None] = no_precondition
) -> Aggregator:
    """Wrap a rule so non-finite clients are dropped and the common diagnostics added.

    The rule sees a ``valid = mask & finite`` mask and updates whose invalid
    rows (masked out, or with any NaN/Inf) are zero; it must give them no
    influence. ``check``: the rule's precondition on the number of clients
    (see `make_aggregator`).
    """

    def aggregate(updates, weights, mask, state, key):
        finite = client_finite(updates)
        valid = mask & finite
        clean = zero_masked(updates, valid)
        update, state, diag = rule(clean, weights.astype(jnp.float32), valid, state, key)
        common = {"nonfinite_clients": jnp.sum(mask & ~finite), **norm_stats(clean, valid)}
        return update, state, {**diag, **common}

    return make_aggregator(init, aggregate, check)


# --------------------------------------------------------------------------
# Plain means.


def weighted_mean() -> Aggregator:
    """Sample-count-weighted mean of the taking-part clients (FedAvg).

    ``update = sum_i m_i w_i u_i / sum_i m_i w_i``. A non-finite update is
    *not* filtered (the mean is not robust): it poisons the result, and the
    diagnostic ``nonfinite_clients`` reports how many clients sent one.
    """

    def aggregate(updates, weights, mask, state, key):
        del key
        w = jnp.where(mask, weights.astype(jnp.float32), 0.0)
        w = w / jnp.maximum(jnp.sum(w), _TINY)
        finite = client_finite(updates)
        # 0 * x is 0 only for finite x: zero the masked-out rows, but only when one of them is not
        # finite, since on XLA's CPU backend that copy costs more than the weighted sum itself.
        update = jax.lax.cond(
            jnp.all(finite | mask), lambda: combine(w, updates), lambda: combine(w, zero_masked(updates, mask))
        )
        diag = {"nonfinite_clients": jnp.sum(mask & ~finite), **norm_stats(updates, mask & finite)}
        return update, state, diag

    return make_aggregator(no_state, aggregate)


def mean() -> Aggregator:
    """Unweighted mean of the taking-part clients: ``sum_i m_i u_i / sum_i m_i``."""
    inner = weighted_mean()

    def aggregate(updates, weights, mask, state, key):
        return inner.aggregate(updates, jnp.ones_like(weights), mask, state, key)

    return make_aggregator(no_state, aggregate)


# --------------------------------------------------------------------------
# Coordinate-wise rules.


def _weighted_rows(coeffs: jax.Array, x: jax.Array) -> jax.Array:
    """``sum_i coeffs_i x_i`` over the client axis of one array, as a BLAS dot.

    XLA's CPU backend runs ``sum(where(...), axis=0)`` over the client axis
    ~100x slower than this matrix-vector product.
    """
    return jnp.tensordot(coeffs.astype(x.dtype), x, axes=1, precision=_HIGHEST)


def coordinate_median(sort: str = "auto") -> Aggregator:
    """Coordinate-wise median over the taking-part clients (Yin et al. 2018).

    Per coordinate: the middle value of the ``n`` taking-part clients, the
    mean of the two middle values when ``n`` is even. Unweighted. ``sort``:
    see `sort_clients`.
    """

    def rule(updates, weights, valid, state, key):
        del weights, key
        return jax.tree.map(lambda u: masked_median(u, valid, sort), updates), state, {}

    return robust(rule)


def trimmed_mean(f: int, sort: str = "auto", num_clients: int | None = None) -> Aggregator:
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the ``f`` largest and ``f`` smallest.

    ``update_k = mean(sorted(u_{1k}, ..., u_{nk})[f : n - f])``. Unweighted.
    Needs ``2f < n`` (checked on ``num_clients`` when given). ``sort``: see
    `sort_clients`.
    """

    def rule(updates, weights, valid, state, key):
        del weights, key
        n = jnp.sum(valid)
        t = jnp.clip((n - 1) // 2, 0, f)
        rank = jnp.arange(valid.shape[0])
        coeffs = ((rank >= t) & (rank < n - t)) / jnp.maximum(n - 2 * t, 1)
        return jax.tree.map(lambda u: _weighted_rows(coeffs, masked_sort(u, valid, sort)), updates), state, {}

    return _check_now(robust(rule, check=bound_check("trimmed_mean", f)), num_clients)


# --------------------------------------------------------------------------
# Distance-based rules.


class _Neighbours(NamedTuple):
    """Each client's distances to the others, sorted once (``d_sorted[i]`` follows ``order[i]``)."""

    order: jax.Array  # [C, C] clients by increasing distance to client i (self and invalid last)
    d_sorted: jax.Array  # [C, C] squared distances in that order (inf for self and invalid)
    d_others: jax.Array  # [C, C] squared distances, 0 for self and invalid


def _neighbours(updates: Any, valid: jax.Array) -> _Neighbours:
    others = valid[:, None] & valid[None, :] & ~jnp.eye(valid.shape[0], dtype=bool)
    d2 = pairwise_sqdistances(updates)
    d = jnp.where(others, d2, jnp.inf)
    order = jnp.argsort(d, axis=1, stable=True)
    return _Neighbours(order, jnp.take_along_axis(d, order, axis=1), jnp.where(others, d2, 0.0))


def _krum_order(nb: _Neighbours, pool: jax.Array, f: int) -> jax.Array:
    """Clients of ``pool`` by increasing Krum score, then clients outside the pool.

    Score (Blanchard et al. 2017): the sum of squared distances to the
    ``|pool| - f - 2`` nearest other clients of the pool, at least the nearest
    one (the published count reaches 0 when clients dropped out or, in Bulyan,
    on the last picks). Equal scores (mutual nearest neighbours tie when the
    count is 1) go to the smaller sum of squared distances to all others in
    the pool, then to the lower index, so the rule does not depend on the
    client order. Overflowing scores rank after finite ones.
    """
    live = pool[nb.order]  # [i, r]: is client i's r-th nearest in the pool?
    k = jnp.maximum(jnp.sum(pool) - f - 2, 1)
    near = live & (jnp.cumsum(live, axis=1) <= k)
    score = jnp.minimum(jnp.sum(jnp.where(near, nb.d_sorted, 0.0), axis=1), _BIG)
    total = jnp.minimum(jnp.sum(jnp.where(pool[None, :], nb.d_others, 0.0), axis=1), _BIG)
    index = jnp.arange(pool.shape[0])
    return jnp.lexsort((index, jnp.where(pool, total, jnp.inf), jnp.where(pool, score, jnp.inf)))


def _average_of(selected: jax.Array, updates: Any) -> Any:
    coeffs = selected.astype(jnp.float32)
    return combine(coeffs / jnp.maximum(jnp.sum(coeffs), 1.0), updates)


def multi_krum(f: int, m: int = 0, num_clients: int | None = None) -> Aggregator:
    """Multi-Krum (Blanchard et al. 2017): the mean of the ``m`` clients with the lowest Krum score.

    ``score(i) = sum_{j in N_i} |u_i - u_j|^2`` over the ``n - f - 2`` nearest
    other clients ``N_i`` (ties: see `_krum_order`); ``m = 0`` means ``n - f``.
    Needs ``n > 2f + 2`` and ``m <= n - f`` (checked on ``num_clients`` when
    given). Unweighted. Diagnostic ``selected``: ``[C]`` bool.
    """
    krum_bound = bound_check("multi_krum", f)

    def check(n: int) -> None:
        krum_bound(n)
        if m > n - f:
            raise ValueError(
                f"multi_krum(f={f}, m={m}) averages at most n - f = {n - f} of n={n} clients; "
                f"use 1 <= m <= {n - f}, or m=0 for n - f."
            )

    def rule(updates, weights, valid, state, key):
        del weights, key
        n = jnp.sum(valid)
        rank = jnp.argsort(_krum_order(_neighbours(updates, valid), valid, f))
        count = jnp.clip(m if m > 0 else n - f, 1, n)
        selected = valid & (rank < count)
        return _average_of(selected, updates), state, {"selected": selected}

    return _check_now(robust(rule, check=check), num_clients)


def krum(f: int, num_clients: int | None = None) -> Aggregator:
    """Krum (Blanchard et al. 2017): the update of the client with the lowest Krum score.

    ``update = u_{i*}``, ``i* = argmin_i sum_{j in N_i} |u_i - u_j|^2`` over the
    ``n - f - 2`` nearest others (ties: see `_krum_order`). Needs ``n > 2f + 2``
    (checked on ``num_clients`` when given). Diagnostics: ``selected``
    (``[C]`` bool) and ``selected_client`` (index of ``i*``).
    """
    inner = multi_krum(f, m=1)

    def aggregate(updates, weights, mask, state, key):
        update, state, diag = inner.aggregate(updates, weights, mask, state, key)
        return update, state, {**diag, "selected_client": jnp.argmax(diag["selected"]).astype(jnp.int32)}

    return _check_now(make_aggregator(no_state, aggregate, bound_check("krum", f)), num_clients)


def geometric_median(nu: Any = 1e-5, iters: int = 4) -> Aggregator:
    """Approximate geometric median by the smoothed Weiszfeld algorithm (RFA, Pillutla et al. 2022).

    ``z_{t+1} = sum_i b_i u_i / sum_i b_i``, ``b_i = a_i / max(nu, |z_t - u_i|)``
    for ``iters`` steps, with ``a_i`` the clients' sample-count weights, as in
    RFA. Started at ``z_0 = 0`` (as ByzFL does) rather than at the weighted
    mean of RFA's reference code: from the mean, far outliers (say 1e12) pull
    the iterate out of the honest cluster and each step only shrinks that pull
    by the factor ``f / (n - f)``, whereas from 0 every iterate stays within a
    few honest norms. Diagnostic ``gm_objective = sum_i a_i |z - u_i| / sum_i a_i``.
    """

    def rule(updates, weights, valid, state, key):
        del key
        alpha = jnp.where(valid, weights, 0.0)
        alpha = alpha / jnp.maximum(jnp.sum(alpha), _TINY)

        def step(_, z):
            beta = alpha / jnp.maximum(nu, jnp.sqrt(client_sqdistances(updates, z)))
            return combine(beta / jnp.maximum(jnp.sum(beta), _TINY), updates)

        zero = jax.tree.map(lambda u: jnp.zeros(u.shape[1:], u.dtype), updates)
        z = jax.lax.fori_loop(0, iters, step, zero)
        objective = jnp.sum(alpha * jnp.sqrt(client_sqdistances(updates, z)))
        return z, state, {"gm_objective": objective}

    return robust(rule)


def centered_clipping(tau: Any = 1.0, iters: int = 1) -> Aggregator:
    """Centered clipping (Karimireddy, He and Jaggi 2021), centred at the previous aggregate.

    ``v_{l+1} = v_l + (1/n) sum_i (u_i - v_l) min(1, tau / |u_i - v_l|)`` for
    ``iters`` steps from ``v_0`` = the previous round's output (zeros at
    init), which the state keeps. Unweighted. Diagnostic ``clipped``: clients
    clipped in the last step.
    """

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def rule(updates, weights, valid, state, key):
        del weights, key
        n = jnp.maximum(jnp.sum(valid), 1)

        def step(_, carry):
            v, _ = carry
            dist = jnp.sqrt(client_sqdistances(updates, v))
            scale = jnp.where(valid, jnp.minimum(1.0, tau / jnp.maximum(dist, _TINY)), 0.0)
            c = scale / n
            moved = combine(c, updates)
            v = jax.tree.map(lambda vi, mi: vi + mi - jnp.sum(c) * vi, v, moved)
            return v, jnp.sum(valid & (scale < 1))

        v, clipped = jax.lax.fori_loop(0, iters, step, (state, jnp.zeros((), jnp.int32)))
        return v, v, {"clipped": clipped}

    return robust(rule, init)


def bulyan(f: int, sort: str = "auto", num_clients: int | None = None) -> Aggregator:
    """Bulyan (El Mhamdi, Guerraoui and Rouault 2018) over Krum.

    1. Select ``theta = n - 2f`` clients by running Krum ``theta`` times, each
       time on the clients not yet selected (scores over the
       ``max(|R| - f - 2, 1)`` nearest others in the remaining pool ``R``;
       the paper's count reaches 0 on the last pick when ``f = 1``, which
       would make that pick depend on the client order). Krum ties as in
       `_krum_order`.
    2. Per coordinate, average the ``beta = theta - 2f`` selected values
       closest to the selected clients' coordinate median; of equally close
       values, the lower ones.

    Needs ``n >= 4f + 3`` (checked on ``num_clients`` when given). Unweighted. Diagnostic ``selected``: ``[C]`` bool,
    the Krum-selected set. ``sort``: see `sort_clients`.
    """

    def rule(updates, weights, valid, state, key):
        del weights, key
        c = valid.shape[0]
        n = jnp.sum(valid)
        nb = _neighbours(updates, valid)
        theta = jnp.clip(n - 2 * f, jnp.minimum(n, 1), n)

        def select(i, carry):
            remaining, selected = carry
            pick = (jnp.arange(c) == _krum_order(nb, remaining, f)[0]) & remaining & (i < theta)
            return remaining & ~pick, selected | pick

        _, selected = jax.lax.fori_loop(0, max(c - 2 * f, 1), select, (valid, jnp.zeros(c, bool)))
        num_selected = jnp.sum(selected)
        beta = jnp.clip(num_selected - 2 * f, 1, jnp.maximum(num_selected, 1))
        # The beta values closest to the median are a window [i, i + beta) of the sorted selected
        # values, i <= num_selected - beta <= 2f: the window of least summed distance to the median
        # (lowest i, so lower values, on ties).
        start = jnp.arange(2 * f + 1)
        rank = jnp.arange(c)
        windows = ((rank[None, :] >= start[:, None]) & (rank[None, :] < start[:, None] + beta)).astype(jnp.float32)
        possible = start <= num_selected - beta

        def leaf(u):
            s = masked_sort(u, selected, sort)
            med = sorted_median(s, num_selected)
            cost = jnp.tensordot(windows, jnp.abs(s - med[None]), axes=1, precision=_HIGHEST)
            best = jnp.argmin(jnp.where(broadcast_clients(possible, cost), cost, jnp.inf), axis=0)
            sums = jnp.tensordot(windows, s, axes=1, precision=_HIGHEST)
            out = jnp.take_along_axis(sums, best[None], axis=0)[0] / beta
            return jnp.where(num_selected > 0, out, 0.0)

        return jax.tree.map(leaf, updates), state, {"selected": selected}

    return _check_now(robust(rule, check=bound_check("bulyan", f)), num_clients)


# --------------------------------------------------------------------------
# Pre-aggregators and their composition.


class PreAggregator(NamedTuple):
    """A step run before an aggregation rule (see `chain`).

    ``apply(updates, weights, valid, key) -> (updates, weights, valid, diag)``
    gets finite updates whose invalid rows are zero and returns the same kind
    (its client axis may change size, as bucketing's does); invalid rows must
    have no influence. ``name`` prefixes its diagnostics: ``'<name>/<key>'``.
    ``check(n) -> outputs``: raise a ValueError when the step cannot run on
    ``n`` inputs, else the size of its output client axis.
    """

    name: str
    apply: Callable[..., tuple[Any, jax.Array, jax.Array, Metrics]]
    check: Callable[[int], int] = lambda n: n


def norm_clip(tau: Any = 0.0) -> PreAggregator:
    """Clip each client's update to norm ``tau``: ``u_i <- u_i min(1, tau / |u_i|)``.

    ``tau <= 0`` clips at the median norm of the taking-part clients (adaptive).
    Diagnostics ``clipped`` (clients whose norm exceeded the threshold) and
    ``tau`` (the threshold used).
    """

    def apply(updates, weights, valid, key):
        del key
        norms = jnp.sqrt(client_sqnorms(updates))
        threshold = jnp.where(tau > 0, tau, masked_median(norms, valid))
        scale = jnp.minimum(1.0, threshold / jnp.maximum(norms, _TINY))
        clipped = jax.tree.map(lambda u: u * broadcast_clients(scale, u).astype(u.dtype), updates)
        return clipped, weights, valid, {"clipped": jnp.sum(valid & (norms > threshold)), "tau": threshold}

    return PreAggregator("norm_clip", apply)


def nearest_neighbor_mixing(f: int) -> PreAggregator:
    """NNM (Allouah et al. 2023): ``u_i <- (1 / (n - f)) sum_{j in N_i} u_j``.

    ``N_i`` is the ``n - f`` taking-part clients nearest to ``u_i`` in L2,
    ``u_i`` itself included; ties go to the lower client index. Needs ``2f < n``.
    """
    nnm_bound = bound_check("nnm", f)

    def check(n: int) -> int:
        nnm_bound(n)
        return n

    def apply(updates, weights, valid, key):
        del key
        n = jnp.sum(valid)
        d = jnp.where(valid[None, :], pairwise_sqdistances(updates), jnp.inf)
        rank = jnp.argsort(jnp.argsort(d, axis=1, stable=True), axis=1)
        k = jnp.maximum(n - f, 1)
        near = (rank < k) & valid[None, :] & valid[:, None]
        return combine(near.astype(jnp.float32) / k, updates), weights, valid, {}

    return PreAggregator("nnm", apply, check)


def bucketing(s: int) -> PreAggregator:
    """Bucketing (Karimireddy, He and Jaggi 2022): average random groups of ``s`` clients.

    The taking-part clients are shuffled with ``key`` (permutation ``pi``) and
    ``b_j = mean(u_{pi(js)}, ..., u_{pi(js + s - 1)})``; the last bucket may be
    smaller. Output: ``ceil(C / s)`` buckets, the first ``ceil(n / s)`` valid,
    each weighing the sum of its members' weights. Randomised: needs a key.
    """

    def check(n: int) -> int:
        if s > n:
            raise ValueError(f"bucketing(s={s}) needs at most n clients per bucket but got n={n}; use s <= {n}.")
        return -(-n // s)

    def apply(updates, weights, valid, key):
        require_key(key, "bucketing")
        c = valid.shape[0]
        perm = jax.random.permutation(key, c)
        order = perm[jnp.argsort(~valid[perm], stable=True)]  # taking-part clients first, shuffled
        rank = jnp.zeros(c, jnp.int32).at[order].set(jnp.arange(c, dtype=jnp.int32))
        member = (rank[None, :] // s == jnp.arange(-(-c // s))[:, None]) & valid[None, :]
        size = jnp.sum(member, axis=1)
        coeffs = member.astype(jnp.float32) / jnp.maximum(size, 1)[:, None]
        return combine(coeffs, updates), member.astype(jnp.float32) @ weights, size > 0, {}

    return PreAggregator("bucketing", apply, check)


def chain(*stages: PreAggregator | Aggregator) -> Aggregator:
    """Compose pre-aggregators with a final aggregator, optax-``chain`` style.

    ``chain(norm_clip(), nearest_neighbor_mixing(2), krum(2))`` drops
    non-finite clients, clips, mixes, then runs Krum; ``key`` is split among
    the stages. Pre-aggregators need finite inputs, so the chain drops
    non-finite clients for any final rule (``chain(norm_clip(), mean())`` is a
    mean over finite clients). Diagnostics: the final rule's, each
    pre-aggregator's as ``'<name>/<key>'``, and ``nonfinite_clients`` and
    ``norm_*`` of the raw client updates. State: the final rule's. Its
    precondition: each stage's on the inputs it gets (bucketing's output for
    the stages after it).
    """
    *pre, final = stages
    if not isinstance(final, Aggregator) or not all(isinstance(p, PreAggregator) for p in pre):
        raise TypeError("chain(*pre_aggregators, aggregator): PreAggregators first, one Aggregator last.")

    def check(n: int) -> None:
        for stage in pre:
            n = stage.check(n)
        final.check(n)

    def aggregate(updates, weights, mask, state, key):
        keys = [None] * (len(pre) + 1) if key is None else jax.random.split(key, len(pre) + 1)
        finite = client_finite(updates)
        valid = mask & finite
        x, w = zero_masked(updates, valid), weights.astype(jnp.float32)
        raw = {"nonfinite_clients": jnp.sum(mask & ~finite), **norm_stats(x, valid)}
        diag = {}
        for stage, k in zip(pre, keys[:-1]):
            x, w, valid, d = stage.apply(x, w, valid, k)
            diag.update({f"{stage.name}/{name}": v for name, v in d.items()})
        update, state, d = final.aggregate(x, w, valid, state, keys[-1])
        return update, state, {**d, **diag, **raw}

    return make_aggregator(final.init, aggregate, check)


def switch(choices: Sequence[Aggregator], index: Any) -> Aggregator:
    """One of ``choices``, picked at run time by the traced integer ``index`` (`jax.lax.switch`).

    Every choice is compiled into the program; with an ``index`` that is not
    batched (one value for a whole vmapped sweep chunk) only the chosen one
    runs. State: a tuple holding every choice's state (only the chosen one's
    changes). Diagnostics: the union over the choices, as float32, NaN where
    the chosen rule does not report a key.
    """
    choices = tuple(choices)

    def init(params):
        return tuple(choice.init(params) for choice in choices)

    def check(n: int) -> None:
        for choice in choices:
            choice.check(n)

    def aggregate(updates, weights, mask, state, key):
        def chosen(i):
            def run(updates, weights, mask, state, key):
                update, own, diag = choices[i].aggregate(updates, weights, mask, state[i], key)
                return update, (*state[:i], own, *state[i + 1 :]), diag

            return run

        operands = (updates, weights, mask, state, key)
        union = {}
        for i in range(len(choices)):
            union.update(jax.eval_shape(chosen(i), *operands)[2])

        def branch(i):
            def run(*operands):
                update, new_state, diag = chosen(i)(*operands)
                filled = {
                    k: diag[k].astype(jnp.float32) if k in diag else jnp.full(v.shape, jnp.nan)
                    for k, v in union.items()
                }
                return update, new_state, filled

            return run

        return jax.lax.switch(index, [branch(i) for i in range(len(choices))], *operands)

    return make_aggregator(init, aggregate, check)


# --------------------------------------------------------------------------
# Config section.


class AggregatorHParams(NamedTuple):
    """The ``aggregator`` section's numeric settings (traced: sweeping them never recompiles)."""

    nu: Any  # geometric_median: Weiszfeld smoothing
    tau: Any  # centered_clipping: clipping radius
    clip_tau: Any  # norm_clip: threshold; 0 = median client norm


_RULES: dict[str, Callable[[Any, AggregatorHParams], Aggregator]] = {
    "weighted_mean": lambda cfg, hp: weighted_mean(),
    "mean": lambda cfg, hp: mean(),
    "coordinate_median": lambda cfg, hp: coordinate_median(cfg.sort),
    "trimmed_mean": lambda cfg, hp: trimmed_mean(cfg.f, cfg.sort),
    "krum": lambda cfg, hp: krum(cfg.f),
    "multi_krum": lambda cfg, hp: multi_krum(cfg.f, cfg.m),
    "geometric_median": lambda cfg, hp: geometric_median(hp.nu, cfg.gm_iters),
    "centered_clipping": lambda cfg, hp: centered_clipping(hp.tau, cfg.cc_iters),
    "bulyan": lambda cfg, hp: bulyan(cfg.f, cfg.sort),
}
_PRE: dict[str, Callable[[Any, AggregatorHParams], PreAggregator]] = {
    "norm_clip": lambda cfg, hp: norm_clip(hp.clip_tau),
    "nnm": lambda cfg, hp: nearest_neighbor_mixing(cfg.f),
    "bucketing": lambda cfg, hp: bucketing(cfg.bucket_size),
}
AGGREGATOR_NAMES = tuple(_RULES)
PRE_AGGREGATOR_NAMES = tuple(_PRE)


def default_config() -> ml_collections.ConfigDict:
    """The ``aggregator`` section of a run config."""
    return ml_collections.ConfigDict(
        {
            "name": "weighted_mean",  # one of AGGREGATOR_NAMES
            "pre": (),  # pre-aggregators run in order before the rule, e.g. ('norm_clip', 'nnm')
            "f": 1,  # Byzantine clients tolerated: trimmed_mean, krum, multi_krum, bulyan, nnm
            "m": 0,  # multi_krum: clients averaged; 0 = n - f
            "nu": 1e-5,  # geometric_median: Weiszfeld smoothing (numeric knob)
            "gm_iters": 4,  # geometric_median: Weiszfeld steps
            "tau": 1.0,  # centered_clipping: clipping radius (numeric knob)
            "cc_iters": 1,  # centered_clipping: clipping steps
            "clip_tau": 0.0,  # norm_clip: threshold; 0 = median client norm (numeric knob)
            "bucket_size": 2,  # bucketing: clients per bucket
            "sort": "auto",  # coordinate-wise rules: 'xla', 'bitonic' or 'auto' (bitonic on CPU)
        }
    )


def _int_at_least(cfg: Any, field: str, low: int) -> None:
    value = cfg[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"aggregator.{field}={value!r} must be an integer >= {low}.")


def _finite_at_least(cfg: Any, field: str, low: float, strict: bool, hint: str) -> None:
    value = cfg[field]
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        raise ValueError(
            f"aggregator.{field}={value!r} must be a finite number {'>' if strict else '>='} {low}; {hint}"
        )


def validate_config(cfg: Any, context: Any) -> None:
    """Raise a ValueError naming ``aggregator.<field>`` and the fix.

    Checks the rule's precondition on ``n``, the clients per round
    (``context.cohort_size``), or the number of buckets ``ceil(n / s)`` when
    bucketing comes first: trimmed mean ``2f < n``, Krum and Multi-Krum
    ``n > 2f + 2``, Bulyan ``n >= 4f + 3``, NNM ``2f < n``.
    """
    if cfg.name not in _RULES:
        raise ValueError(f"aggregator.name={cfg.name!r} is unknown; choose one of {AGGREGATOR_NAMES}.")
    pre = tuple(cfg.pre)
    unknown = [p for p in pre if p not in _PRE]
    if unknown:
        raise ValueError(f"aggregator.pre has unknown steps {unknown}; choose from {PRE_AGGREGATOR_NAMES}.")
    if cfg.sort not in SORTS:
        raise ValueError(f"aggregator.sort={cfg.sort!r} is unknown; choose one of {SORTS}.")
    if len(set(pre)) != len(pre):
        raise ValueError(f"aggregator.pre={pre!r} repeats a step; list each pre-aggregator at most once.")
    for field, low in (("f", 0), ("m", 0), ("gm_iters", 1), ("cc_iters", 1), ("bucket_size", 1)):
        _int_at_least(cfg, field, low)
    _finite_at_least(cfg, "nu", 0.0, True, "try 1e-5 (RFA's default).")
    _finite_at_least(cfg, "tau", 0.0, True, "use about the norm of a typical honest update.")
    _finite_at_least(cfg, "clip_tau", 0.0, False, "use 0 to clip at the median client norm.")

    n = context.cohort_size or context.num_clients
    f = cfg.f
    least, largest, bound = _BOUNDS["nnm"]
    if "nnm" in pre and n < least(f):
        raise ValueError(
            f"aggregator.f={f} is too large for pre-aggregator 'nnm' with n={n} clients per round: NNM "
            f"needs {bound}; use f <= {largest(n)} or at least {least(f)} clients per round."
        )
    inputs, where = n, f"n={n} clients per round"
    if "bucketing" in pre:
        s = cfg.bucket_size
        if s > n:
            raise ValueError(f"aggregator.bucket_size={s} exceeds the {n} clients per round; use <= {n}.")
        inputs, where = -(-n // s), f"n={-(-n // s)} buckets ({n} clients per round in buckets of {s})"
    fix = _shortfall(cfg.name, f, inputs) if cfg.name in _BOUNDS else None
    if fix is not None:
        least, _, bound = _BOUNDS[cfg.name]
        raise ValueError(
            f"aggregator.f={f} is too large for {cfg.name} with {where}: {cfg.name} needs {bound}; "
            f"{fix} at least {least(f)} inputs per round."
        )
    if cfg.name == "multi_krum" and cfg.m > inputs - f:
        raise ValueError(
            f"aggregator.m={cfg.m} is too large for multi_krum with {where} and f={f}: it averages at most "
            f"n - f = {inputs - f} clients; use 1 <= m <= {inputs - f}, or 0 for n - f."
        )


def build_aggregator(cfg: Any, hparams: AggregatorHParams | None = None) -> Aggregator:
    """The aggregator named by ``cfg.name``, after ``cfg.pre`` (the config's ``aggregator`` section).

    Structural settings come from ``cfg`` (static), numeric ones from
    ``hparams`` (traced inside the engine; the config's values when None).
    """
    if cfg.name not in _RULES:
        raise ValueError(f"aggregator.name={cfg.name!r} is unknown; choose one of {AGGREGATOR_NAMES}.")
    hp = hparams_of(AggregatorHParams, cfg) if hparams is None else hparams
    final = _RULES[cfg.name](cfg, hp)
    if not cfg.pre:
        return final
    return chain(*(_PRE[name](cfg, hp) for name in cfg.pre), final)

"""Privacy accounting on the host: epsilon of sampled Gaussian compositions (``dp_accounting``), banded MF.

``dp_accounting``, scipy and jax-privacy are imported inside the functions
that need them (they load in about a second), so ``import medfed_jax`` stays
light. Every function here is host-only (`host_only`).
"""

from __future__ import annotations

import fractions
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from medfed_jax.privacy.mechanisms import strategy_coefs

if TYPE_CHECKING:
    import dp_accounting

ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("poisson", "fixed")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# --------------------------------------------------------------------------- accounting (host)


def host_only(library: str) -> Callable[[Callable], Callable]:
    """Refuse traced arguments with a TypeError saying the function runs on the host with ``library``."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def guarded(*args, **kwargs):
            if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs))):
                raise TypeError(
                    f"privacy.{function.__name__} is host-only (it runs {library}): call it outside jit, "
                    "with Python numbers."
                )
            return function(*args, **kwargs)

        return guarded

    return decorate


# Below this noise multiplier a PLD would need billions of grid points; RDP
# (a valid, looser bound) is used instead. Epsilon is in the hundreds there.
PLD_MIN_NOISE = 0.05


def _check_accounting_args(sampling_rate: float, steps: int, delta: float, accountant: str, sampling: str) -> None:
    _check(0 < sampling_rate <= 1, f"sampling_rate={sampling_rate!r} must lie in (0, 1].")
    _check(isinstance(steps, int) and steps >= 0, f"steps={steps!r} must be an integer >= 0.")
    _check(0 < delta < 1, f"delta={delta!r} must lie in (0, 1).")
    _check(accountant in ACCOUNTANTS, f"accountant={accountant!r} is unknown; choose one of {ACCOUNTANTS}.")
    _check(sampling in SAMPLINGS, f"sampling={sampling!r} is unknown; choose one of {SAMPLINGS}.")


def _uses_replace_one(sampling_rate: float, sampling: str) -> bool:
    return sampling == "fixed" and sampling_rate < 1


def _event_noise(noise_multiplier: float, sampling: str) -> float:
    """Noise multiplier of the Gaussian event: replace-one moves a clipped sum by 2 x clip."""
    return noise_multiplier / 2 if sampling == "fixed" else noise_multiplier


def _make_accountant(accountant: str, sampling_rate: float, sampling: str) -> dp_accounting.PrivacyAccountant:
    import dp_accounting  # imported here, not at module level: it loads scipy (~1 s)
    from dp_accounting import pld, rdp

    if _uses_replace_one(sampling_rate, sampling):
        return rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    return pld.PLDAccountant() if accountant == "pld" else rdp.RdpAccountant()


def _make_event(
    noise_multiplier: float, sampling_rate: float, sampling: str, truncation: tuple[int, int] | None = None
) -> dp_accounting.DpEvent:
    """One step's event. ``noise_multiplier`` is noise std / clip norm of the clipped sum.

    ``truncation=(population, max_cohort)``: Poisson sampling cut to
    ``max_cohort`` at random, `dp_accounting.TruncatedSubsampledGaussianDpEvent`
    (PLD only; as ``jax_privacy.experimental.accounting.truncated_dpsgd_event``)
    on ``population + 1`` units: the larger neighbour under add-or-remove-one,
    where truncation is likelier and epsilon larger.
    """
    import dp_accounting

    if truncation is not None:
        population, max_cohort = truncation
        return dp_accounting.TruncatedSubsampledGaussianDpEvent(
            population + 1, sampling_rate, max_cohort, noise_multiplier
        )
    gaussian = dp_accounting.GaussianDpEvent(_event_noise(noise_multiplier, sampling))
    if _uses_replace_one(sampling_rate, sampling):
        rate = fractions.Fraction(sampling_rate).limit_denominator(10**6)
        return dp_accounting.SampledWithoutReplacementDpEvent(rate.denominator, rate.numerator, gaussian)
    # A Gaussian without sampling is composed as Poisson(1.0): the plain
    # self-composed Gaussian makes the PLD accountant build one huge PLD.
    return dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)


def describe_accounting(
    sampling_rate: float, accountant: str, sampling: str, truncation: tuple[int, int] | None = None
) -> str:
    """A sentence saying which accountant, neighbouring relation and sampling give epsilon."""
    if truncation is not None:
        population, max_cohort = truncation
        how = (
            "PLD accountant of the truncated subsampled Gaussian (dp_accounting's TruncatedSubsampledGaussianDpEvent)"
            if accountant == "pld"
            else "RDP accountant at delta/2 plus the truncation coupling bound (privacy.truncation_slack)"
        )
        return (
            f"Poisson sampling at rate {sampling_rate:g} of {population}, truncated to {max_cohort} at random, "
            f"add-or-remove-one: {how}"
        )
    if _uses_replace_one(sampling_rate, sampling):
        return (
            f"fixed-size sampling without replacement at rate {sampling_rate:g}: RDP accountant with the "
            "REPLACE_ONE relation (sensitivity 2x clip, so the Gaussian event has noise_multiplier/2)"
        )
    if sampling_rate == 1:
        relation = "replace-one (sensitivity 2x clip)" if sampling == "fixed" else "add-or-remove-one"
        how = "exact Gaussian composition" if accountant == "pld" else "RDP accountant"
        return f"no sampling (every unit in every step), {relation}: {how}"
    return f"Poisson sampling at rate {sampling_rate:g}, add-or-remove-one: {accountant.upper()} accountant"


@host_only("scipy")
def truncation_tail(population: int, sampling_rate: float, max_cohort: int) -> float:
    """``P(Binomial(population + 1, q) > max_cohort)``: a step truncates, on the larger of two neighbours."""
    from scipy import stats

    return float(stats.binom.sf(max_cohort, population + 1, sampling_rate))


@host_only("Python math")
def truncation_slack(eps: float, steps: int, tail: float) -> float:
    """The delta truncation adds to an untruncated ``(eps, delta)`` guarantee: ``(1 + e^eps) steps tail``.

    Proof (a coupling): the truncated run ``M'`` and the untruncated ``M`` on
    the same draws differ only if some step has more than ``max_cohort``
    clients, which has probability ``p <= steps * tail`` (union bound) on
    either neighbour. So ``P[M'(D) in S] <= P[M(D) in S] + p <= e^eps
    P[M(D') in S] + delta + p <= e^eps (P[M'(D') in S] + p) + delta + p``.
    """
    return (1.0 + math.exp(min(eps, 700.0))) * steps * tail


def _truncated_rdp_epsilon(
    noise_multiplier: float, sampling_rate: float, steps: int, delta: float, truncation: tuple[int, int]
) -> float:
    """RDP epsilon at ``delta / 2`` of the untruncated run, if its `truncation_slack` fits in the other half."""
    eps = epsilon(noise_multiplier, sampling_rate, steps, delta / 2, "rdp", "poisson")
    population, max_cohort = truncation
    slack = truncation_slack(eps, steps, truncation_tail(population, sampling_rate, max_cohort))
    if slack > delta / 2:
        fits = [
            m
            for m in range(max_cohort + 1, population)
            if truncation_slack(eps, steps, truncation_tail(population, sampling_rate, m)) <= delta / 2
        ]
        fix = f"max_cohort >= {fits[0]}" if fits else "max_cohort=0 (a slot per client: no truncation)"
        raise ValueError(
            f"max_cohort={max_cohort} is too small for the RDP truncation bound: (1 + e^eps) x {steps} steps x "
            f"P(more than {max_cohort} of {population} clients) = {slack:.2g} > delta/2 = {delta / 2:g}; "
            f"use {fix}, or privacy.accountant='pld' (exact for truncation)."
        )
    return eps


@host_only("dp_accounting")
@functools.lru_cache(maxsize=1024)
def epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
    sampling: str = "poisson",
    truncation: tuple[int, int] | None = None,
) -> float:
    """Epsilon of ``steps`` compositions of a sampled Gaussian on a clipped sum.

    ``noise_multiplier`` is noise std / clip norm. ``sampling='poisson'``:
    each unit joins a step with probability ``sampling_rate``,
    add-or-remove-one relation. ``sampling='fixed'``: a fixed-size sample
    without replacement, relation REPLACE_ONE (sensitivity ``2 * clip``, so
    the event has ``noise_multiplier / 2``); below rate 1 only the RDP
    accountant supports it and is used. At rate 1 with ``'pld'`` the
    composition is one Gaussian of multiplier ``z / sqrt(steps)``, whose
    epsilon is computed exactly (the value PLD approximates). With ``'pld'``
    and an event noise below `PLD_MIN_NOISE`, RDP is used. ``0`` noise gives
    ``inf``. ``truncation=(population, max_cohort)``: Poisson sampling of
    ``population`` units cut to ``max_cohort`` at random; PLD accounts it
    exactly (`_make_event`), RDP through `truncation_slack` (refused, naming
    the fix, when the slack exceeds ``delta / 2``). Results are cached.
    """
    _check_accounting_args(sampling_rate, steps, delta, accountant, sampling)
    _check(noise_multiplier >= 0, f"noise_multiplier={noise_multiplier!r} must be >= 0.")
    _check(truncation is None or sampling == "poisson", "truncation applies to Poisson sampling only.")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    z = _event_noise(noise_multiplier, sampling)
    if truncation is not None:
        if accountant == "rdp" or z < PLD_MIN_NOISE:
            return _truncated_rdp_epsilon(noise_multiplier, sampling_rate, steps, delta, truncation)
        acc = _make_accountant("pld", sampling_rate, sampling)
        acc.compose(_make_event(noise_multiplier, sampling_rate, sampling, truncation), steps)
        return float(acc.get_epsilon(delta))
    if accountant == "pld" and sampling_rate == 1:
        import dp_accounting

        return float(dp_accounting.get_epsilon_gaussian(z / math.sqrt(steps), delta))
    acc = _make_accountant(accountant if z >= PLD_MIN_NOISE else "rdp", sampling_rate, sampling)
    acc.compose(_make_event(noise_multiplier, sampling_rate, sampling), steps)
    return float(acc.get_epsilon(delta))


@host_only("dp_accounting and scipy")
def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    accountant: str = "pld",
    sampling: str = "poisson",
    tol: float = 1e-3,
) -> float:
    """The noise multiplier, within ``tol`` above the smallest one, whose `epsilon` is <= ``target_epsilon``.

    Brent's method on `epsilon` (decreasing in the noise) inside a bracket
    found by doubling/halving, so the answer obeys the same accounting rules;
    a handful of `epsilon` evaluations.
    """
    from scipy.optimize import brentq

    _check_accounting_args(sampling_rate, steps, delta, accountant, sampling)
    _check(target_epsilon > 0, f"target_epsilon={target_epsilon!r} must be > 0.")
    _check(steps > 0, "steps must be >= 1 to calibrate noise.")
    _check(tol > 0, f"tol={tol!r} must be > 0.")

    def gap(sigma: float) -> float:
        return epsilon(sigma, sampling_rate, steps, delta, accountant, sampling) - target_epsilon

    low, high = 0.5, 1.0
    while gap(high) > 0:
        low, high = high, 2 * high
    while gap(low) <= 0:
        low, high = low / 2, low
    sigma = brentq(gap, low, high, xtol=tol)
    while gap(sigma) > 0:  # brentq's root is within tol on either side
        sigma += tol
    return sigma


@host_only("jax-privacy, then float()")
def bandmf_sensitivity_squared(bands: int, rounds: int) -> float:
    """``sens(C)^2`` of the ``rounds x rounds`` banded strategy when a client takes part in every round.

    jax-privacy's ``toeplitz.minsep_sensitivity_squared`` with min-sep 1 and
    ``rounds`` participations: ``||C 1||^2`` (the worst case for non-negative
    ``C``, all contributions aligned). ``bands = 1`` gives ``rounds``.
    """
    from jax_privacy.matrix_factorization import toeplitz

    coefs = jnp.asarray(strategy_coefs(bands), jnp.float32)
    return float(toeplitz.minsep_sensitivity_squared(coefs, min_sep=1, max_participations=rounds, n=rounds))


@host_only("dp_accounting")
@functools.lru_cache(maxsize=1024)
def bandmf_epsilon(noise_multiplier: float, bands: int, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` banded-MF releases (every client every round): one Gaussian of ``sigma / sens(C)``."""
    _check(0 < delta < 1, f"delta={delta!r} must lie in (0, 1).")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    import dp_accounting

    z = noise_multiplier / math.sqrt(bandmf_sensitivity_squared(bands, rounds))
    return float(dp_accounting.get_epsilon_gaussian(z, delta))


@host_only("jax-privacy, then float()")
def bandmf_noise_for(noise_multiplier: float, bands: int, rounds: int) -> float:
    """The ``bandmf`` noise multiplier with DP-FedAvg's epsilon at ``noise_multiplier`` (every client, every round).

    Both are one Gaussian of ``sigma / sens``: ``sqrt(rounds)`` for DP-FedAvg, ``sens(C)`` for banded MF.
    """
    return noise_multiplier * math.sqrt(bandmf_sensitivity_squared(bands, rounds) / rounds)

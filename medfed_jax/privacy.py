"""Differential privacy: clipping + Gaussian mechanisms (jitted) and accounting (host).

Mechanisms (all noise from explicit keys; nothing else is random):

- ``mode='central'``: client-level DP-FedAvg (McMahan et al. 2018). Each
  client's whole update is clipped to L2 norm ``S``, the clipped updates of
  the taking-part clients are summed, ``N(0, (sigma S)^2)`` noise is added per
  coordinate and the sum is divided by the *expected* cohort size (a fixed
  denominator, so the sensitivity of the mean is ``S / m``). Optional adaptive
  clipping (Andrew et al. 2021) moves ``S`` toward a target quantile of the
  client update norms. Unit of privacy: one client's entire data set.
- ``mode='bandmf'``: client-level DP-FTRL with banded matrix factorisation
  (Choquette-Choo et al. 2023, "(Amplified) Banded Matrix Factorization";
  Kairouz et al. 2021 for DP-FTRL). As DP-FedAvg, but round ``t``'s noise is
  ``sigma S (C^-1 z)_t`` for iid ``z_t ~ N(0, I)`` and the lower-triangular
  ``b``-banded Toeplitz strategy ``C`` of the square-root factorisation of
  the prefix sum (Fichtenberger et al. 2023), so the noise of the released
  model (a prefix sum of updates) is ``B z`` with ``A = B C``. ``C^-1`` is
  ``jax_privacy.matrix_factorization.toeplitz.inverse_as_streaming_matrix``
  (Algorithm 9 of the paper: a buffer of ``b - 1`` past noise vectors in the
  aggregator state). ``b = 1`` is DP-FedAvg. Accounting: every client in
  every round (min-sep 1, ``T`` participations), the ``T`` releases together
  are one Gaussian mechanism of sensitivity ``S sens(C)``,
  ``sens(C)^2 = ||C 1||^2`` for non-negative ``C`` (jax-privacy's
  ``toeplitz.minsep_sensitivity_squared``), so epsilon is that of one Gaussian
  of multiplier ``sigma / sens(C)`` (``sqrt(T)`` for ``C = I``).
- ``mode='local'``: each client clips its update to ``S`` and adds
  ``N(0, (sigma S)^2)`` before it leaves the client, so any aggregator (robust
  ones included) sees only privatised updates. It costs far more utility
  than central DP at the same epsilon: each of ``m`` clients adds the full
  noise, so the mean carries ``sqrt(m)`` times more noise at the same sigma,
  and the server sees every release, so there is no amplification by cohort
  sampling (and the relation is replace-one, sensitivity ``2 S``).
- ``mode='dpsgd'``: example-level DP-SGD in local training (Abadi et al.
  2016): per-example gradients by vmap, clipped to ``C``, summed, plus
  ``N(0, (sigma C)^2)``, divided by the expected batch size. Unit of privacy:
  one patient record.

Non-finite client updates (or per-example gradients) are replaced by zeros
before clipping, so any input maps to a vector of norm <= S and the
sensitivity bound, hence the guarantee, holds; ``nonfinite_clients`` reports
them.

Accounting uses Google's ``dp_accounting`` (PLD by default, RDP selectable).
Neighbouring relations: Poisson sampling (and no sampling) use
add-or-remove-one with sensitivity ``S``; fixed-size sampling without
replacement uses replace-one, where a clipped sum has sensitivity ``2 S``, so
the Gaussian event carries ``sigma / 2``, and only the RDP accountant supports
it.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.flatten_util import ravel_pytree

from medfed_jax.aggregators import count_nonfinite, make_aggregator, require_key, zero_masked
from medfed_jax.types import Aggregator, PRNGKey, hparams_of

if TYPE_CHECKING:
    import dp_accounting

MODES = ("none", "central", "bandmf", "local", "dpsgd")
SERVER_NOISE = ("central", "bandmf")  # client-level DP noised on the server's sum: the DP-FedAvg estimator
ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("poisson", "fixed")


class PrivacyHParams(NamedTuple):
    """The ``privacy`` section's numeric settings (traced: sweeping them never recompiles)."""

    noise_multiplier: Any  # sigma: noise std / clip norm
    clip_norm: Any  # S (client level) or C (per example); the initial S when adaptive
    target_quantile: Any  # adaptive clipping: share of updates meant to fall under S
    clip_lr: Any  # geometric step of the adaptive clip norm
    clipped_count_stddev: Any  # noise std on the clipped count


def default_config() -> ml_collections.ConfigDict:
    """The ``privacy`` section of a run config."""
    return ml_collections.ConfigDict(
        {
            "mode": "none",  # 'none' | 'central' (DP-FedAvg) | 'local' | 'dpsgd' (example level)
            "noise_multiplier": 0.0,  # sigma: noise std / clip norm
            "clip_norm": float("inf"),  # S (client level) or C (per example); the initial S when adaptive
            "delta": 1e-5,  # the delta of (epsilon, delta)-DP; epsilon is reported at this delta
            "accountant": "pld",  # 'pld' or 'rdp'; fixed-size sampling always uses RDP (replace-one)
            "adaptive_clipping": False,  # central only: S tracks a quantile of update norms
            "target_quantile": 0.5,  # adaptive clipping: share of updates meant to fall under S
            "clip_lr": 0.2,  # geometric step of the adaptive clip norm
            "clipped_count_stddev": 1.0,  # noise std on the clipped count; Andrew et al. suggest cohort/20
            "bands": 1,  # mode='bandmf': bands b of the Toeplitz strategy C; 1 = DP-FedAvg's independent noise
        }
    )


# --------------------------------------------------------------------------- validation


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check_delta(delta: float, units: int, unit: str) -> None:
    """Refuse ``delta >= 1 / units``: such a delta allows publishing one unit's data outright."""
    _check(
        delta < 1.0 / units,
        f"privacy.delta={delta!r} must be < 1/{units} (the number of privacy units, {unit}s); "
        f"a delta that large permits releasing one {unit}'s data in the clear. Use e.g. delta={_suggest(units)}.",
    )


def _suggest(units: int) -> float:
    return float(f"{0.1 / units:.0e}")


def validate_config(cfg: Any, context: Any) -> None:
    """Raise a ValueError naming ``privacy.<field>`` and the fix for bad settings.

    ``context`` is a `medfed_jax.config.BuildContext`. For ``mode='dpsgd'`` the
    privacy unit is a record and the delta check needs the client sizes: it
    is in `validate_with_run` (and `accounting_for_run`).
    """
    _check(cfg.mode in MODES, f"privacy.mode={cfg.mode!r} is unknown; choose one of {MODES}.")
    _check(
        cfg.accountant in ACCOUNTANTS,
        f"privacy.accountant={cfg.accountant!r} is unknown; choose one of {ACCOUNTANTS}.",
    )
    sigma, clip = cfg.noise_multiplier, cfg.clip_norm
    _check(
        _is_number(sigma) and 0 <= sigma < math.inf,
        f"privacy.noise_multiplier={sigma!r} must be a finite number >= 0 (0 adds no noise; epsilon is then inf).",
    )
    _check(_is_number(clip) and clip > 0, f"privacy.clip_norm={clip!r} must be > 0.")
    _check(
        isinstance(cfg.bands, int) and cfg.bands >= 1,
        f"privacy.bands={cfg.bands!r} must be an integer >= 1 (1 = independent noise, as DP-FedAvg).",
    )
    if cfg.adaptive_clipping:
        _check(
            cfg.mode == "central",
            f"privacy.adaptive_clipping=True applies to mode='central' only (mode is {cfg.mode!r}); set it False.",
        )
        _check(
            _is_number(cfg.target_quantile) and 0 < cfg.target_quantile < 1,
            f"privacy.target_quantile={cfg.target_quantile!r} must lie in (0, 1); 0.5 clips at the median norm.",
        )
        _check(
            _is_number(cfg.clip_lr) and cfg.clip_lr > 0,
            f"privacy.clip_lr={cfg.clip_lr!r} must be > 0 (try 0.2).",
        )
        _check(
            _is_number(cfg.clipped_count_stddev) and cfg.clipped_count_stddev > sigma / 2,
            f"privacy.clipped_count_stddev={cfg.clipped_count_stddev!r} must exceed noise_multiplier/2 "
            f"= {sigma / 2:g} (Andrew et al. 2021 split the privacy budget between the update and the "
            "clipped count); try cohort_size/20 or more.",
        )
    if cfg.mode == "none":
        return
    _check(
        clip < math.inf,
        f"privacy.clip_norm=inf with privacy.mode={cfg.mode!r}: DP without clipping has unbounded "
        "sensitivity, so no epsilon holds. Set a finite clip_norm (e.g. 1.0).",
    )
    _check(_is_number(cfg.delta) and 0 < cfg.delta < 1, f"privacy.delta={cfg.delta!r} must lie in (0, 1).")
    if cfg.mode in ("central", "bandmf", "local"):
        check_delta(cfg.delta, context.num_clients, "client")


def validate_with_run(cfg: Any, client_sizes: Sequence[int] | None = None) -> None:
    """Checks across sections of a whole run config (``cfg.privacy`` with the others).

    - central DP needs ``aggregator.name='mean'``: DP-FedAvg replaces the
      aggregator with its own fixed-denominator mean, and the guarantee does
      not hold for any other rule (use ``mode='local'`` with robust rules);
    - DP-SGD needs per-step batch sampling (``local.sampling`` 'fixed' or
      'poisson'; shuffled epochs have no matching accountant), and, given
      ``client_sizes``, ``delta < 1 / (smallest client size)``.
    """
    p = cfg.privacy
    if p.mode in SERVER_NOISE:
        _check(
            cfg.aggregator.name == "mean",
            f"privacy.mode={p.mode!r} with aggregator.name={cfg.aggregator.name!r}: DP-FedAvg's guarantee "
            "holds only for its own unweighted, fixed-denominator mean. Set aggregator.name='mean', or use "
            "privacy.mode='local' to combine DP with a robust aggregator.",
        )
    if p.mode == "bandmf":
        _check(
            not cfg.cohort_size and cfg.cohort_sampling == "fixed",
            f"privacy.mode='bandmf' with cohort_size={cfg.cohort_size}, cohort_sampling={cfg.cohort_sampling!r}: "
            "its accounting assumes every client in every round; set cohort_size=0 and cohort_sampling='fixed'.",
        )
        _check(
            p.bands <= cfg.rounds,
            f"privacy.bands={p.bands} exceeds rounds={cfg.rounds}: a band beyond the last round is never "
            f"used; set privacy.bands <= {cfg.rounds}.",
        )
    if p.mode == "dpsgd":
        _check(
            cfg.local.sampling in SAMPLINGS,
            f"privacy.mode='dpsgd' with local.sampling={cfg.local.sampling!r}: the accountant needs a "
            "batch drawn per step. Set local.sampling='poisson' (or 'fixed') and local.steps > 0.",
        )
        if client_sizes is not None:
            check_delta(p.delta, min(client_sizes), "record")


# --------------------------------------------------------------------------- mechanisms (jitted)


def global_norm(tree: Any) -> jax.Array:
    """L2 norm of all leaves of a pytree together."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


def clip_update(update: Any, clip_norm: jax.Array) -> tuple[Any, jax.Array]:
    """Scale ``update`` to L2 norm <= ``clip_norm``; returns ``(clipped, norm)``.

    An update with norm <= ``clip_norm`` passes bit for bit. A non-finite
    update becomes zeros (norm reported as 0), so the output norm is always
    bounded.
    """
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(update)]))
    update = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), update)
    norm = global_norm(update)
    over = norm > clip_norm
    scale = jnp.where(over, clip_norm / jnp.where(over, norm, 1.0), 1.0)
    clipped = jax.tree.map(lambda u: jnp.where(over, u * scale.astype(u.dtype), u), update)
    return clipped, norm


def noise_std(noise_multiplier: jax.Array, clip_norm: jax.Array) -> jax.Array:
    """``sigma * S``, with 0 when ``sigma == 0`` (also for ``S = inf``)."""
    return jnp.where(noise_multiplier == 0, 0.0, noise_multiplier * clip_norm)


def add_gaussian_noise(tree: Any, key: PRNGKey, std: jax.Array) -> Any:
    """``tree + N(0, std^2)`` independently per coordinate.

    One normal draw over the flattened tree: each `jax.random.normal` call
    costs about a second of XLA compile time on a CPU, so one per leaf adds up.
    """
    flat, unravel = ravel_pytree(tree)
    return unravel(flat + (std * jax.random.normal(key, flat.shape)).astype(flat.dtype))


def _clip_rows(rows: Any, clip_norm: jax.Array, keep: jax.Array) -> tuple[Any, jax.Array]:
    """Clip each row of a ``[N, ...]`` pytree; rows with ``keep == False`` become zeros."""
    clipped, norms = jax.vmap(clip_update, in_axes=(0, None))(rows, clip_norm)
    return zero_masked(clipped, keep), norms


def local_privatizer(noise_multiplier: jax.Array, clip_norm: jax.Array) -> Callable[[Any, PRNGKey], Any]:
    """Local DP: ``(update, key) -> clip(update, S) + N(0, (sigma S)^2)`` for one client."""

    def privatize(update, key):
        clipped, _ = clip_update(update, clip_norm)
        return add_gaussian_noise(clipped, key, noise_std(noise_multiplier, clip_norm))

    return privatize


class AdaptiveClip(NamedTuple):
    """Adaptive clipping settings (Andrew et al. 2021), possibly traced."""

    target_quantile: jax.Array
    clip_lr: jax.Array
    count_stddev: jax.Array


def update_noise_multiplier(noise_multiplier: jax.Array, count_stddev: jax.Array) -> jax.Array:
    """Noise multiplier of the update under adaptive clipping (Andrew et al. 2021, Thm. 1).

    The update (sensitivity S) and the centred clipped count (sensitivity 1/2)
    together form one Gaussian mechanism with multiplier ``z`` when
    ``z_update = (z^-2 - (2 count_stddev)^-2)^(-1/2)``; needs ``z < 2 count_stddev``.
    """
    ratio = noise_multiplier / (2.0 * count_stddev)
    return noise_multiplier / jnp.sqrt(1.0 - jnp.square(ratio))


def strategy_coefs(bands: int) -> np.ndarray:
    """Toeplitz coefficients of the ``bands``-banded strategy ``C``: the first ``bands`` of ``A^(1/2)``.

    ``c_k = binom(2k, k) / 4^k`` (Fichtenberger et al. 2023), via
    ``jax_privacy.matrix_factorization.toeplitz.optimal_max_error_strategy_coefs``;
    positive and non-increasing, ``c_0 = 1``.
    """
    from jax_privacy.matrix_factorization import toeplitz

    with jax.ensure_compile_time_eval():  # constants, also when called while tracing
        return np.asarray(toeplitz.optimal_max_error_strategy_coefs(bands), np.float64)


def correlated_noise(bands: int) -> Any:
    """``C^-1`` as jax-privacy's `StreamingMatrix` (``init_multiply(like)``, ``multiply_next(z, state)``)."""
    from jax_privacy.matrix_factorization import toeplitz

    with jax.ensure_compile_time_eval():
        return toeplitz.inverse_as_streaming_matrix(jnp.asarray(strategy_coefs(bands), jnp.float32))


def dp_fedavg(
    noise_multiplier: jax.Array,
    clip_norm: jax.Array,
    expected_cohort: float,
    adaptive: AdaptiveClip | None = None,
    bands: int = 1,
) -> Aggregator:
    """Client-level central DP mean (DP-FedAvg) as an `Aggregator`.

    ``update = (sum_i m_i clip(u_i, S) + N(0, (z S)^2)) / expected_cohort``;
    ``weights`` are ignored (weighting by data size would raise the
    sensitivity). ``bands > 1``: the noise is correlated across rounds,
    ``z S (C^-1 w)_t`` for iid ``w_t ~ N(0, I)`` (`correlated_noise`;
    ``mode='bandmf'``), with a buffer of ``bands - 1`` past draws in the
    aggregator state. With ``adaptive``, ``S`` lives in the aggregator state
    and moves geometrically toward the target quantile of the update norms,
    estimated from the noised count of unclipped clients; the overall noise
    multiplier stays ``noise_multiplier``. Randomised: ``aggregate`` needs a
    key (its other arguments default, see `medfed_jax.aggregators.make_aggregator`). Diagnostics: ``clip_norm`` (used
    this round), ``clipped_fraction`` (of taking-part clients; a non-private
    diagnostic), ``nonfinite_clients`` (their updates count as zeros).
    """
    m = float(expected_cohort)
    z_update = (
        noise_multiplier if adaptive is None else update_noise_multiplier(noise_multiplier, adaptive.count_stddev)
    )
    noising = correlated_noise(bands) if bands > 1 else None

    def init(params):
        state = {}
        if adaptive is not None:
            state["clip_norm"] = jnp.asarray(clip_norm, jnp.float32)
        if noising is not None:
            flat, _ = ravel_pytree(params)
            state["noise"] = noising.init_multiply(jax.ShapeDtypeStruct(flat.shape, jnp.float32))
        return state or ()

    def aggregate(updates, weights, mask, state, key):
        del weights
        require_key(key, "dp_fedavg")
        clip = clip_norm if adaptive is None else state["clip_norm"]
        clipped, norms = _clip_rows(updates, clip, mask)
        key_update, key_count = jax.random.split(key)
        total = jax.tree.map(lambda u: jnp.sum(u, axis=0), clipped)
        std = noise_std(z_update, clip)
        if noising is None:
            noisy = add_gaussian_noise(total, key_update, std)
        else:
            flat, unravel = ravel_pytree(total)
            noise, buffer = noising.multiply_next(std * jax.random.normal(key_update, flat.shape), state["noise"])
            noisy, state = unravel(flat + noise), {**state, "noise": buffer}
        update = jax.tree.map(lambda u: u / m, noisy)
        taking_part = jnp.sum(mask)
        diag = {
            "clip_norm": jnp.asarray(clip, jnp.float32),
            "clipped_fraction": jnp.sum(mask & (norms > clip)) / jnp.maximum(taking_part, 1),
            "nonfinite_clients": count_nonfinite(updates, mask),
        }
        if adaptive is not None:
            centred = jnp.sum(jnp.where(mask, (norms <= clip) - 0.5, 0.0))
            noisy_count = centred + adaptive.count_stddev * jax.random.normal(key_count)
            below = noisy_count / m + 0.5
            state = {**state, "clip_norm": clip * jnp.exp(-adaptive.clip_lr * (below - adaptive.target_quantile))}
        return update, state, diag

    return make_aggregator(init, aggregate)


def dpsgd_gradient(noise_multiplier: jax.Array, clip_norm: jax.Array) -> Callable[..., tuple[jax.Array, Any]]:
    """Example-level DP-SGD gradient (Abadi et al. 2016).

    Returns ``grad_fn(example_loss, params, xb, yb, valid, key,
    expected_batch_size) -> (mean_loss, grads)``: per-example gradients of
    ``example_loss(params, x, y)`` by vmap, each clipped to ``C``, summed over
    ``valid`` rows, plus ``N(0, (sigma C)^2)`` per coordinate, divided by
    ``expected_batch_size`` (``B`` for fixed-size batches, ``q n`` for Poisson
    sampling). ``mean_loss`` is the plain mean over valid rows, for logging.
    """

    def grad_fn(example_loss, params, xb, yb, valid, key, expected_batch_size):
        losses, grads = jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0, 0))(params, xb, yb)
        clipped, _ = _clip_rows(grads, clip_norm, valid)
        total = jax.tree.map(lambda g: jnp.sum(g, axis=0), clipped)
        noisy = add_gaussian_noise(total, key, noise_std(noise_multiplier, clip_norm))
        mean_grads = jax.tree.map(lambda g: g / expected_batch_size, noisy)
        mean_loss = jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
        return mean_loss, mean_grads

    return grad_fn


def _hparams(cfg: Any, hparams: PrivacyHParams | None) -> PrivacyHParams:
    return hparams_of(PrivacyHParams, cfg) if hparams is None else hparams


def build_client_privatizer(cfg: Any, hparams: PrivacyHParams | None = None) -> Callable[[Any, PRNGKey], Any] | None:
    """``(update, key) -> update`` applied per client before upload (local DP), or None.

    ``hparams``: traced inside the engine; the config's values when None (as for every builder below).
    """
    if cfg.mode != "local":
        return None
    hp = _hparams(cfg, hparams)
    return local_privatizer(hp.noise_multiplier, hp.clip_norm)


def build_central_aggregator(cfg: Any, hparams: PrivacyHParams | None, context: Any) -> Aggregator | None:
    """The DP-FedAvg (or banded-MF) `Aggregator` replacing the configured one under central DP, or None.

    The fixed denominator is ``context.expected_cohort``, the expected number
    of clients per round (``q C`` under Poisson sampling).
    """
    if cfg.mode not in SERVER_NOISE:
        return None
    if context.expected_cohort <= 0:
        raise ValueError(f"central DP needs the expected cohort size; got {context.expected_cohort}.")
    hp = _hparams(cfg, hparams)
    adaptive = AdaptiveClip(hp.target_quantile, hp.clip_lr, hp.clipped_count_stddev) if cfg.adaptive_clipping else None
    bands = cfg.bands if cfg.mode == "bandmf" else 1
    return dp_fedavg(hp.noise_multiplier, hp.clip_norm, context.expected_cohort, adaptive, bands)


def build_gradient_fn(cfg: Any, hparams: PrivacyHParams | None = None) -> Callable[..., tuple[jax.Array, Any]] | None:
    """The per-batch DP-SGD gradient function (see `dpsgd_gradient`), or None."""
    if cfg.mode != "dpsgd":
        return None
    hp = _hparams(cfg, hparams)
    return dpsgd_gradient(hp.noise_multiplier, hp.clip_norm)


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


MECHANISMS = {
    "central": "Gaussian noise on the sum of clipped client updates (DP-FedAvg)",
    "bandmf": "banded matrix-factorisation noise on the sum of clipped client updates (DP-FTRL / BandMF)",
    "local": "Gaussian noise on each clipped client update before upload (local DP)",
    "dpsgd": "Gaussian noise on each step's sum of clipped per-example gradients (DP-SGD)",
    "none": "none",
}


@dataclasses.dataclass(frozen=True)
class Accounting:
    """The privacy accounting of a run: cheap `epsilon_after(rounds)` for eval lines."""

    mode: str
    unit: str  # 'client', 'record' or 'none'
    noise_multiplier: float
    sampling_rate: float
    steps_per_round: int
    delta: float
    accountant: str
    sampling: str
    description: str
    truncation: tuple[int, int] | None = None  # Poisson cohorts cut to slots: (clients, max_cohort)
    bands: int = 1  # mode='bandmf': the strategy's bands

    @property
    def relation(self) -> str:
        """The neighbouring relation epsilon holds for."""
        if self.mode == "none":
            return "none"
        return f"{'replace' if self.sampling == 'fixed' else 'add-or-remove'}-one {self.unit}"

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon after ``rounds`` rounds (inf without DP; results are cached)."""
        if self.mode == "none":
            return math.inf
        if self.mode == "bandmf":
            return bandmf_epsilon(self.noise_multiplier, self.bands, rounds, self.delta)
        return epsilon(
            self.noise_multiplier,
            self.sampling_rate,
            rounds * self.steps_per_round,
            self.delta,
            self.accountant,
            self.sampling,
            self.truncation,
        )

    def replace_one_epsilon_after(self, rounds: int) -> float:
        """Epsilon after ``rounds`` rounds under the replace-one relation (one unit's data swapped for
        another's: the clipped sum moves by up to 2x clip).

        The run's own epsilon where its relation is replace-one already
        (``sampling='fixed'``); the same Gaussian at twice the sensitivity
        where every unit takes part in every step (rate 1; BandMF's one
        Gaussian likewise); nan under Poisson sampling (not accounted here);
        inf without DP.
        """
        if self.mode == "none":
            return math.inf
        if self.mode == "bandmf":
            return bandmf_epsilon(self.noise_multiplier / 2, self.bands, rounds, self.delta)
        if self.sampling == "fixed":
            return self.epsilon_after(rounds)
        if self.sampling_rate < 1:
            return math.nan
        steps = rounds * self.steps_per_round
        return epsilon(self.noise_multiplier, 1.0, steps, self.delta, self.accountant, "fixed")

    def report(self, rounds: int) -> dict:
        """Plain dict for logs and ``summary.json``."""
        return {
            "epsilon": self.epsilon_after(rounds),
            "epsilon_replace_one": self.replace_one_epsilon_after(rounds),
            "delta": self.delta,
            "unit": self.unit,
            "mode": self.mode,
            "accountant": self.accountant,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "steps": rounds * self.steps_per_round,
            "sampling": self.sampling,
            "max_cohort": self.truncation[1] if self.truncation else 0,
            "neighbouring_relation": self.relation,
            "mechanism": MECHANISMS[self.mode] + (f", {self.bands} bands" if self.mode == "bandmf" else ""),
            "description": self.description,
        }


def accounting_for_run(
    cfg: Any, num_clients: int, client_sizes: Sequence[int] | None = None, cohort_sampling: str | None = None
) -> Accounting:
    """The `Accounting` of a whole run config (``cfg.privacy``, ``cfg.cohort_size``, ``cfg.local``).

    Refuses (ValueError) a Poisson ``max_cohort`` too small for the RDP
    truncation bound over ``cfg.rounds`` (`truncation_slack`).

    - central: unit client, one step per round at rate ``cohort_size /
      num_clients`` (``cohort_sampling='fixed'``, a fixed-size cohort without
      replacement) or ``sampling_rate`` (``'poisson'``, truncated to
      ``max_cohort`` when that is set). ``cohort_sampling`` ('fixed' or
      'poisson') overrides how a *fixed-size* config's cohort is accounted
      (e.g. Poisson at the same rate, for comparison); default: as drawn.
    - bandmf: unit client, every client every round (`bandmf_epsilon`).
    - local: unit client, one release per round a client takes part in,
      counted for every round (the server sees who takes part, so cohort
      sampling does not amplify), replace-one relation.
    - dpsgd: unit record, ``local.steps`` steps per round at rate
      ``min(1, batch_size / n)`` for the smallest client ``n`` (the largest rate),
      counted for every round (no credit for cohort sampling).
    """
    p = cfg.privacy
    accountant = p.accountant
    if p.mode == "none":
        return Accounting("none", "none", 0.0, 1.0, 1, 0.0, accountant, "none", "no differential privacy")
    truncation = None
    if p.mode == "bandmf":
        rate, sampling, steps, unit = 1.0, "poisson", 1, "client"
    elif p.mode == "central":
        if cfg.cohort_sampling == "poisson":
            rate, sampling, steps, unit = cfg.sampling_rate, "poisson", 1, "client"
            truncation = (num_clients, cfg.max_cohort) if cfg.max_cohort else None
        else:
            sampling = cohort_sampling or "fixed"
            _check(sampling in SAMPLINGS, f"cohort_sampling={sampling!r}: choose one of {SAMPLINGS}.")
            rate, steps, unit = (cfg.cohort_size or num_clients) / num_clients, 1, "client"
        if rate == 1 and truncation is None:
            sampling = "poisson"  # every client every round: add-or-remove-one, no sampling
    elif p.mode == "local":
        rate, sampling, steps, unit = 1.0, "fixed", 1, "client"
    else:
        _check(client_sizes is not None, "privacy.mode='dpsgd' accounting needs the client sizes.")
        validate_with_run(cfg, client_sizes)
        rate, sampling, steps, unit = (
            min(1.0, cfg.local.batch_size / min(client_sizes)),
            cfg.local.sampling,
            cfg.local.steps,
            "record",
        )
    if p.mode == "bandmf":
        how = f"{p.bands}-banded MF, every client every round (min-sep 1): one Gaussian of sigma / sens(C)"
    else:
        how = describe_accounting(rate, accountant, sampling, truncation)
    if _uses_replace_one(rate, sampling):
        accountant = "rdp"
    accounting = Accounting(
        p.mode,
        unit,
        float(p.noise_multiplier),
        rate,
        steps,
        float(p.delta),
        accountant,
        sampling,
        f"{p.mode} DP per {unit}; {how}",
        truncation,
        p.bands,
    )
    if truncation is not None:
        accounting.epsilon_after(cfg.rounds)  # refuses max_cohort too small for the RDP truncation bound
    return accounting


def client_record_epsilons(cfg: Any, client_sizes: Sequence[int], rounds: int) -> tuple[float, ...]:
    """DP-SGD (``privacy.mode='dpsgd'``): each client's own epsilon after ``rounds`` rounds, one of its
    records the unit, at its own sampling rate ``min(1, batch_size / n_c)`` (`accounting_for_run` reports
    the largest: the smallest client's)."""
    return tuple(accounting_for_run(cfg, 1, [n]).epsilon_after(rounds) for n in client_sizes)


def run_privacy_report(
    cfg: Any,
    num_clients: int,
    client_sizes: Sequence[int] | None = None,
    rounds: int | None = None,
    cohort_sampling: str | None = None,
) -> dict:
    """Epsilon, delta, unit, accountant and sampling of a run after ``rounds`` (default ``cfg.rounds``)."""
    accounting = accounting_for_run(cfg, num_clients, client_sizes, cohort_sampling)
    return accounting.report(cfg.rounds if rounds is None else rounds)

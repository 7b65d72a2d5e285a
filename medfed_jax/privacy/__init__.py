"""Differential privacy: clipping + Gaussian mechanisms (jitted) and accounting (host).

Mechanisms (all noise from explicit keys; nothing else is random):

- ``mode='central'``: client-level DP-FedAvg (McMahan et al. 2018). Each
  client's whole update is clipped to L2 norm ``S``, the clipped updates of
  the clients that send are summed, ``N(0, (sigma S)^2)`` noise is added per
  coordinate and the sum is divided by the *expected* number of senders
  ``D``, the expected cohort times ``1 - unreliable.dropout`` (a fixed
  denominator, so the sensitivity of the mean is ``S / D``, and the mean is
  unbiased under dropout). Optional adaptive clipping (Andrew et al. 2021)
  moves ``S`` toward a target quantile of the client update norms. Unit of
  privacy: one client's entire data set. With dropout ``d`` the senders of a
  Poisson cohort (or of every client) are a Poisson sample at ``q (1 - d)``,
  the rate accounted (`sender_rate`); other cohorts and modes ignore dropout
  (conservative). FedNova and FedDyn are refused (`UNSOUND_WITH_SERVER_NOISE`).
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

The package: `mechanisms` (jitted), `accounting` (host: ``dp_accounting``,
imported lazily, so ``import medfed_jax`` stays light), `settings` (the config
section, validation, the engine's builders, a run's `Accounting`). Every
public name is importable from ``medfed_jax.privacy``.
"""

from __future__ import annotations

from medfed_jax.privacy.accounting import (
    ACCOUNTANTS,
    PLD_MIN_NOISE,
    SAMPLINGS,
    bandmf_epsilon,
    bandmf_noise_for,
    bandmf_sensitivity_squared,
    calibrate_noise,
    describe_accounting,
    epsilon,
    host_only,
    truncation_slack,
    truncation_tail,
)
from medfed_jax.privacy.mechanisms import (
    AdaptiveClip,
    add_gaussian_noise,
    clip_update,
    correlated_noise,
    dp_fedavg,
    dpsgd_gradient,
    global_norm,
    local_privatizer,
    noise_std,
    strategy_coefs,
    update_noise_multiplier,
)
from medfed_jax.privacy.settings import (
    MECHANISMS,
    MODES,
    SERVER_NOISE,
    UNSOUND_WITH_SERVER_NOISE,
    Accounting,
    PrivacyHParams,
    accounting_for_run,
    build_central_aggregator,
    build_client_privatizer,
    build_gradient_fn,
    check_delta,
    client_record_epsilons,
    default_config,
    run_privacy_report,
    sender_rate,
    validate_config,
    validate_with_run,
)

__all__ = [
    "ACCOUNTANTS",
    "Accounting",
    "AdaptiveClip",
    "MECHANISMS",
    "MODES",
    "PLD_MIN_NOISE",
    "PrivacyHParams",
    "SAMPLINGS",
    "SERVER_NOISE",
    "UNSOUND_WITH_SERVER_NOISE",
    "accounting_for_run",
    "add_gaussian_noise",
    "bandmf_epsilon",
    "bandmf_noise_for",
    "bandmf_sensitivity_squared",
    "build_central_aggregator",
    "build_client_privatizer",
    "build_gradient_fn",
    "calibrate_noise",
    "check_delta",
    "client_record_epsilons",
    "clip_update",
    "correlated_noise",
    "default_config",
    "describe_accounting",
    "dp_fedavg",
    "dpsgd_gradient",
    "epsilon",
    "global_norm",
    "host_only",
    "local_privatizer",
    "noise_std",
    "run_privacy_report",
    "sender_rate",
    "strategy_coefs",
    "truncation_slack",
    "truncation_tail",
    "update_noise_multiplier",
    "validate_config",
    "validate_with_run",
]

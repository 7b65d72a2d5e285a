"""Differential privacy with unreliable clients (``unreliable.dropout``): accounting and the DP-FedAvg denominator.

References: ``dp_accounting`` called directly (epsilon of the senders' Poisson
rate ``q (1 - d)``, or of the cohort without dropout where dropout is not
credited), binomial moments in closed form (Monte Carlo tolerances), the
chi-square test of `tests.test_cohorts`, and the client-perturbation test (a
client that did not send leaves no trace, the premise of the accounting).
"""

from __future__ import annotations

import logging
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import pld, rdp
from float32_bounds import EPS32

from medfed_jax import config as config_lib
from medfed_jax import privacy, runner
from medfed_jax.data.base import stack_clients
from medfed_jax.types import FederatedDataset
from tests.test_cohorts import P_MIN, binomial_pmf, chi_square_p, influential_and_participants
from tests.test_engine import engine_and_data, federation, small_config

logging.getLogger("absl").setLevel(logging.ERROR)  # RDP order warnings

SIGMA, DELTA, ROUNDS = 1.1, 1e-5, 30


def _dp(mode="central", dropout=0.3, **top):
    cfg = config_lib.default_config()
    cfg.rounds, cfg.aggregator.name, cfg.unreliable.dropout = ROUNDS, "mean", dropout
    cfg.privacy.update(mode=mode, noise_multiplier=SIGMA, clip_norm=1.0, delta=DELTA, accountant="pld")
    cfg.update(top)
    return cfg


def _composed(accountant, event, steps=ROUNDS):
    return accountant.compose(event, steps).get_epsilon(DELTA)


def _poisson(rate, sigma=SIGMA):
    return dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma))


# --------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("q", [0.2, 1.0])
def test_poisson_cohort_with_dropout_is_accounted_at_the_senders_rate(q, accountant):
    """Sampled with prob. q, then sending with prob. 1 - d, independently: Poisson sampling at q (1 - d)."""
    dropout, clients = 0.3, 50
    cfg = _dp(dropout=dropout, cohort_sampling="poisson", sampling_rate=q)
    cfg.privacy.accountant = accountant
    report = privacy.run_privacy_report(cfg, clients)
    fresh = pld.PLDAccountant() if accountant == "pld" else rdp.RdpAccountant()
    assert report["epsilon"] == pytest.approx(_composed(fresh, _poisson(q * (1 - dropout))), rel=1e-9)
    assert report["sampling_rate"] == pytest.approx(q * (1 - dropout), rel=1e-15)
    assert report["neighbouring_relation"] == "add-or-remove-one client"
    assert "dropout=0.3 credited" in report["description"]
    assert math.isnan(report["epsilon_replace_one"]) == (q < 1)  # Poisson sampling: not accounted under replace-one
    reliable = pld.PLDAccountant() if accountant == "pld" else rdp.RdpAccountant()
    assert report["epsilon"] < (_composed(reliable, _poisson(q)) if q < 1 else math.inf)  # tighter than ignoring d


def test_every_client_every_round_with_dropout_is_poisson_at_one_minus_d():
    """cohort_size=0: each client sends with prob. 1 - d, independently: Poisson at 1 - d (d = 0: one Gaussian).

    Replace-one keeps the bound of every client every round (sensitivity 2 S), valid with dropout too.
    """
    report = privacy.run_privacy_report(_dp(dropout=0.25), num_clients=20)
    assert report["epsilon"] == pytest.approx(_composed(pld.PLDAccountant(), _poisson(0.75)), rel=1e-9)
    replace_one = dp_accounting.get_epsilon_gaussian(SIGMA / 2 / math.sqrt(ROUNDS), DELTA)
    assert report["epsilon_replace_one"] == pytest.approx(replace_one, rel=1e-9)
    reliable = privacy.run_privacy_report(_dp(dropout=0.0), num_clients=20)
    assert reliable["epsilon"] == pytest.approx(
        dp_accounting.get_epsilon_gaussian(SIGMA / math.sqrt(ROUNDS), DELTA), rel=1e-9
    )
    assert "dropout" not in reliable["description"]


def _reliable_epsilon(case: str) -> float:
    """The run's epsilon without dropout, from dp_accounting directly (what a conservative accounting keeps)."""
    if case == "fixed cohort":  # 10 of 50 without replacement: replace-one, sigma / 2
        accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        event = dp_accounting.SampledWithoutReplacementDpEvent(50, 10, dp_accounting.GaussianDpEvent(SIGMA / 2))
        return _composed(accountant, event)
    if case == "truncated poisson":  # q = 0.2 of 50 cut to 14 slots, on 51 units (the larger neighbour)
        event = dp_accounting.TruncatedSubsampledGaussianDpEvent(51, 0.2, 14, SIGMA)
        return _composed(pld.PLDAccountant(), event)
    if case == "local":  # every round a release, replace-one (sigma / 2): one Gaussian of sigma / (2 sqrt(T))
        return dp_accounting.get_epsilon_gaussian(SIGMA / 2 / math.sqrt(ROUNDS), DELTA)
    # dpsgd: 4 steps per round at batch 8 / smallest client 40, no credit for cohorts
    return _composed(pld.PLDAccountant(), _poisson(8 / 40), 4 * ROUNDS)


CONSERVATIVE = {
    "fixed cohort": dict(cohort_size=10),
    "truncated poisson": dict(cohort_sampling="poisson", sampling_rate=0.2, max_cohort=14),
    "local": {},
    "dpsgd": {},
}


@pytest.mark.parametrize("case", list(CONSERVATIVE))
def test_where_senders_are_not_a_poisson_sample_dropout_is_not_credited(case):
    """Fixed-size and truncated cohorts, local DP, DP-SGD: epsilon of the run without dropout (conservative)."""
    mode = case if case in ("local", "dpsgd") else "central"
    cfg = _dp(mode=mode, dropout=0.4, **CONSERVATIVE[case])
    if mode == "dpsgd":
        cfg.aggregator.name, cfg.local.sampling, cfg.local.epochs, cfg.local.steps = "weighted_mean", "poisson", 0, 4
        cfg.local.batch_size = 8
    report = privacy.run_privacy_report(cfg, num_clients=50, client_sizes=[40, 90] * 25)
    assert report["epsilon"] == pytest.approx(_reliable_epsilon(case), rel=1e-9)
    assert "dropout=0.4 not credited" in report["description"]


def test_bandmf_with_dropout_keeps_every_client_every_round():
    cfg = _dp(mode="bandmf", dropout=0.5)
    cfg.privacy.bands = 2
    sensitivity = privacy.bandmf_sensitivity_squared(2, ROUNDS)
    expected = dp_accounting.get_epsilon_gaussian(SIGMA / math.sqrt(sensitivity), DELTA)
    assert privacy.run_privacy_report(cfg, num_clients=20)["epsilon"] == pytest.approx(expected, rel=1e-9)


# --------------------------------------------------------------------------- the fixed denominator


def _central_aggregator(dropout, clients, q, sigma=0.0, clip=2.0, **privacy_fields):
    cfg = _dp(dropout=dropout)
    cfg.privacy.update(noise_multiplier=sigma, clip_norm=clip, **privacy_fields)
    context = config_lib.BuildContext(clients, clients, 2, (3,), sampling_rate=q, dropout=dropout)
    return privacy.build_central_aggregator(cfg.privacy, None, context)


def _sender_masks(rng, trials, clients, q, dropout):
    """``[trials, clients]`` bool: sampled with prob. q, then sending with prob. 1 - d (numpy, independent coins)."""
    return (rng.random((trials, clients)) < q) & (rng.random((trials, clients)) >= dropout)


def test_dp_mean_of_identical_updates_is_unbiased_under_dropout():
    """sigma = 0: the aggregate is (K / D) u with K ~ Binomial(N, q (1 - d)) senders and D = q N (1 - d)."""
    clients, q, dropout, trials = 40, 0.5, 0.3, 20_000
    p, u = q * (1 - dropout), np.array([0.6, -0.8, 0.0], np.float32)  # norm 1 <= clip: passes unclipped
    agg = _central_aggregator(dropout, clients, q)
    masks = _sender_masks(np.random.default_rng(0), trials, clients, q, dropout)
    updates = jnp.broadcast_to(jnp.asarray(u), (clients, 3))
    run = jax.jit(jax.vmap(agg.aggregate, in_axes=(None, None, 0, None, 0)))
    out, _, _ = run(
        updates, jnp.ones(clients), jnp.asarray(masks), agg.init(None), jax.random.split(jax.random.key(1), trials)
    )
    ratio = np.asarray(out)[:, 0] / u[0]  # K / D per trial
    std_of_mean = math.sqrt(clients * p * (1 - p)) / (clients * p) / math.sqrt(trials)
    assert abs(ratio.mean() - 1.0) < 5 * std_of_mean
    np.testing.assert_allclose(ratio, masks.sum(1) / (clients * p), rtol=4 * clients * EPS32)


def test_dp_noise_std_is_z_clip_over_expected_senders():
    clients, q, dropout, sigma, clip, size = 8, 0.5, 0.4, 1.3, 0.5, 200_000
    agg = _central_aggregator(dropout, clients, q, sigma, clip)
    mask = jnp.asarray([True, False, True, True, False, False, True, False])
    updates = jnp.zeros((clients, size))
    out, _, _ = jax.jit(agg.aggregate)(updates, jnp.ones(clients), mask, agg.init(None), jax.random.key(3))
    noise, expected = np.asarray(out, np.float64), sigma * clip / (q * clients * (1 - dropout))
    assert abs(noise.mean()) < 5 * expected / math.sqrt(size)
    assert abs(noise.std() / expected - 1) < 5 / math.sqrt(2 * size)  # the sample std's own error is 1/sqrt(2n)


def test_adaptive_clipping_estimates_the_quantile_without_bias_under_dropout():
    """Andrew et al. 2021's noised fraction below S, over the senders and divided by D, has mean beta.

    ``below = (sum_senders (b_i - 1/2) + N(0, s^2)) / D + 1/2``; its variance is ``(N p (1 - p) / 4 + s^2) / D^2``.
    """
    clients, q, dropout, trials, lr, target, count_std = 50, 0.5, 0.3, 4000, 0.2, 0.5, 1.0
    p = q * (1 - dropout)
    agg = _central_aggregator(
        dropout, clients, q, 0.5, 1.0, adaptive_clipping=True, clip_lr=lr, clipped_count_stddev=count_std
    )
    norms = np.where(np.arange(clients) < 0.8 * clients, 0.5, 2.0).astype(np.float32)  # beta = 0.8 below S = 1
    updates = jnp.asarray(np.stack([norms, np.zeros(clients, np.float32)], 1))
    masks = _sender_masks(np.random.default_rng(2), trials, clients, q, dropout)
    run = jax.jit(jax.vmap(agg.aggregate, in_axes=(None, None, 0, None, 0)))
    _, state, _ = run(
        updates, jnp.ones(clients), jnp.asarray(masks), agg.init(None), jax.random.split(jax.random.key(4), trials)
    )
    below = target - np.log(np.asarray(state["clip_norm"], np.float64)) / lr  # clip' = exp(-lr (below - target))
    std = math.sqrt(clients * p * (1 - p) / 4 + count_std**2) / (clients * p)
    assert abs(below.mean() - 0.8) < 5 * std / math.sqrt(trials)


# --------------------------------------------------------------------------- in the engine


def _identical_clients(clients: int, rows: int) -> FederatedDataset:
    one = federation([rows], test_size=rows)
    train = stack_clients(*zip(*[(np.asarray(one.train.x[0]), np.asarray(one.train.y[0]))] * clients))
    test = stack_clients(*zip(*[(np.asarray(one.test.x[0]), np.asarray(one.test.y[0]))] * clients))
    return FederatedDataset("same", train, test, tuple(f"c{i}" for i in range(clients)), one.num_classes)


def test_engine_round_divides_by_expected_senders_and_senders_are_binomial():
    """Identical clients, one full-batch step each, clipped to S: the round's update is K S / (q N (1 - d)) with K
    the round's senders, and K ~ Binomial(N, q (1 - d))."""
    clients, q, dropout, rows, clip, rounds = 10, 0.5, 0.4, 6, 1e-3, 300
    cfg = small_config(cohort_sampling="poisson", sampling_rate=q, **{"unreliable.dropout": dropout})
    cfg.model.name, cfg.local.batch_size, cfg.local.epochs, cfg.aggregator.name = "logistic", rows, 1, "mean"
    cfg.privacy.update(mode="central", noise_multiplier=0.0, clip_norm=clip, delta=1e-3)
    engine, train, _, knobs = engine_and_data(cfg, _identical_clients(clients, rows))
    _, metrics = engine.run_rounds(engine.init(0, train, knobs), train, knobs, rounds)
    senders = np.asarray(metrics["participants"])
    assert chi_square_p(np.bincount(senders, minlength=clients + 1), binomial_pmf(clients, q * (1 - dropout))) > P_MIN
    want = senders * clip / (q * clients * (1 - dropout))
    params = 5 * 3 + 3  # logistic on 5 features, 3 classes
    # float32: a K-term sum, the clip's scale and two norms over the parameters, each a few roundings per term
    np.testing.assert_allclose(np.asarray(metrics["update_norm"]), want, rtol=4 * (clients + params + rows) * EPS32)


def test_under_central_dp_a_client_that_does_not_send_leaves_no_trace():
    """The release depends on the senders only (client-perturbation test), which the accounting assumes."""
    cfg = small_config(cohort_sampling="poisson", sampling_rate=0.7, **{"unreliable.dropout": 0.4})
    cfg.aggregator.name = "mean"
    cfg.privacy.update(mode="central", noise_multiplier=0.5, clip_norm=1.0, delta=1e-3)
    influential, participants = influential_and_participants(cfg, num_clients=8)
    assert 0 < participants < 8
    assert influential == participants


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("mode", privacy.SERVER_NOISE)
@pytest.mark.parametrize("method", ["fednova", "feddyn"])
def test_central_dp_refuses_drift_methods_that_break_its_sensitivity(method, mode, forbid_compile):
    cfg = small_config(**{"drift.method": method, "unreliable.dropout": 0.3, "aggregator.name": "mean"})
    cfg.privacy.update(mode=mode, noise_multiplier=1.0, clip_norm=1.0, delta=1e-3)
    with pytest.raises(ValueError) as err:
        runner.prepare(cfg, federation([4] * 4))
    message = str(err.value)
    assert f"drift.method={method!r}" in message and "drift.method='none'" in message and "\n" not in message


def test_local_dp_composes_with_fednova_and_dropout():
    cfg = small_config(**{"drift.method": "fednova", "unreliable.dropout": 0.3})
    cfg.privacy.update(mode="local", noise_multiplier=1.0, clip_norm=1.0, delta=1e-3)
    prepared = runner.prepare(cfg, federation([4] * 4))
    assert prepared.context.expected_senders == pytest.approx(4 * 0.7, rel=1e-15)

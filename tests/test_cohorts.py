"""Poisson client sampling (``cohort_sampling='poisson'``): the draw, the engine's masked slots, accounting, refusals.

References: binomial probabilities from ``math.comb``, ``dp_accounting``
called directly, chi-square bounds from scipy.
"""

from __future__ import annotations

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import pld, rdp
from scipy import stats

from medfed_jax import privacy, runner, server
from medfed_jax.data import population
from tests.test_engine import engine_and_data, federation, small_config


def binomial_pmf(n: int, q: float) -> np.ndarray:
    return np.array([math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(n + 1)])


def chi_square_p(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    """Chi-square goodness-of-fit p-value, bins pooled from the top until each expects >= 5 draws."""
    draws = observed.sum()
    obs, exp = list(observed.astype(float)), list(expected_probs * draws)
    while exp[-1] < 5:
        last_obs, last_exp = obs.pop(), exp.pop()
        obs[-1], exp[-1] = obs[-1] + last_obs, exp[-1] + last_exp
    while exp[0] < 5:
        first_obs, first_exp = obs.pop(0), exp.pop(0)
        obs[0], exp[0] = obs[0] + first_obs, exp[0] + first_exp
    return float(stats.chisquare(obs, exp).pvalue)


# A fixed seed makes each check deterministic; the bound p > 1e-6 fails a correct sampler only with
# probability 1e-6 over seeds, and a sampler off by a few percent in q fails it at these draw counts.
P_MIN = 1e-6


@pytest.mark.parametrize("slots", [12, 4])
def test_poisson_cohort_is_truncated_poisson(slots):
    """Counts ~ min(Binomial(C, q), slots); each client in with prob. q (untruncated); pairs independent."""
    num_clients, q, draws = 12, 0.3, 20_000
    keys = jax.random.split(jax.random.key(7), draws)
    index, taking = jax.jit(jax.vmap(lambda k: population.poisson_cohort(k, num_clients, q, slots)))(keys)
    index, taking = np.asarray(index), np.asarray(taking)
    counts = taking.sum(1)
    pmf = binomial_pmf(num_clients, q)
    truncated = np.concatenate([pmf[:slots], [pmf[slots:].sum()]])
    assert chi_square_p(np.bincount(counts, minlength=slots + 1), truncated) > P_MIN
    member = np.zeros((draws, num_clients), bool)
    np.put_along_axis(member, index, taking, axis=1)
    assert all(len(set(row)) == slots for row in index[:100])  # distinct clients in the slots
    if slots == num_clients:  # no truncation: independent Bernoulli(q) memberships
        se = math.sqrt(q * (1 - q) / draws)
        assert np.all(np.abs(member.mean(0) - q) < 5 * se)
        both = (member[:, 0] & member[:, 1]).mean()
        assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / draws)


def test_engine_participants_per_round_follow_binomial():
    num_clients, q, rounds = 10, 0.4, 300
    cfg = small_config(cohort_sampling="poisson", sampling_rate=q, **{"model.name": "logistic"})
    engine, train, _, knobs = engine_and_data(cfg, federation([4] * num_clients))
    _, metrics = engine.run_rounds(engine.init(0, train, knobs), train, knobs, rounds)
    counts = np.asarray(metrics["participants"])
    assert chi_square_p(np.bincount(counts, minlength=num_clients + 1), binomial_pmf(num_clients, q)) > P_MIN


def influential_and_participants(cfg, num_clients: int) -> tuple[int, int]:
    """Client-perturbation test of round 0: how many clients change the new model when their rows are
    replaced by large noise, and the round's ``participants`` metric (equal when absent clients leave no trace)."""
    engine, train, _, knobs = engine_and_data(cfg, federation([4] * num_clients))
    state = engine.init(0, train, knobs)
    reference, metrics = engine.round_step(state, train, knobs)
    influential = 0
    for c in range(num_clients):
        x = np.array(train.x)
        x[c] = 100.0 * np.random.default_rng(c).normal(size=x[c].shape)
        perturbed, _ = engine.round_step(state, train._replace(x=jnp.asarray(x)), knobs)
        leaves = zip(jax.tree.leaves(reference.params), jax.tree.leaves(perturbed.params))
        influential += any(not np.allclose(a, b) for a, b in leaves)
    return influential, int(metrics["participants"])


def test_engine_clients_outside_the_poisson_cohort_leave_no_trace():
    """A client changes the round iff it took part, and the slots are masked otherwise (client-perturbation test)."""
    cfg = small_config(cohort_sampling="poisson", sampling_rate=0.5, max_cohort=6)
    influential, participants = influential_and_participants(cfg, num_clients=8)
    assert 0 < participants <= 6
    assert influential == participants


def _central(q: float, max_cohort: int, accountant: str = "pld", rounds: int = 40):
    cfg = small_config(cohort_sampling="poisson", sampling_rate=q, max_cohort=max_cohort)
    cfg.rounds, cfg.aggregator.name = rounds, "mean"
    cfg.privacy.mode, cfg.privacy.noise_multiplier, cfg.privacy.clip_norm = "central", 1.1, 1.0
    cfg.privacy.accountant, cfg.privacy.delta = accountant, 1e-5
    return cfg


def test_poisson_pld_epsilon_equals_dp_accounting():
    clients, q, sigma, rounds, delta = 50, 0.2, 1.1, 40, 1e-5
    plain = privacy.run_privacy_report(_central(q, 0), clients)
    direct = pld.PLDAccountant().compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds
    )
    assert plain["epsilon"] == pytest.approx(direct.get_epsilon(delta), rel=1e-9)
    assert plain["neighbouring_relation"] == "add-or-remove-one client" and plain["max_cohort"] == 0
    cut = privacy.run_privacy_report(_central(q, 14), clients)
    # the larger add-or-remove neighbour has clients + 1 units (privacy._make_event)
    event = dp_accounting.TruncatedSubsampledGaussianDpEvent(clients + 1, q, 14, sigma)
    direct = pld.PLDAccountant().compose(event, rounds)
    assert cut["epsilon"] == pytest.approx(direct.get_epsilon(delta), rel=1e-9)
    assert cut["epsilon"] > plain["epsilon"] and cut["max_cohort"] == 14


def test_poisson_rdp_truncation_uses_the_coupling_bound():
    clients, q, sigma, rounds, delta, slots = 50, 0.2, 1.1, 40, 1e-5, 34
    report = privacy.run_privacy_report(_central(q, slots, "rdp"), clients)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    direct = rdp.RdpAccountant().compose(event, rounds).get_epsilon(delta / 2)
    assert report["epsilon"] == pytest.approx(direct, rel=1e-9)
    tail = sum(math.comb(clients + 1, k) * q**k * (1 - q) ** (clients + 1 - k) for k in range(slots + 1, clients + 2))
    assert (1 + math.exp(direct)) * rounds * tail <= delta / 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"cohort_sampling": "poisson", "sampling_rate": 0.0}, r"sampling_rate=0.0 must lie in \(0, 1\]"),
        ({"cohort_sampling": "poisson", "sampling_rate": 1.5}, r"sampling_rate=1.5 must lie in \(0, 1\]"),
        ({"cohort_sampling": "poisson", "sampling_rate": -0.1}, r"sampling_rate=-0.1 must lie"),
        ({"cohort_sampling": "poisson", "sampling_rate": 0.5, "max_cohort": 3}, r"max_cohort=3 must lie in \[4, 8\]"),
        ({"cohort_sampling": "poisson", "sampling_rate": 0.5, "max_cohort": 9}, r"max_cohort=9 must lie in \[4, 8\]"),
        ({"cohort_sampling": "poisson", "sampling_rate": 0.5, "cohort_size": 4}, "set cohort_size=0"),
        ({"sampling_rate": 0.5}, "apply to cohort_sampling='poisson' only"),
        ({"cohort_sampling": "bernoulli"}, "cohort_sampling='bernoulli' is unknown"),
    ],
)
def test_poisson_settings_are_refused_before_compiling(overrides, message):
    with pytest.raises(ValueError, match=message):
        runner.prepare(small_config(**overrides), federation([4] * 8))


def test_max_cohort_too_small_for_the_rdp_truncation_bound_is_refused():
    with pytest.raises(ValueError, match=r"max_cohort=12 is too small for the RDP truncation bound.*max_cohort >= \d+"):
        privacy.run_privacy_report(_central(0.2, 12, "rdp"), 50)


def test_poisson_dp_fedavg_divides_by_the_expected_cohort():
    """Noise-free DP-FedAvg = the plain mean of the same cohort x participants / (q C) (same keys, same draw)."""
    num_clients, q = 10, 0.4
    overrides = {"cohort_sampling": "poisson", "sampling_rate": q, "model.name": "logistic", "aggregator.name": "mean"}
    dataset = federation([4] * num_clients)
    plain, train, _, knobs = engine_and_data(small_config(**overrides), dataset)
    private_cfg = small_config(**overrides, **{"privacy.mode": "central", "privacy.clip_norm": 1e6})
    private, _, _, private_knobs = engine_and_data(private_cfg, dataset)
    start = plain.init(0, train, knobs)
    mean, metrics = plain.round_step(start, train, knobs)
    dp, _ = private.round_step(private.init(0, train, private_knobs), train, private_knobs)
    scale = int(metrics["participants"]) / (q * num_clients)
    assert scale != 1.0
    for new_dp, new_mean, old in zip(*(jax.tree.leaves(s.params) for s in (dp, mean, start))):
        np.testing.assert_allclose(new_dp - old, scale * (new_mean - old), rtol=1e-4, atol=1e-7)


def test_clients_not_taking_part_keep_their_personal_state():
    num_clients = 8
    cfg = small_config(cohort_sampling="poisson", sampling_rate=0.5, **{"personalization.method": "ditto"})
    engine, train, _, knobs = engine_and_data(cfg, federation([4] * num_clients))
    state = engine.init(0, train, knobs)
    sample_key = jax.random.fold_in(jax.random.fold_in(state.key, 0), server._SAMPLE)  # round 0's draw
    index, taking = population.poisson_cohort(sample_key, num_clients, 0.5, num_clients)
    new, metrics = engine.round_step(state, train, knobs)
    took = np.zeros(num_clients, bool)
    took[np.asarray(index)[np.asarray(taking)]] = True
    assert took.sum() == int(metrics["participants"]) and 0 < took.sum() < num_clients
    for before, after in zip(jax.tree.leaves(state.clients), jax.tree.leaves(new.clients)):
        moved = np.any(np.asarray(before != after).reshape(num_clients, -1), axis=1)
        np.testing.assert_array_equal(moved, took)

"""Unreliable clients and FedBuff's virtual time: rates in distribution, and an event-driven numpy simulation.

Statistical tests use fixed seeds and bounds derived here: a binomial count
within z = 5.3 standard deviations (two-sided normal tail ~1e-7) and
chi-square statistics below the 1 - 1e-6 quantile (scipy), so a correct
implementation fails with probability < 1e-6 per check, and a wrong rate by
a few percent fails for certain at these sample sizes.
"""

from __future__ import annotations

import heapq
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from float32_bounds import EPS32
from scipy import stats

from medfed_jax import unreliable

Z = 5.3
KEY = jax.random.key(0)


def assert_binomial(count: int, n: int, p: float, what: str) -> None:
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= Z * sigma, f"{what}: {count} of {n}, expected {n * p:.0f} +- {Z * sigma:.0f}"


def assert_chi_square(observed: np.ndarray, probabilities: np.ndarray, what: str) -> None:
    expected = observed.sum() * probabilities
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    critical = float(stats.chi2.isf(1e-6, df=observed.size - 1))
    assert statistic <= critical, f"{what}: chi-square {statistic:.1f} > {critical:.1f} ({observed} vs {expected})"


def test_dropout_rate_is_honoured_per_client_and_in_total():
    clients = jnp.arange(4000)
    rates = jnp.where(clients < 2000, 0.1, 0.6)  # two groups of clients with their own rates
    sent = np.asarray(unreliable.dropout_mask(KEY, clients, rates))
    assert_binomial(int(np.sum(~sent[:2000])), 2000, 0.1, "dropped at rate 0.1")
    assert_binomial(int(np.sum(~sent[2000:])), 2000, 0.6, "dropped at rate 0.6")
    scalar = np.asarray(unreliable.dropout_mask(jax.random.key(1), clients, 0.3))
    assert_binomial(int(np.sum(~scalar)), 4000, 0.3, "dropped at rate 0.3")
    assert np.all(unreliable.dropout_mask(KEY, clients, 0.0)) and not np.any(unreliable.dropout_mask(KEY, clients, 1))


def test_a_clients_fate_does_not_depend_on_the_cohort_order():
    clients = jnp.array([7, 3, 11, 0, 5])
    order = jnp.array([4, 2, 0, 3, 1])
    np.testing.assert_array_equal(
        unreliable.dropout_mask(KEY, clients[order], 0.5), unreliable.dropout_mask(KEY, clients, 0.5)[order]
    )
    steps = jnp.full(5, 9)
    np.testing.assert_array_equal(
        unreliable.straggler_steps(KEY, clients[order], steps, 0.5),
        unreliable.straggler_steps(KEY, clients, steps, 0.5)[order],
    )


def test_straggler_steps_follow_their_distribution():
    """P(j steps) = rate / tau for j < tau and 1 - rate + rate / tau for j = tau."""
    n, tau, rate = 6000, 5, 0.4
    done = np.asarray(unreliable.straggler_steps(KEY, jnp.arange(n), jnp.full(n, tau), rate))
    observed = np.bincount(done, minlength=tau + 1)
    assert observed[0] == 0
    probabilities = np.full(tau, rate / tau)
    probabilities[-1] += 1 - rate
    assert_chi_square(observed[1:], probabilities, "straggler steps")


def test_straggler_steps_stay_within_one_and_the_clients_own_steps():
    steps = jnp.tile(jnp.arange(7), 50)  # 0..6 steps, every client a straggler
    done = np.asarray(unreliable.straggler_steps(KEY, jnp.arange(350), steps, 1.0))
    steps = np.asarray(steps)
    assert np.all(done[steps == 0] == 0) and np.all(done[steps > 0] >= 1) and np.all(done <= steps)


def test_compute_budgets_are_uniform_on_low_to_high():
    epochs = np.asarray(unreliable.compute_budgets(KEY, jnp.arange(3000), 2, 5))
    assert epochs.min() >= 2 and epochs.max() <= 5
    assert_chi_square(np.bincount(epochs, minlength=6)[2:], np.full(4, 0.25), "local epochs")


def test_latency_is_the_median_times_a_lognormal_factor():
    clients = jnp.arange(3000)
    median = jnp.where(clients % 2 == 0, 2.0, 8.0)
    np.testing.assert_array_equal(unreliable.latency(KEY, clients, median, 0.0), median)
    spread = 0.5
    z = np.log(np.asarray(unreliable.latency(KEY, clients, median, spread)) / np.asarray(median)) / spread
    assert abs(z.mean()) <= Z / math.sqrt(z.size)  # mean of n standard normals
    chi2 = stats.chi2(df=z.size - 1)
    assert chi2.ppf(1e-6) <= np.sum((z - z.mean()) ** 2) <= chi2.isf(1e-6)  # its sample variance


@pytest.mark.parametrize("spread", [0.0, 0.8])
def test_fedbuff_with_buffer_equal_to_concurrency_is_synchronous(spread):
    """K = M: every step all M slots arrive, none stale, each weighted 1 / M (FedAvg's mean over a cohort of M)."""
    num_clients, m = 12, 5
    mean = jnp.linspace(1.0, 3.0, num_clients)
    state = unreliable.fedbuff_init(KEY, num_clients, m, mean, spread)
    step = jax.jit(lambda s, k: unreliable.fedbuff_step(s, k, num_clients, m, mean, spread))
    in_flight = set(np.asarray(state.client).tolist())
    assert len(in_flight) == m
    for t in range(6):
        buffer, state = step(state, jax.random.key(t + 1))
        assert set(np.asarray(buffer.clients).tolist()) == in_flight
        np.testing.assert_array_equal(buffer.staleness, 0)
        np.testing.assert_array_equal(buffer.weights, np.full(m, 1.0 / m, np.float32))
        in_flight = set(np.asarray(buffer.dispatched).tolist())
        assert len(in_flight) == m and int(state.server_version) == t + 1


def test_fedbuff_rounds_with_buffer_equal_to_concurrency_are_synchronous_fedavg():
    """FedBuff's loop (train at dispatch, hold the update in its slot, apply sum_k weights_k delta_k) with K = M and
    zero latency spread trains the same model as synchronous FedAvg on the same cohorts (to float32 rounding)."""
    num_clients, m, lr = 8, 3, 0.5
    targets = jnp.linspace(-2.0, 2.0, num_clients)[:, None] * jnp.array([1.0, -0.5])  # client c's optimum

    def local(params, clients):  # one gradient step of 0.5 ||w - t_c||^2 per client: [K, 2]
        return lr * (targets[clients] - params)

    @jax.jit
    def both_rounds(state, params, pending, synchronous, key):
        buffer, state = unreliable.fedbuff_step(state, key, num_clients, m, 1.0, 0.0)
        params = params + jnp.sum(buffer.weights[:, None] * pending[buffer.slots], axis=0)
        pending = pending.at[buffer.slots].set(local(params, buffer.dispatched))
        synchronous = synchronous + jnp.mean(local(synchronous, buffer.clients), axis=0)
        return state, params, pending, synchronous

    state = unreliable.fedbuff_init(KEY, num_clients, m, 1.0, 0.0)
    params = synchronous = jnp.zeros(2)
    pending = local(params, state.client)
    for t in range(5):
        state, params, pending, synchronous = both_rounds(state, params, pending, synchronous, jax.random.key(t + 1))
        assert float(state.clock) == t + 1  # every round takes the one latency
    bound = 5 * 4 * EPS32 * float(jnp.max(jnp.abs(targets)))  # 5 rounds of a 3-term sum of values below max|t|
    np.testing.assert_allclose(params, synchronous, rtol=0, atol=bound)


def test_fedbuff_dispatch_is_uniform_over_idle_clients():
    """Each of N clients is in the first M-subset with probability M / N (binomial over 2000 independent draws)."""
    num_clients, m, draws = 10, 4, 2000
    keys = jax.random.split(KEY, draws)
    clients = jax.jit(jax.vmap(lambda k: unreliable.fedbuff_init(k, num_clients, m, 1.0, 0.0).client))(keys)
    assert all(len(set(row)) == m for row in np.asarray(clients).tolist())
    counts = np.bincount(np.asarray(clients).reshape(-1), minlength=num_clients)
    for c in range(num_clients):
        assert_binomial(int(counts[c]), draws, m / num_clients, f"client {c} dispatched")


def numpy_fedbuff(initial: list[int], dispatches: list[list[int]], mean: np.ndarray, k: int, exponent: float):
    """Event-driven FedBuff with a heap of (finish, slot): the arrivals, staleness, weights and clock of each step.

    The dispatched clients are inputs (the JAX draw), checked here to be idle and distinct.
    """
    heap = [(float(mean[c]), slot, c, 0) for slot, c in enumerate(initial)]
    heapq.heapify(heap)
    version, steps = 0, []
    for new_clients in dispatches:
        arrived = [heapq.heappop(heap) for _ in range(k)]
        clock = arrived[-1][0]
        staleness = [version - v for _, _, _, v in arrived]
        training = {c for _, _, c, _ in heap}
        assert len(set(new_clients)) == k and not training & set(new_clients), "dispatched a busy client"
        version += 1
        for (_, slot, _, _), c in zip(arrived, new_clients):
            heapq.heappush(heap, (clock + float(mean[c]), slot, c, version))
        weights = [(1 + s) ** -exponent / k for s in staleness]
        steps.append(([a[1] for a in arrived], [a[2] for a in arrived], staleness, weights, clock))
    return steps


def test_fedbuff_matches_an_event_driven_simulation():
    """K < M with deterministic integer latencies (exact in float32, ties broken by the lower slot as in the heap)."""
    num_clients, m, k, exponent, rounds = 10, 6, 2, 0.5, 12
    mean = np.arange(num_clients) % 4 + 1.0  # 1..4 time units, slow and fast clients
    state = unreliable.fedbuff_init(KEY, num_clients, m, jnp.asarray(mean), 0.0)
    initial = np.asarray(state.client).tolist()
    step = jax.jit(lambda s, key: unreliable.fedbuff_step(s, key, num_clients, k, jnp.asarray(mean), 0.0, exponent))
    got = []
    for t in range(rounds):
        buffer, state = step(state, jax.random.key(100 + t))
        got.append((buffer, float(state.clock)))
    want = numpy_fedbuff(initial, [np.asarray(b.dispatched).tolist() for b, _ in got], mean, k, exponent)
    for (buffer, clock), (slots, clients, staleness, weights, want_clock) in zip(got, want):
        np.testing.assert_array_equal(buffer.slots, slots)
        np.testing.assert_array_equal(buffer.clients, clients)
        np.testing.assert_array_equal(buffer.staleness, staleness)
        np.testing.assert_allclose(buffer.weights, weights, rtol=4 * EPS32)
        assert clock == want_clock
    assert max(max(s) for _, _, s, _, _ in want) >= 2  # slow clients did arrive stale


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: unreliable.dropout_mask(KEY, jnp.arange(3), 1.5), r"dropout_mask: rate=1.5 must lie in \[0, 1\]"),
        (lambda: unreliable.straggler_steps(KEY, jnp.arange(3), jnp.ones(3), -0.1), r"straggler_steps: rate=-0.1"),
        (
            lambda: unreliable.compute_budgets(KEY, jnp.arange(3), 3, 2),
            r"low=3, high=2 must be integers with 1 <= low <= high",
        ),
        (lambda: unreliable.fedbuff_init(KEY, 4, 5, 1.0, 0.0), r"concurrency=5, num_clients=4 need"),
        (
            lambda: unreliable.fedbuff_step(unreliable.fedbuff_init(KEY, 6, 3, 1.0, 0.0), KEY, 6, 4, 1.0, 0.0),
            r"buffer_size=4, concurrency=3",
        ),
    ],
)
def test_bad_settings_are_refused_with_one_line(call, match):
    with pytest.raises(ValueError, match=match):
        call()

"""SCAFFOLD, FedNova and FedDyn against plain-numpy re-implementations of their papers' rounds.

The JAX side composes the `medfed_jax.drift` pieces into a round over a
linear least-squares model (a tree ``{'w', 'b'}``, local steps by optax);
the numpy side is written from each paper's algorithm in float64 with loops
over clients and steps, on the flattened parameters ``[w, b]``, and computes
its local steps itself. Two rounds, so the carried state (control variates,
FedDyn's ``g_k`` and ``h``) is exercised; one of four clients does not send.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from float32_bounds import EPS32

from medfed_jax import aggregators as agg
from medfed_jax import drift

N, ROWS, DIM = 4, 6, 3  # clients (the whole population is the cohort), rows per client, features
LR, ROUNDS = 0.1, 2
STEPS = np.array([3, 1, 4, 2])  # unequal local step counts
WEIGHTS = np.array([6.0, 3.0, 5.0, 2.0])  # sample-count weights (FedNova's p_i)
MASK = np.array([True, True, False, True])  # client 2 trains but its update does not arrive


def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, ROWS, DIM)) * 0.7
    y = rng.normal(size=(N, ROWS)) + np.arange(N)[:, None]  # non-IID: each client's own offset
    return x.astype(np.float32), y.astype(np.float32)


# --------------------------------------------------------------------------- the JAX round from the pieces


def jax_rounds(method, rule, steps, momentum=0.0, mask=MASK, rounds=ROUNDS):
    x, y = problem()
    params = {"w": jnp.zeros(DIM), "b": jnp.zeros(())}
    state = method.init(params, N)
    optimizer = optax.sgd(LR, momentum=momentum)
    weights, mask, steps = jnp.asarray(WEIGHTS), jnp.asarray(mask), jnp.asarray(steps)

    def loss(p, xi, yi):
        return 0.5 * jnp.mean((xi @ p["w"] + p["b"] - yi) ** 2)

    def one_round(params, state):
        def local(xi, yi, k, client):
            terms = method.local_terms(state.server, client)

            def step(t, carry):
                w, opt_state = carry
                g = drift.corrected_gradient(jax.grad(loss)(w, xi, yi), w, params, terms)
                updates, new_opt_state = optimizer.update(g, opt_state, w)
                new = (optax.apply_updates(w, updates), new_opt_state)
                return jax.tree.map(lambda a, b: jnp.where(t < k, a, b), new, carry)

            final, _ = jax.lax.fori_loop(0, int(STEPS.max()) + 2, step, (params, optimizer.init(params)))
            return jax.tree.map(jnp.subtract, final, params)

        deltas = jax.vmap(local)(jnp.asarray(x), jnp.asarray(y), steps, state.clients)
        after = jax.vmap(lambda c, d, k, m: method.client_update(state.server, c, d, k, m))(
            state.clients, deltas, steps, mask
        )
        cohort = drift.Cohort(deltas, steps, weights, mask, state.clients, after, N)
        (update, _, _), server = method.server_update(state.server, cohort, lambda u: rule.aggregate(u, weights, mask))
        return jax.tree.map(jnp.add, params, update), drift.DriftState(server, after)

    step = jax.jit(one_round)
    for _ in range(rounds):
        params, state = step(params, state)
    flat = lambda p: np.concatenate([np.asarray(p["w"]).reshape(-1), np.asarray(p["b"]).reshape(-1)])  # noqa: E731
    return flat(params), state, flat


# --------------------------------------------------------------------------- numpy, from the papers


def np_local(theta, xi, yi, steps, momentum=0.0, linear=0.0, prox=0.0):
    """``steps`` heavy-ball steps on 0.5 mean((X w + b - y)^2) + <linear, .> + prox/2 ||. - theta||^2."""
    features = np.concatenate([xi, np.ones((xi.shape[0], 1))], axis=1).astype(np.float64)
    start, w, u = theta.copy(), theta.copy(), np.zeros_like(theta)
    for _ in range(steps):
        g = features.T @ (features @ w - yi) / xi.shape[0] + linear + prox * (w - start)
        u = momentum * u + g
        w = w - LR * u
    return w


def np_fedavg(momentum=0.0):
    x, y = problem()
    theta, taking = np.zeros(DIM + 1), np.flatnonzero(MASK)
    for _ in range(ROUNDS):
        p = WEIGHTS[taking] / WEIGHTS[taking].sum()
        theta = theta + sum(
            p_i * (np_local(theta, x[i], y[i], STEPS[i], momentum) - theta) for p_i, i in zip(p, taking)
        )
    return theta


def np_scaffold():
    """Karimireddy et al. 2020, Algorithm 1, option II; x <- x + mean_S dy, c <- c + |S|/N mean_S dc."""
    x, y = problem()
    theta, c, c_i, taking = np.zeros(DIM + 1), np.zeros(DIM + 1), np.zeros((N, DIM + 1)), np.flatnonzero(MASK)
    for _ in range(ROUNDS):
        dy, dc = [], []
        for i in taking:
            y_i = np_local(theta, x[i], y[i], STEPS[i], linear=c - c_i[i])
            new_c = c_i[i] - c + (theta - y_i) / (STEPS[i] * LR)
            dy.append(y_i - theta)
            dc.append(new_c - c_i[i])
            c_i[i] = new_c
        theta = theta + np.mean(dy, axis=0)
        c = c + len(taking) / N * np.mean(dc, axis=0)
    return theta, c, c_i


def np_fednova(momentum):
    """Wang et al. 2020: d_i = (x - y_i) / ||a_i||_1 (authors' recursion for the norm); x <- - tau_eff sum p_i d_i."""
    x, y = problem()
    theta, taking = np.zeros(DIM + 1), np.flatnonzero(MASK)
    for _ in range(ROUNDS):
        p = WEIGHTS[taking] / WEIGHTS[taking].sum()
        norms, d = [], []
        for i in taking:
            counter = norm = 0.0
            for _ in range(STEPS[i]):  # JYWa/FedNova: counter <- rho counter + 1, norm += counter
                counter = momentum * counter + 1.0
                norm += counter
            norms.append(norm)
            d.append((theta - np_local(theta, x[i], y[i], STEPS[i], momentum)) / norm)
        tau_eff = float(np.dot(p, norms))
        theta = theta - tau_eff * sum(p_i * d_i for p_i, d_i in zip(p, d))
    return theta


def np_feddyn(alpha):
    """Acar et al. 2021, Algorithm 1 (m = N clients, P the ones that send)."""
    x, y = problem()
    theta, h, g, taking = np.zeros(DIM + 1), np.zeros(DIM + 1), np.zeros((N, DIM + 1)), np.flatnonzero(MASK)
    for _ in range(ROUNDS):
        models = []
        for k in taking:
            theta_k = np_local(theta, x[k], y[k], STEPS[k], linear=-g[k], prox=alpha)
            g[k] = g[k] - alpha * (theta_k - theta)
            models.append(theta_k)
        h = h - alpha / N * sum(m - theta for m in models)
        theta = np.mean(models, axis=0) - h / alpha
    return theta, h, g


def tolerance(reference: np.ndarray, amplification: float = 1.0) -> float:
    """Float32 error of the JAX rounds: each of ROUNDS x max(STEPS) steps rounds a length-(ROWS (DIM + 1))
    computation of values below max|reference| (the problem contracts, so errors add up), with 10 operations of
    headroom per step; the control variates divide parameter errors by K lr (``amplification``)."""
    per_step = (ROWS * (DIM + 1) + 10) * EPS32
    return ROUNDS * int(STEPS.max()) * per_step * amplification * max(1.0, float(np.max(np.abs(reference))))


def flat_tree(tree) -> np.ndarray:
    """``[N, DIM + 1]`` rows ``[w, b]`` of a per-client state tree."""
    return np.concatenate([np.asarray(tree["w"]), np.asarray(tree["b"])[:, None]], axis=1)


def test_fedavg_matches_numpy():
    theta, _, _ = jax_rounds(drift.none(), agg.weighted_mean(), STEPS)
    want = np_fedavg()
    np.testing.assert_allclose(theta, want, rtol=0, atol=tolerance(want))


def test_scaffold_matches_the_paper_round():
    theta, state, flat = jax_rounds(drift.scaffold(LR), agg.mean(), STEPS)
    want_theta, want_c, want_ci = np_scaffold()
    amplify = 1.0 / (LR * STEPS.min())
    np.testing.assert_allclose(theta, want_theta, rtol=0, atol=tolerance(want_theta))
    np.testing.assert_allclose(flat(state.server), want_c, rtol=0, atol=tolerance(want_c, amplify))
    np.testing.assert_allclose(flat_tree(state.clients), want_ci, rtol=0, atol=tolerance(want_ci, amplify))
    assert np.all(flat_tree(state.clients)[2] == 0)  # the client that did not send keeps its (zero) variate
    assert np.max(np.abs(want_c)) > 0.05  # the control variates are far from zero: the test can fail


@pytest.mark.parametrize("momentum", [0.0, 0.6])
def test_fednova_matches_the_paper_round(momentum):
    theta, _, _ = jax_rounds(drift.fednova(momentum), agg.weighted_mean(), STEPS, momentum)
    want = np_fednova(momentum)
    np.testing.assert_allclose(theta, want, rtol=0, atol=tolerance(want, 1.0 / (1.0 - momentum)))
    assert np.max(np.abs(want - np_fedavg(momentum))) > 0.05  # unequal steps: FedNova is not FedAvg here


def test_feddyn_matches_the_paper_round():
    alpha = 0.5
    theta, state, flat = jax_rounds(drift.feddyn(alpha), agg.mean(), STEPS)
    want_theta, want_h, want_g = np_feddyn(alpha)
    np.testing.assert_allclose(theta, want_theta, rtol=0, atol=tolerance(want_theta, 1.0 / alpha))
    np.testing.assert_allclose(flat(state.server), want_h, rtol=0, atol=tolerance(want_h, alpha))
    np.testing.assert_allclose(flat_tree(state.clients), want_g, rtol=0, atol=tolerance(want_g, alpha))
    assert np.max(np.abs(want_h)) > 0.05


def test_scaffold_with_zero_control_variates_and_one_step_is_fedavg():
    one = np.ones(N, int)
    scaffold, _, _ = jax_rounds(drift.scaffold(LR), agg.mean(), one, rounds=1)
    fedavg, _, _ = jax_rounds(drift.none(), agg.mean(), one, rounds=1)
    np.testing.assert_array_equal(scaffold, fedavg)  # c - c_i = 0 is added exactly


def test_fednova_with_equal_steps_is_fedavg():
    """Equal steps: every factor tau_eff / ||a||_1 is 1 to a few roundings (the weighted sum of N equal norms)."""
    equal = np.full(N, 3)
    fednova, _, _ = jax_rounds(drift.fednova(0.6), agg.weighted_mean(), equal, 0.6)
    fedavg, _, _ = jax_rounds(drift.none(), agg.weighted_mean(), equal, 0.6)
    bound = ROUNDS * (N + 4) * EPS32 * max(1.0, float(np.max(np.abs(fedavg))))
    np.testing.assert_allclose(fednova, fedavg, rtol=0, atol=bound)


def test_fednova_norm_is_the_authors_recursion():
    for rho in (0.0, 0.5, 0.9):
        for tau in (0, 1, 2, 7, 30):
            counter = norm = 0.0
            for _ in range(tau):
                counter = rho * counter + 1.0
                norm += counter
            assert float(drift.fednova_norm(tau, rho)) == pytest.approx(norm, rel=tau * 4 * EPS32, abs=0)


def test_fednova_scale_leaves_out_clients_without_steps_or_not_sending():
    scale = drift.fednova_scale(jnp.array([2.0, 0.0, 4.0, 1.0]), jnp.array([1.0, 1.0, 1.0, 2.0]), jnp.array(MASK))
    tau_eff = (1 * 2.0 + 1 * 0.0 + 2 * 1.0) / 4  # p = (1, 1, 2) / 4 over clients 0, 1, 3
    np.testing.assert_allclose(scale, [tau_eff / 2.0, 0.0, 0.0, tau_eff / 1.0], rtol=2 * EPS32)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: drift.scaffold(0.0), r"scaffold: lr=0.0 must be > 0"),
        (lambda: drift.feddyn(-1.0), r"feddyn: alpha=-1.0 must be > 0"),
        (lambda: drift.fednova(1.0), r"fednova: momentum=1.0 must lie in \[0, 1\)"),
    ],
)
def test_bad_settings_are_refused_with_one_line(build, match):
    with pytest.raises(ValueError, match=match):
        build()

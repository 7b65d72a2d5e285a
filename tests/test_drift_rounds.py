"""Drift corrections inside the engine's round (``drift`` config section): two engine rounds of SCAFFOLD,
FedNova and FedDyn against plain-numpy re-implementations of the papers' rounds, and the refusals.

The local problem is softmax regression trained by full-batch gradient descent (``local.sampling='fixed'``
with a batch larger than every client), so each client's local steps are exact in float64 numpy; the clients
do unequal step counts (compute budgets ``unreliable.min_local``), drawn by `unreliable.compute_budgets` on
the run's budget key (the wiring is what is under test here; the draw is tested in test_unreliable.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfed_jax import runner, server, unreliable
from tests.test_engine import engine_and_data, federation, small_config

SIZES, LR, NUM_CLASSES, STEPS, ALPHA = [3, 7, 5, 6, 2], 0.3, 3, 4, 0.1


def _softmax_gradient(w, b, x, y):
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = (p - np.eye(NUM_CLASSES)[y]) / len(y)
    return x.T @ residual, residual.sum(0)


def _local_gd(w, b, x, y, steps, correction=lambda w, b: (0.0, 0.0)):
    """``steps`` full-batch GD steps on the mean loss plus ``correction(w, b)`` added to the gradient."""
    w0, b0 = w.copy(), b.copy()
    for _ in range(steps):
        gw, gb = _softmax_gradient(w, b, x, y)
        cw, cb = correction(w, b)
        w, b = w - LR * (gw + cw), b - LR * (gb + cb)
    return w - w0, b - b0


def _correction(method, c, c_k, w_start, b_start):
    """The term a method adds to each local gradient: SCAFFOLD ``c - c_i``, FedDyn ``-g_k + alpha (w - x)``."""
    if method == "scaffold":
        return lambda w, b: (c[0] - c_k[0], c[1] - c_k[1])
    if method == "feddyn":
        return lambda w, b: (-c_k[0] + ALPHA * (w - w_start), -c_k[1] + ALPHA * (b - b_start))
    return lambda w, b: (0.0, 0.0)


def _numpy_rounds(method, w, b, x, y, steps, rounds):
    """The papers' rounds with every client taking part, weighted-mean aggregation by sample count, server lr 1."""
    n = np.asarray(SIZES, np.float64)
    p = n / n.sum()
    N = len(SIZES)
    c = (np.zeros_like(w), np.zeros_like(b))  # SCAFFOLD's c / FedDyn's h
    ci = [(np.zeros_like(w), np.zeros_like(b)) for _ in range(N)]  # c_i / g_k
    for _ in range(rounds):
        deltas = []
        for k in range(N):
            xk, yk = x[k, : SIZES[k]], y[k, : SIZES[k]]
            deltas.append(_local_gd(w, b, xk, yk, int(steps[k]), _correction(method, c, ci[k], w, b)))
        if method == "scaffold":
            new_ci = [tuple(ci[k][j] - c[j] - deltas[k][j] / (steps[k] * LR) for j in range(2)) for k in range(N)]
            c = tuple(c[j] + sum(new_ci[k][j] - ci[k][j] for k in range(N)) / N for j in range(2))
            ci = new_ci
            update = [sum(p[k] * deltas[k][j] for k in range(N)) for j in range(2)]
        elif method == "fednova":
            tau_eff = float(np.sum(p * steps))
            update = [sum(p[k] * deltas[k][j] * tau_eff / steps[k] for k in range(N)) for j in range(2)]
        else:  # feddyn
            ci = [tuple(ci[k][j] - ALPHA * deltas[k][j] for j in range(2)) for k in range(N)]
            c = tuple(c[j] - ALPHA * sum(deltas[k][j] for k in range(N)) / N for j in range(2))
            update = [sum(p[k] * deltas[k][j] for k in range(N)) - c[j] / ALPHA for j in range(2)]
        w, b = w + update[0], b + update[1]
    return w, b


def _config(method, **overrides):
    local = {"local.epochs": 0, "local.steps": STEPS, "local.sampling": "fixed", "local.batch_size": 8}
    local |= {"local.lr": LR, "model.name": "logistic", "unreliable.min_local": 1}
    return small_config(**(local | {"drift.method": method, "drift.feddyn_alpha": ALPHA} | overrides))


@pytest.mark.parametrize("method", ["scaffold", "fednova", "feddyn"])
def test_two_engine_rounds_match_numpy(method):
    dataset = federation(SIZES, num_classes=NUM_CLASSES)
    engine, train, _, knobs = engine_and_data(_config(method), dataset)
    state = engine.init(0, train, knobs)
    final, _ = engine.run_rounds(state, train, knobs, 2)
    budget_key = jax.random.fold_in(state.key, server.BUDGET_ROUND)
    steps = np.asarray(unreliable.compute_budgets(budget_key, jnp.arange(len(SIZES)), 1, STEPS))
    assert len(set(steps)) > 1  # unequal local work: FedNova's normalisation matters
    head = state.params["params"]["head"]
    w, b = (np.asarray(head[k], np.float64) for k in ("kernel", "bias"))
    x, y = np.asarray(dataset.train.x, np.float64), np.asarray(dataset.train.y)
    want_w, want_b = _numpy_rounds(method, w, b, x, y, steps.astype(np.float64), rounds=2)
    # float32 over 2 rounds x <= 4 GD steps of a 5x3 problem (|x| ~ 1, |update| < 1; SCAFFOLD divides by K lr
    # >= 0.3): rounding errors ~1e-6 relative, far below 1e-4
    np.testing.assert_allclose(final.params["params"]["head"]["kernel"], want_w, atol=1e-4)
    np.testing.assert_allclose(final.params["params"]["head"]["bias"], want_b, atol=1e-4)


def test_fednova_with_equal_steps_is_fedavg():
    dataset = federation(SIZES, num_classes=NUM_CLASSES)
    results = []
    for method in ("none", "fednova"):
        cfg = _config(method, **{"unreliable.min_local": 0})
        engine, train, _, knobs = engine_and_data(cfg, dataset)
        state, _ = engine.run_rounds(engine.init(0, train, knobs), train, knobs, 2)
        results.append(state.params)
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # tau_eff / tau_i = 1: one float32 rounding


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"drift.method": "fedsplit"}, "drift.method='fedsplit' is unknown"),
        ({"drift.method": "feddyn", "drift.feddyn_alpha": 0.0}, "drift.feddyn_alpha=0.0 must be > 0"),
        ({"drift.method": "scaffold", "local.optimizer": "momentum"}, "set local.optimizer='sgd'"),
        (
            {"drift.method": "scaffold", "privacy.mode": "local", "privacy.clip_norm": 1.0},
            "would leave the client unprivatised",
        ),
        ({"drift.method": "fednova", "local.optimizer": "adam"}, "derived for SGD and heavy-ball"),
        ({"drift.method": "fednova", "local.prox_mu": 0.01}, "set local.prox_mu=0"),
        ({"drift.method": "feddyn", "personalization.method": "ditto"}, "both own the local gradient"),
    ],
)
def test_unsound_drift_combinations_are_refused_before_compiling(overrides, needle, forbid_compile):
    cfg = small_config(**overrides)
    with pytest.raises(ValueError) as err:
        runner.prepare(cfg, federation([4] * 4))
    assert needle in str(err.value) and "\n" not in str(err.value)

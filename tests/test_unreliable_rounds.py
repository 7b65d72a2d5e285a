"""Unreliable clients inside the engine's round (``unreliable`` config section).

References: binomial probabilities from ``math.comb`` (chi-square, scipy),
full-batch gradient descent on softmax regression in plain numpy, the
hook-off round itself (an inert hook must not move a bit), the client
perturbation test (a dropped client leaves no trace).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfed_jax import config, runner, server, unreliable
from tests.test_cohorts import P_MIN, binomial_pmf, chi_square_p, influential_and_participants
from tests.test_engine import engine_and_data, federation, small_config


def test_participants_per_round_follow_binomial_of_the_dropout_rate():
    num_clients, dropout, rounds = 10, 0.3, 300
    cfg = small_config(**{"model.name": "logistic", "unreliable.dropout": dropout})
    engine, train, _, knobs = engine_and_data(cfg, federation([4] * num_clients))
    _, metrics = engine.run_rounds(engine.init(0, train, knobs), train, knobs, rounds)
    counts = np.asarray(metrics["participants"])
    assert chi_square_p(np.bincount(counts, minlength=num_clients + 1), binomial_pmf(num_clients, 1 - dropout)) > P_MIN


def test_a_dropped_client_leaves_no_trace():
    """A client changes the round iff it sent (client-perturbation test), under a sampled cohort with dropout."""
    cfg = small_config(cohort_size=6, **{"unreliable.dropout": 0.4})
    influential, participants = influential_and_participants(cfg, num_clients=8)
    assert 0 < participants < 6
    assert influential == participants


@pytest.mark.parametrize(
    "local", [{"local.epochs": 2}, {"local.epochs": 0, "local.steps": 3, "local.sampling": "fixed"}]
)
def test_an_inert_hook_is_bit_identical_to_the_reliable_round(local):
    """Budgets all equal to the configured work (min_local = it), no stragglers, no dropout: the hook runs and
    must give the hook-off round bit for bit (its step counts are `client_steps`', its mask all True)."""
    work = local.get("local.steps") or local["local.epochs"]
    dataset = federation([3, 9, 6, 1])
    base = small_config(**local)
    inert = small_config(**local, **{"unreliable.min_local": work})
    results = []
    for cfg in (base, inert):
        engine, train, _, knobs = engine_and_data(cfg, dataset)
        state, metrics = engine.run_rounds(engine.init(0, train, knobs), train, knobs, 3)
        results.append((state.params, metrics["train_loss"]))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _softmax_gd_delta(w, b, x, y, steps, lr, num_classes):
    """Full-batch gradient descent on mean softmax cross-entropy, in float64 numpy: ``steps`` steps."""
    w0, b0 = w.copy(), b.copy()
    onehot = np.eye(num_classes)[y]
    for _ in range(steps):
        logits = x @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w = w - lr * x.T @ (p - onehot) / len(y)
        b = b - lr * (p - onehot).mean(0)
    return w - w0, b - b0


def test_round_with_budgets_stragglers_and_dropout_matches_numpy():
    """One round: every sent client's full-batch GD for its own step count, averaged by sample count (numpy);
    the step counts and senders from `unreliable.cohort_work` on the round's keys (the wiring under test)."""
    sizes, lr, num_classes = [3, 7, 5, 6, 2, 4], 0.3, 3
    overrides = {"local.epochs": 0, "local.steps": 5, "local.sampling": "fixed", "local.batch_size": 8}
    overrides |= {"local.lr": lr, "model.name": "logistic"}
    overrides |= {"unreliable.dropout": 0.3, "unreliable.straggler_rate": 0.5, "unreliable.min_local": 2}
    cfg = small_config(**overrides)
    dataset = federation(sizes, num_classes=num_classes)
    engine, train, _, knobs = engine_and_data(cfg, dataset)
    state = engine.init(0, train, knobs)
    new_state, metrics = engine.round_step(state, train, knobs)

    round_key = jax.random.fold_in(state.key, 0)
    keys = unreliable.CohortWork(
        jax.random.fold_in(round_key, server._DROPOUT),
        jax.random.fold_in(round_key, server._STRAGGLE),
        jax.random.fold_in(state.key, server.BUDGET_ROUND),
    )
    settings = server.round_spec(config.split(cfg).static, engine.context, (), None).unreliable
    sent, steps = map(np.asarray, unreliable.cohort_work(settings, keys, jnp.arange(len(sizes)), train.count))
    assert 0 < sent.sum() < len(sizes) and len(set(steps[sent])) > 1  # the draw exercises both effects
    assert int(metrics["participants"]) == sent.sum()

    w, b = (np.asarray(state.params["params"]["head"][k], np.float64) for k in ("kernel", "bias"))
    x, y = np.asarray(dataset.train.x, np.float64), np.asarray(dataset.train.y)
    total_w, total_b, weight = np.zeros_like(w), np.zeros_like(b), 0
    for c, n in enumerate(sizes):
        if sent[c]:
            dw, db = _softmax_gd_delta(w, b, x[c, :n], y[c, :n], int(steps[c]), lr, num_classes)
            total_w, total_b, weight = total_w + n * dw, total_b + n * db, weight + n
    # float32 rounding over <= 5 steps of a 5x3 problem with |x| ~ 1: errors ~1e-6, far below the 1e-4 bound
    np.testing.assert_allclose(new_state.params["params"]["head"]["kernel"], w + total_w / weight, atol=1e-4)
    np.testing.assert_allclose(new_state.params["params"]["head"]["bias"], b + total_b / weight, atol=1e-4)


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("unreliable.dropout", 1.0, "unreliable.dropout=1.0 must lie in [0, 1)"),
        ("unreliable.dropout", -0.1, "unreliable.dropout=-0.1 must lie in [0, 1)"),
        ("unreliable.straggler_rate", 1.5, "unreliable.straggler_rate=1.5 must lie in [0, 1]"),
        ("unreliable.min_local", 3, "unreliable.min_local=3 must lie in [0, 1]"),
    ],
)
def test_bad_unreliable_settings_are_refused_before_compiling(field, value, needle, forbid_compile):
    cfg = small_config(**{field: value})
    with pytest.raises(ValueError) as err:
        runner.prepare(cfg, federation([4] * 4))
    assert needle in str(err.value) and "\n" not in str(err.value)

"""FedBuff as an engine server mode (``asynchronous.mode='fedbuff'``): against synchronous FedAvg, against a
plain-numpy replay of the server steps, its metrics, its composition with attacks and compression, and the
refusals.

The numpy replay takes the engine's random choices (which clients are dispatched, their latencies: the
in-flight state before each step) as given, since `unreliable.fedbuff_step`'s draws are tested on their own
(test_unreliable.py), and recomputes everything else: which slots arrive, their staleness and discount, which
model each update was trained on, the aggregate and the new model. The local problem is softmax regression
trained by full-batch gradient descent, exact in float64 numpy (test_drift_rounds.py).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from medfed_jax import config as config_lib
from medfed_jax import runner
from tests.test_drift_rounds import _local_gd
from tests.test_engine import engine_and_data, federation, small_config

SIZES, LR, NUM_CLASSES, STEPS = [3, 7, 5, 6, 2, 4], 0.3, 3, 2


def _config(**overrides):
    local = {"local.epochs": 0, "local.steps": STEPS, "local.sampling": "fixed", "local.batch_size": 8}
    return small_config(**(local | {"local.lr": LR, "model.name": "logistic"} | overrides))


def _fedbuff(**overrides):
    return _config(**({"asynchronous.mode": "fedbuff"} | overrides))


def _head(params):
    head = params["params"]["head"]
    return tuple(np.asarray(head[k], np.float64) for k in ("kernel", "bias"))


def test_buffer_of_the_whole_population_with_zero_spread_is_synchronous_fedavg():
    dataset = federation(SIZES, num_classes=NUM_CLASSES)
    finals = []
    for cfg in (_config(), _fedbuff(**{"asynchronous.latency_spread": 0.0, "asynchronous.client_latency_spread": 0.0})):
        engine, train, _, knobs = engine_and_data(cfg, dataset)
        state, metrics = engine.run_rounds(engine.init(0, train, knobs), train, knobs, 3)
        finals.append(state.params)
    np.testing.assert_array_equal(metrics["staleness"], 0.0)
    np.testing.assert_allclose(metrics["virtual_time"], [1.0, 2.0, 3.0])  # every median is exp(0) = 1
    for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])):
        # the same clients, keys and models; only the order of the weighted sum over clients differs (float32)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _numpy_server_steps(engine, state, train, knobs, dataset, k, exponent, steps, flipped=()):
    """Run ``steps`` engine server steps one by one and replay each in float64 numpy (module docstring).

    Returns the engine's final state, its metrics per step and the numpy model after each step.
    """
    x, y = np.asarray(dataset.train.x, np.float64), np.asarray(dataset.train.y)
    sizes = np.asarray(SIZES, np.float64)
    models = [_head(state.params)]  # numpy's model of each server version

    def delta(client, version):
        n = SIZES[client]
        return _local_gd(*models[version], x[client, :n], y[client, :n], STEPS)

    flight = state.asynchronous.in_flight
    pending = {s: delta(int(c), 0) for s, c in enumerate(np.asarray(flight.client))}
    metrics_per_step = []
    for _ in range(steps):
        flight = state.asynchronous.in_flight
        finish, version = np.asarray(flight.finish), np.asarray(flight.version)
        clients, server_version = np.asarray(flight.client), int(flight.server_version)
        arrived = sorted(range(len(finish)), key=lambda s: (finish[s], s))[:k]
        staleness = np.array([server_version - version[s] for s in arrived], np.float64)
        discount = (1 + staleness) ** -exponent
        sign = np.array([-1.0 if clients[s] in flipped else 1.0 for s in arrived])
        n = sizes[clients[arrived]]
        update = [
            sum(n[i] * sign[i] * discount[i] * pending[s][j] for i, s in enumerate(arrived)) / n.sum() for j in (0, 1)
        ]
        models.append(tuple(m + u for m, u in zip(models[-1], update)))
        state, metrics = engine.round_step(state, train, knobs)
        metrics_per_step.append(metrics)
        np.testing.assert_allclose(metrics["staleness"], staleness.mean(), rtol=1e-6)
        assert float(metrics["virtual_time"]) == pytest.approx(max(finish[s] for s in arrived), rel=1e-6)
        now = state.asynchronous.in_flight
        busy = {int(clients[s]) for s in range(len(clients)) if s not in arrived}
        for s in arrived:  # the refilled slots hold idle clients, dispatched on the new version
            assert int(now.client[s]) not in busy and int(now.version[s]) == server_version + 1
            assert float(now.finish[s]) > float(metrics["virtual_time"])
            pending[s] = delta(int(now.client[s]), server_version + 1)
        assert len({int(now.client[s]) for s in arrived}) == k
    return state, metrics_per_step, models


@pytest.mark.parametrize("exponent", [0.5, 1.0])
def test_server_steps_match_a_numpy_replay(exponent):
    dataset = federation(SIZES, num_classes=NUM_CLASSES)
    cfg = _fedbuff(cohort_size=4, **{"asynchronous.buffer_size": 2, "asynchronous.staleness_exponent": exponent})
    engine, train, _, knobs = engine_and_data(cfg, dataset)
    state = engine.init(0, train, knobs)
    final, metrics, models = _numpy_server_steps(engine, state, train, knobs, dataset, 2, exponent, steps=6)
    assert max(float(m["staleness"]) for m in metrics) >= 1  # stale updates were discounted
    w, b = _head(final.params)
    # float32 over 6 steps of <= 2 GD steps on a 5x3 problem (|x| ~ 1, |update| < 1): errors ~1e-6, far below 1e-4
    np.testing.assert_allclose(w, models[-1][0], atol=1e-4)
    np.testing.assert_allclose(b, models[-1][1], atol=1e-4)


def test_sign_flipping_hits_the_arrivals_of_malicious_clients():
    dataset = federation(SIZES, num_classes=NUM_CLASSES)
    flipped = (1, 4)
    cfg = _fedbuff(
        cohort_size=4, **{"asynchronous.buffer_size": 2, "attack.name": "sign_flip", "attack.clients": flipped}
    )
    engine, train, _, knobs = engine_and_data(cfg, dataset)
    final, _, models = _numpy_server_steps(
        engine, engine.init(0, train, knobs), train, knobs, dataset, 2, 0.5, 5, flipped
    )
    np.testing.assert_allclose(_head(final.params)[0], models[-1][0], atol=1e-4)


def test_compressed_uploads_are_counted_when_they_arrive():
    dataset = federation(SIZES, num_classes=NUM_CLASSES)
    cfg = _fedbuff(cohort_size=4, **{"asynchronous.buffer_size": 3, "compression.method": "bfloat16"})
    engine, train, _, knobs = engine_and_data(cfg, dataset)
    _, metrics = engine.run_rounds(engine.init(0, train, knobs), train, knobs, 3)
    coordinates = 5 * NUM_CLASSES + NUM_CLASSES  # the logistic model's kernel and bias
    np.testing.assert_array_equal(metrics["uploaded_bytes"], 3 * 2 * coordinates)  # K messages of 2 bytes each


def test_a_fedbuff_run_with_its_baselines():
    cfg = _fedbuff(cohort_size=3, rounds=5, eval_every=2, baselines=("local_only", "pooled"))
    cfg.asynchronous.buffer_size = 2
    results = runner.run(cfg, federation(SIZES, num_classes=NUM_CLASSES), log=None)
    history = results["federated"]
    assert [row["round"] for row in history] == [2, 4, 5]
    assert {"staleness", "virtual_time", "global_pooled_accuracy"} <= set(history[-1])
    assert set(results) == {"federated", "local_only", "pooled"}


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"asynchronous.mode": "buffered"}, "asynchronous.mode='buffered' is unknown"),
        ({"asynchronous.buffer_size": 5, "cohort_size": 4}, "asynchronous.buffer_size=5 must lie in [1, 4]"),
        ({"asynchronous.latency_spread": -1.0}, "asynchronous.latency_spread=-1.0 must be a finite number >= 0"),
        ({"privacy.mode": "central", "privacy.noise_multiplier": 1.0}, "with privacy.mode='central'"),
        ({"cohort_sampling": "poisson", "sampling_rate": 0.5}, "with cohort_sampling='poisson'"),
        ({"unreliable.dropout": 0.3}, "latency is FedBuff's model of slow clients"),
        ({"drift.method": "scaffold"}, "with drift.method='scaffold'"),
        ({"personalization.method": "ditto"}, "with personalization.method='ditto'"),
        ({"aggregator.name": "krum", "cohort_size": 6, "asynchronous.buffer_size": 2}, "aggregator"),
    ],
)
def test_refusals_name_the_field(overrides, needle):
    cfg = _fedbuff(**overrides)
    with pytest.raises(ValueError, match=None) as raised:
        runner.prepare(cfg, federation(SIZES, num_classes=NUM_CLASSES))
    assert needle in str(raised.value), str(raised.value)


def test_synchronous_mode_is_the_default_and_costs_nothing():
    assert config_lib.default_config().asynchronous.mode == "synchronous"
    dataset = federation(SIZES, num_classes=NUM_CLASSES)
    engine, train, _, knobs = engine_and_data(_config(), dataset)
    assert engine.init(0, train, knobs).asynchronous == ()


def test_a_killed_fedbuff_run_resumes_its_clients_in_flight(tmp_path):
    cfg = _fedbuff(cohort_size=4, rounds=7, eval_every=5, **{"asynchronous.buffer_size": 2})
    prepared = runner.prepare(cfg, federation(SIZES, num_classes=NUM_CLASSES))
    checkpoint = str(tmp_path / "checkpoint.npz")

    def killed_after_first_chunk(line):
        if "/7" in line:
            raise KeyboardInterrupt

    def run(log, path=checkpoint):
        return runner.train_evaluations("federated", prepared, [0], False, path, log)

    with pytest.raises(KeyboardInterrupt):
        run(killed_after_first_chunk)
    resumed = run(lambda line: None)
    straight = run(lambda line: None, str(tmp_path / "straight.npz"))
    assert [e.round for e in resumed] == [5, 7]
    for key in ("global_pooled_loss", "virtual_time", "staleness", "update_norm"):  # the same program: bit for bit
        np.testing.assert_array_equal(resumed[-1].metrics[key], straight[-1].metrics[key])

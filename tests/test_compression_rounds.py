"""Compressed uploads inside the engine's round (``compression`` config section).

References: two rounds of full-batch softmax-regression GD with top-k + error feedback re-implemented in
numpy (`tests.test_drift_rounds`' local solver), the closed-form message sizes, the uncompressed round
(float32 transport must not move a bit), and the refusals.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from medfed_jax import runner
from tests.test_drift_rounds import LR, NUM_CLASSES, SIZES, _local_gd
from tests.test_engine import engine_and_data, federation, small_config

FRACTION, FEATURES = 0.34, 5


def _config(**overrides):
    local = {"local.epochs": 0, "local.steps": 3, "local.sampling": "fixed", "local.batch_size": 8}
    local |= {"local.lr": LR, "model.name": "logistic"}
    return small_config(**(local | overrides))


def _top_k(v, fraction):
    """The ceil(fraction d) largest-magnitude coordinates of v (ties: lower index), the rest zero."""
    flat = v.ravel()
    k = math.ceil(fraction * flat.size)
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(v.shape)


def _message_bytes(fraction):
    """top-k's bytes per client: k (32 + ceil(log2 d)) bits per leaf (kernel 5x3, bias 3), rounded up to bytes."""
    sizes = (FEATURES * NUM_CLASSES, NUM_CLASSES)
    bits = sum(math.ceil(fraction * d) * (32 + math.ceil(math.log2(d))) for d in sizes)
    return math.ceil(bits / 8)


def test_two_rounds_of_top_k_with_error_feedback_match_numpy():
    cfg = _config(**{"compression.method": "top_k", "compression.fraction": FRACTION})
    cfg.compression.error_feedback = True
    dataset = federation(SIZES, num_classes=NUM_CLASSES)
    engine, train, _, knobs = engine_and_data(cfg, dataset)
    state = engine.init(0, train, knobs)
    final, metrics = engine.run_rounds(state, train, knobs, 2)

    head = state.params["params"]["head"]
    w, b = (np.asarray(head[k], np.float64) for k in ("kernel", "bias"))
    x, y = np.asarray(dataset.train.x, np.float64), np.asarray(dataset.train.y)
    p = np.asarray(SIZES, np.float64) / sum(SIZES)
    residual = [(np.zeros_like(w), np.zeros_like(b)) for _ in SIZES]
    for _ in range(2):
        total_w, total_b = np.zeros_like(w), np.zeros_like(b)
        for k, n in enumerate(SIZES):
            dw, db = _local_gd(w, b, x[k, :n], y[k, :n], 3)
            cw, cb = dw + residual[k][0], db + residual[k][1]
            sw, sb = _top_k(cw, FRACTION), _top_k(cb, FRACTION)
            residual[k] = (cw - sw, cb - sb)
            total_w, total_b = total_w + p[k] * sw, total_b + p[k] * sb
        w, b = w + total_w, b + total_b
    # float32 rounding over 2 rounds x 3 GD steps of a 5x3 problem: ~1e-6; a top-k choice flipped by rounding
    # needs two magnitudes within ~1e-6 of each other (this seed's data has none)
    np.testing.assert_allclose(final.params["params"]["head"]["kernel"], w, atol=1e-4)
    np.testing.assert_allclose(final.params["params"]["head"]["bias"], b, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(metrics["uploaded_bytes"]), [len(SIZES) * _message_bytes(FRACTION)] * 2)
    assert np.any(np.abs(np.asarray(final.compression[0]["params"]["head"]["kernel"])) > 0)  # residuals carried


def test_uploaded_bytes_count_only_the_clients_that_sent():
    """float32 transport: 4 bytes per coordinate (18) per sender; dropped clients upload nothing."""
    cfg = _config(**{"compression.method": "float32", "unreliable.dropout": 0.4})
    engine, train, _, knobs = engine_and_data(cfg, federation(SIZES, num_classes=NUM_CLASSES))
    _, metrics = engine.run_rounds(engine.init(0, train, knobs), train, knobs, 20)
    participants = np.asarray(metrics["participants"])
    assert 0 < participants.min() < participants.max() <= len(SIZES)
    np.testing.assert_array_equal(np.asarray(metrics["uploaded_bytes"]), participants * 4 * 18)


def test_scaffold_also_uploads_its_control_variate_change_in_float32():
    """SCAFFOLD's client sends c_i+ - c_i beside its update (Karimireddy et al. 2020, Algorithm 1 line 13): with
    bfloat16 updates that is 2 + 4 bytes per coordinate (18) per client."""
    cfg = _config(**{"compression.method": "bfloat16", "drift.method": "scaffold"})
    engine, train, _, knobs = engine_and_data(cfg, federation(SIZES, num_classes=NUM_CLASSES))
    _, metrics = engine.run_rounds(engine.init(0, train, knobs), train, knobs, 2)
    np.testing.assert_array_equal(np.asarray(metrics["uploaded_bytes"]), [len(SIZES) * (2 + 4) * 18] * 2)


def test_float32_transport_is_bit_identical_to_no_compression():
    dataset = federation(SIZES, num_classes=NUM_CLASSES)
    results = []
    for method in ("none", "float32"):
        engine, train, _, knobs = engine_and_data(_config(**{"compression.method": method}), dataset)
        state, metrics = engine.run_rounds(engine.init(0, train, knobs), train, knobs, 2)
        results.append(state.params)
        assert ("uploaded_bytes" in metrics) == (method != "none")
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"compression.method": "zip"}, "compression.method='zip' is unknown"),
        ({"compression.method": "qsgd", "compression.bits": 1}, "compression.bits=1 must lie in [2, 16]"),
        ({"compression.method": "qsgd", "compression.norm": "l1"}, "compression.norm='l1' is unknown"),
        ({"compression.method": "top_k", "compression.fraction": 0.0}, "compression.fraction=0.0 must lie in (0, 1]"),
        ({"compression.error_feedback": True}, "choose a compressor"),
    ],
)
def test_bad_compression_settings_are_refused_before_compiling(overrides, needle, forbid_compile):
    cfg = small_config(**overrides)
    with pytest.raises(ValueError) as err:
        runner.prepare(cfg, federation([4] * 4))
    assert needle in str(err.value) and "\n" not in str(err.value)

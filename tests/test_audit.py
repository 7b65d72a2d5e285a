"""Tests of the privacy audit: attack metrics against numpy references, inversion with and without noise."""

from __future__ import annotations

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfed_jax import audit
from medfed_jax.models import make_model


def test_membership_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    members = np.round(rng.exponential(0.5, size=40), 1)  # rounding makes ties
    nonmembers = np.round(rng.exponential(1.0, size=30), 1)
    pairs = members[:, None] - nonmembers[None, :]
    expected = np.mean((pairs < 0) + 0.5 * (pairs == 0))
    assert audit.membership_auc(members, nonmembers) == pytest.approx(expected, abs=1e-12)
    assert audit.membership_auc(np.zeros(5), np.ones(5)) == 1.0
    assert audit.membership_auc(np.ones(5), np.ones(5)) == 0.5


def test_example_losses_match_numpy_cross_entropy():
    model = make_model("logistic", 3)
    x = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 2, 1, 0], np.int32)
    params = model.init(jax.random.key(0), jnp.asarray(x[:1]))
    head = params["params"]["head"]
    logits = x.astype(np.float64) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    log_z = np.log(np.exp(logits).sum(1))
    expected = log_z - logits[np.arange(6), y]
    np.testing.assert_allclose(audit.example_losses(model.apply, params, x, y), expected, rtol=1e-5)


def test_label_inference_from_the_output_bias_gradient():
    x_all, y_all = audit.load_digits_images()
    index = audit.distinct_label_batch(y_all, 4, np.random.default_rng(2))
    model = make_model("mlp", 10, (16,))
    params = model.init(jax.random.key(1), jnp.zeros((1, 64)))
    grads = jax.jit(audit.batch_gradient, static_argnums=0)(model.apply, params, x_all[index], y_all[index])
    labels = audit.infer_labels(grads["params"]["head"]["bias"], 4)
    assert sorted(np.asarray(labels).tolist()) == sorted(y_all[index].tolist())


def test_reconstruction_error_ignores_order_and_gives_psnr():
    true = np.random.default_rng(3).uniform(size=(3, 64))
    assert audit.reconstruction_error(true[[2, 0, 1]], true)[0] == 0.0
    mse, psnr = audit.reconstruction_error(np.clip(true[[1, 2, 0]] + 0.1, None, None), true)
    assert mse == pytest.approx(0.01) and psnr == pytest.approx(20.0)


def test_gradient_inversion_cli_recovers_without_noise_fails_with_large_noise(tmp_path):
    out = str(tmp_path)
    argv = ["--out", out, "--noise", "0", "1", "--trials", "1", "--inversion_steps", "600"]
    argv += ["--membership_steps", "5", "--epsilons", "4"]
    results = audit.main(argv)
    assert sorted(os.listdir(out)) == ["inversion.csv", "inversion.png", "membership.csv"]
    with open(os.path.join(out, "inversion.csv")) as f:
        clean, noisy = ({k: float(v) for k, v in row.items()} for row in csv.DictReader(f))
    # Stated error: without DP a batch of 4 digits comes back to MSE < 1e-3 (PSNR > 30 dB) ...
    assert clean["mse"] < 1e-3 and clean["psnr_db"] > 30 and clean["label_recovery_rate"] == 1
    # ... and with noise std equal to the update norm, worse than guessing the mean digit (MSE ~0.13).
    assert noisy["mse"] > 0.1 and noisy["psnr_db"] < 10
    assert np.isinf(clean["epsilon_one_release"]) and 0 < noisy["epsilon_one_release"] < 20
    membership = results["membership"]
    assert len(membership) == 2 and membership[1]["epsilon"] <= 4.0
    assert all(0 <= row["membership_auc"] <= 1 for row in membership)

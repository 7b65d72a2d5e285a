"""Tests of the privacy audit: attack metrics against numpy references, inversion with and without noise."""

from __future__ import annotations

import csv
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfed_jax import audit, privacy
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


# --------------------------------------------------------------------------- the federated release


def test_record_pool_and_included_block_against_numpy():
    from tests.test_engine import federation

    dataset = federation([3, 5], test_size=2)
    pool = audit.record_pool(dataset)
    np.testing.assert_array_equal(pool.count, [5, 7])
    np.testing.assert_array_equal(pool.x[1, 5:7], np.asarray(dataset.test.x)[1, :2])
    member = np.zeros(pool.y.shape, bool)
    member[0, [1, 4]], member[1, [0, 6]] = True, True
    block = audit.included_block(pool, jnp.asarray(member))
    np.testing.assert_array_equal(block.count, [2, 2])
    np.testing.assert_array_equal(np.asarray(block.x)[0, :2], pool.x[0, [1, 4]])
    np.testing.assert_array_equal(np.asarray(block.y)[1, :2], pool.y[1, [0, 6]])
    assert np.all(np.asarray(block.x)[:, 2:] == 0)


def test_logit_confidence_and_lira_against_numpy():
    rng = np.random.default_rng(3)
    logits, y = rng.normal(size=(5, 4)), np.array([0, 3, 1, 1, 2])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = np.log(p[np.arange(5), y]) - np.log1p(-p[np.arange(5), y])
    np.testing.assert_allclose(audit.logit_confidence(jnp.asarray(logits), jnp.asarray(y)), expected, rtol=1e-5)
    shadows, member = rng.normal(size=(6, 5)), rng.random((6, 5)) < 0.5
    member[0], member[1] = True, False  # every record has an in and an out shadow
    target = rng.normal(size=5)
    mu_in = np.array([shadows[member[:, j], j].mean() for j in range(5)])
    mu_out = np.array([shadows[~member[:, j], j].mean() for j in range(5)])
    s_in = np.sqrt(np.sum((shadows - mu_in) ** 2 * member) / (member.sum() - 1))
    s_out = np.sqrt(np.sum((shadows - mu_out) ** 2 * ~member) / ((~member).sum() - 1))
    expected = stats_logpdf(target, mu_in, s_in) - stats_logpdf(target, mu_out, s_out)
    got = audit.lira_scores(jnp.asarray(target), jnp.asarray(shadows), jnp.asarray(member))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def stats_logpdf(x, mean, std):
    from scipy import stats

    return stats.norm.logpdf(x, mean, std)


def test_federated_audit_lower_bound_never_exceeds_the_accounted_epsilon():
    """Random labels force memorisation: the attack finds a positive lower bound without DP, and under DP
    it stays below the accounted record-level epsilon."""
    from medfed_jax import config as config_lib
    from tests.test_engine import federation

    dataset = federation([40, 40], num_features=16, num_classes=4, test_size=40, seed=5)
    shuffled = np.random.default_rng(0).integers(0, 4, size=np.asarray(dataset.train.y).shape)
    dataset = dataclasses.replace(dataset, train=dataset.train._replace(y=shuffled.astype(np.int32)))
    cfg = config_lib.default_config()
    cfg.model.widths, cfg.rounds, cfg.eval_every, cfg.baselines = (128,), 20, 20, ()
    cfg.local.epochs, cfg.local.batch_size, cfg.local.lr = 2, 8, 0.2
    cfg.privacy.delta = 1e-5  # the one-run bound's delta term is 2 m delta: small beside the significance
    _, leaky = audit.federated_audit(cfg, dataset, shadows=4)
    assert leaky["lira_auc"] > 0.8 and leaky["empirical_epsilon_lower_bound"] > 0.5
    cfg.privacy.mode, cfg.privacy.clip_norm, cfg.aggregator.name = "central", 1.0, "mean"
    cfg.privacy.noise_multiplier = privacy.calibrate_noise(2.0, 1e-5, 1.0, cfg.rounds, sampling="fixed", tol=0.01)
    _, private = audit.federated_audit(cfg, dataset, shadows=4)
    assert private["accounted_record_epsilon"] <= 2.0
    assert private["empirical_epsilon_lower_bound"] <= private["accounted_record_epsilon"]


def test_engine_round_upload_is_the_clients_local_sgd_steps():
    """The attacked upload is the engine's real round: ``local_steps`` of full-batch SGD (a plain-JAX loop here)."""
    batch, steps, lr = 4, 3, 0.1
    round_fn = audit.engine_round(16, batch, steps, lr, seed=0)
    x_all, y_all = audit.load_digits_images()
    x, y = jnp.asarray(x_all[10:14]), jnp.asarray(y_all[10:14])
    params, upload = round_fn(x, y, jnp.float32(0.0))
    model = make_model("mlp", 10, (16,))
    reference = params
    for _ in range(steps):
        grads = audit.batch_gradient(model.apply, reference, x, y)
        reference = jax.tree.map(lambda p, g: p - lr * g, reference, grads)
    expected = jax.tree.map(jnp.subtract, params, reference)
    simulated = audit.simulated_upload(model.apply, params, x, y, steps, lr)  # what the attack unrolls
    # |params| < 1: each step's update rounds at <= eps32 ~ 1.2e-7 in either program, which may fuse the
    # matmuls differently (a few ulps per step); 1e-6 absolute is ~8 ulps per step over 3 steps.
    for got, modelled, want in zip(*(jax.tree.leaves(t) for t in (upload, simulated, expected))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(modelled, want, rtol=1e-4, atol=1e-6)
    _, noised = round_fn(x, y, jnp.float32(1.0))  # sigma = 1: noise std per coordinate = ||update||
    noise = privacy.global_norm(jax.tree.map(jnp.subtract, noised, upload))
    dim = sum(leaf.size for leaf in jax.tree.leaves(upload))
    ratio = float(noise / privacy.global_norm(upload)) / np.sqrt(dim)
    assert abs(ratio - 1.0) < 5 / np.sqrt(2 * dim)  # ||N(0, s^2 I_d)|| / (s sqrt(d)): mean 1, std ~ 1/sqrt(2d)

"""Tests of the DP mechanisms (against numpy references) and of the accounting (against dp_accounting)."""

from __future__ import annotations

import logging

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import pld, rdp
from float32_bounds import assert_within, sum_bound

from medfed_jax import config as config_lib
from medfed_jax import privacy

logging.getLogger("absl").setLevel(logging.ERROR)  # RDP order warnings


def _tree(rng, lead=()):
    """A two-leaf pytree with an optional leading axis."""
    return {
        "w": rng.normal(size=(*lead, 3, 4)).astype(np.float32),
        "b": rng.normal(size=(*lead, 5)).astype(np.float32),
    }


def _flat_rows(tree):
    """``[N, P]`` numpy rows of a pytree with a leading axis (leaf order of jax.tree.leaves)."""
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)], axis=1)


def _numpy_clip(rows, clip):
    norms = np.linalg.norm(rows.astype(np.float64), axis=1, keepdims=True)
    return rows * np.minimum(1.0, clip / norms)


def _knobs(sigma, clip, **extra):
    values = {"noise_multiplier": sigma, "clip_norm": clip, **extra}
    defaults = privacy.default_config()
    return privacy.PrivacyHParams(*(jnp.float32(values.get(f, defaults[f])) for f in privacy.PrivacyHParams._fields))


def _cfg(**privacy_fields):
    cfg = config_lib.default_config()
    cfg.privacy.update(privacy_fields)
    return cfg


CONTEXT = config_lib.BuildContext(num_clients=8, cohort_size=8, num_classes=2, feature_shape=(4,))


# --------------------------------------------------------------------------- clipping


def test_clipped_norms_at_most_clip_and_small_updates_untouched():
    rng = np.random.default_rng(0)
    updates = _tree(rng, (16,))
    scale = np.geomspace(0.05, 20, 16).astype(np.float32)
    updates = jax.tree.map(lambda u: u * scale.reshape(-1, *([1] * (u.ndim - 1))), updates)
    clip = 2.0
    clipped, norms = jax.jit(jax.vmap(privacy.clip_update, in_axes=(0, None)))(updates, clip)
    rows, out = _flat_rows(updates), _flat_rows(clipped)
    true_norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    assert (true_norms < clip).sum() >= 4 and (true_norms > clip).sum() >= 4
    np.testing.assert_allclose(norms, true_norms, rtol=1e-5)
    assert np.all(np.linalg.norm(out, axis=1) <= clip * (1 + 1e-6))
    small = true_norms <= clip
    np.testing.assert_array_equal(out[small], rows[small])  # bit for bit
    np.testing.assert_allclose(out, _numpy_clip(rows, clip), rtol=1e-5, atol=1e-7)


def test_nonfinite_update_becomes_zero():
    update = {"w": jnp.array([1.0, jnp.nan]), "b": jnp.array([3.0])}
    clipped, norm = privacy.clip_update(update, 1.0)
    np.testing.assert_array_equal(clipped["w"], 0.0)
    np.testing.assert_array_equal(clipped["b"], 0.0)
    assert float(norm) == 0.0


# --------------------------------------------------------------------------- noise


def _std_within(samples, expected, rel=0.03):
    """Sample std within ``rel`` of ``expected``; with >= 1e5 samples the std's own error is ~0.2%."""
    samples = np.asarray(samples, np.float64).ravel()
    assert samples.size >= 100_000
    assert abs(samples.mean()) < 5 * expected / np.sqrt(samples.size)
    assert abs(samples.std() / expected - 1) < rel, (samples.std(), expected)


def test_local_noise_has_stated_std_and_keys_behave():
    sigma, clip = 0.7, 2.0
    zeros = {"a": jnp.zeros((300, 400)), "b": jnp.zeros((20_000,))}
    privatize = jax.jit(privacy.local_privatizer(sigma, clip))
    noise = privatize(zeros, jax.random.key(1))
    _std_within(_flat_rows(jax.tree.map(lambda x: x[None], noise)), sigma * clip)
    # The tolerance is tight enough to catch a 10% error in scale.
    with pytest.raises(AssertionError):
        _std_within(_flat_rows(jax.tree.map(lambda x: x[None], noise)) * 1.1, sigma * clip)
    again = privatize(zeros, jax.random.key(1))
    other = privatize(zeros, jax.random.key(2))
    a, b, c = (_flat_rows(jax.tree.map(lambda x: x[None], t))[0] for t in (noise, again, other))
    np.testing.assert_array_equal(a, b)
    assert abs(np.corrcoef(a, c)[0, 1]) < 5 / np.sqrt(a.size)  # independent across keys
    # The two leaves draw independent noise too.
    np.testing.assert_array_less(np.abs(np.corrcoef(a[:20_000], a[-20_000:])[0, 1]), 5 / np.sqrt(20_000))


def test_central_noise_has_stated_std():
    sigma, clip, clients = 1.3, 0.5, 4
    rng = np.random.default_rng(1)
    updates = {"u": jnp.asarray(rng.normal(size=(clients, 120_000)).astype(np.float32))}
    mask = jnp.array([True, True, False, True])
    agg = privacy.dp_fedavg(sigma, clip, expected_cohort=clients)
    out, _, _ = jax.jit(agg.aggregate)(updates, jnp.ones(clients), mask, agg.init(None), jax.random.key(3))
    rows = _numpy_clip(np.asarray(updates["u"]), clip)
    exact = rows[np.asarray(mask)].sum(0) / clients
    _std_within(np.asarray(out["u"]) - exact, sigma * clip / clients)


def test_dpsgd_noise_has_stated_std():
    sigma, clip, expected_batch = 0.9, 1.5, 6.0
    params = {"w": jnp.zeros(100_000)}
    xb = jnp.zeros((3, 100_000))
    grad_fn = privacy.dpsgd_gradient(sigma, clip)

    def loss(p, x, y):  # zero gradient at x = 0
        return jnp.dot(p["w"], x)

    _, grads = jax.jit(grad_fn, static_argnums=0)(
        loss, params, xb, jnp.zeros(3), jnp.ones(3, bool), jax.random.key(4), expected_batch
    )
    _std_within(grads["w"], sigma * clip / expected_batch)


# --------------------------------------------------------------------------- central DP (DP-FedAvg)


def test_sigma_zero_and_no_clipping_is_fedavg():
    rng = np.random.default_rng(2)
    clients = 8
    updates = jax.tree.map(jnp.asarray, _tree(rng, (clients,)))
    weights = jnp.asarray(rng.integers(1, 100, clients), jnp.float32)
    agg = privacy.build_central_aggregator(_cfg(mode="central").privacy, _knobs(0.0, np.inf), CONTEXT)
    out, _, diag = jax.jit(agg.aggregate)(updates, weights, jnp.ones(clients, bool), agg.init(None), jax.random.key(0))
    for name in ("w", "b"):
        u = np.asarray(updates[name], np.float64)
        # A float32 mean of 8 signed terms: sum bound of |u_i| / 8, one division each.
        assert_within(out[name], u.mean(0), sum_bound(np.abs(u) / clients, ops_per_term=2), name)
    assert float(diag["clipped_fraction"]) == 0.0 and np.isinf(diag["clip_norm"])


def test_masked_out_and_nonfinite_clients_have_no_influence():
    rng = np.random.default_rng(3)
    clients, clip = 6, 1.0
    rows = rng.normal(size=(clients, 10)).astype(np.float32)
    rows[1] = np.nan  # takes part but sent garbage: counts as zero
    rows[4] = 1e6  # masked out
    mask = np.array([True, True, True, False, False, True])
    agg = privacy.dp_fedavg(0.0, clip, expected_cohort=5)
    out, _, diag = jax.jit(agg.aggregate)(
        {"u": jnp.asarray(rows)}, jnp.ones(clients), jnp.asarray(mask), (), jax.random.key(0)
    )
    keep = mask.copy()
    keep[1] = False
    expected = _numpy_clip(rows[keep], clip).sum(0) / 5  # fixed denominator: expected cohort
    # Sum of signed clipped rows over all 6 clients: each term bounded by its |value| / 5 and off by the
    # norm (p/2 + 1 operations), the clip factor, its product and / 5 (tests/float32_bounds.py).
    terms = np.zeros(rows.shape)
    terms[keep] = np.abs(_numpy_clip(rows[keep], clip)) / 5
    assert_within(out["u"], expected, sum_bound(terms, ops_per_term=rows.shape[1] // 2 + 5), "dp_fedavg")
    assert int(diag["nonfinite_clients"]) == 1
    norms = np.linalg.norm(rows[keep], axis=1)
    np.testing.assert_allclose(diag["clipped_fraction"], (norms > clip).sum() / mask.sum())


def test_adaptive_clipping_update_rule_and_convergence():
    norms = np.arange(1.0, 11.0, dtype=np.float32)  # client k sends an update of norm k
    updates = {"u": jnp.asarray(np.stack([np.eye(1, 10, 0)[0] * n for n in norms]).astype(np.float32))}
    target, lr, count_std = 0.3, 0.2, 1e-6
    cfg = _cfg(mode="central", adaptive_clipping=True).privacy
    knobs = _knobs(0.0, 4.5, target_quantile=target, clip_lr=lr, clipped_count_stddev=count_std)
    context = CONTEXT._replace(num_clients=10, cohort_size=10)
    agg = privacy.build_central_aggregator(cfg, knobs, context)
    step = jax.jit(agg.aggregate)
    mask = jnp.ones(10, bool)
    state = agg.init(None)
    _, state, diag = step(updates, jnp.ones(10), mask, state, jax.random.key(0))
    below = (norms <= 4.5).mean()
    np.testing.assert_allclose(state["clip_norm"], 4.5 * np.exp(-lr * (below - target)), rtol=1e-5)
    np.testing.assert_allclose(diag["clipped_fraction"], 0.6)
    for r in range(150):
        _, state, _ = step(updates, jnp.ones(10), mask, state, jax.random.key(r))
    assert 3.0 <= float(state["clip_norm"]) < 4.0  # 30% of norms at or below it


def test_adaptive_noise_split_keeps_total_multiplier():
    z, count_std = 1.1, 2.0
    z_update = float(privacy.update_noise_multiplier(z, count_std))
    np.testing.assert_allclose(z_update**-2 + (2 * count_std) ** -2, z**-2, rtol=1e-6)


# --------------------------------------------------------------------------- DP-SGD


def test_dpsgd_gradient_matches_numpy_clipped_mean():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(7, 3)).astype(np.float32) * np.array([[0.1], [1], [3], [0.2], [2], [5], [1]], np.float32)
    y = rng.normal(size=7).astype(np.float32)
    valid = np.array([1, 1, 1, 1, 1, 0, 0], bool)
    x[6] = np.nan  # padding must not contribute
    w = rng.normal(size=3).astype(np.float32)

    def loss(p, xi, yi):
        return 0.5 * (jnp.dot(p, xi) - yi) ** 2

    clip, expected_batch = 0.3, 4.0
    grad_fn = privacy.dpsgd_gradient(0.0, clip)
    mean_loss, grads = jax.jit(grad_fn, static_argnums=0)(
        loss,
        jnp.asarray(w),
        jnp.asarray(x),
        jnp.asarray(y),
        jnp.asarray(valid),
        jax.random.key(0),
        expected_batch,
    )
    # float64 reference from the float32 inputs; float32 bound (tests/float32_bounds.py): the residual
    # r_i = w . x_i - y_i is off by up to d eps A_i, A_i = sum_j |w_j x_ij| + |y_i| (cancellation makes a
    # relative tolerance meaningless here); each clipped term is bounded by s_i A_i |x_i| / B with
    # s_i = min(1, clip / |g_i|) and carries 2d + 5 rounded operations (residual, product, norm, clip
    # factor, its product, / B), then a sum over all N rows, padding included. The loss term 0.5 r_i^2 is
    # bounded by 0.5 A_i^2 and off by 2d + 3 operations.
    rows, d = x.shape
    x64, y64, w64 = x[valid].astype(np.float64), y[valid].astype(np.float64), w.astype(np.float64)
    residual = x64 @ w64 - y64
    per_example = residual[:, None] * x64
    assert (np.linalg.norm(per_example, axis=1) > clip).sum() >= 2
    scale = np.minimum(1.0, clip / np.linalg.norm(per_example, axis=1))
    magnitude = np.abs(x64) @ np.abs(w64) + np.abs(y64)
    gradient_terms, loss_terms = np.zeros((rows, d)), np.zeros(rows)
    gradient_terms[valid] = (scale * magnitude)[:, None] * np.abs(x64) / expected_batch
    loss_terms[valid] = 0.5 * magnitude**2 / valid.sum()
    want = _numpy_clip(per_example, clip).sum(0) / expected_batch
    assert_within(grads, want, sum_bound(gradient_terms, ops_per_term=2 * d + 5), "clipped gradient")
    assert_within(mean_loss, np.mean(0.5 * residual**2), sum_bound(loss_terms, ops_per_term=2 * d + 3), "loss")


def test_builders_return_none_outside_their_mode():
    knobs = _knobs(1.0, 1.0)
    for mode in privacy.MODES:
        p = _cfg(mode=mode).privacy
        assert (privacy.build_client_privatizer(p, knobs) is None) == (mode != "local")
        assert (privacy.build_central_aggregator(p, knobs, CONTEXT) is None) == (mode not in privacy.SERVER_NOISE)
        assert (privacy.build_gradient_fn(p, knobs) is None) == (mode != "dpsgd")


# --------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("q, sigma, steps, delta", [(0.01, 1.1, 1000, 1e-5), (0.2, 2.0, 50, 1e-6)])
def test_epsilon_matches_dp_accounting(q, sigma, steps, delta):
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    for name, accountant in (("pld", pld.PLDAccountant()), ("rdp", rdp.RdpAccountant())):
        expected = accountant.compose(event, steps).get_epsilon(delta)
        assert privacy.epsilon(sigma, q, steps, delta, accountant=name) == pytest.approx(expected, rel=1e-9)


def test_epsilon_without_sampling_is_one_gaussian():
    sigma, steps, delta = 5.0, 30, 1e-5
    exact = dp_accounting.get_epsilon_gaussian(sigma / np.sqrt(steps), delta)
    assert privacy.epsilon(sigma, 1.0, steps, delta, "pld") == pytest.approx(exact, rel=1e-9)
    event = dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(sigma))
    assert exact == pytest.approx(pld.PLDAccountant().compose(event, steps).get_epsilon(delta), rel=1e-4)
    direct_rdp = rdp.RdpAccountant().compose(event, steps).get_epsilon(delta)
    assert privacy.epsilon(sigma, 1.0, steps, delta, "rdp") == pytest.approx(direct_rdp, rel=1e-9)


def test_tiny_noise_falls_back_to_rdp_instead_of_a_huge_pld():
    event = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(0.01))
    direct = rdp.RdpAccountant().compose(event, 10).get_epsilon(1e-5)
    assert privacy.epsilon(0.01, 0.1, 10, 1e-5, "pld") == pytest.approx(direct, rel=1e-9)


def test_fixed_size_sampling_uses_replace_one_with_double_sensitivity():
    # 10 of 100 clients per round; replace-one moves a clipped sum by 2 S, so the event carries sigma / 2.
    sigma, steps, delta = 3.0, 40, 1e-5
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(
        dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(sigma / 2)),
        steps,
    )
    expected = accountant.get_epsilon(delta)
    assert privacy.epsilon(sigma, 0.1, steps, delta, sampling="fixed") == pytest.approx(expected, rel=1e-9)
    assert "REPLACE_ONE" in privacy.describe_accounting(0.1, "pld", "fixed")


def test_epsilon_edge_cases():
    assert privacy.epsilon(0.0, 0.1, 10, 1e-5) == np.inf
    assert privacy.epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    with pytest.raises(ValueError, match="sampling_rate"):
        privacy.epsilon(1.0, 1.5, 10, 1e-5)


@pytest.mark.parametrize("q, sampling, accountant", [(0.05, "poisson", "rdp"), (1.0, "fixed", "pld")])
def test_calibrate_noise_inverts_epsilon(q, sampling, accountant):
    steps, delta, target = 200, 1e-5, 3.0
    sigma = privacy.calibrate_noise(target, delta, q, steps, accountant=accountant, sampling=sampling, tol=1e-3)
    assert privacy.epsilon(sigma, q, steps, delta, accountant, sampling) <= target
    assert privacy.epsilon(sigma - 5e-3, q, steps, delta, accountant, sampling) > target


def test_run_report_central_local_dpsgd():
    delta = 1e-5
    cfg = _cfg(mode="central", noise_multiplier=1.2, clip_norm=1.0, delta=delta, accountant="rdp")
    cfg.cohort_sampling, cfg.sampling_rate, cfg.rounds, cfg.aggregator.name = "poisson", 0.1, 30, "mean"
    report = privacy.run_privacy_report(cfg, num_clients=100)
    direct = (
        rdp.RdpAccountant()
        .compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.2)), 30)
        .get_epsilon(delta)
    )
    assert report["epsilon"] == pytest.approx(direct, rel=1e-9)
    assert report["unit"] == "client" and report["delta"] == delta and report["steps"] == 30

    cfg.privacy.mode = "local"
    accounting = privacy.accounting_for_run(cfg, num_clients=100)
    direct = rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(1.2 / 2), 12).get_epsilon(delta)
    assert accounting.epsilon_after(12) == pytest.approx(direct, rel=1e-6)

    cfg.privacy.mode, cfg.aggregator.name = "dpsgd", "weighted_mean"
    cfg.local.sampling, cfg.local.epochs, cfg.local.steps, cfg.local.batch_size = "poisson", 0, 5, 16
    report = privacy.run_privacy_report(cfg, num_clients=4, client_sizes=[400, 160, 800, 320], rounds=20)
    direct = (
        rdp.RdpAccountant()
        .compose(dp_accounting.PoissonSampledDpEvent(16 / 160, dp_accounting.GaussianDpEvent(1.2)), 100)
        .get_epsilon(delta)
    )
    assert report["unit"] == "record" and report["epsilon"] == pytest.approx(direct, rel=1e-9)

    cfg.privacy.mode = "none"
    assert privacy.run_privacy_report(cfg, num_clients=4)["epsilon"] == np.inf


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"mode": "central", "clip_norm": float("inf")}, "without clipping"),
        ({"mode": "local", "clip_norm": 1.0, "delta": 0.2}, "delta"),
        ({"mode": "central", "clip_norm": 1.0, "noise_multiplier": -1.0}, "noise_multiplier"),
        ({"mode": "shuffle"}, "mode"),
        ({"mode": "local", "clip_norm": 1.0, "adaptive_clipping": True}, "adaptive_clipping"),
        (
            {"mode": "central", "clip_norm": 1.0, "noise_multiplier": 3.0, "adaptive_clipping": True},
            "clipped_count_stddev",
        ),
        ({"mode": "central", "clip_norm": 1.0, "accountant": "moments"}, "accountant"),
    ],
)
def test_validate_config_refuses(fields, match):
    with pytest.raises(ValueError, match=match):
        privacy.validate_config(_cfg(**fields).privacy, CONTEXT)


def test_validate_config_accepts_sane_settings():
    privacy.validate_config(_cfg().privacy, CONTEXT)
    privacy.validate_config(_cfg(mode="central", clip_norm=1.0, noise_multiplier=1.0).privacy, CONTEXT)


def test_record_delta_and_cross_section_refusals():
    cfg = _cfg(mode="dpsgd", clip_norm=1.0, noise_multiplier=1.0)
    privacy.validate_config(cfg.privacy, CONTEXT)
    with pytest.raises(ValueError, match="local.sampling"):
        privacy.validate_with_run(cfg)
    cfg.local.sampling, cfg.local.epochs, cfg.local.steps = "fixed", 0, 3
    privacy.validate_with_run(cfg, client_sizes=[100, 15])
    cfg.privacy.delta = 0.1
    with pytest.raises(ValueError, match="records"):
        privacy.validate_with_run(cfg, client_sizes=[100, 15])
    central = _cfg(mode="central", clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="aggregator.name"):
        privacy.validate_with_run(central)
    central.aggregator.name = "mean"
    privacy.validate_with_run(central)


# --------------------------------------------------------------------------- banded matrix factorisation


def _numpy_strategy(bands: int, rounds: int) -> np.ndarray:
    """The ``rounds x rounds`` lower-triangular Toeplitz C with ``c_k = binom(2k, k) / 4^k`` for ``k < bands``."""
    from math import comb

    coefs = [comb(2 * k, k) / 4**k for k in range(min(bands, rounds))]
    strategy = np.zeros((rounds, rounds))
    for k, c in enumerate(coefs):
        strategy += c * np.eye(rounds, k=-k)
    return strategy


def test_bandmf_noise_is_white_after_applying_the_strategy():
    """Rounds' noise n_t = sigma S (C^-1 z)_t: C n is iid N(0, (sigma S)^2) (sample covariance over coordinates)."""
    bands, rounds, dim, sigma, clip = 3, 6, 20_000, 0.7, 2.0
    aggregator = privacy.dp_fedavg(jnp.float32(sigma), jnp.float32(clip), 1.0, bands=bands)
    params = {"w": jnp.zeros((dim,), jnp.float32)}
    state, noises = aggregator.init(params), []
    zeros, mask = {"w": jnp.zeros((2, dim), jnp.float32)}, jnp.ones(2, bool)
    for t in range(rounds):
        update, state, _ = aggregator.aggregate(zeros, None, mask, state, jax.random.key(t))
        noises.append(np.asarray(update["w"], np.float64))
    white = _numpy_strategy(bands, rounds) @ np.stack(noises) / (sigma * clip)
    covariance = white @ white.T / dim
    # Sample covariance of iid N(0, 1) over `dim` coordinates: entries have std <= sqrt(2 / dim) (~0.01).
    np.testing.assert_allclose(covariance, np.eye(rounds), atol=6 * np.sqrt(2 / dim))
    assert np.abs(np.corrcoef(np.stack(noises))[1, 0]) > 0.2  # the raw noise is correlated across rounds


@pytest.mark.parametrize("bands", [1, 2, 5])
def test_bandmf_epsilon_is_one_gaussian_of_sigma_over_sensitivity(bands):
    sigma, rounds, delta = 8.0, 30, 1e-5
    sensitivity = np.linalg.norm(_numpy_strategy(bands, rounds) @ np.ones(rounds))  # C >= 0: all aligned
    assert privacy.bandmf_sensitivity_squared(bands, rounds) == pytest.approx(sensitivity**2, rel=1e-5)
    direct = dp_accounting.get_epsilon_gaussian(sigma / sensitivity, delta)
    assert privacy.bandmf_epsilon(sigma, bands, rounds, delta) == pytest.approx(direct, rel=1e-4)
    fedavg = privacy.epsilon(sigma, 1.0, rounds, delta)  # DP-FedAvg, every client every round
    matched = privacy.bandmf_noise_for(sigma, bands, rounds)
    assert privacy.bandmf_epsilon(matched, bands, rounds, delta) == pytest.approx(fedavg, rel=1e-4)


def test_bandmf_run_report_and_refusals():
    cfg = _cfg(mode="bandmf", noise_multiplier=4.0, clip_norm=1.0, bands=3)
    cfg.rounds, cfg.aggregator.name = 20, "mean"
    report = privacy.run_privacy_report(cfg, num_clients=4)
    sensitivity = np.linalg.norm(_numpy_strategy(3, 20) @ np.ones(20))
    assert report["epsilon"] == pytest.approx(dp_accounting.get_epsilon_gaussian(4.0 / sensitivity, 1e-5), rel=1e-4)
    assert report["neighbouring_relation"] == "add-or-remove-one client" and "3 bands" in report["mechanism"]
    cfg.cohort_size = 2
    with pytest.raises(ValueError, match="privacy.mode='bandmf' with cohort_size=2"):
        privacy.validate_with_run(cfg)
    cfg.cohort_size, cfg.privacy.bands = 0, 21
    with pytest.raises(ValueError, match="privacy.bands=21 exceeds rounds=20"):
        privacy.validate_with_run(cfg)
    cfg.privacy.bands = 0
    with pytest.raises(ValueError, match="privacy.bands=0 must be an integer >= 1"):
        privacy.validate_config(cfg.privacy, CONTEXT)

"""The library face of medfed_jax: defaults, masks, preconditions, keys, host-only guards, the README example.

References are plain numpy and dp_accounting called directly.
"""

import math
import os
import re

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import medfed_jax as mf
from medfed_jax import aggregators as agg
from medfed_jax import attacks, compression, drift, privacy, unreliable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, D = 10, 3
KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def rows():
    return np.random.default_rng(0).normal(size=(C, D)).astype(np.float32)


def test_library_modules_load_on_first_access():
    assert {"aggregators", "attacks", "privacy", "compression", "drift", "unreliable"} <= set(dir(mf))
    assert mf.aggregators is agg and mf.attacks is attacks and mf.privacy is privacy
    assert mf.compression is compression and mf.drift is drift and mf.unreliable is unreliable
    assert mf.aggregators.coordinate_median is agg.coordinate_median


@pytest.mark.parametrize(
    "rule, reference",
    [
        (agg.mean, lambda x: x.mean(0)),
        (agg.weighted_mean, lambda x: x.mean(0)),  # equal weights by default
        (agg.coordinate_median, lambda x: np.median(x, 0)),
        (lambda: agg.trimmed_mean(2), lambda x: np.sort(x, 0)[2:-2].mean(0)),
        (lambda: agg.centered_clipping(tau=1e9), lambda x: x.mean(0)),  # state defaults to zeros; no clipping
    ],
)
def test_aggregate_with_defaults_matches_numpy(rows, rule, reference):
    update, _, _ = rule().aggregate({"w": jnp.asarray(rows)})
    # float32 sums of 10 values of order 1: a few ulps of the largest partial sum
    np.testing.assert_allclose(update["w"], reference(rows.astype(np.float64)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [bool, np.int32, np.float32])
def test_masks_as_bool_or_zero_one(rows, dtype):
    taking = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1])
    mask = jnp.asarray(taking.astype(dtype))
    kept = rows[taking == 1].astype(np.float64)
    for rule, reference in ((agg.mean(), kept.mean(0)), (agg.trimmed_mean(1), np.sort(kept, 0)[1:-1].mean(0))):
        update, _, _ = rule.aggregate({"w": jnp.asarray(rows)}, mask=mask)
        np.testing.assert_allclose(update["w"], reference, rtol=0, atol=1e-5)
    flipped = attacks.sign_flip(3.0).apply({"w": jnp.asarray(rows)}, mask)["w"]
    np.testing.assert_array_equal(flipped, np.where(taking[:, None] == 1, -3.0 * rows, rows))


def test_weights_weight_the_mean(rows):
    weights = np.arange(1, C + 1, dtype=np.float64)
    update, _, _ = agg.weighted_mean().aggregate({"w": jnp.asarray(rows)}, weights=jnp.asarray(weights))
    np.testing.assert_allclose(update["w"], weights @ rows / weights.sum(), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: agg.krum(4, num_clients=10), r"krum\(f=4\) needs n > 2f \+ 2 .*n=10.*use f <= 3, or at least 11"),
        (lambda: agg.multi_krum(4, num_clients=10), r"multi_krum\(f=4\) needs n > 2f \+ 2 .*n=10"),
        (lambda: agg.multi_krum(1, m=10, num_clients=10), r"multi_krum\(f=1, m=10\) averages at most n - f = 9"),
        (lambda: agg.bulyan(2, num_clients=10), r"bulyan\(f=2\) needs n >= 4f \+ 3 .*at least 11.*n=10"),
        (lambda: agg.trimmed_mean(5, num_clients=10), r"trimmed_mean\(f=5\) needs 2f < n .*n=10.*f <= 4"),
    ],
)
def test_precondition_refused_at_build(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_precondition_at_the_bound_is_accepted():
    agg.krum(3, num_clients=9)  # 9 > 2*3 + 2
    agg.bulyan(2, num_clients=11)  # 11 >= 4*2 + 3
    agg.trimmed_mean(4, num_clients=9)  # 8 < 9


def test_precondition_refused_while_tracing(rows):
    updates = {"w": jnp.asarray(rows)}
    with pytest.raises(ValueError, match=r"krum\(f=4\) needs n > 2f \+ 2 .*n=10"):
        agg.krum(4).aggregate(updates)
    with pytest.raises(ValueError, match=r"bulyan\(f=2\) .*n=10"):
        jax.jit(lambda u: agg.bulyan(2).aggregate(u))(updates)
    with pytest.raises(ValueError, match=r"krum\(f=2\) .*n=5"):  # 10 clients in buckets of 2: 5 inputs
        agg.chain(agg.bucketing(2), agg.krum(2)).aggregate(updates, key=KEY)
    with pytest.raises(ValueError, match=r"nnm\(f=5\) needs 2f < n"):
        agg.chain(agg.nearest_neighbor_mixing(5), agg.mean()).aggregate(updates)


def test_with_a_mask_the_rule_degrades_as_documented(rows):
    """With a mask, n is data: Krum scores over max(n - f - 2, 1) neighbours instead of failing (the engine's case)."""
    update, _, diag = agg.krum(4).aggregate({"w": jnp.asarray(rows)}, mask=np.ones(C))
    d2 = ((rows[:, None].astype(np.float64) - rows[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    best = int(np.argmin(np.sort(d2, 1)[:, : C - 4 - 2].sum(1)))  # score over the n - f - 2 nearest others
    assert int(diag["selected_client"]) == best
    np.testing.assert_array_equal(update["w"], rows[best])


def test_randomised_rules_need_a_key(rows):
    updates = {"w": jnp.asarray(rows)}
    with pytest.raises(TypeError, match="bucketing is randomised: pass key="):
        agg.chain(agg.bucketing(2), agg.mean()).aggregate(updates)
    with pytest.raises(TypeError, match="dp_fedavg is randomised: pass key="):
        privacy.dp_fedavg(1.0, 1.0, C).aggregate(updates)
    with pytest.raises(TypeError, match="gaussian is randomised: pass key="):
        attacks.gaussian().apply(updates, np.arange(C) < 2)
    with pytest.raises(TypeError, match="fang_trim is randomised: pass key="):
        attacks.fang_trim().apply(updates, np.arange(C) < 2)


def test_dp_fedavg_without_noise_is_the_clipped_sum_over_the_expected_cohort(rows):
    update, _, _ = privacy.dp_fedavg(0.0, 1.0, 8.0).aggregate({"w": jnp.asarray(rows)}, key=KEY)
    x = rows.astype(np.float64)
    clipped = x * np.minimum(1.0, 1.0 / np.linalg.norm(x, axis=1))[:, None]
    np.testing.assert_allclose(update["w"], clipped.sum(0) / 8.0, rtol=0, atol=1e-5)


def test_attack_without_context_takes_every_client(rows):
    """IPM: malicious clients send -eps times the mean of the honest ones (all clients take part)."""
    malicious = np.arange(C) < 3
    out = attacks.ipm(0.5).apply({"w": jnp.asarray(rows)}, malicious.astype(np.float32))["w"]
    expected = np.where(malicious[:, None], -0.5 * rows[~malicious].astype(np.float64).mean(0), rows)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="needs AttackContext.aggregate"):
        attacks.opt_ipm().apply({"w": jnp.asarray(rows)}, malicious)


def test_accounting_is_host_only():
    with pytest.raises(TypeError, match=r"privacy.epsilon is host-only \(it runs dp_accounting\): call it outside jit"):
        jax.jit(lambda z: privacy.epsilon(z, 1.0, 10, 1e-5))(1.0)
    with pytest.raises(TypeError, match="privacy.calibrate_noise is host-only"):
        jax.jit(lambda e: privacy.calibrate_noise(e, 1e-5, 1.0, 10))(1.0)
    # outside jit: every unit in every step is one Gaussian of multiplier z / sqrt(steps)
    assert privacy.epsilon(1.0, 1.0, 10, 1e-5) == pytest.approx(
        dp_accounting.get_epsilon_gaussian(1.0 / math.sqrt(10), 1e-5), rel=1e-12
    )


def readme_example() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Using the pieces in your own JAX code", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the section holds python examples"
    return "\n".join(blocks)  # each block continues the one before


def test_readme_example_runs(capsys):
    """The README's examples run as written, and their own assertions (robust rules beat the mean, top-k with
    error feedback uploads a third of float32's bytes) hold."""
    exec(compile(readme_example(), "README.md: Using the pieces", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert "sign-flip attack: mean" in printed and "DP-FedAvg, no attack" in printed
    assert "2-bit QSGD, 30% dropout: error" in printed
    eps = float(re.search(r"epsilon=([0-9.]+)", printed).group(1))
    assert eps == pytest.approx(dp_accounting.get_epsilon_gaussian(1.0 / math.sqrt(30), 1e-5), abs=0.05)

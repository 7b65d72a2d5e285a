"""Attacks against their published formulas, written here in plain numpy (and scipy for Phi^-1)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from attack_inputs import updates_with_absent
from scipy.stats import norm

from medfed_jax import aggregators, attacks
from medfed_jax.config import BuildContext
from medfed_jax.types import AttackContext, hparams_of

C, K = 9, 4


def setup(seed=0):
    """Updates as ``[C, 10]`` rows, attackers 1, 4, 6; client 8 does not take part and holds garbage."""
    return updates_with_absent(C, 10, absent=8, attackers=(1, 4, 6), seed=seed)


def to_tree(u):
    return {"a": jnp.asarray(u[:, :6].reshape(-1, 2, 3), jnp.float32), "b": jnp.asarray(u[:, 6:], jnp.float32)}


def flat_rows(tree):
    return np.concatenate([np.asarray(tree["a"]).reshape(C, -1), np.asarray(tree["b"])], axis=1).astype(np.float64)


@functools.cache
def jitted_apply(name, **params):
    return jax.jit(getattr(attacks, name)(**params).apply)


def attack(name, u, malicious, mask, key=0, **params):
    context = AttackContext(jnp.ones(C), jnp.asarray(mask), K)
    out = jitted_apply(name, **params)(to_tree(u), jnp.asarray(malicious), jax.random.PRNGKey(key), context)
    return flat_rows(out)


def expect(u, malicious, rows):
    """The attack's output: honest rows untouched, malicious rows replaced by ``rows``."""
    want = u.copy()
    want[malicious] = rows
    return want


def honest_stats(u, malicious, mask):
    h = u[mask & ~malicious]
    return h.mean(0), h.std(0, ddof=1)


def close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sign_flip():
    u, mal, mask = setup()
    close(attack("sign_flip", u, mal, mask, scale=2.5), expect(u, mal, -2.5 * u[mal]))


def test_ipm():
    u, mal, mask = setup()
    mu, _ = honest_stats(u, mal, mask)
    close(attack("ipm", u, mal, mask, eps=0.7), expect(u, mal, -0.7 * mu))


def test_alie_with_explicit_z():
    u, mal, mask = setup()
    mu, sigma = honest_stats(u, mal, mask)
    close(attack("alie", u, mal, mask, z=1.3), expect(u, mal, mu - 1.3 * sigma))


def test_alie_default_z_is_baruch_z_max():
    u, mal, mask = setup()
    mu, sigma = honest_stats(u, mal, mask)
    n, f = 8, 3  # taking part; malicious among them
    s = np.floor(n / 2 + 1) - f
    z = norm.ppf((n - s) / n)
    close(attack("alie", u, mal, mask), expect(u, mal, mu - z * sigma))


@pytest.mark.parametrize("n,f", [(8, 3), (10, 2), (20, 5), (50, 12), (100, 20), (7, 0)])
def test_alie_z_max_matches_scipy(n, f):
    s = np.floor(n / 2 + 1) - f
    np.testing.assert_allclose(attacks.alie_z_max(n, f), norm.ppf((n - s) / n), rtol=1e-5)


def test_gaussian_replaces_malicious_rows_with_noise_of_the_given_scale():
    rng = np.random.default_rng(1)
    u = rng.normal(size=(C, 4000)) + 5.0
    malicious = np.arange(C) % 2 == 1
    context = AttackContext(jnp.ones(C), jnp.ones(C, bool), K)
    apply = jax.jit(attacks.gaussian(3.0).apply)
    out = np.asarray(apply({"x": jnp.asarray(u)}, jnp.asarray(malicious), jax.random.PRNGKey(0), context)["x"])
    np.testing.assert_array_equal(out[~malicious], u[~malicious].astype(np.float32))
    noise = out[malicious]
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 3.0) < 0.1  # 16000 draws: sd of the mean ~0.02
    again = apply({"x": jnp.asarray(u)}, jnp.asarray(malicious), jax.random.PRNGKey(0), context)["x"]
    other = apply({"x": jnp.asarray(u)}, jnp.asarray(malicious), jax.random.PRNGKey(1), context)["x"]
    np.testing.assert_array_equal(again, out)
    assert not np.allclose(other, out)


def test_scaling():
    u, mal, mask = setup()
    close(attack("scaling", u, mal, mask, gamma=7.0), expect(u, mal, 7.0 * u[mal]))
    close(attack("scaling", u, mal, mask), expect(u, mal, 8.0 * u[mal]))  # gamma=0: n = 8 taking part


def test_non_finite():
    u, mal, mask = setup()
    got = attack("non_finite", u, mal, mask)
    np.testing.assert_array_equal(got[~mal], u[~mal].astype(np.float32))
    assert np.all(np.isposinf(got[[1]])) and np.all(np.isnan(got[[4, 6]]))  # odd index Inf, even NaN


def test_label_flip_poisons_labels_only():
    y = np.tile(np.arange(K), (C, 2))
    malicious = np.zeros(C, bool)
    malicious[[0, 5]] = True
    lf = attacks.label_flip()
    got = np.asarray(jax.jit(lf.poison_labels, static_argnums=2)(jnp.asarray(y), jnp.asarray(malicious), K))
    want = y.copy()
    want[malicious] = K - 1 - y[malicious]
    np.testing.assert_array_equal(got, want)
    u, mal, mask = setup()
    close(flat_rows(lf.apply(to_tree(u), jnp.asarray(mal), jax.random.PRNGKey(0), None)), u)
    np.testing.assert_array_equal(attacks.sign_flip().poison_labels(jnp.asarray(y), jnp.asarray(malicious), K), y)


def test_switch_applies_the_chosen_attack_to_updates_and_labels():
    """`attacks.switch` with a traced index matches each attack's numpy reference."""
    u, mal, mask = setup()
    mu, _ = honest_stats(u, mal, mask)
    y = np.tile(np.arange(K), (C, 2))
    context = AttackContext(jnp.ones(C), jnp.asarray(mask), K)
    choices = (attacks.sign_flip(2.0), attacks.ipm(0.5), attacks.label_flip())

    @jax.jit
    def run(index):
        chosen = attacks.switch(choices, index)
        updates = chosen.apply(to_tree(u), jnp.asarray(mal), jax.random.PRNGKey(0), context)
        return updates, chosen.poison_labels(jnp.asarray(y), jnp.asarray(mal), K)

    flipped = y.copy()
    flipped[mal] = K - 1 - y[mal]
    for index, (rows, labels) in enumerate(((-2.0 * u[mal], y), (-0.5 * mu, y), (u[mal], flipped))):
        updates, poisoned = run(jnp.int32(index))
        close(flat_rows(updates), expect(u, mal, rows))
        np.testing.assert_array_equal(np.asarray(poisoned), labels)


# ---------------------------------------------------------------------------
# The malicious set and the config section.


def section(**fields) -> ml_collections.ConfigDict:
    cfg = attacks.default_config()
    cfg.update(fields)
    return cfg


def test_fraction_gives_round_fraction_times_c_clients_without_recompiling():
    draw = jax.jit(lambda key, fraction: attacks.attack_mask(section(), key, fraction, 20))
    seen = set()
    for fraction, want in ((0.0, 0), (0.1, 2), (0.25, 5), (0.33, 7), (0.5, 10)):
        for seed in range(3):
            mask = np.asarray(draw(jax.random.PRNGKey(seed), jnp.float32(fraction)))
            assert mask.sum() == want
            seen.add(tuple(np.flatnonzero(mask)))
    assert len(seen) > 5  # the key places them
    assert draw._cache_size() == 1


def test_explicit_clients_override_fraction():
    cfg = section(clients=(3, 0), fraction=0.5)
    mask = attacks.attack_mask(cfg, jax.random.PRNGKey(0), jnp.float32(0.5), 6)
    np.testing.assert_array_equal(mask, [True, False, False, True, False, False])


def test_built_attack_reads_traced_knobs():
    u, mal, mask = setup()

    @jax.jit
    def apply(tree, knobs):
        return attacks.build_attack(section(name="sign_flip"), knobs).apply(
            tree, jnp.asarray(mal), jax.random.PRNGKey(0), AttackContext(jnp.ones(C), jnp.asarray(mask), K)
        )

    for scale in (0.5, 3.0):
        knobs = hparams_of(attacks.AttackHParams, section())._replace(scale=jnp.float32(scale))
        close(flat_rows(apply(to_tree(u), knobs)), expect(u, mal, -scale * u[mal]))
    assert apply._cache_size() == 1


def test_every_name_builds():
    for field in attacks.AttackHParams._fields:
        assert isinstance(attacks.default_config()[field], float)
    u, mal, mask = setup()
    rule = aggregators.coordinate_median()
    context = AttackContext(  # a server side for the adaptive attacks: params are the aggregate itself
        jnp.ones(C),
        jnp.asarray(mask),
        K,
        aggregate=lambda t: rule.aggregate(t, jnp.ones(C), jnp.asarray(mask), (), jax.random.PRNGKey(0))[0],
        step=lambda update: update,
        loss=lambda params, clients: sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params)),
    )
    for name in attacks.ATTACK_NAMES:
        a = attacks.build_attack(section(name=name))
        out = jax.eval_shape(
            lambda *args, a=a: a.apply(*args, context), to_tree(u), jnp.asarray(mal), jax.random.PRNGKey(0)
        )
        assert out["a"].shape == (C, 2, 3), name


def context(num_clients=10) -> BuildContext:
    return BuildContext(num_clients=num_clients, cohort_size=num_clients, num_classes=K, feature_shape=(3,))


@pytest.mark.parametrize(
    "fields,needles",
    [
        ({"name": "backdoor"}, ["attack.name", "sign_flip"]),
        ({"fraction": 1.0}, ["attack.fraction=1.0", "[0, 1)"]),
        ({"fraction": -0.1}, ["attack.fraction"]),
        ({"fraction": 0.96}, ["all 10 clients", "fraction < 0.95"]),
        ({"clients": (1, 10)}, ["attack.clients", "[10]", "0..9"]),
        ({"clients": (2, 2)}, ["repeats"]),
        ({"clients": tuple(range(10))}, ["at least one honest"]),
        ({"scale": 0.0}, ["attack.scale"]),
        ({"sigma": -1.0}, ["attack.sigma"]),
        ({"z": float("nan")}, ["attack.z", "z_max"]),
        ({"gamma": -2.0}, ["attack.gamma"]),
        ({"evals": 0}, ["attack.evals=0", ">= 1"]),
        ({"steps": 0}, ["attack.steps=0", "integer >= 1"]),
        ({"perturbation": "gauss"}, ["attack.perturbation='gauss'", "unit_vec"]),
        ({"stealth": "none"}, ["attack.stealth", "distance"]),
        ({"knowledge": "partial"}, ["attack.knowledge", "own_data"]),
        ({"step_size": 0.0}, ["attack.step_size=0.0", "> 0"]),
        ({"budget": float("inf")}, ["attack.budget=inf", "finite"]),
    ],
)
def test_validate_config_names_the_field_and_the_fix(fields, needles):
    with pytest.raises(ValueError) as err:
        attacks.validate_config(section(**fields), context())
    for needle in needles:
        assert needle in str(err.value)


def test_validate_config_accepts_sensible_settings():
    attacks.validate_config(section(name="alie", fraction=0.3), context())
    attacks.validate_config(section(name="label_flip", clients=(0, 9)), context())
    attacks.validate_config(section(name="ipm", fraction=0.94, eps=100.0), context())

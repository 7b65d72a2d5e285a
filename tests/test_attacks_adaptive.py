"""Adaptive attacks against plain-numpy re-implementations of their searches and formulas.

Each searched attack is checked on fixed inputs for the factor it picks (recovered from its output) and
the update it sends. Float32 vs float64: the searches compare objective values, so inputs are chosen
with no near-ties at the compared points; updates agree to float32 rounding of O(1) values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from attack_inputs import updates_with_absent

from medfed_jax import aggregators, attacks, runner, sweep
from medfed_jax import config as config_lib
from medfed_jax.config import split
from medfed_jax.models import make_model
from medfed_jax.server import build_engine
from medfed_jax.types import AttackContext, ClientData

C, P = 10, 12


def setup(seed=0):
    """``[C, P]`` updates (client 9 absent, holding garbage), attackers 2, 5, 7."""
    return updates_with_absent(C, P, absent=9, attackers=(2, 5, 7), shift=0.5, seed=seed)


def tree(u):
    return {"a": jnp.asarray(u[:, :4], jnp.float32), "b": jnp.asarray(u[:, 4:].reshape(-1, 2, 4), jnp.float32)}


def rows(t):
    return np.concatenate([np.asarray(t["a"]).reshape(C, -1), np.asarray(t["b"]).reshape(C, -1)], 1)


def row(t):
    return np.concatenate([np.asarray(t["a"]).ravel(), np.asarray(t["b"]).ravel()])


def run(attack, u, malicious, mask, aggregate=None, key=0):
    context = AttackContext(jnp.ones(C), jnp.asarray(mask), 4, aggregate=aggregate)
    out = jax.jit(lambda t, m, k: attack.apply(t, m, k, context))(tree(u), jnp.asarray(malicious), jax.random.key(key))
    return rows(out)


def honest_stats(u, malicious, mask):
    h = u[mask & ~malicious]
    return h.mean(0), h.std(0, ddof=1)


def check_rows(got, u, malicious, crafted):
    """Honest rows bit-identical (as float32), malicious rows ``crafted`` to float32 rounding."""
    np.testing.assert_array_equal(got[~malicious], u[~malicious].astype(np.float32))
    want = np.broadcast_to(crafted, got[malicious].shape)
    np.testing.assert_allclose(got[malicious], want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


# --------------------------------------------------------------------------- ByzFL's line search


def byzfl_line_maximize(objective, evals, start=0.0, delta=10.0, ratio=0.8):
    """ByzFL's Optimal_* search, transcribed: expansion (break at the first failure), then contraction."""
    best_x, best_y, remaining = start, objective(start), evals - 1
    while remaining > 0:
        x = best_x + delta
        y = objective(x)
        remaining -= 1
        if y > best_y:
            best_x, best_y, delta = x, y, delta * 2
        else:
            delta *= ratio
            break
    while remaining > 0:
        x = best_x + delta
        y = objective(x)
        remaining -= 1
        if y > best_y:
            best_x, best_y = x, y
        delta *= ratio
    return best_x


@pytest.mark.parametrize("peak,evals", [(37.3, 20), (3.1, 20), (250.0, 12), (0.0, 5)])
def test_line_maximize_is_byzfl_search(peak, evals):
    objective = lambda t: -(abs(t - peak) ** 1.5)  # noqa: E731
    want = byzfl_line_maximize(objective, evals)
    got, value = jax.jit(lambda: attacks.line_maximize(lambda t: -(jnp.abs(t - peak) ** 1.5), evals))()
    np.testing.assert_allclose(float(got), want, rtol=1e-5)  # a sum of <= 20 steps, float32
    np.testing.assert_allclose(float(value), objective(want), rtol=1e-3, atol=1e-3)


def median_of(u, mask):
    return np.median(u[mask], axis=0)


@pytest.mark.parametrize("name", ["opt_ipm", "opt_alie"])
def test_opt_attacks_pick_byzfl_factor_against_the_median(name):
    u, mal, mask = setup(1)
    mu, sigma = honest_stats(u, mal, mask)
    base, direction = (np.zeros(P), -mu) if name == "opt_ipm" else (mu, sigma)

    def distance(tau):
        x = u.copy()
        x[mal] = base + tau * direction
        return np.linalg.norm(median_of(x, mask) - mu)

    tau = byzfl_line_maximize(distance, 20)
    assert tau > 0  # the search moved: the factor is not the start value
    rule = aggregators.coordinate_median()
    aggregate = lambda t: rule.aggregate(t, jnp.ones(C), jnp.asarray(mask), (), jax.random.key(0))[0]  # noqa: E731
    got = run(getattr(attacks, name)(20), u, mal, mask, aggregate)
    check_rows(got, u, mal, base + tau * direction)
    recovered = (got[mal][0] - base) @ direction / (direction @ direction)
    np.testing.assert_allclose(recovered, tau, rtol=1e-4)


@pytest.mark.parametrize("name", ["opt_ipm", "mimic_ipm"])
def test_searched_attack_without_the_server_side_says_what_it_needs(name):
    u, mal, mask = setup()
    with pytest.raises(ValueError, match="AttackContext.aggregate"):
        run(getattr(attacks, name)(), u, mal, mask)


# --------------------------------------------------------------------------- Fang et al. 2020


def numpy_krum_selects(x, mask, f):
    """Index of Krum's pick: lowest sum of squared distances to the n - f - 2 nearest others."""
    idx = np.flatnonzero(mask)
    v = x[idx]
    d2 = ((v[:, None] - v[None]) ** 2).sum(-1)
    k = max(len(idx) - f - 2, 1)
    scores = [np.sort(np.delete(d2[i], i))[:k].sum() for i in range(len(idx))]
    return idx[int(np.argmin(scores))]


def fang_lambda_max(h, n, f):
    """Fang et al. (2020), Sec. 4.2 bound, in update space: honest ``h [n - f, d]``."""
    d = h.shape[1]
    dist = np.sqrt(((h[:, None] - h[None]) ** 2).sum(-1))
    sums = [np.sort(np.delete(dist[i], i))[: n - f - 2].sum() for i in range(len(h))]
    return min(sums) / ((n - 2 * f - 1) * np.sqrt(d)) + np.linalg.norm(h, axis=1).max() / np.sqrt(d)


@pytest.mark.parametrize("seed", [0, 3])
def test_fang_krum_lambda_and_update(seed):
    u, mal, mask = setup(seed)
    n, f = mask.sum(), (mask & mal).sum()
    honest = u[mask & ~mal]
    mu, _ = honest_stats(u, mal, mask)
    s = np.sign(mu)
    lam = fang_lambda_max(honest, n, f)
    np.testing.assert_allclose(
        float(attacks.fang_krum_lambda_max(tree(u), jnp.asarray(mask & ~mal), jnp.int32(f))), lam, rtol=1e-5
    )
    while lam > attacks.FANG_THRESHOLD:
        x = u.copy()
        x[mal] = -lam * s
        if mal[numpy_krum_selects(x, mask, f)]:
            break
        lam /= 2
    assert lam > attacks.FANG_THRESHOLD
    got = run(attacks.fang_krum(), u, mal, mask)
    check_rows(got, u, mal, -lam * s)


def test_fang_krum_sends_genuine_updates_when_krum_never_picks_it():
    u, mal, mask = setup()
    u[mal] = 0.0  # the attackers' genuine updates
    u[mask & ~mal] = 5.0 + np.arange(P)  # identical honest updates score 0: Krum picks one at every lambda
    got = run(attacks.fang_krum(), u, mal, mask)
    np.testing.assert_array_equal(got[mask], u[mask].astype(np.float32))


# --------------------------------------------------------------------------- mimic, then reverse


def numpy_mimic_ipm(u, malicious, mask, aggregate, evals):
    """The attack transcribed: base 0 or the honest u_j with the largest reversal, then ByzFL's line search."""
    mu = u[mask & ~malicious].mean(0)

    def reversal(v):
        x = u.copy()
        x[malicious] = v
        return (mu - aggregate(x)) @ mu / np.linalg.norm(mu)

    j, best = -1, reversal(np.zeros(P))
    for i in np.flatnonzero(mask & ~malicious):
        if reversal(u[i]) > best:
            j, best = i, reversal(u[i])
    base = np.zeros(P) if j < 0 else u[j]
    tau = byzfl_line_maximize(lambda t: reversal(base - t * mu), evals)
    return j, tau, base, mu


def krum_rule(mask, f=3):
    rule = aggregators.krum(f)
    aggregate = lambda t: rule.aggregate(t, jnp.ones(C), jnp.asarray(mask), (), jax.random.key(0))[0]  # noqa: E731
    return aggregate, lambda x: x[numpy_krum_selects(x, mask, f)]


@pytest.mark.parametrize(
    "rule_name,shift,seed,want_base", [("krum", 0.5, 0, -1), ("krum", 2.0, 0, 8), ("median", 0.5, 1, -1)]
)
def test_mimic_ipm_base_factor_and_update(rule_name, shift, seed, want_base):
    """Krum with the zero base, Krum where no reversal is selected (attackers copy honest client 8), the median."""
    u, mal, mask = updates_with_absent(C, P, absent=9, attackers=(2, 5, 7), shift=shift, seed=seed)
    if rule_name == "krum":
        aggregate, numpy_rule = krum_rule(mask)
    else:
        rule = aggregators.coordinate_median()
        aggregate = lambda t: rule.aggregate(t, jnp.ones(C), jnp.asarray(mask), (), jax.random.key(0))[0]  # noqa: E731
        numpy_rule = lambda x: median_of(x, mask)  # noqa: E731
    j, tau, base, mu = numpy_mimic_ipm(u, mal, mask, numpy_rule, 20)
    assert j == want_base and tau > 0  # the inputs cover both bases; the search moved
    got = run(attacks.mimic_ipm(20), u, mal, mask, aggregate)
    check_rows(got, u, mal, base - tau * mu)
    np.testing.assert_allclose((base - got[mal][0]) @ mu / (mu @ mu), tau, rtol=1e-4)


def test_mimic_ipm_ties_keep_the_zero_base_and_tau_zero():
    """Identical honest updates: Krum picks one whatever the attackers send, every candidate ties, u = 0."""
    u, mal, mask = setup()
    u[mask & ~mal] = 1.0 + np.arange(P)
    got = run(attacks.mimic_ipm(), u, mal, mask, krum_rule(mask)[0])
    check_rows(got, u, mal, np.zeros(P))


def test_mimic_ipm_stops_at_the_krum_selection_boundary_where_opt_ipm_does_not():
    """Reversal grows with tau only while Krum selects the crafted update: the search ends just below the boundary.

    ByzFL's contraction keeps ``boundary - tau < delta / ratio`` once a try has failed (a try below the
    boundary succeeds and moves tau up by delta), and 40 evaluations with the boundary below the first
    step 10 end with ``delta <= 10 * 0.8**38``. On the same inputs Opt-IPM's ``|agg - mu_H|`` is largest
    at tau = 10, where Krum picks an honest update.
    """
    u, mal, mask = updates_with_absent(C, P, absent=9, attackers=(2, 5, 7), shift=0.5, seed=1)
    aggregate, numpy_rule = krum_rule(mask)
    mu = u[mask & ~mal].mean(0)

    def attacker_selected(t):
        x = u.copy()
        x[mal] = -t * mu
        return mal[numpy_krum_selects(x, mask, 3)]

    low, high = 0.0, 10.0  # numpy bisection for the boundary, float64
    assert attacker_selected(low) and not attacker_selected(high)
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if attacker_selected(mid) else (low, mid)
    got = run(attacks.mimic_ipm(40), u, mal, mask, aggregate)
    tau = -got[mal][0] @ mu / (mu @ mu)
    assert 0 <= low - tau < 10 * 0.8**38 / 0.8 and attacker_selected(tau)
    assert numpy_mimic_ipm(u, mal, mask, numpy_rule, 40)[0] == -1  # the zero base: Opt-IPM's line
    ipm_tau = -run(attacks.opt_ipm(20), u, mal, mask, aggregate)[mal][0] @ mu / (mu @ mu)
    assert not attacker_selected(ipm_tau)


def numpy_fang_trim(u, honest, r):
    mu = u[honest].mean(0)
    hi, lo = u[honest].max(0), u[honest].min(0)
    below = np.where(lo > 0, lo / r, lo * r)
    above = np.where(hi > 0, hi * r, hi / r)
    return np.where(mu > 0, below, above)


def test_fang_trim_values_match_the_paper():
    u, mal, mask = setup(2)
    u[:, :4] -= 1.5  # mixed signs of the honest extremes and the mean
    r = np.random.default_rng(5).uniform(1, 2, size=(C, P))
    got = attacks.fang_trim_values(tree(u), jnp.asarray(mask & ~mal), tree(r))
    np.testing.assert_allclose(rows(got)[mask], numpy_fang_trim(u, mask & ~mal, r)[mask], rtol=1e-6, atol=1e-6)


def test_fang_trim_attackers_draw_their_own_factors_in_one_to_b():
    u, mal, mask = setup(2)
    got = run(attacks.fang_trim(), u, mal, mask)
    np.testing.assert_array_equal(got[~mal], u[~mal].astype(np.float32))
    r_low, r_high = (
        numpy_fang_trim(u, mask & ~mal, np.ones((C, P))),
        numpy_fang_trim(u, mask & ~mal, 2 * np.ones((C, P))),
    )
    lo, hi = np.minimum(r_low, r_high), np.maximum(r_low, r_high)
    crafted = got[mal]
    assert np.all(crafted >= lo[mal] - 1e-6) and np.all(crafted <= hi[mal] + 1e-6)
    assert len({tuple(rw) for rw in crafted}) == mal.sum()  # one draw per attacker


# --------------------------------------------------------------------------- Shejwalkar and Houmansadr 2021


def numpy_perturbation(kind, mu, sigma):
    return {"unit_vec": -mu / np.linalg.norm(mu), "sign": -np.sign(mu), "std": -sigma}[kind]


def ndss_gamma(feasible, evals, gamma=10.0):
    """Their search, with a fixed number of steps: success -> gamma += step / 2, failure -> -=; step /= 2."""
    step, best = gamma, 0.0
    for _ in range(evals):
        if feasible(gamma):
            best, gamma = gamma, gamma + step / 2
        else:
            gamma -= step / 2
        step /= 2
    return best


@pytest.mark.parametrize("rule", ["min_max", "min_sum"])
@pytest.mark.parametrize("kind", attacks.PERTURBATIONS)
def test_min_max_and_min_sum_gamma_and_update(rule, kind):
    u, mal, mask = setup(4)
    h = u[mask & ~mal]
    mu, sigma = honest_stats(u, mal, mask)
    p = numpy_perturbation(kind, mu, sigma)
    pair = ((h[:, None] - h[None]) ** 2).sum(-1)

    def feasible(gamma):
        d2 = ((mu + gamma * p - h) ** 2).sum(-1)
        return d2.max() <= pair.max() if rule == "min_max" else d2.sum() <= pair.sum(1).max()

    gamma = ndss_gamma(feasible, 20)
    assert 1e-3 < gamma < 20 - 1e-3  # interior: neither 0 nor the search's ceiling
    got = run(getattr(attacks, rule)(kind, 20), u, mal, mask)
    check_rows(got, u, mal, mu + gamma * p)
    np.testing.assert_allclose((got[mal][0] - mu) @ p / (p @ p), gamma, rtol=1e-4)


# --------------------------------------------------------------------------- the differentiable attacker

F, K = 4, 3


def server_context(x, y, mask, rule, server_opt, params):
    """An AttackContext built as the engine builds it: the aggregator, the server step and the data loss."""
    model = make_model("logistic", K)
    weights = jnp.ones(x.shape[0])
    rows_valid = jnp.ones(y.shape, bool)
    opt_state = server_opt.init(params)

    def step(update):
        steps, _ = server_opt.update(jax.tree.map(jnp.negative, update), opt_state, params)
        return optax.apply_updates(params, steps)

    return AttackContext(
        weights,
        mask,
        K,
        aggregate=lambda t: rule.aggregate(t, weights, mask, (), jax.random.key(0))[0],
        step=step,
        loss=lambda p, clients: attacks.mean_loss(model.apply, p, x, y, rows_valid & clients[:, None]),
    )


def logistic_problem(seed=0, clients=6, rows_each=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(clients, rows_each, F))
    y = rng.integers(0, K, size=(clients, rows_each))
    params = {"params": {"head": {"kernel": rng.normal(size=(F, K)) * 0.3, "bias": rng.normal(size=K) * 0.1}}}
    deltas = {
        "params": {
            "head": {"kernel": rng.normal(size=(clients, F, K)) * 0.2, "bias": rng.normal(size=(clients, K)) * 0.2}
        }
    }
    malicious = np.zeros(clients, bool)
    malicious[[1, 4]] = True
    return x, y, params, deltas, malicious


@pytest.mark.parametrize("rule_name", ["mean", "trimmed_mean", "geometric_median"])
def test_poison_objective_gradient_matches_finite_differences(rule_name):
    """jax.grad through aggregator and server optimizer (FedAvgM) vs central differences, in float64."""
    with jax.enable_x64(True):
        x, y, params, deltas, malicious = logistic_problem()
        params, deltas = jax.tree.map(jnp.float64, params), jax.tree.map(jnp.float64, deltas)
        mask = jnp.ones(6, bool)
        rule = {"mean": aggregators.mean(), "trimmed_mean": aggregators.trimmed_mean(1)}.get(rule_name)
        rule = rule or aggregators.geometric_median(1e-8, 3)
        context = server_context(jnp.asarray(x), jnp.asarray(y), mask, rule, optax.sgd(0.7, momentum=0.9), params)
        honest = mask & ~jnp.asarray(malicious)
        u0 = jax.tree.map(lambda d: jnp.mean(d, 0) + 0.05, deltas)
        objective = jax.jit(lambda u: attacks.poison_objective(u, deltas, jnp.asarray(malicious), honest, context))
        grad = jax.grad(objective)(u0)
        flat, unravel = jax.flatten_util.ravel_pytree(u0)
        h = 1e-6  # error: h^2 f''' ~ 1e-12 plus rounding 1e-16 / h ~ 1e-10; kinks of the trimmed mean are farther
        fd = np.array(
            [(objective(unravel(flat + h * e)) - objective(unravel(flat - h * e))) / (2 * h) for e in np.eye(flat.size)]
        )
        np.testing.assert_allclose(jax.flatten_util.ravel_pytree(grad)[0], fd, rtol=1e-6, atol=1e-8)
        assert np.abs(fd).max() > 1e-3  # the malicious update does move the honest loss


def softmax_loss_grad(w, b, x, y):
    """Mean cross-entropy of a linear softmax model on ``x [N, F]`` and its gradient (closed form)."""
    z = x @ w + b
    z -= z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    loss = -np.log(p[np.arange(len(y)), y]).mean()
    g = p.copy()
    g[np.arange(len(y)), y] -= 1
    return loss, x.T @ g / len(y), g.mean(0)


@pytest.mark.parametrize("stealth,knowledge", [("distance", "omniscient"), ("norm", "own_data")])
def test_grad_ascent_is_projected_normalised_ascent(stealth, knowledge):
    """Mean aggregator, FedAvg (lr eta): d params' / du = eta f / n, so the ascent is closed form in numpy."""
    x, y, params, deltas, malicious = logistic_problem(1)
    n, f, eta, steps, step_size, budget = 6, 2, 0.8, 4, 0.6, 1.5
    mask = np.ones(n, bool)
    honest = ~malicious
    dk, db = deltas["params"]["head"]["kernel"].reshape(n, -1), deltas["params"]["head"]["bias"]
    d = np.concatenate([dk, db], 1)
    mu = d[honest].mean(0)
    center = mu if stealth == "distance" else np.zeros_like(mu)
    radius = budget * np.linalg.norm(d[honest] - center, axis=1).max()
    w0 = np.concatenate([params["params"]["head"]["kernel"].ravel(), params["params"]["head"]["bias"]])
    data = honest if knowledge == "omniscient" else malicious
    xs, ys = x[data].reshape(-1, F), y[data].ravel()

    def objective(v):  # loss after the server step with every attacker sending v, and its gradient in v
        w = w0 + eta * (d[honest].sum(0) + f * v) / n
        loss, gw, gb = softmax_loss_grad(w[: F * K].reshape(F, K), w[F * K :], xs, ys)
        return loss, eta * f / n * np.concatenate([gw.ravel(), gb])

    v, best_v, best = mu.copy(), mu.copy(), -np.inf
    for _ in range(steps):
        loss, g = objective(v)
        if loss > best:
            best_v, best = v.copy(), loss
        v = v + step_size * radius * g / np.linalg.norm(g)
        off = v - center
        v = center + off * min(1.0, radius / np.linalg.norm(off))
    want = v if objective(v)[0] > best else best_v

    context = server_context(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(y),
        jnp.asarray(mask),
        aggregators.mean(),
        optax.sgd(eta),
        jax.tree.map(jnp.float32, params),
    )
    attack = attacks.grad_ascent(steps, step_size, budget, stealth, knowledge)
    out = jax.jit(lambda t: attack.apply(t, jnp.asarray(malicious), jax.random.key(0), context))(
        jax.tree.map(jnp.float32, deltas)
    )
    got = np.concatenate(
        [np.asarray(out["params"]["head"]["kernel"]).reshape(n, -1), np.asarray(out["params"]["head"]["bias"])], 1
    )
    np.testing.assert_array_equal(got[honest], d[honest].astype(np.float32))
    np.testing.assert_allclose(got[malicious], np.broadcast_to(want, (f, want.size)), rtol=1e-4, atol=1e-5)
    assert objective(want)[0] > objective(mu)[0] + 1e-3  # the ascent raised the loss
    assert np.linalg.norm(want - center) <= radius * (1 + 1e-9)


@pytest.mark.parametrize("attack_name", ["grad_ascent", "mimic_ipm"])
def test_adaptive_attack_in_a_vmapped_sweep_equals_its_runs_alone(tmp_path, attack_name):
    """Switched at run time with sign flip, fractions and seeds vmapped: each adaptive cell equals its own run."""
    cfg = config_lib.default_config()
    cfg.data.samples_per_client = 16
    cfg.model.name = "logistic"
    cfg.rounds, cfg.eval_every = 3, 3
    cfg.local.batch_size = 8
    cfg.baselines = ()
    cfg.aggregator.name = "trimmed_mean"
    cfg.sweep.cells = [{"attack.name": name} for name in (attack_name, "sign_flip")]
    cfg.sweep.grid = {"attack": {"fraction": (0.25, 0.5)}, "seed": (0, 1)}
    result = sweep.run_sweep(cfg, str(tmp_path), log=None)
    assert result.programs_compiled == 1  # one program for both attacks: the attack is a run-time switch
    losses = {}
    for cell in [c for c in result.plan.cells if c.values["attack.name"] == attack_name]:
        alone_cfg = sweep.with_overrides(cfg, cell.values)
        prepared = runner.prepare(alone_cfg)
        engine = build_engine(split(alone_cfg).static, prepared.context)
        train, test = (ClientData(*map(jnp.asarray, d)) for d in (prepared.dataset.train, prepared.dataset.test))
        alone = engine.program(alone_cfg.seed, train, test, config_lib.split(alone_cfg).hparams)
        for name, value in alone.items():
            np.testing.assert_allclose(result.histories[cell.index][name], value, rtol=1e-5, atol=1e-5, err_msg=name)
        losses[tuple(sorted(cell.values.items()))] = float(np.asarray(alone["global_pooled_loss"])[-1])
    assert len(set(losses.values())) == len(losses)  # fraction and seed matter: the equality is not vacuous

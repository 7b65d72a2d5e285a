"""Personalised FL (fine-tuning, Ditto, FedPer, APFL) against numpy references, limits and spies.

Local training is full-batch with one step per round, so every method has a
closed-form trajectory written here in float64 numpy (logistic model) or with
`jax.grad` of a loss written here (MLP). Tests share configs so that the
cached engines compile once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfed_jax import aggregators, attacks, personalize, runner
from medfed_jax import config as config_lib
from medfed_jax.client import LocalHParams, LocalSpec
from medfed_jax.config import split
from medfed_jax.data.base import stack_clients
from medfed_jax.models import make_model
from medfed_jax.server import build_engine
from medfed_jax.types import Aggregator, Attack, ClientData, FederatedDataset

NUM_CLASSES, LR, ROUNDS = 3, 0.3, 3
SIZES = [5, 8, 3, 6]
BUILD_AGGREGATOR, BUILD_ATTACK = aggregators.build_aggregator, attacks.build_attack  # before any monkeypatching


def federation(sizes=SIZES, num_features=4, seed=0, test_size=5) -> FederatedDataset:
    """A toy federation whose clients disagree (each has its own label rule)."""
    rng = np.random.default_rng(seed)

    def client(n, w):
        x = rng.normal(size=(n, num_features)).astype(np.float32)
        return x, np.argmax(x @ w, 1)

    rules = [rng.normal(size=(num_features, NUM_CLASSES)) for _ in sizes]
    train = [client(n, w) for n, w in zip(sizes, rules)]
    test = [client(test_size, w) for w in rules]
    names = tuple(f"c{i}" for i in range(len(sizes)))
    return FederatedDataset("toy", stack_clients(*zip(*train)), stack_clients(*zip(*test)), names, NUM_CLASSES)


def make_config(method, **overrides):
    """Logistic model, full-batch local training: one gradient step per client and round."""
    cfg = config_lib.default_config()
    cfg.model.name = "logistic"
    cfg.rounds, cfg.eval_every = 2, 1
    cfg.local.batch_size, cfg.local.lr = 64, LR
    cfg.baselines = ()
    cfg.personalization.method = method
    for path, value in overrides.items():
        config_lib.set_path(cfg, path, value)
    return cfg


def setup(cfg, dataset, build=build_engine):
    prepared = runner.prepare(cfg, dataset)
    engine = build(split(cfg).static, prepared.context)
    return engine, ClientData(*map(jnp.asarray, dataset.train)), prepared.hparams


def advance(engine, state, train, knobs, rounds):
    """``rounds`` rounds, one compiled ``run_rounds(..., 1)`` call each (the runner's chunk here)."""
    for _ in range(rounds):
        state, _ = engine.run_rounds(state, train, knobs, 1)
    return state


def with_knobs(hparams, **values):
    personal = hparams.personalization._replace(**{k: jnp.float32(v) for k, v in values.items()})
    return hparams._replace(personalization=personal)


def changed_clients(before, after, num_clients):
    """``[C]`` bool: which clients' personal state differs in any bit."""
    changed = np.zeros(num_clients, bool)
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        changed |= np.any(np.asarray(old) != np.asarray(new), axis=tuple(range(1, np.ndim(old))))
    return changed


# --------------------------------------------------------------------------- numpy references (logistic model)


def rows(data, c):
    n = int(data.count[c])
    return np.asarray(data.x[c, :n], np.float64), np.asarray(data.y[c, :n])


def pooled_rows(data):
    parts = [rows(data, c) for c in range(len(data.count))]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def head(params):
    """The logistic model's ``(kernel, bias)`` in float64 (leading client axis kept if any)."""
    h = params["params"]["head"]
    return np.asarray(h["kernel"], np.float64), np.asarray(h["bias"], np.float64)


def gradient(w, x, y):
    """Gradient of the mean softmax cross-entropy of a linear model ``w = (kernel, bias)``."""
    logits = x @ w[0] + w[1]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = (p - np.eye(NUM_CLASSES)[y]) / len(y)
    return x.T @ residual, residual.sum(0)


def sgd(w, g, lr=LR):
    return tuple(a - lr * b for a, b in zip(w, g))


def gd(w, x, y, steps):
    for _ in range(steps):
        w = sgd(w, gradient(w, x, y))
    return w


def fedavg_trajectory(w, dataset, rounds):
    """Full-batch FedAvg with count weights: gradient descent on the pooled loss; every round's model."""
    x, y = pooled_rows(dataset.train)
    trajectory = [w]
    for _ in range(rounds):
        trajectory.append(sgd(trajectory[-1], gradient(trajectory[-1], x, y)))
    return trajectory


def assert_head(params, want, atol=1e-5):
    for got, ref in zip(head(params), want):
        np.testing.assert_allclose(got, ref, atol=atol, rtol=0)


# --------------------------------------------------------------------------- fine-tuning


def test_finetune_with_zero_steps_is_the_global_model():
    dataset = federation()
    section = personalize.default_config()
    section.method, section.finetune_steps = "finetune", 0
    model = make_model("mlp", NUM_CLASSES, (6,))
    spec = LocalSpec(1, 0, 64, "sgd", "shuffle", dataset.train.max_count)
    personal = personalize.build_personalizer(section, None, model, spec)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
    hparams = LocalHParams(jnp.float32(LR), jnp.float32(0.0), jnp.float32(0.0))
    tuned = personal.personal_params(params, (), dataset.train, jax.random.PRNGKey(1), hparams)
    for got, want in zip(jax.tree.leaves(tuned), jax.tree.leaves(params)):
        assert got.shape == (4, *want.shape)
        np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))


def test_finetune_takes_full_batch_gradient_steps_from_the_global_model():
    dataset = federation()
    engine, train, knobs = setup(make_config("finetune", **{"personalization.finetune_steps": 3}), dataset)
    state = engine.init(1, train, knobs)
    personal = head(engine.eval_params(state, train, knobs))
    for c in range(4):
        want = gd(head(state.params), *rows(dataset.train, c), steps=3)
        for got, ref in zip(personal, want):
            np.testing.assert_allclose(got[c], ref, atol=1e-5)


# --------------------------------------------------------------------------- Ditto


def test_ditto_follows_its_proximal_recursion_and_both_lambda_limits():
    """v <- (v - lr grad F_c(v) + lr lam w_t) / (1 + lr lam); lam = 0 is local-only, lam -> inf is FedAvg."""
    dataset = federation()
    engine, train, knobs = setup(make_config("ditto"), dataset)
    start = engine.init(0, train, knobs)
    fedavg = fedavg_trajectory(head(start.params), dataset, ROUNDS)

    for lam in (0.0, 2.0, 1e8):
        state = advance(engine, start, train, with_knobs(knobs, ditto_lambda=lam), ROUNDS)
        assert_head(state.params, fedavg[-1])  # the personal models leave FedAvg's global model alone
        shrink = LR * lam
        for c in range(4):
            x, y = rows(dataset.train, c)
            v = head(start.params)
            for r in range(ROUNDS):
                v = tuple((a + shrink * b) / (1 + shrink) for a, b in zip(sgd(v, gradient(v, x, y)), fedavg[r]))
            if lam == 0:
                v_alone = gd(head(start.params), x, y, ROUNDS)
                np.testing.assert_allclose(v[0], v_alone[0], atol=1e-12)  # the recursion is local-only training
            if lam == 1e8:
                np.testing.assert_allclose(v[0], fedavg[ROUNDS - 1][0], atol=1e-6)  # the last round's global model
            for got, ref in zip(head(state.clients), v):
                np.testing.assert_allclose(got[c], ref, atol=1e-5)


# --------------------------------------------------------------------------- partial personalisation


def mlp_loss(params, x, y):
    """Mean cross-entropy of the (6,) MLP, written out independently of the package."""
    p = params["params"]
    hidden = jax.nn.relu(x @ p["hidden0"]["kernel"] + p["hidden0"]["bias"])
    logits = hidden @ p["head"]["kernel"] + p["head"]["bias"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def test_fedper_local_subtrees_never_leave_their_clients(monkeypatch):
    """Cohort of 3 of 4, client 1 malicious, DP-SGD: only the hidden layer is noised, attacked, aggregated."""
    dataset = federation()
    overrides = {"model.name": "mlp", "model.widths": (6,), "attack.name": "sign_flip", "attack.clients": (1,)}
    full_batch_steps = {"local.sampling": "fixed", "local.steps": 1, "local.epochs": 0}
    dpsgd = {"privacy.mode": "dpsgd", "privacy.noise_multiplier": 100.0, "privacy.clip_norm": 1.0}
    cfg = make_config("fedper", cohort_size=3, **overrides, **full_batch_steps, **dpsgd)
    seen = []

    def spy_aggregator(cfg_, knobs):
        real = BUILD_AGGREGATOR(cfg_, knobs)

        def aggregate(updates, *args):
            seen.append(("aggregator", {k: v.shape for k, v in updates.items()}))
            return real.aggregate(updates, *args)

        return Aggregator(real.init, aggregate)

    def spy_attack(cfg_, knobs):
        real = BUILD_ATTACK(cfg_, knobs)

        def apply(updates, *args):
            seen.append(("attack", {k: v.shape for k, v in updates.items()}))
            return real.apply(updates, *args)

        return Attack(apply, real.poison_labels)

    monkeypatch.setattr(attacks, "build_attack", spy_attack)
    monkeypatch.setattr(aggregators, "build_aggregator", spy_aggregator)
    engine, train, knobs = setup(cfg, dataset, build_engine.__wrapped__)  # uncached: traced with the spies
    state = engine.init(0, train, knobs)
    after = advance(engine, state, train, knobs, 1)
    shared = {"params/hidden0/bias": (3, 6), "params/hidden0/kernel": (3, 4, 6)}
    assert ("aggregator", shared) in seen and ("attack", shared) in seen
    assert all(shapes == shared for _, shapes in seen)
    np.testing.assert_array_equal(after.params["params"]["head"]["kernel"], state.params["params"]["head"]["kernel"])
    moved_by_noise = after.params["params"]["hidden0"]["kernel"] - state.params["params"]["hidden0"]["kernel"]
    assert np.abs(moved_by_noise).max() > 1.0  # sigma C / n >= 100 / 8 per coordinate; exact steps are ~0.1

    # a sampled client's head took one exact (noise-free) full-batch step on its own clean data (the malicious
    # one's too: the attack only rewrites shared updates); an unsampled client's head is bit-identical
    sampled = changed_clients(state.clients, after.clients, 4)
    assert sampled.sum() == 3
    mlp_grad = jax.jit(jax.grad(mlp_loss))
    for c in range(4):
        x, y = (jnp.asarray(a) for a in rows(dataset.train, c))
        grad = mlp_grad(state.params, x.astype(jnp.float32), y)["params"]["head"]
        for name in ("kernel", "bias"):
            want = state.params["params"]["head"][name] - LR * grad[name] * sampled[c]
            np.testing.assert_allclose(after.clients[f"params/head/{name}"][c], want, atol=1e-5)

    # another sampled client's data changes what is aggregated, but no one else's local head, in any bit
    d = int(np.flatnonzero(sampled)[-1])
    x = np.array(train.x)
    x[d] = -3 * x[d]
    moved = advance(engine, state, train._replace(x=jnp.asarray(x)), knobs, 1)
    assert not np.allclose(moved.params["params"]["hidden0"]["kernel"], after.params["params"]["hidden0"]["kernel"])
    others = np.arange(4) != d
    for a, b in zip(jax.tree.leaves(after.clients), jax.tree.leaves(moved.clients)):
        np.testing.assert_array_equal(np.asarray(a)[others], np.asarray(b)[others])


# --------------------------------------------------------------------------- APFL

APFL_FIXED = {"personalization.learn_alpha": False}


def test_apfl_fixed_alpha_zero_is_fedavg_and_one_is_local_only():
    dataset = federation()
    engine, train, knobs = setup(make_config("apfl", **APFL_FIXED), dataset)
    start = engine.init(0, train, knobs)
    fedavg = fedavg_trajectory(head(start.params), dataset, ROUNDS)
    for alpha in (0.0, 1.0):
        alpha_knobs = with_knobs(knobs, alpha=alpha)
        state = advance(engine, start, train, alpha_knobs, ROUNDS)
        personal = head(engine.eval_params(state, train, alpha_knobs))
        for c in range(4):
            want = fedavg[-1] if alpha == 0 else gd(head(start.params), *rows(dataset.train, c), steps=ROUNDS)
            for got, ref in zip(personal, want):
                np.testing.assert_allclose(got[c], ref, atol=1e-5)


def test_apfl_local_step_follows_the_paper():
    """One full-batch step: w -= lr grad f(w); v -= lr alpha grad f(vbar); alpha -= lr <v - w, grad f(vbar)>."""
    dataset = federation([6])
    x, y = rows(dataset.train, 0)
    rng = np.random.default_rng(3)
    w, v = ((rng.normal(size=(4, 3)), rng.normal(size=3)) for _ in range(2))
    as_params = lambda m: {"params": {"head": {"kernel": jnp.float32(m[0]), "bias": jnp.float32(m[1])}}}  # noqa: E731
    section = personalize.default_config()
    section.method = "apfl"
    knobs = personalize.PersonalizationHParams(ditto_lambda=jnp.float32(0.0), alpha=jnp.float32(0.3))
    spec = LocalSpec(1, 0, 64, "sgd", "shuffle", 6)
    personal = personalize.build_personalizer(section, knobs, make_model("logistic", NUM_CLASSES), spec)
    hparams = LocalHParams(jnp.float32(0.2), jnp.float32(0.0), jnp.float32(0.0))
    client = {"v": as_params(v), "alpha": jnp.float32(0.3)}
    data = tuple(jnp.asarray(a[0]) for a in dataset.train)
    delta_w, new, _ = jax.jit(personal.client_update)(as_params(w), client, data, jax.random.PRNGKey(0), hparams)

    mix = tuple(0.3 * a + 0.7 * b for a, b in zip(v, w))
    g_mix = gradient(mix, x, y)
    alpha = 0.3 - 0.2 * sum(np.sum((a - b) * g) for a, b, g in zip(v, w, g_mix))
    assert 0.0 < alpha < 1.0 and abs(alpha - 0.3) > 1e-3  # the step moved alpha inside (0, 1)
    for got, ref in zip(head(delta_w), gradient(w, x, y)):
        np.testing.assert_allclose(got, -0.2 * ref, atol=1e-5)
    for got, ref in zip(head(new["v"]), sgd(v, g_mix, lr=0.2 * 0.3)):
        np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(new["alpha"], alpha, atol=1e-5)


def test_learned_apfl_keeps_unsampled_clients_state_and_alpha_in_range():
    dataset = federation([4, 6, 5, 3, 7])
    engine, train, knobs = setup(make_config("apfl", cohort_size=2), dataset)
    state = engine.init(0, train, knobs)
    np.testing.assert_array_equal(state.clients["alpha"], np.full(5, 0.5, np.float32))
    for _ in range(4):
        new = advance(engine, state, train, knobs, 1)
        assert changed_clients(state.clients, new.clients, 5).sum() == 2
        state = new
    alpha = np.asarray(state.clients["alpha"])
    assert np.all((alpha >= 0) & (alpha <= 1)) and np.any(alpha != 0.5)


# --------------------------------------------------------------------------- runner


def test_personalised_methods_in_the_runner_report_own_split_accuracy():
    dataset = federation(test_size=7)
    prepared = runner.prepare(make_config("apfl", **APFL_FIXED), dataset)  # the engine of the test above
    history = runner.run_seeds(prepared, "apfl", [2])
    rows_ = runner.train_method("apfl", prepared, seed=2, log=None)
    accuracy = history["client_accuracy"][0]
    assert accuracy.shape == (2, 4)
    np.testing.assert_allclose(history["own_client_accuracy"][0], accuracy.mean(1), atol=1e-6)  # equal test splits
    np.testing.assert_allclose(history["worst_client_accuracy"][0], accuracy.min(1), atol=1e-7)
    np.testing.assert_allclose([r["own_client_accuracy"] for r in rows_], history["own_client_accuracy"][0], atol=1e-6)
    np.testing.assert_allclose([r["accuracy[c3]"] for r in rows_], accuracy[:, 3], atol=1e-6)

    # client c's accuracy is its mixture alpha v_c + (1 - alpha) w on its own test rows, recomputed in numpy
    engine, train, knobs = setup(make_config("apfl", **APFL_FIXED), dataset)
    state = advance(engine, engine.init(2, train, knobs), train, knobs, 2)
    kernel, bias = head(state.clients["v"])
    w = head(state.params)
    for c in range(4):
        x, y = rows(dataset.test, c)
        logits = x @ (0.5 * kernel[c] + 0.5 * w[0]) + 0.5 * bias[c] + 0.5 * w[1]
        assert accuracy[-1, c] == pytest.approx(np.mean(np.argmax(logits, 1) == y))


# --------------------------------------------------------------------------- bad input

MLP = {"model.name": "mlp", "model.widths": (6,)}
BAD = [
    ({"personalization.method": "fedper", "personalization.local_paths": ("encoder",), **MLP}, "match no parameter"),
    ({"baselines": ("fedper",), "personalization.local_paths": ("decoder",)}, "match no parameter"),
    ({"personalization.method": "fedper", "personalization.local_paths": ("params",), **MLP}, "every parameter"),
    ({"personalization.method": "fedper", "personalization.local_paths": ("head",)}, "nothing is left to federate"),
    ({"personalization.method": "fedper", "personalization.local_paths": ()}, "local_paths is empty"),
    ({"personalization.ditto_lambda": -0.5}, "ditto_lambda=-0.5 must be a finite number >= 0"),
    ({"personalization.ditto_lambda": float("inf")}, "ditto_lambda=inf"),
    ({"personalization.alpha": 1.5}, r"alpha=1.5 must lie in \[0, 1\]"),
    ({"personalization.alpha": -0.1}, r"alpha=-0.1 must lie in \[0, 1\]"),
    ({"personalization.method": "pfedme"}, "personalization.method='pfedme' is unknown"),
    ({"personalization.finetune_steps": -1}, "finetune_steps"),
    ({"baselines": ("ditto", "perfedavg")}, "'perfedavg' is unknown"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_personalisation_config_raises_before_compiling(overrides, message, forbid_compile):
    with pytest.raises(ValueError, match=message):
        runner.run(make_config("none", **overrides), federation([4, 5, 6]), log=None)

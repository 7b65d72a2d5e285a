"""The federated engine against independent references (numpy, closed forms, loops)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfed_jax import config as config_lib
from medfed_jax import runner
from medfed_jax.client import LocalHParams, LocalSpec, make_local_update
from medfed_jax.config import split
from medfed_jax.data.base import stack_clients
from medfed_jax.models import make_model
from medfed_jax.server import build_engine
from medfed_jax.types import ClientData, FederatedDataset


def federation(sizes, num_features=5, num_classes=3, seed=0, test_size=6) -> FederatedDataset:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(num_features, num_classes))

    def client(n):
        x = rng.normal(size=(n, num_features)).astype(np.float32)
        return x, np.argmax(x @ w + 0.3 * rng.normal(size=(n, num_classes)), 1)

    train = [client(n) for n in sizes]
    test = [client(test_size) for _ in sizes]
    return FederatedDataset(
        "toy",
        stack_clients(*zip(*train)),
        stack_clients(*zip(*test)),
        tuple(f"c{i}" for i in range(len(sizes))),
        num_classes,
    )


def small_config(**overrides):
    cfg = config_lib.default_config()
    cfg.model.name = "mlp"
    cfg.model.widths = (8,)
    cfg.rounds, cfg.eval_every = 4, 2
    cfg.local.batch_size = 4
    cfg.local.lr = 0.1
    cfg.baselines = ()
    for path, value in overrides.items():
        config_lib.set_path(cfg, path, value)
    return cfg


def engine_and_data(cfg, dataset):
    prepared = runner.prepare(cfg, dataset)
    engine = build_engine(split(cfg).static, prepared.context)
    train = ClientData(*map(jnp.asarray, dataset.train))
    test = ClientData(*map(jnp.asarray, dataset.test))
    return engine, train, test, prepared.hparams


def hparams(lr=0.1, momentum=0.0, prox_mu=0.0):
    return LocalHParams(jnp.float32(lr), jnp.float32(momentum), jnp.float32(prox_mu))


@pytest.mark.parametrize("sampling,epochs,steps", [("shuffle", 2, 0), ("fixed", 0, 3), ("poisson", 0, 3)])
def test_vmapped_local_update_equals_python_loop(sampling, epochs, steps):
    dataset = federation([3, 9, 6, 1])
    model = make_model("mlp", 3, (8,))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
    spec = LocalSpec(epochs, steps, 4, "momentum", sampling, dataset.train.max_count)
    update = make_local_update(model, spec)
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    hp = hparams(momentum=0.5, prox_mu=0.01)
    batched, batched_metrics = jax.jit(jax.vmap(update, in_axes=(None, 0, 0, None)))(
        params, tuple(dataset.train), keys, hp
    )
    single = jax.jit(update)
    for c in range(4):
        data_c = tuple(np.asarray(a)[c] for a in dataset.train)
        delta, metrics = single(params, data_c, keys[c], hp)
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(delta)):
            np.testing.assert_allclose(got[c], want, atol=1e-5)
        assert int(batched_metrics["num_steps"][c]) == int(metrics["num_steps"])


def test_epoch_mode_makes_ceil_n_e_over_b_real_steps():
    dataset = federation([3, 9, 6, 1])
    model = make_model("logistic", 3)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
    update = make_local_update(model, LocalSpec(2, 0, 4, "sgd", "shuffle", 9))
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    _, metrics = jax.vmap(update, in_axes=(None, 0, 0, None))(params, tuple(dataset.train), keys, hparams())
    np.testing.assert_array_equal(metrics["num_steps"], [int(np.ceil(n * 2 / 4)) for n in (3, 9, 6, 1)])


def test_garbage_padding_changes_nothing():
    dataset = federation([3, 7, 5])
    x, y, count = (np.array(a) for a in dataset.train)
    wide_x = np.concatenate([x, np.full((3, 4, 5), 1e6, np.float32)], axis=1)
    wide_y = np.concatenate([y, np.full((3, 4), 2, np.int32)], axis=1)
    rng = np.random.default_rng(0)
    for c in range(3):  # garbage (not zeros) in the existing padding too
        wide_x[c, count[c] :] = rng.normal(size=wide_x[c, count[c] :].shape) * 1e6
    padded = FederatedDataset("toy", ClientData(wide_x, wide_y, count), dataset.test, dataset.client_names, 3)
    cfg = small_config(**{"local.sampling": "fixed", "local.steps": 3, "local.epochs": 0})
    a = runner.run_seeds(runner.prepare(cfg, dataset), "federated", [0])
    b = runner.run_seeds(runner.prepare(cfg, padded), "federated", [0])
    for key in ("global_pooled_accuracy", "global_pooled_loss", "train_loss"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_one_full_batch_round_is_one_gradient_step_on_the_pooled_loss():
    sizes = [4, 9, 6]
    dataset = federation(sizes)
    cfg = small_config(**{"model.name": "logistic", "local.batch_size": 64, "local.lr": 0.3})
    engine, train, _, knobs = engine_and_data(cfg, dataset)
    state = engine.init(0, train, knobs)
    new_state, _ = engine.round_step(state, train, knobs)
    w = np.asarray(state.params["params"]["head"]["kernel"], np.float64)
    b = np.asarray(state.params["params"]["head"]["bias"], np.float64)
    xs = np.concatenate([np.asarray(dataset.train.x)[c, :n] for c, n in enumerate(sizes)]).astype(np.float64)
    ys = np.concatenate([np.asarray(dataset.train.y)[c, :n] for c, n in enumerate(sizes)])
    logits = xs @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = (p - np.eye(3)[ys]) / len(ys)  # gradient of the pooled mean cross-entropy
    np.testing.assert_allclose(new_state.params["params"]["head"]["kernel"], w - 0.3 * xs.T @ residual, atol=1e-5)
    np.testing.assert_allclose(new_state.params["params"]["head"]["bias"], b - 0.3 * residual.sum(0), atol=1e-5)


def test_scanned_rounds_equal_single_round_steps():
    dataset = federation([5, 8, 3, 6])
    cfg = small_config(**{"cohort_size": 3, "server.optimizer": "fedadam", "server.lr": 0.05})
    engine, train, _, knobs = engine_and_data(cfg, dataset)
    state = engine.init(3, train, knobs)
    scanned, scanned_metrics = engine.run_rounds(state, train, knobs, 5)
    stepped = state
    for r in range(5):
        stepped, metrics = engine.round_step(stepped, train, knobs)
        np.testing.assert_allclose(scanned_metrics["train_loss"][r], metrics["train_loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(scanned.params), jax.tree.leaves(stepped.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(scanned.round) == int(stepped.round) == 5


def test_same_seed_same_history_different_seed_differs():
    dataset = federation([5, 8, 3, 6])
    cfg = small_config(cohort_size=2)
    prepared = runner.prepare(cfg, dataset)
    first = runner.train_method("federated", prepared, seed=1, log=None)
    again = runner.train_method("federated", prepared, seed=1, log=None)
    other = runner.train_method("federated", prepared, seed=2, log=None)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(first) == strip(again)
    assert strip(first) != strip(other)


def test_cohort_sampling_draws_the_cohort_without_replacement_and_ignores_others():
    num_clients, cohort = 8, 3
    dataset = federation([4] * num_clients)
    cfg = small_config(cohort_size=cohort)
    engine, train, _, knobs = engine_and_data(cfg, dataset)
    state = engine.init(0, train, knobs)
    reference, _ = engine.round_step(state, train, knobs)
    influential = []
    for c in range(num_clients):  # a client influences the round iff it was sampled
        x = np.array(train.x)
        x[c] = 100.0 * np.random.default_rng(c).normal(size=x[c].shape)
        perturbed, _ = engine.round_step(state, train._replace(x=jnp.asarray(x)), knobs)
        changed = any(
            not np.allclose(a, b) for a, b in zip(jax.tree.leaves(reference.params), jax.tree.leaves(perturbed.params))
        )
        influential.append(changed)
    assert sum(influential) == cohort


def test_server_optimizers_match_optax_free_reference():
    """FedAvgM's server step against a hand-written momentum update in numpy."""
    dataset = federation([6, 6])
    cfg = small_config(
        **{"model.name": "logistic", "server.optimizer": "fedavgm", "server.lr": 0.7, "server.momentum": 0.5}
    )
    engine, train, _, knobs = engine_and_data(cfg, dataset)
    plain = small_config(**{"model.name": "logistic"})
    plain_engine, _, _, plain_knobs = engine_and_data(plain, dataset)
    state = engine.init(0, train, knobs)
    plain_state = plain_engine.init(0, train, plain_knobs)
    velocity = 0.0
    params = np.asarray(state.params["params"]["head"]["kernel"])
    for _ in range(3):
        # the FedAvg (lr 1) step from the same params gives the aggregate
        plain_state = plain_state._replace(params=state.params, round=state.round)
        stepped, _ = plain_engine.round_step(plain_state, train, plain_knobs)
        aggregate = np.asarray(stepped.params["params"]["head"]["kernel"]) - params
        velocity = 0.5 * velocity - aggregate
        params = params - 0.7 * velocity
        state, _ = engine.round_step(state, train, knobs)
        np.testing.assert_allclose(state.params["params"]["head"]["kernel"], params, atol=1e-5)


BAD_CONFIGS = [
    ({"cohort_size": 9}, "cohort_size=9"),
    ({"local.batch_size": 0}, "local.batch_size"),
    ({"local.steps": 3}, "exactly one of local.epochs"),
    ({"local.epochs": 0}, "exactly one of local.epochs"),
    ({"local.lr": 0.0}, "local.lr"),
    ({"local.lr": -1.0}, "local.lr"),
    ({"model.name": "resnet"}, "model.name"),
    ({"local.optimizer": "lbfgs"}, "local.optimizer"),
    ({"server.optimizer": "fedsgd"}, "server.optimizer"),
    ({"aggregator.name": "average"}, "aggregator.name"),
    ({"model.name": "cnn"}, "cnn"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS)
def test_config_errors_raise_before_compiling(overrides, message, forbid_compile):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        runner.run(small_config(**overrides), federation([4] * 8), log=None)


def test_bad_data_raises_before_compiling():
    dataset = federation([4, 5])
    x = np.array(dataset.train.x)
    x[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        runner.prepare(
            small_config(), FederatedDataset("nan", dataset.train._replace(x=x), dataset.test, dataset.client_names, 3)
        )
    count = np.array(dataset.train.count)
    count[0] = 0
    with pytest.raises(ValueError, match="no training samples"):
        runner.prepare(
            small_config(),
            FederatedDataset("empty", dataset.train._replace(count=count), dataset.test, dataset.client_names, 3),
        )


def test_baselines_run_and_local_only_keeps_clients_apart():
    dataset = federation([5, 7, 6])
    cfg = small_config(baselines=("local_only", "pooled"))
    prepared = runner.prepare(cfg, dataset)
    local = runner.run_seeds(prepared, "local_only", [0])
    pooled = runner.run_seeds(prepared, "pooled", [0])
    assert local["client_accuracy"].shape == (1, 2, 3)
    assert pooled["client_accuracy"].shape == (1, 2, 3)
    # a local-only client's model ignores the others' data: perturb client 2's data, client 0 is unchanged
    x = np.array(dataset.train.x)
    x[2] = -x[2]
    changed = FederatedDataset("toy", dataset.train._replace(x=x), dataset.test, dataset.client_names, 3)
    other = runner.run_seeds(runner.prepare(cfg, changed), "local_only", [0])
    np.testing.assert_allclose(other["client_accuracy"][:, :, 0], local["client_accuracy"][:, :, 0])
    np.testing.assert_allclose(other["client_loss"][:, :, 0], local["client_loss"][:, :, 0], rtol=1e-6)


def test_program_equals_chunked_run():
    dataset = federation([5, 8, 3, 6])
    cfg = small_config()
    prepared = runner.prepare(cfg, dataset)
    rows = runner.train_method("federated", prepared, seed=4, log=None)
    program = runner.run_seeds(prepared, "federated", [4])
    np.testing.assert_allclose(
        [r["global_pooled_accuracy"] for r in rows], program["global_pooled_accuracy"][0], atol=1e-6
    )
    np.testing.assert_allclose([r["global_pooled_loss"] for r in rows], program["global_pooled_loss"][0], rtol=1e-5)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_roc_auc_matches_sklearn_with_ties_padding_and_missing_classes(num_classes):
    """`eval.roc_auc` against sklearn's per-class binary AUC, macro-averaged over classes with both kinds."""
    from sklearn.metrics import roc_auc_score

    from medfed_jax.eval import roc_auc

    rng = np.random.default_rng(num_classes)
    n = 60
    probs = rng.dirichlet(np.ones(num_classes), size=n).astype(np.float32)
    probs[:10] = probs[0]  # ties
    labels = rng.integers(0, num_classes, size=n)
    if num_classes > 2:
        labels[labels == num_classes - 1] = 0  # the last class never occurs: skipped
    valid = np.ones(n, bool)
    valid[-7:] = False
    probs[-7:] = np.nan  # padding holds garbage that must not count
    got = float(jax.jit(roc_auc)(jnp.asarray(probs), jnp.asarray(labels), jnp.asarray(valid)))
    keep = [k for k in range(num_classes) if 0 < np.sum(labels[valid] == k) < valid.sum()]
    want = np.mean([roc_auc_score(labels[valid] == k, probs[valid, k]) for k in keep])
    assert got == pytest.approx(want, abs=1e-6)
    if num_classes == 2:
        assert got == pytest.approx(roc_auc_score(labels[valid], probs[valid, 1]), abs=1e-6)
    probs[3, 0] = np.nan  # a real row without a score: no AUC
    assert np.isnan(float(roc_auc(jnp.asarray(probs), jnp.asarray(labels), jnp.asarray(valid))))

"""Populations far larger than a cohort: flat storage, O(cohort) draws, cohort blocks, step loops, outputs.

References: the padded `ClientData` of the same clients (numpy), exact
combinatorics (chi-square over every subset), binomial bounds, jaxpr shapes,
and element counts of the stored arrays.
"""

from __future__ import annotations

import csv
import io
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from medfed_jax import cli, client_results, runner, tabular
from medfed_jax import client as client_lib
from medfed_jax import config as config_lib
from medfed_jax import data as data_lib
from medfed_jax.client import LocalHParams, LocalSpec, make_local_update, map_clients, masked_mean_gradient
from medfed_jax.config import split
from medfed_jax.data import population, synthetic
from medfed_jax.data.base import stack_clients
from medfed_jax.models import make_model
from medfed_jax.server import build_engine
from medfed_jax.types import ClientData, FederatedDataset, Population

EPS = float(np.finfo(np.float32).eps)


def toy(sizes, num_features=5, num_classes=3, seed=0, test_size=4, flat=False) -> FederatedDataset:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(num_features, num_classes))

    def client(n):
        x = rng.normal(size=(n, num_features)).astype(np.float32)
        return x, np.argmax(x @ w, 1).astype(np.int32)

    train = stack_clients(*zip(*[client(n) for n in sizes]))
    test = stack_clients(*zip(*[client(test_size) for _ in sizes]))
    names = tuple(f"c{i}" for i in range(len(sizes)))
    return FederatedDataset("toy", population.from_padded(train) if flat else train, test, names, num_classes)


def small_config(**overrides):
    cfg = config_lib.default_config()
    cfg.model.widths = (8,)
    cfg.rounds, cfg.eval_every = 2, 1
    cfg.local.batch_size, cfg.local.lr = 3, 0.1
    cfg.baselines = ()
    for path, value in overrides.items():
        config_lib.set_path(cfg, path, value)
    return cfg


def random_config(**overrides):
    data = {"data.name": "random", "data.num_features": 4, "data.samples_per_client": 6, "data.size_sigma": 1.0}
    return small_config(**{**data, **overrides})


# ----------------------------------------------------------------------------- storage


def test_flat_storage_equals_the_padded_data_for_every_client():
    padded = data_lib.load_dataset(random_config(**{"data.num_clients": 40, "data.storage": "padded"}).data)
    flat = data_lib.load_dataset(random_config(**{"data.num_clients": 40, "data.storage": "flat"}).data)
    assert isinstance(flat.train, Population) and isinstance(padded.train, ClientData)
    x, y, count = (np.asarray(a) for a in padded.train)
    np.testing.assert_array_equal(flat.train.count, count)
    for c in range(len(count)):  # each client's rows, read back from the offsets
        rows = slice(int(flat.train.offset[c]), int(flat.train.offset[c]) + int(count[c]))
        np.testing.assert_array_equal(flat.train.x[rows], x[c, : count[c]])
        np.testing.assert_array_equal(flat.train.y[rows], y[c, : count[c]])
    for got, want in zip(population.to_padded(flat.train), padded.train):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(flat.test, padded.test):  # the evaluated test splits are the same too
        np.testing.assert_array_equal(got, want)


def test_gathered_block_is_the_padded_clients_and_caps_larger_clients_to_a_subset():
    dataset = toy([3, 9, 1, 6])
    flat = population.from_padded(dataset.train)
    index = jnp.asarray([2, 0, 3, 1])
    block = population.gather(flat, index, 9, jax.random.PRNGKey(0))  # cap = largest: exact
    for got, want in zip(block, dataset.train.take(np.asarray(index))):
        np.testing.assert_array_equal(got, want)
    cap = 4  # clients 1 (9 rows) and 3 (6 rows) are cut to 4 distinct rows of their own
    block = population.gather(flat, index, cap, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(block.count, [1, 3, 4, 4])
    x = np.asarray(dataset.train.x)
    for slot, c in enumerate(np.asarray(index)):
        n = min(int(dataset.train.count[c]), cap)
        own = {tuple(r) for r in x[c, : dataset.train.count[c]]}
        got = [tuple(r) for r in np.asarray(block.x[slot, :n])]
        assert len(set(got)) == n and set(got) <= own
        assert not np.asarray(block.x[slot, n:]).any() and not np.asarray(block.y[slot, n:]).any()


def test_capped_clients_train_on_a_uniform_subset_of_their_rows():
    n, cap, draws = 10, 3, 6000
    flat = population.flat(np.arange(n, dtype=np.float32)[:, None], np.zeros(n, np.int32), [n])
    keys = jax.random.split(jax.random.PRNGKey(1), draws)
    rows = jax.jit(jax.vmap(lambda k: population.gather(flat, jnp.asarray([0]), cap, k).x[0, :, 0]))(keys)
    hits = np.bincount(np.asarray(rows, np.int64).ravel(), minlength=n)
    # each row is in the subset with probability cap/n: a binomial, 5 sigma on every row
    mean, sd = draws * cap / n, math.sqrt(draws * cap / n * (1 - cap / n))
    assert np.all(np.abs(hits - mean) < 5 * sd), hits


def test_generated_population_stores_no_rows_and_gives_each_client_its_own_stream():
    cfg = random_config(**{"data.num_clients": 50, "data.storage": "generated", "data.eval_clients": 10})
    generated = data_lib.load_dataset(cfg.data)
    flat = data_lib.load_dataset(random_config(**{"data.num_clients": 50, "data.storage": "flat"}).data)
    train = generated.train
    np.testing.assert_array_equal(train.count, flat.train.count)  # the flat generator's sizes and teacher
    np.testing.assert_array_equal(
        train.teacher, synthetic.teacher_weights(4, 2, data_lib.resolve_seed(cfg.data, 0).seed)
    )
    assert sum(np.asarray(a).nbytes for a in train) == 50 * 4 + 4 * 2 * 4 + 2 * 4  # sizes, teacher, key
    wide = population.generate(train, jnp.asarray([7, 3, 12]), 40)
    narrow, narrow_slot = population.generate(train, jnp.asarray([12, 7]), 5), {12: 0, 7: 1}
    for slot, c in enumerate([7, 3, 12]):
        n = min(int(train.count[c]), 40)
        assert int(wide.count[slot]) == n and not np.asarray(wide.x[slot, n:]).any()
        x = np.asarray(wide.x[slot, :n])
        logits = np.sort(x @ np.asarray(train.teacher), 1)
        clear = logits[:, -1] - logits[:, -2] > 1e-4  # float32 matmuls may order near-ties differently
        np.testing.assert_array_equal(wide.y[slot, :n][clear], np.argmax(x @ np.asarray(train.teacher), 1)[clear])
        if c in narrow_slot:  # a client's rows do not depend on the block's width or its neighbours
            np.testing.assert_array_equal(narrow.x[narrow_slot[c], : min(n, 5)], x[: min(n, 5)])
    assert len(generated.test.count) == 10 and generated.eval_clients is not None


def test_memory_is_total_rows_plus_cohort_by_cap():
    cfg = random_config(**{"data.num_clients": 3000, "data.storage": "flat", "data.eval_clients": 50})
    dataset = data_lib.load_dataset(cfg.data)
    rows, clients, features = dataset.train.total_rows, dataset.num_clients, 4
    stored = sum(np.asarray(a).nbytes for a in dataset.train)
    assert stored == rows * (features + 1) * 4 + 2 * clients * 4  # x, y per row; offset, count per client
    largest = int(np.max(dataset.train.count))
    assert stored * 5 < clients * largest * (features + 1) * 4  # padding to the largest would be far bigger
    cohort, cap = 20, population.resolve_cap(cfg.data, dataset.train.count)
    block = jax.eval_shape(
        lambda p: population.gather(p, jnp.arange(cohort), cap, jax.random.PRNGKey(0)), dataset.train
    )
    assert sum(math.prod(a.shape) * a.dtype.itemsize for a in block) == cohort * cap * (features + 1) * 4 + cohort * 4


def test_cap_from_quantile_and_cap_below_one_is_refused_before_compiling(forbid_compile):
    counts = np.array([1, 2, 3, 4, 100])
    cfg = random_config()
    cfg.data.cap_quantile = 1.0
    assert population.resolve_cap(cfg.data, counts) == 100
    cfg.data.cap_quantile = 0.5
    assert population.resolve_cap(cfg.data, counts) == 3
    cfg.data.cap = 7
    assert population.resolve_cap(cfg.data, counts) == 7
    with pytest.raises(ValueError, match=r"data.cap=-1 (is out of range|must be an integer >= 1)"):
        runner.prepare(random_config(**{"data.cap": -1, "data.storage": "flat"}))
    with pytest.raises(ValueError, match=r"data.cap_quantile=0.0 must lie in \(0, 1\]"):
        runner.prepare(random_config(**{"data.cap_quantile": 0, "data.storage": "flat"}))
    with pytest.raises(ValueError, match="cap=0 must be >= 1"):
        population.gather(population.from_padded(toy([2]).train), jnp.asarray([0]), 0, jax.random.PRNGKey(0))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"data.storage": "dense"}, "data.storage='dense' is unknown"),
        ({"data.eval_clients": -2}, "data.eval_clients=-2 is out of range"),
        ({"data.size_sigma": -1.0}, "data.size_sigma=-1.0 must be a finite number >= 0"),
        ({"data.storage": "flat", "baselines": ("pooled",)}, "set baselines=()"),
        ({"data.storage": "flat", "personalization.method": "ditto"}, "only global-model training"),
        ({"data.eval_clients": 3, "baselines": ("local_only",)}, "set baselines=()"),
        (
            {
                "data.storage": "flat",
                "data.cap": 2,
                "privacy.mode": "dpsgd",
                "local.sampling": "poisson",
                "local.epochs": 0,
                "local.steps": 2,
            },
            "does not model per-round row subsets",
        ),
        ({"data.name": "digits", "data.partition": "iid", "data.size_sigma": 1.0}, "applies to the 'random'"),
    ],
)
def test_population_settings_are_checked_before_compiling(overrides, message, forbid_compile):
    cfg = random_config(**{"data.num_clients": 8})
    for path, value in overrides.items():
        config_lib.set_path(cfg, path, value)
    with pytest.raises(ValueError, match=message):
        runner.prepare(cfg)


# ----------------------------------------------------------------------------- cohort draws


def test_floyd_draws_every_subset_equally_often():
    n, k, draws = 7, 3, 14_000
    keys = jax.random.split(jax.random.PRNGKey(0), draws)
    samples = np.asarray(jax.jit(jax.vmap(lambda key: population.sample_without_replacement(key, n, k)))(keys))
    assert all(len(set(s)) == k for s in samples) and samples.min() >= 0 and samples.max() < n
    subsets = {s: i for i, s in enumerate(itertools.combinations(range(n), k))}
    observed = np.bincount([subsets[tuple(sorted(s))] for s in samples], minlength=len(subsets))
    chi2 = float(np.sum((observed - draws / len(subsets)) ** 2 / (draws / len(subsets))))
    assert chi2 < stats.chi2.ppf(1 - 1e-6, len(subsets) - 1), chi2  # fails a biased sampler; 1e-6 false alarms


def test_cohort_draw_gives_every_client_the_same_inclusion_frequency():
    n, cohort, draws = 500, 50, 2000
    flat = population.flat(np.zeros((n, 1), np.float32), np.zeros(n, np.int32), np.ones(n))
    keys = jax.random.split(jax.random.PRNGKey(3), draws)
    index = np.asarray(jax.jit(jax.vmap(lambda key: population.draw_cohort(key, flat, cohort)))(keys))
    assert all(len(set(row)) == cohort for row in index)
    hits = np.bincount(index.ravel(), minlength=n)
    p = cohort / n  # Binomial(draws, p) per client; 6 sigma over 500 clients: false alarm ~1e-6
    assert np.all(np.abs(hits - draws * p) < 6 * math.sqrt(draws * p * (1 - p))), (hits.min(), hits.max())


def test_cohort_is_ordered_by_client_size():
    flat = population.from_padded(toy([5, 1, 9, 3, 7, 2]).train)
    index = np.asarray(population.draw_cohort(jax.random.PRNGKey(0), flat, 4))
    assert np.all(np.diff(np.asarray(flat.count)[index]) >= 0)


def _intermediate_sizes(jaxpr) -> list[tuple[str, tuple[int, ...]]]:
    """(primitive, shape) of every value computed in ``jaxpr`` and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        found.extend((str(eqn.primitive), tuple(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found.extend(_intermediate_sizes(inner))
    return found


POISSON = {"cohort_size": 0, "cohort_sampling": "poisson", "sampling_rate": 1e-3, "max_cohort": 12}


@pytest.mark.parametrize(
    "storage, sampling", [("flat", {}), ("generated", {}), ("padded", {}), ("flat", POISSON), ("generated", POISSON)]
)
def test_a_flat_round_computes_nothing_of_population_size(storage, sampling):
    num_clients = 5003  # larger than every block, parameter and cohort array of this config
    cfg = random_config(
        **{
            "data.num_clients": num_clients,
            "data.samples_per_client": 2,
            "data.storage": storage,
            "cohort_size": 5,
            **sampling,
        }
    )
    prepared = runner.prepare(cfg)
    engine = build_engine(split(cfg).static, prepared.context)
    train = jax.device_put(prepared.dataset.train)
    state = engine.init(0, train, prepared.hparams)
    (call,) = jax.make_jaxpr(engine.round_step)(state, train, prepared.hparams).jaxpr.eqns  # the jitted round
    jaxpr = call.params["jaxpr"].jaxpr  # its inputs and outputs (the state) may be population-sized
    big = [(p, s) for p, s in _intermediate_sizes(jaxpr) if math.prod(s) >= num_clients]
    if storage == "padded":
        assert big  # the padded path's permutation of the whole population, which the check detects
    else:
        assert not big, big  # the stored rows are inputs; the round only builds cohort-sized values
        new, metrics = engine.round_step(state, train, prepared.hparams)
        assert int(new.round) == 1 and np.isfinite(float(metrics["train_loss"]))
        if sampling:  # Poisson cohorts: a binomial count in max_cohort slots
            assert 0 <= int(metrics["participants"]) <= sampling["max_cohort"]


# ----------------------------------------------------------------------------- step loop


def test_a_chunk_runs_as_many_steps_as_its_largest_member_and_results_are_unchanged():
    sizes = [1, 2, 10, 10]  # sorted by size: chunks {1, 2} and {10, 10}
    dataset = toy(sizes)
    model = make_model("mlp", 3, (8,))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
    hp = LocalHParams(jnp.float32(0.1), jnp.float32(0.5), jnp.float32(0.01))
    keys = jax.random.split(jax.random.PRNGKey(1), len(sizes))
    executed = []
    plain = masked_mean_gradient(model)

    def counting(*args):
        jax.debug.callback(lambda: executed.append(1))
        return plain(*args)

    spec = LocalSpec(1, 0, 1, "momentum", "shuffle", 10)
    chunked = make_local_update(model, spec, counting)
    data = tuple(jnp.asarray(a) for a in dataset.train)
    deltas, metrics = jax.jit(lambda p, d, k: map_clients(chunked, (p, d, k, hp), (None, 0, 0, None), "map", 2))(
        params, data, keys
    )
    jax.effects_barrier()
    assert len(executed) == 2 + 10  # one call per iteration of each chunk's loop: its largest member's steps
    np.testing.assert_array_equal(metrics["num_steps"], sizes)
    # Reference: each client alone (its own steps exactly), padded 5 rows wider than the population's largest.
    wide = make_local_update(model, spec._replace(max_count=15))
    alone = jax.jit(wide)
    for c, n in enumerate(sizes):
        x = np.zeros((15, 5), np.float32)
        y = np.zeros(15, np.int32)
        x[:n], y[:n] = dataset.train.x[c, :n], dataset.train.y[c, :n]
        delta, m = alone(params, (x, y, n), keys[c], hp)
        for got, want in zip(jax.tree.leaves(deltas), jax.tree.leaves(delta)):
            tol = 4 * (n + 1) * EPS * max(1.0, float(np.abs(want).max()))  # a few ulps per step (batched vs alone)
            np.testing.assert_allclose(got[c], want, rtol=0, atol=tol)
        assert float(metrics["train_loss"][c]) == pytest.approx(float(m["train_loss"]), rel=4 * n * EPS)


def masked_scan_reference(model, spec, params, data, key, hp):
    """The step loop before this change: a fixed-length scan over the padded largest client's steps,
    steps past a client's own budget masked (``where(active, new, old)``)."""
    x, y, count = data
    order_key, step_key, noise_key = jax.random.split(key, 3)
    orders = None
    if spec.sampling == "shuffle":
        keys = jax.random.split(order_key, spec.epochs)
        orders = jax.vmap(lambda k: client_lib._shuffled_order(k, count, spec.max_count))(keys)
    optimizer = client_lib.make_client_optimizer(spec.optimizer, hp)
    gradient = masked_mean_gradient(model)
    length = spec.steps or max(1, math.ceil(spec.max_count * spec.epochs / spec.batch_size))

    def step(carry, t):
        p, state = carry
        rows, valid, expected = client_lib._batch_rows(spec, step_key, t, count, orders)
        active = jnp.any(valid) if spec.sampling == "shuffle" else count > 0
        loss, grads = gradient(p, x[rows], y[rows], valid, jax.random.fold_in(noise_key, t), expected)
        grads = jax.tree.map(lambda g, w, w0: g + hp.prox_mu * (w - w0), grads, p, params)
        updates, new_state = optimizer.update(grads, state, p)
        keep = lambda new, old: jnp.where(active, new, old)  # noqa: E731
        new_p = jax.tree.map(keep, optax.apply_updates(p, updates), p)
        return (new_p, jax.tree.map(keep, new_state, state)), (jnp.where(active, loss, 0.0), active)

    (final, _), (losses, active) = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(length))
    return jax.tree.map(jnp.subtract, final, params), jnp.sum(active), jnp.sum(losses) / jnp.maximum(jnp.sum(active), 1)


@pytest.mark.parametrize(
    "sampling,epochs,steps,optimizer",
    [("shuffle", 2, 0, "momentum"), ("shuffle", 1, 0, "adam"), ("fixed", 0, 3, "sgd"), ("poisson", 0, 3, "momentum")],
)
def test_the_while_loop_gives_the_masked_scans_params(sampling, epochs, steps, optimizer):
    sizes = [9, 1, 4, 0, 6]
    dataset = toy(sizes)
    model = make_model("mlp", 3, (8,))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
    hp = LocalHParams(jnp.float32(0.1), jnp.float32(0.5), jnp.float32(0.01))
    spec = LocalSpec(epochs, steps, 3, optimizer, sampling, 9)
    keys = jax.random.split(jax.random.PRNGKey(2), len(sizes))
    data = tuple(jnp.asarray(a) for a in dataset.train)
    deltas, metrics = jax.jit(jax.vmap(make_local_update(model, spec), in_axes=(None, 0, 0, None)))(
        params, data, keys, hp
    )
    reference = jax.jit(jax.vmap(lambda d, k: masked_scan_reference(model, spec, params, d, k, hp)))
    want, want_steps, want_loss = reference(data, keys)
    # The same operations in the same order (bit-equal on the machines we ran); XLA may fuse a while body
    # differently from a scan body, moving each step's result by a few ulps: 4 eps per step of the largest.
    tol = 4 * (int(max(want_steps)) + 1) * EPS
    for got, expected in zip(jax.tree.leaves(deltas), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=tol * max(1.0, float(np.abs(expected).max())))
    np.testing.assert_array_equal(metrics["num_steps"], want_steps)
    # the loss mean sums the same per-step losses in another order: within (steps + 1) eps of each other
    np.testing.assert_allclose(metrics["train_loss"], want_loss, rtol=(max(want_steps) + 1) * EPS)


# ----------------------------------------------------------------------------- the engine


def _round(cfg, dataset):
    prepared = runner.prepare(cfg, dataset)
    engine = build_engine(split(cfg).static, prepared.context)
    train = jax.device_put(dataset.train)
    state = engine.init(0, train, prepared.hparams)
    return state, *engine.round_step(state, train, prepared.hparams)


def test_flat_round_equals_the_padded_round_when_sizes_are_sorted():
    sizes = [2, 3, 5, 8, 9]  # already in size order: the flat cohort has the padded order
    cfg = small_config(**{"data.storage": "flat"})
    _, padded, padded_metrics = _round(cfg, toy(sizes))
    _, flat, flat_metrics = _round(cfg, toy(sizes, flat=True))
    # The same data, keys and operations (bit-equal here); two separately compiled programs may fuse
    # differently: a few ulps per local step (3 at most) and per client in the mean (5).
    tol = 4 * (3 + len(sizes)) * EPS
    for got, want in zip(jax.tree.leaves(flat.params), jax.tree.leaves(padded.params)):
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(1.0, float(np.abs(want).max())))
    assert float(flat_metrics["train_loss"]) == pytest.approx(float(padded_metrics["train_loss"]), rel=tol)


def test_ordering_the_cohort_by_size_only_reorders_the_mean():
    sizes = [9, 2, 8, 3, 5, 1]
    cfg = small_config(**{"data.storage": "flat"})
    start, padded, metrics = _round(cfg, toy(sizes))
    _, flat, _ = _round(cfg, toy(sizes, flat=True))
    # Both take the same per-client updates (same data and keys) and average them in another order: each
    # weighted mean is within gamma_C * max_i |delta_i| <= C eps * norm_max of the exact one (recursive
    # summation, weights summing to 1), plus one rounding of the division and of params + update.
    c = len(sizes)
    for got, want, old in zip(*(jax.tree.leaves(s.params) for s in (flat, padded, start))):
        tol = 2 * (c + 2) * EPS * float(metrics["norm_max"]) + 2 * EPS * float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
        assert np.abs(want - old).max() > 100 * tol  # the round moved the params by far more than the tolerance


# ----------------------------------------------------------------------------- outputs


def test_per_client_outputs_are_summarised_beyond_the_threshold_and_written_long():
    names = [f"c{i}" for i in range(client_results.PER_CLIENT_COLUMNS + 1)]
    accuracy = np.linspace(0, 1, len(names))
    row = client_results.columns({"client_accuracy": accuracy, "client_loss": 1 - accuracy}, names)
    assert not any(k.startswith("accuracy[") for k in row)
    np.testing.assert_allclose(
        [row[f"client_accuracy_p{q}"] for q in client_results.QUANTILES], np.percentile(accuracy, [0, 10, 50, 90, 100])
    )
    few = client_results.columns({"client_accuracy": accuracy[:3]}, names[:3])
    assert few == {f"accuracy[c{i}]": accuracy[i] for i in range(3)}
    rows = [{"method": "federated", "round": r, **row} for r in (1, 2)]
    history, per_client = client_results.split(rows)
    assert per_client and all(client_results.VALUES not in h for h in history)
    assert tabular.to_csv(history).splitlines()[0].count(",") < 20  # columns do not grow with the clients
    lines = list(csv.reader(io.StringIO(tabular.to_csv(client_results.long_rows(rows, names)))))
    assert lines[0] == ["method", "round", "client", "metric", "value"]
    assert len(lines) == 1 + 2 * 2 * len(names)  # rounds x metrics x clients: linear
    assert lines[2] == ["federated", "1", "c1", "client_accuracy", repr(float(accuracy[1]))]


def test_a_flat_run_with_a_sampled_evaluation_writes_linear_outputs(tmp_path):
    cfg = random_config(
        **{
            "data.num_clients": 400,
            "data.storage": "flat",
            "data.eval_clients": 150,
            "data.cap_quantile": 0.9,
            "cohort_size": 20,
        }
    )
    summary = cli.run_single(runner.prepare(cfg), str(tmp_path))
    assert summary["evaluated_clients"] == "a seeded sample of 150 of 400 clients (data.seed)"
    header = (tmp_path / "history.csv").read_text().splitlines()[0].split(",")
    assert "client_accuracy_p50" in header and not any(h.startswith("accuracy[") for h in header)
    lines = (tmp_path / "clients.csv").read_text().splitlines()
    assert len(lines) == 1 + cfg.rounds * 2 * 150
    sample = population.eval_sample(400, 150, data_lib.resolve_seed(cfg.data, 0).seed)
    assert {line.split(",")[2] for line in lines[1:]} == {f"client{c}" for c in sample}

"""Populations far larger than a cohort: flat storage, O(cohort) draws, a fixed cohort block.

Storage (``data.storage``). A `Population` keeps every client's rows back to
back, ``x[R, ...]``, ``y[R]``, with per-client ``offset[C]`` and ``count[C]``
(``R`` = total rows): memory O(R + C), never O(C x largest client) as padded
`ClientData` is. ``'auto'`` stores flat from `FLAT_FROM_CLIENTS` clients on;
smaller populations stay padded, exactly as before. ``'generated'`` (the
``random`` and ``mnist_like`` sources) stores no rows at all: a
`GeneratedPopulation` holds the teacher, a key and the sizes, and each round
generates its cohort's rows on device from per-client keys (`generate`).

A round over a flat population (`medfed_jax.server`, `draw_cohort`, `gather`):

1. draw the cohort with Floyd's algorithm (`sample_without_replacement`):
   ``cohort`` iterations, each comparing with the clients drawn so far, so
   O(cohort^2) work and no array of population size (Poisson cohorts,
   ``cohort_sampling='poisson'``: `poisson_cohort`, a binomial count and a
   Floyd draw of ``max_cohort`` slots);
2. order it by client size, so that each chunk of `client.map_clients` holds
   clients of similar size (a chunk's step loop runs as many steps as its own
   largest member, `client.make_local_update`);
3. gather its rows into a fixed ``[cohort, cap]`` block (`ClientData`). A
   client with at most ``cap`` rows brings all of them (zero padding after);
   a larger one a uniformly random ``cap``-subset of its rows, drawn afresh
   every round (Floyd again). Its weight in the round is the rows it trained
   on, ``min(count, cap)``.

``cap`` is a shape, so it is fixed per run (`resolve_cap`): ``data.cap`` rows,
or when that is 0 the ``data.cap_quantile`` quantile of the client sizes
(1.0 = the largest client: nothing is subsampled and a round is exact). A
quantile below 1 keeps the block (and a round's cost) independent of the
population's largest client, which grows with the population under
heavy-tailed sizes. Memory: O(R + C + cohort x cap).

Evaluation (``data.eval_clients``): every client's test split, or a seeded
sample of that many clients (`store`), padded on the host once; a run's
output names the sample.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medfed_jax.types import Array, ClientData, FederatedDataset, GeneratedPopulation, Population, per_client_keys

STORAGES = ("auto", "padded", "flat", "generated")
FLAT_FROM_CLIENTS = 10_000  # 'auto' storage: flat from this many clients on
MAX_EVAL_BYTES = 2 << 30  # refuse a padded evaluation block larger than this


# ----------------------------------------------------------------------------- device side


def sample_without_replacement(key: Array, n: Array | int, k: int) -> Array:
    """``k`` distinct integers of ``0..n-1``, every ``k``-subset equally likely (Floyd's algorithm).

    R. W. Floyd's sampler (Bentley & Floyd, CACM 30(9), 1987): for
    ``j = n-k .. n-1`` draw ``t`` uniform in ``0..j`` and keep ``t``, or ``j``
    when ``t`` was already kept. ``k`` iterations of an O(k) membership test:
    O(k^2) work, O(k) memory, whatever ``n`` (which may be traced; needs
    ``n >= k``). Uniform up to `jax.random.randint`'s own rounding.
    """
    slots = jnp.arange(k)

    def body(i, chosen):
        j = n - k + i
        t = jax.random.randint(jax.random.fold_in(key, i), (), 0, j + 1)
        seen = jnp.any((chosen == t) & (slots < i))
        return chosen.at[i].set(jnp.where(seen, j, t).astype(jnp.int32))

    return jax.lax.fori_loop(0, k, body, jnp.zeros(k, jnp.int32))


def draw_cohort(key: Array, population: Population | GeneratedPopulation, cohort: int) -> Array:
    """``[cohort]`` population indices, uniform without replacement, ordered by client size."""
    (index,) = by_size(population, sample_without_replacement(key, population.num_clients, cohort))
    return index


def poisson_cohort(key: Array, num_clients: int, rate: float, slots: int) -> tuple[Array, Array]:
    """Truncated Poisson sampling: ``([slots] client indices, [slots] taking part)``.

    Each client takes part independently with probability ``rate``; when more
    than ``slots`` do, a uniformly random ``slots`` of them are kept (the
    truncation `dp_accounting.TruncatedSubsampledGaussianDpEvent` models).
    Drawn as ``K ~ Binomial(num_clients, rate)`` and the first ``min(K, slots)``
    of a uniformly ordered ``slots``-sample without replacement (Floyd, then a
    permutation): under Poisson sampling the set's law depends on its size
    only, so given ``K`` it is a uniform ``K``-subset, and any prefix of a
    uniformly ordered sample is one. O(slots^2) work, nothing of population size.
    """
    count_key, subset_key, order_key = jax.random.split(key, 3)
    taking = jnp.round(jax.random.binomial(count_key, num_clients, rate)).astype(jnp.int32)
    index = jax.random.permutation(order_key, sample_without_replacement(subset_key, num_clients, slots))
    return index, jnp.arange(slots) < jnp.minimum(taking, slots)


def by_size(population: Population | GeneratedPopulation, index: Array, *carried: Array) -> tuple[Array, ...]:
    """``index`` (and arrays ``carried`` along with it) ordered by client size, as `draw_cohort` orders."""
    order = jnp.argsort(jnp.asarray(population.count)[index], stable=True)
    return (index[order], *(c[order] for c in carried))


def gather(population: Population, index: Array, cap: int, key: Array) -> ClientData:
    """The clients at ``index`` as a ``[len(index), cap]`` padded block (see the module docstring).

    Clients with more than ``cap`` rows are cut to a uniformly random subset
    of ``cap`` rows, drawn from ``fold_in(key, client)``; padding is zero.
    """
    if cap < 1:
        raise ValueError(f"cap={cap} must be >= 1 row per client; set data.cap >= 1 or data.cap_quantile > 0.")
    x, y, offset, count = (jnp.asarray(a) for a in population)
    offset, count = offset[index], count[index]
    slots = jnp.arange(cap, dtype=jnp.int32)
    over = count > cap

    def subsets():
        keys = per_client_keys(key, index)
        return jax.vmap(lambda k, n: sample_without_replacement(k, n, cap))(keys, count)

    within = jax.lax.cond(jnp.any(over), subsets, lambda: jnp.broadcast_to(slots, (index.shape[0], cap)))
    kept = jnp.minimum(count, cap)
    valid = slots[None, :] < kept[:, None]
    rows = jnp.where(valid, offset[:, None] + jnp.where(over[:, None], within, slots[None, :]), 0)
    x_valid = valid.reshape(valid.shape + (1,) * (x.ndim - 1))
    return ClientData(
        jnp.where(x_valid, x[rows], 0).astype(x.dtype),
        jnp.where(valid, y[rows], 0).astype(y.dtype),
        kept.astype(jnp.int32),
    )


def generate(population: GeneratedPopulation, index: Array, cap: int) -> ClientData:
    """The clients at ``index`` as a ``[len(index), cap]`` block of their first ``min(count, cap)`` rows.

    A client's rows are iid, so a client larger than ``cap`` trains on a
    fixed ``cap``-row sample of its distribution (its first rows).
    """
    teacher, count = jnp.asarray(population.teacher), jnp.asarray(population.count)[index]
    key = jnp.asarray(population.key)
    x = jax.vmap(lambda c: jax.random.normal(jax.random.fold_in(key, c), (cap, teacher.shape[0])))(index)
    kept = jnp.minimum(count, cap)
    valid = jnp.arange(cap)[None, :] < kept[:, None]
    y = jnp.argmax(x @ teacher, -1).astype(jnp.int32)
    return ClientData(jnp.where(valid[..., None], x, 0.0), jnp.where(valid, y, 0), kept.astype(jnp.int32))


def cohort_block(train: Population | GeneratedPopulation, index: Array, cap: int, key: Array) -> ClientData:
    """A round's ``[cohort, cap]`` block: `gather` from stored rows, or `generate` them."""
    if isinstance(train, GeneratedPopulation):
        return generate(train, index, cap)
    return gather(train, index, cap, key)


# ----------------------------------------------------------------------------- host side


def from_padded(data: ClientData) -> Population:
    """The real rows of padded `ClientData`, stored flat (numpy)."""
    x, y, count = (np.asarray(a) for a in data)
    valid = np.arange(y.shape[1])[None, :] < count[:, None]
    return flat(x[valid], y[valid], count)


def flat(x: np.ndarray, y: np.ndarray, count: np.ndarray) -> Population:
    """A `Population` of rows ``x``/``y`` whose clients hold ``count`` consecutive rows each."""
    count = np.asarray(count, np.int64)
    if count.sum() != len(y) or len(x) != len(y):
        raise ValueError(f"{len(x)} feature rows and {len(y)} labels for clients holding {count.sum()} rows")
    if len(y) >= 2**31:
        raise ValueError(f"{len(y)} rows exceed int32 offsets (2^31); use fewer clients or rows per client.")
    offset = np.cumsum(count) - count
    return Population(
        np.asarray(x, np.float32), np.asarray(y, np.int32), offset.astype(np.int32), count.astype(np.int32)
    )


def to_padded(population: Population, index: np.ndarray | None = None) -> ClientData:
    """The clients at ``index`` (all when None) padded to the largest of them (numpy)."""
    offset, count = np.asarray(population.offset), np.asarray(population.count)
    index = np.arange(len(count)) if index is None else np.asarray(index)
    n_max = max(int(count[index].max(initial=0)), 1)
    valid = np.arange(n_max)[None, :] < count[index][:, None]
    rows = np.where(valid, offset[index][:, None] + np.arange(n_max)[None, :], 0)
    x, y = np.asarray(population.x), np.asarray(population.y)
    x_valid = valid.reshape(valid.shape + (1,) * (x.ndim - 1))
    return ClientData(
        np.where(x_valid, x[rows], 0).astype(np.float32), np.where(valid, y[rows], 0).astype(np.int32), count[index]
    )


def resolve_storage(data_cfg: Any, num_clients: int) -> str:
    """``'padded'`` or ``'flat'`` for ``data.storage`` and a population of ``num_clients``."""
    if data_cfg.storage != "auto":
        return data_cfg.storage
    return "flat" if num_clients >= FLAT_FROM_CLIENTS else "padded"


def resolve_cap(data_cfg: Any, counts: np.ndarray) -> int:
    """Rows per client of a round's cohort block: ``data.cap``, or the ``data.cap_quantile`` size quantile.

    The quantile is numpy's ``'higher'`` one (an actual client size), so
    ``cap_quantile=1`` is the largest client.
    """
    if data_cfg.cap > 0:
        return int(data_cfg.cap)
    return max(1, int(np.quantile(np.asarray(counts), data_cfg.cap_quantile, method="higher")))


def eval_sample(num_clients: int, eval_clients: int, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded sample of ``eval_clients`` clients (None: evaluate every client)."""
    if eval_clients == 0 or eval_clients >= num_clients:
        return None
    return np.sort(np.random.default_rng([seed, eval_clients]).choice(num_clients, eval_clients, replace=False))


def store(dataset: FederatedDataset, data_cfg: Any) -> FederatedDataset:
    """The dataset in its configured storage, with the test splits of the evaluated clients padded.

    ``dataset.test`` may be flat (a generator that never padded it); the
    result's is padded `ClientData` of every client or of the seeded sample
    `eval_sample`. Refuses an evaluation block over `MAX_EVAL_BYTES` with the
    fix (``data.eval_clients``).
    """
    storage = resolve_storage(data_cfg, dataset.num_clients)
    train, test = dataset.train, dataset.test
    chosen = eval_sample(dataset.num_clients, data_cfg.eval_clients, data_cfg.seed)
    if storage == "padded" and isinstance(train, ClientData) and isinstance(test, ClientData) and chosen is None:
        return dataset
    if storage == "flat" and isinstance(train, ClientData):
        train = from_padded(train)
    elif storage == "padded" and isinstance(train, Population):
        train = to_padded(train)
    if isinstance(test, ClientData):
        padded = test if chosen is None else test.take(chosen)
    elif isinstance(test, GeneratedPopulation):
        index = np.arange(test.num_clients) if chosen is None else chosen
        _check_eval_bytes(data_cfg, np.asarray(test.count)[index], test.feature_shape)
        cap = max(1, int(np.asarray(test.count)[index].max()))
        padded = ClientData(*jax.device_get(jax.jit(generate, static_argnums=2)(test, index, cap)))
    else:
        _check_eval_bytes(
            data_cfg, np.asarray(test.count) if chosen is None else np.asarray(test.count)[chosen], test.feature_shape
        )
        padded = to_padded(test, chosen)
    info = {**dataset.info, "storage": storage}
    if chosen is not None:
        info["eval_sample"] = f"a seeded sample of {len(chosen)} of {dataset.num_clients} clients (data.seed)"
    return dataclasses.replace(dataset, train=train, test=padded, info=info, eval_clients=chosen)


def _check_eval_bytes(data_cfg: Any, counts: np.ndarray, feature_shape: tuple[int, ...]) -> None:
    need = len(counts) * int(counts.max()) * int(np.prod(feature_shape)) * 4
    if need > MAX_EVAL_BYTES:
        raise ValueError(
            f"data.eval_clients={data_cfg.eval_clients}: evaluating {len(counts)} clients padded to their largest "
            f"test split ({int(counts.max())} rows) needs {need / 2**30:.1f} GiB; set data.eval_clients to a "
            "sample, e.g. 1000."
        )


def label_histogram(population: Population, num_classes: int) -> np.ndarray:
    """``[C, num_classes]`` int64 label counts per client, linear in the rows."""
    count = np.asarray(population.count)
    client = np.repeat(np.arange(len(count), dtype=np.int64), count)
    flat_index = client * num_classes + np.asarray(population.y)
    return np.bincount(flat_index, minlength=len(count) * num_classes).reshape(len(count), num_classes)


def summary(dataset: FederatedDataset) -> dict[str, Any]:
    """`data.base.partition_summary` of a dataset whose splits may be stored flat (linear in the rows)."""
    from medfed_jax.data.base import label_skew, partition_summary

    if isinstance(dataset.train, ClientData) and isinstance(dataset.test, ClientData):
        return partition_summary(dataset)
    hist = {}
    for split in ("train", "test"):
        data = getattr(dataset, split)
        if isinstance(data, ClientData):
            data = from_padded(data)
        hist[split] = label_histogram(data, dataset.num_classes)
    return {
        "num_clients": dataset.num_clients,
        "train_counts": np.asarray(dataset.train.count),
        "test_counts": np.asarray(dataset.test.count),
        "train_label_histogram": hist["train"],
        "test_label_histogram": hist["test"],
        "label_skew": label_skew(hist["train"]),
        "padding_overhead": {"train": 0.0, "test": 0.0},
    }


def validate_split(dataset: FederatedDataset, split: str) -> None:
    """`data.base.validate_dataset`'s checks for a split stored flat or generated: layout, finite, labels."""
    data = getattr(dataset, split)
    if isinstance(data, GeneratedPopulation):
        teacher, count = np.asarray(data.teacher), np.asarray(data.count)
        if teacher.ndim != 2 or teacher.shape[1] != dataset.num_classes or not np.isfinite(teacher).all():
            raise ValueError(f"{dataset.name} {split}: the teacher must be finite [F, {dataset.num_classes}]")
        if count.ndim != 1 or count.min(initial=0) < 0:
            raise ValueError(f"{dataset.name} {split}: counts must be a [C] vector of sizes >= 0")
        return
    x, y, offset, count = (np.asarray(a) for a in data)
    where = f"{dataset.name} {split}"
    if x.ndim < 2 or y.ndim != 1 or count.ndim != 1 or offset.shape != count.shape or len(x) != len(y):
        raise ValueError(
            f"{where}: expected x[R, ...], y[R], offset[C], count[C], got {x.shape}, {y.shape}, "
            f"{offset.shape}, {count.shape}"
        )
    if count.min(initial=0) < 0 or count.sum() != len(y) or not np.array_equal(offset, np.cumsum(count) - count):
        raise ValueError(
            f"{where}: offsets must be the running sum of non-negative counts covering all {len(y)} rows; "
            "build it with medfed_jax.data.population.flat."
        )
    finite = np.isfinite(x.reshape(len(x), -1)).all(1)
    if not finite.all():
        raise ValueError(
            f"{where}: NaN or Inf in the features of {int((~finite).sum())} rows; impute or drop those rows "
            "before building the dataset."
        )
    if y.size and (y.min() < 0 or y.max() >= dataset.num_classes):
        raise ValueError(f"{where}: labels must lie in [0, {dataset.num_classes}), found range [{y.min()}, {y.max()}]")


def validate_config(data_cfg: Any) -> None:
    """The population fields of the ``data`` section (nothing is loaded)."""
    if data_cfg.storage not in STORAGES:
        raise ValueError(f"data.storage={data_cfg.storage!r} is unknown; choose one of {STORAGES}.")
    cap = data_cfg.cap
    if not isinstance(cap, (int, np.integer)) or isinstance(cap, bool) or cap < 0:
        raise ValueError(
            f"data.cap={cap!r} must be an integer >= 1 (rows per client in a round), or 0 to take "
            "data.cap_quantile of the client sizes."
        )
    q = data_cfg.cap_quantile
    if not (isinstance(q, (int, float)) and math.isfinite(q) and 0 < q <= 1):
        raise ValueError(f"data.cap_quantile={q!r} must lie in (0, 1]; 1 = the largest client (no subsampling).")
    e = data_cfg.eval_clients
    if not isinstance(e, (int, np.integer)) or isinstance(e, bool) or e < 0:
        raise ValueError(f"data.eval_clients={e!r} must be 0 (every client) or a positive sample size, e.g. 1000.")
    s = data_cfg.size_sigma
    if not (isinstance(s, (int, float)) and math.isfinite(s) and s >= 0):
        raise ValueError(f"data.size_sigma={s!r} must be a finite number >= 0 (0 = equal sizes, 1 = heavy skew).")


def validate_run(cfg: Any, dataset: FederatedDataset) -> None:
    """What flat storage or a sampled evaluation supports: a global model's federated training, no sweep."""
    flat, sampled = not isinstance(dataset.train, ClientData), dataset.eval_clients is not None
    if not (flat or sampled):
        return
    storage = "generated" if isinstance(dataset.train, GeneratedPopulation) else "flat"
    what = f"data.storage={storage!r}" if flat else f"data.eval_clients={cfg.data.eval_clients} (a sample)"
    fix = "set data.storage='padded' and data.eval_clients=0" if flat else "set data.eval_clients=0"
    if cfg.personalization.method != "none":
        raise ValueError(
            f"personalization.method={cfg.personalization.method!r} keeps and evaluates one model per client; "
            f"with {what} only global-model training is supported: {fix}, or personalization.method='none'."
        )
    if tuple(cfg.baselines):
        raise ValueError(
            f"baselines={tuple(cfg.baselines)!r} train every client (or pool them); with {what} set "
            f"baselines=(), or {fix}."
        )
    if "sweep" in cfg and len(cfg.sweep):
        raise ValueError(f"{what} runs single configs, not sweeps: {fix}, or drop the sweep section.")
    largest = int(np.max(dataset.train.count))
    if flat and cfg.privacy.mode == "dpsgd" and resolve_cap(cfg.data, dataset.train.count) < largest:
        raise ValueError(
            f"privacy.mode='dpsgd' with a cohort cap below the largest client ({largest} rows): the accountant "
            "does not model per-round row subsets; set data.cap=0 and data.cap_quantile=1."
        )

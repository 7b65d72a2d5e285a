"""Synthetic federations for scale tests, generated per client in vectorised numpy.

Both generators draw every client at once (or in large blocks of clients),
so 10^5 clients take seconds. ``samples_per_client`` counts *training* rows;
each client also gets ``round(f / (1 - f) * n)`` test rows from the same
distribution (``f = test_fraction``), so test rows are the fraction ``f`` of
the client's rows. `linear_teacher` with ``size_sigma > 0`` draws log-normal
client sizes and writes its rows flat (`medfed_jax.data.population`), block
by block, so that 10^6 clients fit in a few GB.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from medfed_jax.data import population
from medfed_jax.data.base import partition_summary, validate_dataset
from medfed_jax.types import ClientData, FederatedDataset, GeneratedPopulation

ROWS_PER_BLOCK = 1 << 20  # rows generated at once by the flat generator (bounds its temporaries)

FEDPROX_DIM, FEDPROX_CLASSES = 60, 10
MAX_BYTES = 4 << 30  # refuse to allocate more than this for one feature array


def _check(num_clients: int, samples_per_client: int, test_fraction: float, allow_zero: bool = False) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r} must be a positive integer.")
    low = 0 if allow_zero else 1
    if not isinstance(samples_per_client, (int, np.integer)) or samples_per_client < low:
        raise ValueError(f"samples_per_client={samples_per_client!r} must be an integer >= {low}.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction!r} must lie in (0, 1), e.g. 0.2.")


def _check_memory(num_clients: int, rows: int, features: int) -> None:
    need = num_clients * rows * features * 4
    if need > MAX_BYTES:
        raise ValueError(
            f"{num_clients} clients x {rows} rows (padded) x {features} features need {need / 2**30:.1f} GiB; "
            "use fewer clients or samples_per_client (for FedProx's log-normal sizes, set samples_per_client "
            "> 0 to give equal sizes without padding)."
        )


def test_rows(n_train: np.ndarray | int, test_fraction: float) -> np.ndarray:
    """Test rows per client so that they are ``test_fraction`` of its rows (at least 1)."""
    return np.maximum(1, np.round(np.asarray(n_train) * test_fraction / (1 - test_fraction))).astype(np.int64)


def _dataset(
    name: str, x: np.ndarray, y: np.ndarray, n_train: np.ndarray, n_test: np.ndarray, num_classes: int
) -> FederatedDataset:
    """Rows [0, n_train) of each client are train, the next n_test are test."""
    tr_max, te_max = int(n_train.max()), int(n_test.max())
    if n_train.min() == tr_max and n_test.min() == te_max:  # equal sizes: slices, no padding
        train = ClientData(x[:, :tr_max], y[:, :tr_max], n_train.astype(np.int32))
        test = ClientData(x[:, tr_max : tr_max + te_max], y[:, tr_max : tr_max + te_max], n_test.astype(np.int32))
    else:
        train_valid = np.arange(tr_max)[None] < n_train[:, None]
        test_valid = np.arange(te_max)[None] < n_test[:, None]
        idx = np.minimum(n_train[:, None] + np.arange(te_max)[None], x.shape[1] - 1)
        train = ClientData(
            x[:, :tr_max] * train_valid[..., None], y[:, :tr_max] * train_valid, n_train.astype(np.int32)
        )
        test = ClientData(
            np.take_along_axis(x, idx[..., None], 1) * test_valid[..., None],
            np.take_along_axis(y, idx, 1) * test_valid,
            n_test.astype(np.int32),
        )
    dataset = FederatedDataset(
        name=name,
        train=train,
        test=test,
        client_names=tuple(f"client{c}" for c in range(len(n_train))),
        num_classes=num_classes,
    )
    validate_dataset(dataset)
    dataset.info["summary"] = partition_summary(dataset)
    return dataset


def teacher_weights(num_features: int, num_classes: int, seed: int) -> np.ndarray:
    """The fixed ``[num_features, num_classes]`` teacher of `linear_teacher` for ``seed``."""
    return np.random.default_rng(seed).standard_normal((num_features, num_classes), dtype=np.float32)


def linear_teacher(
    num_clients: int,
    samples_per_client: int,
    num_features: int,
    num_classes: int,
    seed: int,
    test_fraction: float = 0.2,
    name: str = "random",
    size_sigma: float = 0.0,
    generated: bool = False,
) -> FederatedDataset:
    """IID clients: ``x ~ N(0, I)``, label ``argmax(x @ W)`` with ``W = teacher_weights(..., seed)``.

    ``size_sigma > 0``: log-normal training sizes ``max(1, round(n * exp(size_sigma * z)))``,
    ``z ~ N(0, 1)`` (median ``n = samples_per_client``), stored flat (`lognormal_sizes`).
    ``generated``: the same clients, sizes and teacher, rows generated on device each round
    (`_generated_linear_teacher`).
    """
    _check(num_clients, samples_per_client, test_fraction)
    if num_features < 1 or num_classes < 2:
        raise ValueError(f"need num_features >= 1 and num_classes >= 2, got {num_features}, {num_classes}")
    shape = (num_clients, samples_per_client, num_features, num_classes, seed, test_fraction, name, size_sigma)
    if generated:
        return _generated_linear_teacher(*shape)
    if size_sigma > 0:
        return _flat_linear_teacher(*shape)
    n_test = int(test_rows(samples_per_client, test_fraction))
    _check_memory(num_clients, samples_per_client + n_test, num_features)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((num_features, num_classes), dtype=np.float32)
    x = rng.standard_normal((num_clients, samples_per_client + n_test, num_features), dtype=np.float32)
    y = np.argmax(x.reshape(-1, num_features) @ w, -1).astype(np.int32).reshape(x.shape[:2])
    sizes = np.full(num_clients, samples_per_client, np.int64)
    return _dataset(name, x, y, sizes, np.full(num_clients, n_test, np.int64), num_classes)


def lognormal_sizes(rng: np.random.Generator, num_clients: int, median: int, sigma: float) -> np.ndarray:
    """``[C]`` int64 client sizes ``max(1, round(median * exp(sigma * z)))``, ``z ~ N(0, 1)``."""
    return np.maximum(1, np.round(median * np.exp(sigma * rng.standard_normal(num_clients)))).astype(np.int64)


def _teacher_rows(rng: np.random.Generator, rows: int, w: np.ndarray):
    """``rows`` IID teacher rows ``(x[rows, F], y[rows])``, drawn in blocks of `ROWS_PER_BLOCK`."""
    x = np.empty((rows, w.shape[0]), np.float32)
    y = np.empty(rows, np.int32)
    for s in range(0, rows, ROWS_PER_BLOCK):
        e = min(s + ROWS_PER_BLOCK, rows)
        x[s:e] = rng.standard_normal((e - s, w.shape[0]), dtype=np.float32)
        y[s:e] = np.argmax(x[s:e] @ w, -1)
    return x, y


def _teacher_and_sizes(num_clients, median, num_features, num_classes, seed, test_fraction, sigma):
    """``(rng, W, n_train, n_test)`` for ``seed``: the teacher, then the training sizes (log-normal when
    ``sigma > 0``, else ``median`` each) and their test splits; ``rng`` goes on to draw the rows."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((num_features, num_classes), dtype=np.float32)
    if sigma > 0:
        n_train = lognormal_sizes(rng, num_clients, median, sigma)
    else:
        n_train = np.full(num_clients, median, np.int64)
    return rng, w, n_train, test_rows(n_train, test_fraction)


def _flat_linear_teacher(num_clients, median, num_features, num_classes, seed, test_fraction, name, sigma):
    """`linear_teacher` with log-normal sizes, train and test stored flat (no padding)."""
    rng, w, n_train, n_test = _teacher_and_sizes(
        num_clients, median, num_features, num_classes, seed, test_fraction, sigma
    )
    total = int(n_train.sum() + n_test.sum())
    if total * (num_features + 1) * 4 > 2 * MAX_BYTES:
        raise ValueError(
            f"{num_clients} clients of median {median} rows (size_sigma={sigma}) hold {total} rows x "
            f"{num_features} features ({total * (num_features + 1) * 4 / 2**30:.1f} GiB); use fewer clients, "
            "a smaller data.samples_per_client or data.size_sigma."
        )
    train = population.flat(*_teacher_rows(rng, int(n_train.sum()), w), n_train)
    test = population.flat(*_teacher_rows(rng, int(n_test.sum()), w), n_test)
    names = tuple(f"client{c}" for c in range(num_clients))
    dataset = FederatedDataset(name, train, test, names, num_classes)
    validate_dataset(dataset)
    dataset.info["summary"] = population.summary(dataset)
    return dataset


def _generated_linear_teacher(num_clients, median, num_features, num_classes, seed, test_fraction, name, sigma):
    """`linear_teacher`'s clients, sizes and teacher, with rows generated on device each round (none stored).

    The teacher and the sizes are the flat generator's for ``seed``; the rows
    come from per-client keys (`medfed_jax.types.GeneratedPopulation`), the
    test splits from a second key.
    """
    _, w, n_train, n_test = _teacher_and_sizes(
        num_clients, median, num_features, num_classes, seed, test_fraction, sigma
    )
    key = np.asarray(jax.random.PRNGKey(seed))
    train, test = (
        GeneratedPopulation(np.asarray(jax.random.fold_in(key, split)), w, n.astype(np.int32))
        for split, n in ((0, n_train), (1, n_test))
    )
    dataset = FederatedDataset(name, train, test, tuple(f"client{c}" for c in range(num_clients)), num_classes)
    validate_dataset(dataset)
    return dataset


def mnist_like(
    num_clients: int, samples_per_client: int, seed: int, test_fraction: float = 0.2, size_sigma: float = 0.0
) -> FederatedDataset:
    """Benchmark W1's data: MNIST-shaped (784 features, 10 classes) `linear_teacher` clients."""
    return linear_teacher(
        num_clients, samples_per_client, 784, 10, seed, test_fraction, name="mnist_like", size_sigma=size_sigma
    )


def fedprox_synthetic(
    num_clients: int,
    alpha: float,
    beta: float,
    seed: int,
    samples_per_client: int = 0,
    test_fraction: float = 0.2,
) -> FederatedDataset:
    """Synthetic(alpha, beta) of FedProx (Li et al., MLSys 2020), 60 features, 10 classes.

    As in the paper's generator (``litian96/FedProx``, ``data/synthetic_*``):
    client k draws ``u_k ~ N(0, alpha^2)``, ``B_k ~ N(0, beta^2)`` (numpy
    scale = alpha, beta, as the reference code does), ``W_k ~ N(u_k, 1)``
    ``[60, 10]``, ``b_k ~ N(u_k, 1)`` ``[10]``, ``v_k ~ N(B_k, 1)`` ``[60]``,
    features ``x ~ N(v_k, diag(j^-1.2))`` and label ``argmax(x W_k + b_k)``.
    ``samples_per_client=0`` uses the reference's sizes ``int(lognormal(4, 2))
    + 50`` (heavy-tailed; clients are padded to the largest); > 0 gives equal
    sizes. Note: ``u_k`` shifts every class's logit by the same amount, so in
    this definition alpha does not change the labels (model heterogeneity
    comes from the per-client N(0, 1) draws of W_k, b_k); beta does move the
    feature distribution.
    """
    _check(num_clients, samples_per_client, test_fraction, allow_zero=True)
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"synthetic {name}={value!r} must be a finite number >= 0 (the paper uses 0, 0.5, 1).")
    rng = np.random.default_rng(seed)
    if samples_per_client > 0:
        n_train = np.full(num_clients, samples_per_client, np.int64)
    else:
        n_train = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
    n_test = test_rows(n_train, test_fraction)
    n_max = int((n_train + n_test).max())
    _check_memory(num_clients, n_max, FEDPROX_DIM)
    u = rng.normal(0, alpha, num_clients).astype(np.float32)
    b_mean = rng.normal(0, beta, num_clients).astype(np.float32)
    sd = (np.arange(1, FEDPROX_DIM + 1, dtype=np.float32) ** -1.2) ** 0.5
    x = np.empty((num_clients, n_max, FEDPROX_DIM), np.float32)
    y = np.empty((num_clients, n_max), np.int32)
    block = max(1, (1 << 20) // n_max)  # clients per block: about 10^6 rows of temporaries
    for s in range(0, num_clients, block):
        e = min(s + block, num_clients)
        m = e - s
        v = b_mean[s:e, None] + rng.standard_normal((m, FEDPROX_DIM), dtype=np.float32)
        w = u[s:e, None, None] + rng.standard_normal((m, FEDPROX_DIM, FEDPROX_CLASSES), dtype=np.float32)
        b = u[s:e, None] + rng.standard_normal((m, FEDPROX_CLASSES), dtype=np.float32)
        x[s:e] = v[:, None, :] + sd * rng.standard_normal((m, n_max, FEDPROX_DIM), dtype=np.float32)
        y[s:e] = np.argmax(np.einsum("cnd,cdk->cnk", x[s:e], w) + b[:, None, :], -1)
    return _dataset(f"synthetic({alpha},{beta})", x, y, n_train, n_test, FEDPROX_CLASSES)

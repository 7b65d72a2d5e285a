"""Host-side helpers shared by every data source: padding, pooling, checks."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medfed_jax.types import ClientData, FederatedDataset


def stack_clients(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> ClientData:
    """Pad per-client arrays to the largest client and stack them.

    Args:
      xs: one ``[n_c, *feature_shape]`` array per client.
      ys: one ``[n_c]`` integer label array per client.

    Returns:
      `ClientData` with numpy leaves ``x[C, N_max, ...]`` (float32, zero
      padding), ``y[C, N_max]`` (int32) and ``count[C]``.
    """
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"need one label array per feature array, got {len(xs)} and {len(ys)}")
    feature_shape = np.shape(xs[0])[1:]
    counts = np.array([len(x) for x in xs], np.int32)
    n_max = max(int(counts.max()), 1)
    x_out = np.zeros((len(xs), n_max, *feature_shape), np.float32)
    y_out = np.zeros((len(xs), n_max), np.int32)
    for c, (x, y) in enumerate(zip(xs, ys)):
        if np.shape(x)[1:] != feature_shape or len(x) != len(y):
            raise ValueError(
                f"client {c}: features {np.shape(x)} and labels {np.shape(y)} do not "
                f"match the first client's feature shape {feature_shape}"
            )
        x_out[c, : len(x)] = x
        y_out[c, : len(y)] = y
    return ClientData(x_out, y_out, counts)


def unstack_clients(data: ClientData) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The real (unpadded) rows of each client, as lists of numpy arrays."""
    x, y, count = (np.asarray(a) for a in data)
    return [x[c, : count[c]] for c in range(len(count))], [y[c, : count[c]] for c in range(len(count))]


def pool_clients(data: ClientData) -> ClientData:
    """All real rows of every client as a single client."""
    xs, ys = unstack_clients(data)
    return stack_clients([np.concatenate(xs)], [np.concatenate(ys)])


def pooled(dataset: FederatedDataset) -> FederatedDataset:
    """The centralised version of a federation: one client holding all data."""
    return FederatedDataset(
        name=f"{dataset.name}-pooled",
        train=pool_clients(dataset.train),
        test=pool_clients(dataset.test),
        client_names=("pooled",),
        num_classes=dataset.num_classes,
        info=dict(dataset.info),
    )


def padding_overhead(data: ClientData) -> float:
    """Fraction of stored rows that are padding (0 = none, 0.9 = 90% wasted)."""
    count = np.asarray(data.count)
    return 1.0 - float(count.sum()) / float(count.size * max(data.max_count, 1))


def validate_dataset(dataset: FederatedDataset) -> None:
    """Refuse data that would silently corrupt a run; errors name the fix."""
    for split in ("train", "test"):
        data: ClientData = getattr(dataset, split)
        x, y, count = (np.asarray(a) for a in data)
        if x.ndim < 3 or y.ndim != 2 or count.ndim != 1 or not (x.shape[0] == y.shape[0] == count.shape[0]):
            raise ValueError(
                f"{dataset.name} {split}: expected x[C, N, ...], y[C, N], count[C], got "
                f"{x.shape}, {y.shape}, {count.shape}"
            )
        valid = np.arange(y.shape[1])[None, :] < count[:, None]
        if not np.all(np.isfinite(x[valid])):
            bad = sorted({int(c) for c in np.nonzero(~np.isfinite(x).reshape(len(x), -1).any(1) & (count > 0))[0]})
            raise ValueError(
                f"{dataset.name} {split}: NaN or Inf in the features of clients {bad}; "
                "impute or drop those rows before building the dataset."
            )
        labels = y[valid]
        if labels.size and (labels.min() < 0 or labels.max() >= dataset.num_classes):
            raise ValueError(
                f"{dataset.name} {split}: labels must lie in [0, {dataset.num_classes}), "
                f"found range [{labels.min()}, {labels.max()}]"
            )
    empty = [dataset.client_names[c] for c in np.nonzero(np.asarray(dataset.train.count) == 0)[0]]
    if empty:
        raise ValueError(
            f"{dataset.name}: clients {empty} have no training samples; drop them or "
            "choose a partition that gives every client data (e.g. a larger Dirichlet alpha)."
        )
    if len(dataset.client_names) != dataset.num_clients:
        raise ValueError(
            f"{dataset.name}: {len(dataset.client_names)} client names for {dataset.num_clients} clients"
        )

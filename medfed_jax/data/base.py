"""Host-side helpers shared by every data source: padding, pooling, checks, summaries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
    if len(xs) != len(ys) or not len(xs):
        raise ValueError(f"need one label array per feature array, got {len(xs)} and {len(ys)}")
    feature_shape = np.shape(xs[0])[1:]
    for c, (x, y) in enumerate(zip(xs, ys)):
        if np.shape(x)[1:] != feature_shape or len(x) != len(y):
            raise ValueError(
                f"client {c}: features {np.shape(x)} and labels {np.shape(y)} do not "
                f"match the first client's feature shape {feature_shape}"
            )
    counts = np.array([len(y) for y in ys], np.int32)
    n_max = max(int(counts.max()), 1)
    # Scatter all real rows at once: row r of client c goes to [c, r].
    client = np.repeat(np.arange(len(counts)), counts)
    row = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    x_out = np.zeros((len(counts), n_max, *feature_shape), np.float32)
    y_out = np.zeros((len(counts), n_max), np.int32)
    x_out[client, row] = np.concatenate([np.asarray(x, np.float32).reshape(-1, *feature_shape) for x in xs])
    y_out[client, row] = np.concatenate([np.asarray(y).reshape(-1) for y in ys])
    return ClientData(x_out, y_out, counts)


def stack_splits(datas: Sequence[ClientData]) -> ClientData:
    """Several splits of the same clients as one `ClientData` with a leading split axis ``[S, C, N, ...]``.

    Each is zero-padded to the largest ``N`` among them (padding rows never
    count: ``count`` is unchanged); used for per-seed splits vmapped over seeds.
    """
    rows = max(d.y.shape[1] for d in datas)

    def pad(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        return np.pad(a, [(0, 0), (0, rows - a.shape[1])] + [(0, 0)] * (a.ndim - 2))

    return ClientData(
        np.stack([pad(d.x) for d in datas]),
        np.stack([pad(d.y) for d in datas]),
        np.stack([np.asarray(d.count) for d in datas]),
    )


def unstack_clients(data: ClientData) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The real (unpadded) rows of each client, as lists of numpy arrays."""
    x, y, count = (np.asarray(a) for a in data)
    return [x[c, : count[c]] for c in range(len(count))], [y[c, : count[c]] for c in range(len(count))]


def pool_clients(data: ClientData) -> ClientData:
    """All real rows of every client, in client order, as a single client."""
    x, y, count = (np.asarray(a) for a in data)
    valid = np.arange(y.shape[1])[None, :] < count[:, None]
    return ClientData(
        x[valid][None].astype(np.float32), y[valid][None].astype(np.int32), np.array([valid.sum()], np.int32)
    )


def pooled(dataset: FederatedDataset) -> FederatedDataset:
    """The centralised version of a federation: one client holding all data.

    The pooled rows are exactly the federation's rows (already preprocessed the
    way each client preprocessed them); per-client entries of ``info`` (row
    indices, summary) are replaced by the pooled summary.
    """
    result = FederatedDataset(
        name=f"{dataset.name}-pooled",
        train=pool_clients(dataset.train),
        test=pool_clients(dataset.test),
        client_names=("pooled",),
        num_classes=dataset.num_classes,
    )
    info = {k: v for k, v in dataset.info.items() if k not in ("rows", "summary")}
    result.info.update(info, pooled_from=dataset.name, summary=partition_summary(result))
    return result


def padding_overhead(data: ClientData) -> float:
    """Fraction of stored rows that are padding (0 = none, 0.9 = 90% wasted)."""
    count = np.asarray(data.count)
    return 1.0 - float(count.sum()) / float(count.size * max(data.max_count, 1))


def label_histogram(data: ClientData, num_classes: int) -> np.ndarray:
    """``[C, num_classes]`` int64: how many real rows of each label each client holds."""
    y, count = np.asarray(data.y), np.asarray(data.count)
    valid = np.arange(y.shape[1])[None, :] < count[:, None]
    client = np.broadcast_to(np.arange(len(count))[:, None], y.shape)[valid]
    flat = client.astype(np.int64) * num_classes + y[valid]
    return np.bincount(flat, minlength=len(count) * num_classes).reshape(len(count), num_classes)


def label_skew(histogram: np.ndarray) -> float:
    """Mean total-variation distance between each client's label distribution
    and the federation's (0 = every client like the whole, 1 = disjoint)."""
    histogram = np.asarray(histogram, np.float64)
    client = histogram / np.maximum(histogram.sum(1, keepdims=True), 1)
    overall = histogram.sum(0) / max(histogram.sum(), 1)
    return float(np.mean(0.5 * np.abs(client - overall).sum(1)))


def partition_summary(dataset: FederatedDataset) -> dict[str, Any]:
    """Samples per client, label histograms, label skew and padding overhead.

    Arrays are numpy (call ``.tolist()`` for JSON); ``label_skew`` is
    `label_skew` of the training histogram.
    """
    train_hist = label_histogram(dataset.train, dataset.num_classes)
    return {
        "num_clients": dataset.num_clients,
        "train_counts": np.asarray(dataset.train.count),
        "test_counts": np.asarray(dataset.test.count),
        "train_label_histogram": train_hist,
        "test_label_histogram": label_histogram(dataset.test, dataset.num_classes),
        "label_skew": label_skew(train_hist),
        "padding_overhead": {"train": padding_overhead(dataset.train), "test": padding_overhead(dataset.test)},
    }


def format_summary(dataset: FederatedDataset, max_clients: int = 20) -> str:
    """A short text table of the partition (first ``max_clients`` clients)."""
    s = dataset.info.get("summary") or partition_summary(dataset)
    lines = [
        f"{dataset.name}: {s['num_clients']} clients, {int(s['train_counts'].sum())} train / "
        f"{int(s['test_counts'].sum())} test rows, label skew (mean TV) {s['label_skew']:.3f}, padding "
        f"{s['padding_overhead']['train']:.1%} train / {s['padding_overhead']['test']:.1%} test",
        f"{'client':>16} {'train':>6} {'test':>6}  train labels",
    ]
    for c in range(min(s["num_clients"], max_clients)):
        hist = " ".join(str(int(v)) for v in s["train_label_histogram"][c])
        lines.append(
            f"{dataset.client_names[c][:16]:>16} {int(s['train_counts'][c]):>6} {int(s['test_counts'][c]):>6}  {hist}"
        )
    if s["num_clients"] > max_clients:
        lines.append(f"... {s['num_clients'] - max_clients} more clients")
    return "\n".join(lines)


def plot_label_heatmap(dataset: FederatedDataset, path: str, max_clients: int = 100) -> str:
    """Save a label-by-client heatmap of the training split to ``path``.

    Shows the first ``max_clients`` clients; needs matplotlib. Returns ``path``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plot_label_heatmap needs matplotlib: pip install matplotlib") from err
    hist = label_histogram(dataset.train, dataset.num_classes)[:max_clients]
    fig, ax = plt.subplots(figsize=(min(2 + 0.25 * len(hist), 20), 1 + 0.35 * dataset.num_classes))
    image = ax.imshow(hist.T, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("client")
    ax.set_ylabel("label")
    ax.set_yticks(range(dataset.num_classes))
    if len(hist) <= 30:
        ax.set_xticks(range(len(hist)), [n[:12] for n in dataset.client_names[: len(hist)]], rotation=90)
    ax.set_title(f"{dataset.name}: training samples per label and client")
    fig.colorbar(image, ax=ax, label="samples")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def validate_dataset(dataset: FederatedDataset) -> None:
    """Refuse data that would silently corrupt a run; errors name the fix."""
    if len(dataset.client_names) != dataset.num_clients:
        raise ValueError(f"{dataset.name}: {len(dataset.client_names)} client names for {dataset.num_clients} clients")
    if not isinstance(dataset.num_classes, (int, np.integer)) or dataset.num_classes < 2:
        raise ValueError(f"{dataset.name}: num_classes={dataset.num_classes!r} must be an integer >= 2")
    from medfed_jax.data import population  # flat splits (imports this module)

    for split in ("train", "test"):
        data: ClientData = getattr(dataset, split)
        if not isinstance(data, ClientData):
            population.validate_split(dataset, split)
            continue
        x, y, count = (np.asarray(a) for a in data)
        if x.ndim < 3 or y.ndim != 2 or count.ndim != 1 or not (x.shape[0] == y.shape[0] == count.shape[0]):
            raise ValueError(
                f"{dataset.name} {split}: expected x[C, N, ...], y[C, N], count[C], got "
                f"{x.shape}, {y.shape}, {count.shape}"
            )
        if x.shape[1] != y.shape[1] or count.min() < 0 or count.max() > y.shape[1]:
            raise ValueError(
                f"{dataset.name} {split}: counts must lie in [0, {y.shape[1]}] and x, y must share N; got "
                f"x {x.shape}, y {y.shape}, counts in [{count.min()}, {count.max()}]"
            )
        valid = np.arange(y.shape[1])[None, :] < count[:, None]
        finite = np.isfinite(x.reshape(*y.shape, -1)).all(-1)
        if not finite[valid].all():
            bad = np.nonzero((~finite & valid).any(1))[0]
            raise ValueError(
                f"{dataset.name} {split}: NaN or Inf in the features of clients "
                f"{[dataset.client_names[c] for c in bad[:10]]}{' ...' if len(bad) > 10 else ''}; "
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
            f"{dataset.name}: clients {empty[:10]} have no training samples; drop them or "
            "choose a partition that gives every client data (e.g. a larger Dirichlet alpha)."
        )

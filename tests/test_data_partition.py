"""Partitioners, federate, summaries: checked against plain-numpy references written here."""

import math
import re

import numpy as np
import pytest

from medfed_jax.data import base, partition
from medfed_jax.types import ClientData, FederatedDataset

NUM_CLASSES = 10


def make_labels(n_per_class=(60, 40, 80, 30, 50, 70, 20, 90, 45, 55), seed=0):
    """Imbalanced 10-class labels in random order."""
    y = np.repeat(np.arange(len(n_per_class)), n_per_class)
    return np.random.default_rng(seed).permutation(y)


def mean_tv_to_global(labels, parts, num_classes=NUM_CLASSES):
    """Mean total-variation distance between each client's label distribution and the global one."""
    overall = np.bincount(labels, minlength=num_classes) / len(labels)
    tvs = [0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - overall).sum() for p in parts]
    return float(np.mean(tvs))


PARTITIONERS = {
    "iid": lambda y, seed: partition.iid(y, 7, seed),
    "dirichlet": lambda y, seed: partition.dirichlet(y, 7, 0.5, seed, min_samples=5),
    "dirichlet_capped": lambda y, seed: partition.dirichlet(y, 7, 0.5, seed, min_samples=5, capped=True),
    "shards": lambda y, seed: partition.shards(y, 7, 3, seed),
    "quantity": lambda y, seed: partition.quantity(y, 7, 1.0, seed, min_samples=3),
}


@pytest.mark.parametrize("kind", sorted(PARTITIONERS))
def test_parts_are_disjoint_cover_every_sample_once_and_are_seeded(kind):
    y = make_labels()
    parts = PARTITIONERS[kind](y, 0)
    assert len(parts) == 7
    every = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(every), np.arange(len(y)))  # no sample lost or duplicated
    again = PARTITIONERS[kind](y, 0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = PARTITIONERS[kind](y, 1)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_natural_groups_by_column_in_sorted_order():
    groups = np.array(["b", "a", "c", "a", "b", "b"])
    parts, names = partition.natural(groups)
    assert names == ("a", "b", "c")
    for part, name in zip(parts, names):
        np.testing.assert_array_equal(part, np.flatnonzero(groups == name))


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in partition.iid(make_labels(), 7, 3)]
    assert sum(sizes) == 540 and max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_gives_more_label_skew_than_large():
    # Statistic: mean total-variation distance between client and global label distributions.
    y = np.repeat(np.arange(NUM_CLASSES), 400)
    skewed = np.mean([mean_tv_to_global(y, partition.dirichlet(y, 10, 0.1, s)) for s in range(3)])
    near_iid = np.mean([mean_tv_to_global(y, partition.dirichlet(y, 10, 100.0, s)) for s in range(3)])
    assert skewed > 0.5
    assert near_iid < 0.15
    assert skewed > near_iid + 0.3


@pytest.mark.parametrize("capped, clients", [(False, 10), (True, 20)])
def test_dirichlet_respects_min_samples(capped, clients):
    y = make_labels()
    for seed in range(3):
        parts = partition.dirichlet(y, clients, 0.1, seed, min_samples=8, capped=capped)
        assert min(len(p) for p in parts) >= 8


def numpy_effective_classes(labels, parts):
    """Reference: per client, exp of the Shannon entropy of its label histogram, averaged (loops, no tricks)."""
    values = []
    for p in parts:
        counts = np.bincount(labels[p], minlength=NUM_CLASSES)
        probs = counts[counts > 0] / counts.sum()
        values.append(math.exp(-sum(q * math.log(q) for q in probs)))
    return sum(values) / len(values)


def test_effective_classes_matches_the_entropy_reference_and_its_extremes():
    y = make_labels()
    for parts in (partition.iid(y, 5, 0), partition.dirichlet(y, 5, 0.3, 1), partition.shards(y, 5, 2, 2)):
        assert partition.effective_classes(y, parts) == pytest.approx(numpy_effective_classes(y, parts), rel=1e-12)
    one_class = [np.flatnonzero(y == c) for c in range(NUM_CLASSES)]
    assert partition.effective_classes(y, one_class) == pytest.approx(1.0)
    balanced = np.repeat(np.arange(NUM_CLASSES), 6)
    assert partition.effective_classes(balanced, [np.arange(60)]) == pytest.approx(NUM_CLASSES)


def test_the_capacity_cap_measurably_changes_the_skew():
    # NIID-Bench's cap stops a client that holds more than N / C samples from receiving later classes: on
    # digits-like labels (10 balanced classes, 20 clients, alpha 0.5) the capped split has fewer effective
    # classes per client. Over 10 seeds the means differ by ~0.7 classes (5.5 vs 4.8), per-seed std ~0.25.
    y = np.random.default_rng(0).permutation(np.repeat(np.arange(NUM_CLASSES), 180))
    plain = [numpy_effective_classes(y, partition.dirichlet(y, 20, 0.5, s)) for s in range(10)]
    capped = [numpy_effective_classes(y, partition.dirichlet(y, 20, 0.5, s, capped=True)) for s in range(10)]
    assert np.mean(plain) - np.mean(capped) > 0.4
    assert sum(p > c for p, c in zip(plain, capped)) >= 8


def test_dirichlet_infeasible_minimum_error_names_a_setting_that_works():
    y = np.repeat(np.arange(4), 50)  # 4 classes, 10 clients: alpha=0.01 feeds about 4 of them
    with pytest.raises(ValueError, match=r"Dirichlet\(alpha=0.01\).*min_samples=8") as err:
        partition.dirichlet(y, 10, 0.01, 0, min_samples=8)
    message = str(err.value)
    alpha = re.search(r"alpha=([0-9.e+-]+) works with 10 clients", message)
    clients = re.search(r"num_clients=(\d+) works", message)
    assert alpha and clients, message
    assert min(len(p) for p in partition.dirichlet(y, 10, float(alpha.group(1)), 0, min_samples=8)) >= 8
    assert min(len(p) for p in partition.dirichlet(y, int(clients.group(1)), 0.01, 0, min_samples=8)) >= 8


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf")])
def test_dirichlet_rejects_non_positive_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        partition.dirichlet(make_labels(), 4, alpha, 0)


@pytest.mark.parametrize(
    "make",
    [
        lambda y: partition.iid(y, len(y) + 1, 0),
        lambda y: partition.dirichlet(y, len(y) + 1, 1.0, 0, min_samples=1),
        lambda y: partition.shards(y, len(y) + 1, 1, 0),
        lambda y: partition.quantity(y, len(y) + 1, 1.0, 0, min_samples=1),
    ],
)
def test_more_clients_than_samples_is_a_clear_error(make):
    with pytest.raises(ValueError, match=r"num_clients=\d+ .*only 540"):
        make(make_labels())


@pytest.mark.parametrize("num_clients,k", [(10, 2), (7, 3), (5, 2), (13, 10), (30, 1), (3, 4)])
def test_shards_give_exactly_k_classes_per_client_and_balanced_holders(num_clients, k):
    y = make_labels()
    parts = partition.shards(y, num_clients, k, seed=num_clients)
    assert [len(np.unique(y[p])) for p in parts] == [k] * num_clients
    holders = np.array([[np.any(y[p] == c) for c in range(NUM_CLASSES)] for p in parts]).sum(0)
    assert set(holders) <= {num_clients * k // NUM_CLASSES, math.ceil(num_clients * k / NUM_CLASSES)}


def test_shards_errors():
    y = make_labels()
    with pytest.raises(ValueError, match=r"shards_per_client=11 .*only 10"):
        partition.shards(y, 5, 11, 0)
    with pytest.raises(ValueError, match="some classes would belong to no client"):
        partition.shards(y, 3, 2, 0)


def test_quantity_sizes_and_sigma_controls_skew():
    y = np.zeros(5000, int)
    for sigma in (0.0, 0.5, 2.0):
        sizes = np.array([len(p) for p in partition.quantity(y, 50, sigma, 0, min_samples=4)])
        assert sizes.sum() == 5000 and sizes.min() >= 4
        if sigma == 0.0:
            assert sizes.max() - sizes.min() <= 1
    cv = {s: np.std(sz) / np.mean(sz) for s in (0.5, 2.0) for sz in [[len(p) for p in partition.quantity(y, 50, s, 1)]]}
    assert cv[2.0] > 2 * cv[0.5]


def test_quantity_rejects_negative_sigma():
    with pytest.raises(ValueError, match="sigma"):
        partition.quantity(make_labels(), 4, -1.0, 0)


def test_split_train_test_count_and_stratification():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), [50, 23, 7, 120])
    mask = partition.split_train_test(y, 0.34, rng)
    n_test = math.ceil(0.34 * len(y))
    assert mask.sum() == n_test
    for c in range(4):  # systematic sampling: each class within one row of its proportional share
        assert abs(mask[y == c].sum() - (y == c).sum() * n_test / len(y)) < 1


def federated(seed=0, standardize="none"):
    y = make_labels()
    x = np.random.default_rng(5).normal(3.0, 2.0, size=(len(y), 4)) * np.arange(1, 5)
    parts = partition.dirichlet(y, 5, 1.0, seed, min_samples=10)
    fed = partition.federate(
        x, y, parts, test_fraction=0.25, seed=seed, name="toy", num_classes=NUM_CLASSES, standardize=standardize
    )
    return x, y, parts, fed


def test_federate_splits_each_client_own_rows_and_pads():
    x, y, parts, fed = federated()
    rows = fed.info["rows"]
    for c, part in enumerate(parts):
        train, test = rows["train"][c], rows["test"][c]
        assert not set(train) & set(test)
        np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.sort(part))
        assert len(test) == math.ceil(0.25 * len(part))
        n_tr, n_te = fed.train.count[c], fed.test.count[c]
        np.testing.assert_allclose(fed.train.x[c, :n_tr], x[train], rtol=1e-6)
        np.testing.assert_array_equal(fed.train.y[c, :n_tr], y[train])
        np.testing.assert_array_equal(fed.test.y[c, :n_te], y[test])
        assert not fed.train.x[c, n_tr:].any() and not fed.test.x[c, n_te:].any()  # zero padding
    assert fed.client_names == tuple(f"client{c}" for c in range(5)) and fed.num_classes == NUM_CLASSES


@pytest.mark.parametrize("how", ["client", "global"])
def test_federate_standardises_with_training_statistics_only(how):
    x, _, _, fed = federated(standardize=how)
    rows = fed.info["rows"]
    pooled_train = x[np.concatenate(rows["train"])]
    for c in range(5):
        ref = x[rows["train"][c]] if how == "client" else pooled_train
        mean, std = ref.mean(0), ref.std(0)
        n_tr, n_te = fed.train.count[c], fed.test.count[c]
        np.testing.assert_allclose(fed.train.x[c, :n_tr], (x[rows["train"][c]] - mean) / std, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(fed.test.x[c, :n_te], (x[rows["test"][c]] - mean) / std, rtol=1e-4, atol=1e-5)


def test_federate_rejects_nan_features_and_overlapping_parts():
    y = make_labels()
    x = np.ones((len(y), 3))
    x[17, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf .*first: \\[17\\]"):
        partition.federate(x, y, partition.iid(y, 3, 0), test_fraction=0.2, seed=0, name="t", num_classes=10)
    with pytest.raises(ValueError, match="disjoint"):
        partition.federate(np.ones((len(y), 3)), y, [np.arange(10), np.arange(5, 20)], test_fraction=0.2, seed=0,
                           name="t", num_classes=10)  # fmt: skip


def test_validate_dataset_rejects_nan_in_real_rows_only():
    x = np.zeros((2, 3, 2), np.float32)
    x[1, 2] = np.nan  # padding row of client 1 (count 2): ignored
    data = ClientData(x, np.zeros((2, 3), np.int32), np.array([3, 2], np.int32))
    base.validate_dataset(FederatedDataset("t", data, data, ("a", "b"), 2))
    x[0, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or Inf in the features of clients \['a'\]"):
        base.validate_dataset(FederatedDataset("t", data, data, ("a", "b"), 2))


def test_summary_histograms_and_padding_match_a_direct_count(tmp_path):
    _, y, _, fed = federated()
    s = base.partition_summary(fed)
    for c in range(5):
        n = fed.train.count[c]
        np.testing.assert_array_equal(s["train_label_histogram"][c], np.bincount(fed.train.y[c, :n], minlength=10))
    counts = np.asarray(fed.train.count)
    assert s["padding_overhead"]["train"] == pytest.approx(1 - counts.sum() / (5 * counts.max()))
    np.testing.assert_array_equal(s["train_counts"], counts)
    assert "toy: 5 clients" in base.format_summary(fed)
    path = base.plot_label_heatmap(fed, str(tmp_path / "heat.png"))
    assert (tmp_path / "heat.png").stat().st_size > 1000 and path.endswith("heat.png")


def test_stack_and_pool_round_trip():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(n, 2, 2)) for n in (3, 0, 5)]
    ys = [rng.integers(0, 4, n) for n in (3, 0, 5)]
    data = base.stack_clients(xs, ys)
    assert data.x.shape == (3, 5, 2, 2) and list(data.count) == [3, 0, 5]
    back_x, back_y = base.unstack_clients(data)
    for a, b, c, d in zip(back_x, xs, back_y, ys):
        np.testing.assert_allclose(a, b.astype(np.float32))
        np.testing.assert_array_equal(c, d)
    pooled = base.pool_clients(data)
    np.testing.assert_allclose(pooled.x[0], np.concatenate(xs).astype(np.float32))
    np.testing.assert_array_equal(pooled.y[0], np.concatenate(ys))

"""Data sources (heart, built-ins, MedMNIST files, generators) and the data config.

References are independent: the heart CSV is parsed here with the csv module,
MedMNIST files are written here in the official format, generator labels are
recomputed in numpy.
"""

import csv
import importlib.resources
import math

import numpy as np
import pytest

from medfed_jax import data
from medfed_jax.data import synthetic

HOSPITALS = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
KEPT = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalch", "exang", "oldpeak")


def reference_heart():
    """The 740 complete rows, encoded independently: 13 columns, label, hospital."""
    path = importlib.resources.files("medfed_jax.data").joinpath("heart_disease_uci.csv")
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if all(r[c] != "" for c in KEPT)]
    cp = ["atypical angina", "non-anginal", "asymptomatic"]  # 'typical angina' is the dropped reference
    ecg = ["st-t abnormality", "lv hypertrophy"]  # 'normal' is the dropped reference
    x = np.array(
        [
            [float(r["age"]), r["sex"] == "Male", float(r["trestbps"]), float(r["chol"]), r["fbs"] == "TRUE",
             float(r["thalch"]), r["exang"] == "TRUE", float(r["oldpeak"])]
            + [r["cp"] == v for v in cp] + [r["restecg"] == v for v in ecg]
            for r in rows
        ],
        float,
    )  # fmt: skip
    return x, np.array([int(r["num"]) > 0 for r in rows], int), np.array([r["dataset"] for r in rows])


@pytest.fixture(scope="module")
def heart_data():
    return data.load_heart_disease()


def test_heart_clients_features_and_counts(heart_data):
    fed = heart_data
    assert fed.client_names == HOSPITALS and fed.num_classes == 2 and fed.feature_shape == (13,)
    total = np.asarray(fed.train.count) + np.asarray(fed.test.count)
    assert total.tolist() == [304, 260, 46, 130]
    # 66/34 split: ceil(0.34 n) test rows per hospital.
    assert np.asarray(fed.test.count).tolist() == [math.ceil(0.34 * n) for n in (304, 260, 46, 130)]


def test_heart_rows_labels_and_train_only_standardisation(heart_data):
    fed = heart_data
    x_ref, y_ref, hospital = reference_heart()
    rows = fed.info["rows"]
    forced = []
    for c, name in enumerate(HOSPITALS):
        train, test = rows["train"][c], rows["test"][c]
        assert not set(train) & set(test)  # disjoint
        np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.flatnonzero(hospital == name))
        mean, std = x_ref[train].mean(0), x_ref[train].std(0)
        std = np.where(std > 0, std, 1.0)
        n_tr, n_te = fed.train.count[c], fed.test.count[c]
        x_tr, x_te = fed.train.x[c, :n_tr], fed.test.x[c, :n_te]
        np.testing.assert_allclose(x_tr, (x_ref[train] - mean) / std, atol=1e-5)
        np.testing.assert_allclose(x_te, (x_ref[test] - mean) / std, atol=1e-5)
        np.testing.assert_array_equal(fed.train.y[c, :n_tr], y_ref[train])
        np.testing.assert_array_equal(fed.test.y[c, :n_te], y_ref[test])
        varying = x_ref[train].std(0) > 0
        # Statistics in float64: a float32 accumulation over n rows could be off by n eps |z| (~2e-5 here),
        # while the float32 z themselves are within a few eps |z| of exact, well inside these tolerances.
        np.testing.assert_allclose(x_tr.mean(0, dtype=np.float64), 0, atol=1e-5)
        np.testing.assert_allclose(x_tr.std(0, dtype=np.float64)[varying], 1, atol=1e-4)
        forced.append(np.abs(x_te.mean(0)[varying]).max())
    assert max(forced) > 0.1  # test statistics are not re-standardised


def test_heart_split_is_seeded_and_pooled_is_the_union(heart_data):
    again, other = data.load_heart_disease(seed=0), data.load_heart_disease(seed=1)
    np.testing.assert_array_equal(again.train.x, heart_data.train.x)
    assert not np.array_equal(other.info["rows"]["test"][0], heart_data.info["rows"]["test"][0])
    pooled = data.load_heart_disease(pooled=True)
    assert pooled.client_names == ("pooled",) and pooled.train.count.tolist() == [486]
    xs, _ = data.unstack_clients(heart_data.train)
    np.testing.assert_allclose(pooled.train.x[0], np.concatenate(xs))


def test_heart_via_config_natural_and_another_partition(heart_data):
    cfg = data.default_config()
    cfg.update(name="heart", partition="natural", test_fraction=0.34)
    fed = data.load_dataset(cfg)
    assert fed.client_names == HOSPITALS
    np.testing.assert_array_equal(fed.test.x, heart_data.test.x)
    cfg.update(partition="iid", num_clients=5)
    fed = data.load_dataset(cfg)
    assert fed.num_clients == 5 and int(fed.train.count.sum() + fed.test.count.sum()) == 740


def test_digits_and_breast_cancer_through_load_dataset():
    from sklearn.datasets import load_breast_cancer, load_digits

    cfg = data.default_config()
    cfg.update(name="digits", partition="dirichlet", num_clients=8, alpha=0.5)
    fed = data.load_dataset(cfg)
    assert fed.feature_shape == (8, 8, 1) and fed.num_classes == 10 and fed.num_clients == 8
    pooled = np.concatenate([data.pool_clients(fed.train).x[0], data.pool_clients(fed.test).x[0]])
    assert len(pooled) == 1797 and pooled.min() == 0.0 and pooled.max() == 1.0
    reference = load_digits().images[..., None] / 16.0
    np.testing.assert_allclose(np.sort(pooled.ravel()), np.sort(reference.ravel()), atol=1e-7)
    assert fed.info["summary"]["train_label_histogram"].shape == (8, 10)

    cfg.update(name="breast_cancer", partition="iid", num_clients=3)
    fed = data.load_dataset(cfg)
    assert fed.feature_shape == (30,) and fed.num_classes == 2
    train = data.pool_clients(fed.train).x[0]
    # Standardised with all training rows (statistics in float64, as above).
    np.testing.assert_allclose(train.mean(0, dtype=np.float64), 0, atol=1e-4)
    np.testing.assert_allclose(train.std(0, dtype=np.float64), 1, atol=1e-3)
    counts = fed.train.count.sum() + fed.test.count.sum()
    assert counts == len(load_breast_cancer().target)


def write_official_npz(path, n=(12, 4, 6), size=28, rgb=False, num_classes=9, drop=None, seed=0):
    """A MedMNIST file exactly as the official ones: uint8 images [N,H,W(,3)], labels [N,1]."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        shape = (count, size, size, 3) if rgb else (count, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, num_classes, (count, 1), dtype=np.uint8)
    arrays.pop(drop, None)
    np.savez_compressed(path, **arrays)
    return arrays


def test_medmnist_grayscale_and_rgb_files_load(tmp_path, monkeypatch):
    gray = write_official_npz(tmp_path / "pneumoniamnist.npz", num_classes=2)
    rgb = write_official_npz(tmp_path / "pathmnist_64.npz", size=64, rgb=True)
    out = data.load_medmnist("pneumoniamnist", root=tmp_path)
    x, y = out.train
    assert x.shape == (12, 28, 28, 1) and x.dtype == np.float32 and y.shape == (12,) and out.num_classes == 2
    np.testing.assert_allclose(x[..., 0], gray["train_images"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(out.test[1], gray["test_labels"][:, 0])
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path))
    out = data.load_medmnist("pathmnist", size=64)
    x, y = out.val
    assert x.shape == (4, 64, 64, 3) and 0.0 <= x.min() and x.max() <= 1.0 and y.dtype == np.int32
    np.testing.assert_allclose(x, rgb["val_images"] / 255.0, rtol=1e-6)


def test_medmnist_missing_file_and_missing_key_errors(tmp_path):
    expected = tmp_path / "dermamnist_128.npz"
    with pytest.raises(FileNotFoundError) as err:
        data.load_medmnist("dermamnist", root=tmp_path, size=128)
    assert str(expected) in str(err.value) and "python -m medmnist download" in str(err.value)
    write_official_npz(tmp_path / "bloodmnist.npz", num_classes=8, drop="val_labels")
    with pytest.raises(ValueError, match=r"lacks the keys \['val_labels'\]"):
        data.load_medmnist("bloodmnist", root=tmp_path)
    write_official_npz(tmp_path / "octmnist_64.npz", num_classes=4)  # 28x28 images under the 64 name
    with pytest.raises(ValueError, match="not \\[N, 64, 64\\]"):
        data.load_medmnist("octmnist", root=tmp_path, size=64)
    with pytest.raises(ValueError, match="multi-label"):
        data.load_medmnist("chestmnist", root=tmp_path)


def test_medmnist_through_load_dataset_partitions_train_and_val(tmp_path):
    write_official_npz(tmp_path / "breastmnist.npz", n=(40, 10, 8), num_classes=2)
    cfg = data.default_config()
    cfg.update(name="medmnist", partition="iid", num_clients=5, medmnist_flag="breastmnist", root=str(tmp_path))
    fed = data.load_dataset(cfg)
    assert fed.feature_shape == (28, 28, 1) and fed.num_classes == 2
    assert int(fed.train.count.sum() + fed.test.count.sum()) == 50


def test_mnist_like_labels_follow_the_fixed_teacher():
    fed = synthetic.mnist_like(num_clients=3, samples_per_client=40, seed=7)
    assert fed.train.x.shape == (3, 40, 784) and fed.test.x.shape == (3, 10, 784)  # 10 = 0.2 of 50 rows
    w = synthetic.teacher_weights(784, 10, 7)
    for split in (fed.train, fed.test):
        np.testing.assert_array_equal(split.y, np.argmax(np.einsum("cnf,fk->cnk", split.x, w), -1))
    again = synthetic.mnist_like(num_clients=3, samples_per_client=40, seed=7)
    np.testing.assert_array_equal(again.train.x, fed.train.x)


def test_generators_reach_1e5_clients():
    fed = synthetic.linear_teacher(100_000, 3, 4, 3, seed=0)
    assert fed.num_clients == 100_000 and fed.train.x.shape == (100_000, 3, 4)
    assert fed.info["summary"]["train_counts"].sum() == 300_000
    fed = synthetic.fedprox_synthetic(100_000, 0.5, 0.5, seed=0, samples_per_client=1)
    assert fed.train.x.shape == (100_000, 1, 60) and fed.test.x.shape == (100_000, 1, 60)


def test_fedprox_synthetic_feature_covariance_and_beta():
    fed = synthetic.fedprox_synthetic(4, 1.0, 0.0, seed=0, samples_per_client=4000)
    x = fed.train.x[0]
    np.testing.assert_allclose(x.var(0), np.arange(1, 61) ** -1.2, rtol=0.1)  # Sigma = diag(j^-1.2)

    def spread(beta):  # variance across clients of each client's mean feature value ~ beta^2 + 1/60
        f = synthetic.fedprox_synthetic(300, 0.0, beta, seed=1, samples_per_client=50)
        return f.train.x.mean((1, 2)).var()

    assert spread(0.0) < 0.1 and spread(2.0) > 2.0
    sizes = synthetic.fedprox_synthetic(30, 0.5, 0.5, seed=0).train.count
    assert sizes.min() >= 50  # int(lognormal(4, 2)) + 50


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(name="cifar"), "data.name='cifar' is unknown"),
        (dict(name="digits", partition="random"), "data.partition='random' is unknown"),
        (dict(name="digits", partition="dirichlet", alpha=0.0), "data.alpha=0.0 must be a finite number > 0"),
        (dict(name="digits", partition="dirichlet", alpha=-1), "data.alpha"),
        (dict(name="digits", partition="iid", num_clients=5000), r"data.num_clients=5000 .* <= 898"),
        (dict(name="heart", partition="dirichlet", num_clients=100), r"data.num_clients=100 .* <= 74"),
        (dict(name="digits", partition="shards", shards_per_client=11), "data.shards_per_client=11 .* <= 10"),
        (dict(name="breast_cancer", partition="shards", shards_per_client=3), "data.shards_per_client=3"),
        (dict(name="digits", partition="natural"), "no natural clients"),
        (dict(name="mnist_like", partition="iid"), "use data.partition='natural'"),
        (dict(name="digits", partition="iid", test_fraction=0.0), "data.test_fraction"),
        (dict(name="medmnist", partition="iid", medmnist_flag="chestmnist"), "data.medmnist_flag.*multi-label"),
        (dict(name="medmnist", partition="iid", medmnist_size=32), "data.medmnist_size"),
        (dict(name="digits", partition="quantity", quantity_sigma=-1.0), "data.quantity_sigma"),
    ],
)
def test_config_errors_name_the_field(changes, match):
    cfg = data.default_config()
    cfg.update(**changes)
    with pytest.raises(ValueError, match=match):
        data.validate_config(cfg)


def test_default_config_loads_random():
    fed = data.load_dataset(data.default_config())
    assert fed.num_clients == 4 and fed.feature_shape == (8,) and fed.num_classes == 2

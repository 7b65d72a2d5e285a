"""Host-side data: loaders, partitioners and the `load_dataset` entry point.

Sources (``data.name``):

- ``heart``: Fed-Heart-Disease, 4 real hospitals, bundled (`heart`).
- ``digits``, ``breast_cancer``: scikit-learn built-ins (`builtin`).
- ``medmnist``: a MedMNIST 2D dataset from the user's disk (`medmnist`).
- ``synthetic``: FedProx's Synthetic(alpha, beta); ``mnist_like``: benchmark
  W1's 784-feature linear-teacher data; ``random``: the same generator with
  ``num_features``/``num_classes`` (`synthetic`).

Partitions (``data.partition``): ``natural`` (a source's own clients: the
hospitals, or the generated clients), ``iid``, ``dirichlet`` (plain
Dirichlet label skew), ``dirichlet_capped`` (NIID-Bench's variant: a client
above its equal share gets no more samples, which weakens the skew),
``shards``, ``quantity`` (`partition`). Array sources are partitioned, then
each client's rows are split into its own train/test (``data.test_fraction``).

Seed (``data.seed``): the partition, train/test split and generator seed.
``None`` (the default) follows the run seed (`resolve_seed`), so ``--seeds=N``
and a sweep's seed axis draw a new split per seed; an integer pins the split
while the training seed varies.

Storage (``data.storage``, ``cap``, ``cap_quantile``, ``eval_clients``;
`population`): padded `ClientData`, or flat rows for populations far larger
than a cohort; ``data.size_sigma`` gives the generated sources log-normal
client sizes.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
import numpy as np

from medfed_jax.data import builtin, heart, medmnist, partition, population, synthetic
from medfed_jax.data.base import (
    format_summary,
    partition_summary,
    plot_label_heatmap,
    pool_clients,
    pooled,
    stack_clients,
    unstack_clients,
    validate_dataset,
)
from medfed_jax.data.heart import load_heart_disease
from medfed_jax.data.medmnist import load_medmnist
from medfed_jax.data.partition import federate
from medfed_jax.types import FederatedDataset

GENERATED = ("random", "mnist_like", "synthetic")  # clients are generated: partition must be 'natural'
ARRAYS = ("heart", "digits", "breast_cancer", "medmnist")  # samples partitioned among clients
DATASETS = ARRAYS + GENERATED
PARTITIONS = ("natural", "iid", "dirichlet", "dirichlet_capped", "shards", "quantity")
DIRICHLET = ("dirichlet", "dirichlet_capped")
# Samples and classes of the sources whose size is known without loading them.
KNOWN_SIZES = {"heart": (740, 2), "digits": (1797, 10), "breast_cancer": (569, 2)}
# How array sources are standardised (training statistics only, see partition.federate).
STANDARDIZE = {"heart": "client", "digits": "none", "breast_cancer": "global", "medmnist": "none"}


def default_config() -> ml_collections.ConfigDict:
    """The ``data`` section of a run config."""
    return ml_collections.ConfigDict(
        dict(
            name="random",  # one of DATASETS
            partition="natural",  # one of PARTITIONS; 'natural' = the source's own clients
            num_clients=4,  # clients to partition into / generate (ignored by heart + natural)
            test_fraction=0.2,  # share of each client's rows held out as its test split (FLamby heart: 0.34)
            seed=None,  # partition, train/test split and generator seed; None = the run seed (a new split per seed)
            alpha=0.5,  # dirichlet(_capped) concentration: 0.1 strong label skew, 100 near IID
            min_samples=10,  # dirichlet(_capped) / quantity: smallest client (>= 2: one train and one test row)
            shards_per_client=2,  # shards: distinct classes per client
            quantity_sigma=1.0,  # quantity: log-normal sigma of client sizes (0 = equal)
            samples_per_client=64,  # generated sources: training rows per client (synthetic: 0 = FedProx sizes)
            num_features=8,  # random only
            num_classes=2,  # random only
            synthetic_alpha=1.0,  # synthetic: model heterogeneity (FedProx alpha)
            synthetic_beta=1.0,  # synthetic: feature heterogeneity (FedProx beta)
            medmnist_flag="pathmnist",  # medmnist: which 2D dataset
            medmnist_size=28,  # medmnist: 28, 64, 128 or 224
            root="",  # medmnist: folder with the .npz files ('' = $MEDMNIST_ROOT or ~/.medmnist)
            size_sigma=0.0,  # random / mnist_like: log-normal sigma of client sizes (median samples_per_client)
            storage="auto",  # 'padded', 'flat' (rows back to back), 'generated' (random, mnist_like: no rows
            # stored, generated on device per round) or 'auto' (flat from 10^4 clients)
            cap=0,  # flat: rows per client in a round's cohort block; 0 = the cap_quantile of client sizes
            cap_quantile=1.0,  # flat, cap=0: size quantile for the block (1 = largest client, no subsampling)
            eval_clients=0,  # clients evaluated: 0 = all, N = a seeded sample of N (huge populations)
        )
    )


def _int_at_least(cfg: Any, field: str, low: int, fix: str = "") -> None:
    value = cfg[field]
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"data.{field}={value!r} must be an integer >= {low}.{' ' + fix if fix else ''}")


def _number(cfg: Any, field: str, positive: bool, fix: str) -> None:
    value = cfg[field]
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ValueError(f"data.{field}={value!r} must be a finite number {'> 0' if positive else '>= 0'}. {fix}")


def _min_client(cfg: Any) -> int:
    return max(cfg.min_samples, 2) if cfg.partition in (*DIRICHLET, "quantity") else 2


def _check_clients(cfg: Any, num_samples: int) -> None:
    """Enough samples for every client (needs the source's size)."""
    need = _min_client(cfg)
    if cfg.partition != "natural" and cfg.num_clients * need > num_samples:
        raise ValueError(
            f"data.num_clients={cfg.num_clients} is too many for {cfg.name}'s {num_samples} samples: each "
            f"client needs at least {need} (a train and a test row"
            f"{', and data.min_samples' if need > 2 else ''}); use data.num_clients <= {num_samples // need}."
        )


def _check_shards(cfg: Any, num_classes: int) -> None:
    if cfg.partition == "shards" and cfg.shards_per_client > num_classes:
        raise ValueError(
            f"data.shards_per_client={cfg.shards_per_client} is larger than {cfg.name}'s {num_classes} classes; "
            f"each client holds that many distinct classes, so use data.shards_per_client <= {num_classes}."
        )


def validate_config(cfg: Any) -> None:
    """Raise a ValueError naming ``data.<field>`` and the fix (nothing is loaded)."""
    if cfg.name not in DATASETS:
        raise ValueError(f"data.name={cfg.name!r} is unknown; choose one of {DATASETS}.")
    if cfg.partition not in PARTITIONS:
        raise ValueError(f"data.partition={cfg.partition!r} is unknown; choose one of {PARTITIONS}.")
    if cfg.name in GENERATED and cfg.partition != "natural":
        raise ValueError(
            f"data.partition={cfg.partition!r}: {cfg.name} generates its clients directly; use "
            "data.partition='natural' (or an array source such as 'digits' to partition)."
        )
    if cfg.partition == "natural" and cfg.name not in GENERATED + ("heart",):
        raise ValueError(
            f"data.partition='natural': {cfg.name} has no natural clients (only heart's hospitals and the "
            "generated sources do); choose 'iid', 'dirichlet', 'shards' or 'quantity'."
        )
    _int_at_least(cfg, "num_clients", 1)
    if cfg.seed is not None:
        _int_at_least(cfg, "seed", 0, "Or None (the default) to follow the run seed.")
    tf = cfg.test_fraction
    if not (isinstance(tf, (int, float)) and 0 < tf < 1):
        raise ValueError(f"data.test_fraction={tf!r} must lie in (0, 1); 0.2 is common, FLamby's heart uses 0.34.")
    if cfg.partition in DIRICHLET:
        _number(cfg, "alpha", True, "Use 0.1 for strong label skew, 1 for moderate, 100 for near IID.")
    if cfg.partition in (*DIRICHLET, "quantity"):
        _int_at_least(cfg, "min_samples", 2, "Each client needs a train and a test row.")
    if cfg.partition == "shards":
        _int_at_least(cfg, "shards_per_client", 1)
    if cfg.partition == "quantity":
        _number(cfg, "quantity_sigma", False, "0 gives equal sizes, 1 to 2 strong size skew.")
    if cfg.name in GENERATED:
        _int_at_least(
            cfg,
            "samples_per_client",
            0 if cfg.name == "synthetic" else 1,
            "(synthetic accepts 0 for FedProx's log-normal sizes)" if cfg.name == "synthetic" else "",
        )
    if cfg.name == "random":
        _int_at_least(cfg, "num_features", 1)
        _int_at_least(cfg, "num_classes", 2)
    if cfg.name == "synthetic":
        for field in ("synthetic_alpha", "synthetic_beta"):
            _number(cfg, field, False, "FedProx uses 0, 0.5 and 1.")
    if cfg.name == "medmnist":
        try:
            medmnist.check_flag(cfg.medmnist_flag, cfg.medmnist_size)
        except ValueError as err:
            field = "medmnist_size" if cfg.medmnist_flag in medmnist.NUM_CLASSES else "medmnist_flag"
            raise ValueError(f"data.{field}: {err}") from None
        _check_shards(cfg, medmnist.NUM_CLASSES[cfg.medmnist_flag])
    population.validate_config(cfg)
    if cfg.storage == "generated" and cfg.name not in ("random", "mnist_like"):
        raise ValueError(
            f"data.storage='generated' generates linear-teacher rows on device; data.name={cfg.name!r} has stored "
            "rows: use data.name='random' or 'mnist_like', or data.storage='flat'."
        )
    if cfg.size_sigma > 0 and cfg.name not in ("random", "mnist_like"):
        raise ValueError(
            f"data.size_sigma={cfg.size_sigma!r} applies to the 'random' and 'mnist_like' generators; set it to 0 "
            "(array sources size their clients through data.partition='quantity')."
        )
    if cfg.name in KNOWN_SIZES:
        _check_clients(cfg, KNOWN_SIZES[cfg.name][0])
        _check_shards(cfg, KNOWN_SIZES[cfg.name][1])


def _source_arrays(cfg: Any) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """``(x, y, num_classes, groups)`` of an array source, before any split."""
    if cfg.name == "heart":
        x, y, hospital = heart.read_heart_disease()
        return x, y, 2, hospital
    if cfg.name == "digits":
        return (*builtin.digits(), 10, None)
    if cfg.name == "breast_cancer":
        return (*builtin.breast_cancer(), 2, None)
    data = load_medmnist(cfg.medmnist_flag, cfg.root or None, cfg.medmnist_size)
    # The official train and val splits are partitioned; the official test split stays held out.
    (x_train, y_train), (x_val, y_val) = data.train, data.val
    return np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]), data.num_classes, None


def _partition(cfg: Any, y: np.ndarray, groups: np.ndarray | None):
    """``(parts, client_names or None)`` for the configured partition."""
    if cfg.partition == "natural":
        return partition.natural(groups)
    c, seed = cfg.num_clients, cfg.seed
    make = {
        "iid": lambda: partition.iid(y, c, seed),
        "dirichlet": lambda: partition.dirichlet(y, c, cfg.alpha, seed, min_samples=cfg.min_samples),
        "dirichlet_capped": lambda: partition.dirichlet(
            y, c, cfg.alpha, seed, min_samples=cfg.min_samples, capped=True
        ),
        "shards": lambda: partition.shards(y, c, cfg.shards_per_client, seed),
        "quantity": lambda: partition.quantity(y, c, cfg.quantity_sigma, seed, min_samples=cfg.min_samples),
    }[cfg.partition]
    try:
        return make(), None
    except ValueError as err:
        raise ValueError(f"data.partition={cfg.partition!r} on {cfg.name}: {err}") from None


def _generate(cfg: Any) -> FederatedDataset:
    if cfg.storage == "generated":
        features, classes = (784, 10) if cfg.name == "mnist_like" else (cfg.num_features, cfg.num_classes)
        return synthetic.linear_teacher(
            cfg.num_clients,
            cfg.samples_per_client,
            features,
            classes,
            cfg.seed,
            cfg.test_fraction,
            cfg.name,
            cfg.size_sigma,
            generated=True,
        )
    if cfg.name == "random":
        return synthetic.linear_teacher(
            cfg.num_clients,
            cfg.samples_per_client,
            cfg.num_features,
            cfg.num_classes,
            cfg.seed,
            cfg.test_fraction,
            size_sigma=cfg.size_sigma,
        )
    if cfg.name == "mnist_like":
        return synthetic.mnist_like(
            cfg.num_clients, cfg.samples_per_client, cfg.seed, cfg.test_fraction, cfg.size_sigma
        )
    return synthetic.fedprox_synthetic(
        cfg.num_clients, cfg.synthetic_alpha, cfg.synthetic_beta, cfg.seed, cfg.samples_per_client, cfg.test_fraction
    )


def resolve_seed(cfg: Any, run_seed: int) -> ml_collections.ConfigDict:
    """A copy of the ``data`` section with ``seed`` set: ``data.seed``, or ``run_seed`` when it is None."""
    resolved = cfg.copy_and_resolve_references()
    if resolved.seed is None:
        resolved.seed = int(run_seed)
    return resolved


def follows_run_seed(cfg: Any) -> bool:
    """Whether the ``data`` section draws its split from the run seed (``data.seed`` None)."""
    return cfg.seed is None


def load_dataset(cfg: Any, run_seed: int = 0) -> FederatedDataset:
    """The federated dataset a ``data`` config section describes, its seed `resolve_seed`'s.

    Checked by `validate_config` before loading and by `validate_dataset`
    (inside `federate` and the generators) after. ``info`` holds ``summary``
    (`partition_summary`) and, for array sources, ``rows`` (source row indices
    of every client's train and test split). The result is stored as
    ``data.storage`` says, its test splits those of ``data.eval_clients``
    (`population.store`).
    """
    validate_config(cfg)
    cfg = resolve_seed(cfg, run_seed)
    if cfg.name in GENERATED:
        dataset = _generate(cfg)
    else:
        x, y, num_classes, groups = _source_arrays(cfg)
        _check_clients(cfg, len(y))
        parts, names = _partition(cfg, y, groups)
        name = cfg.name if cfg.partition == "natural" else f"{cfg.name}-{cfg.partition}"
        dataset = federate(
            x,
            y,
            parts,
            test_fraction=cfg.test_fraction,
            seed=cfg.seed,
            name=name,
            num_classes=num_classes,
            client_names=names,
            standardize=STANDARDIZE[cfg.name],
        )
        if cfg.name == "heart":
            dataset.info["features"] = heart.FEATURES
    return population.store(dataset, cfg)


__all__ = [
    "DATASETS",
    "PARTITIONS",
    "default_config",
    "follows_run_seed",
    "federate",
    "format_summary",
    "load_dataset",
    "load_heart_disease",
    "load_medmnist",
    "partition_summary",
    "plot_label_heatmap",
    "pool_clients",
    "pooled",
    "resolve_seed",
    "stack_clients",
    "unstack_clients",
    "validate_config",
    "validate_dataset",
]

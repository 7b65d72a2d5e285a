"""Host-side data: loaders, partitioners and the `load_dataset` entry point."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from medfed_jax.data.base import pooled, stack_clients, validate_dataset
from medfed_jax.types import FederatedDataset

DATASETS = ("random",)


def default_config() -> ml_collections.ConfigDict:
    """The ``data`` section of a run config."""
    return ml_collections.ConfigDict(
        dict(name="random", num_clients=4, samples_per_client=64, num_features=8, num_classes=2, seed=0)
    )


def validate_config(cfg: Any) -> None:
    """Raise a ValueError naming ``data.<field>`` and the fix."""
    if cfg.name not in DATASETS:
        raise ValueError(f"data.name={cfg.name!r} is unknown; choose one of {DATASETS}.")


def load_dataset(cfg: Any) -> FederatedDataset:
    """The federated dataset a ``data`` config section describes."""
    validate_config(cfg)
    rng = np.random.default_rng(cfg.seed)
    w = rng.normal(size=(cfg.num_features, cfg.num_classes))

    def client(n):
        x = rng.normal(size=(n, cfg.num_features)).astype(np.float32)
        return x, np.argmax(x @ w, 1)

    train = [client(cfg.samples_per_client) for _ in range(cfg.num_clients)]
    test = [client(cfg.samples_per_client // 2) for _ in range(cfg.num_clients)]
    dataset = FederatedDataset(
        name="random",
        train=stack_clients(*zip(*train)),
        test=stack_clients(*zip(*test)),
        client_names=tuple(f"client{c}" for c in range(cfg.num_clients)),
        num_classes=cfg.num_classes,
    )
    validate_dataset(dataset)
    return dataset


__all__ = ["default_config", "load_dataset", "pooled", "stack_clients", "validate_config", "validate_dataset"]

"""Baselines beside federated training, both through the federated engine.

- *local-only*: each client trains its own model on its own data alone, with
  the same local work per round as in the federation and the same number of
  rounds (so the same total budget); no communication. It is the federated
  round with a personaliser that never shares (`medfed_jax.personalize`'s
  ``local_only``: the shared part of the model is empty, so the server side
  is skipped), every client in every round.
- *pooled*: centralised training on the union of all clients' training rows
  (the federated engine with a single client), same epochs and rounds.

Both are evaluated on every client's own test split and on all clients' test
rows together: pooled training's one model as the federated model
(``global_pooled_*``), local-only's client models each on all rows and then
averaged (``mean_client_model_*``; `medfed_jax.eval`).
"""

from __future__ import annotations

from typing import Any

from medfed_jax import config as config_lib
from medfed_jax import mesh as mesh_lib
from medfed_jax import personalize
from medfed_jax.data.base import pool_clients
from medfed_jax.server import Engine, build_engine
from medfed_jax.types import FederatedDataset


def local_only_config(cfg: Any) -> Any:
    """The run config of local-only training: `pooled_config`'s settings (every client in every round, nothing else
    beside local training), and the personaliser that never shares."""
    cfg = pooled_config(cfg)
    cfg.personalization.method = personalize.LOCAL_ONLY
    return cfg


def build_local_only(cfg: Any, context: config_lib.BuildContext) -> Engine:
    """The engine of local-only training for `local_only_config`'s static part ``cfg``, on one device.

    One device, as it ran when its results were recorded (a mesh would map its
    clients in other chunks). ``context``: `local_only_config`'s, every client
    in every round.
    """
    return build_engine(cfg, context, (), mesh_lib.one_device_mesh())


def pooled_training_view(dataset: FederatedDataset) -> FederatedDataset:
    """Training rows pooled into one client; the test splits stay per client."""
    return FederatedDataset(
        name=f"{dataset.name}-pooled",
        train=pool_clients(dataset.train),
        test=dataset.test,
        client_names=dataset.client_names,
        num_classes=dataset.num_classes,
        info=dataset.info,
    )


def pooled_config(cfg: Any) -> Any:
    """The run config for centralised training: one client, no attack, no DP, plain mean, no personalisation,
    every client reliable, no drift correction, no compression, synchronous rounds."""
    cfg = cfg.copy_and_resolve_references()
    cfg.cohort_size, cfg.cohort_sampling, cfg.sampling_rate, cfg.max_cohort = 0, "fixed", 0.0, 0
    defaults = config_lib.default_config()
    cfg.attack = defaults.attack
    cfg.aggregator = defaults.aggregator
    cfg.privacy = defaults.privacy
    cfg.personalization = defaults.personalization
    cfg.unreliable = defaults.unreliable
    cfg.drift = defaults.drift
    cfg.compression = defaults.compression
    cfg.asynchronous = defaults.asynchronous
    return cfg

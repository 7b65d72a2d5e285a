"""medfed_jax: federated learning for medical AI as pure JAX functions.

Public API (re-exported names only); see README.md for a tour.
"""

from medfed_jax import mesh
from medfed_jax.aggregators import build_aggregator, mean, weighted_mean
from medfed_jax.attacks import build_attack, no_attack
from medfed_jax.client import LocalHParams, LocalSpec, make_local_update
from medfed_jax.config import default_config
from medfed_jax.data import load_dataset
from medfed_jax.eval import make_evaluate
from medfed_jax.models import make_model
from medfed_jax.runner import prepare, run, run_seeds, train_method
from medfed_jax.server import Engine, FedState, build_engine, make_server_optimizer, static_config
from medfed_jax.types import Aggregator, Attack, ClientData, FederatedDataset, Model

mesh.configure_default_devices()  # before JAX's backend starts: every core by default

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "Attack",
    "ClientData",
    "Engine",
    "FedState",
    "FederatedDataset",
    "LocalHParams",
    "LocalSpec",
    "Model",
    "build_aggregator",
    "build_attack",
    "build_engine",
    "default_config",
    "load_dataset",
    "make_evaluate",
    "make_local_update",
    "make_model",
    "make_server_optimizer",
    "mean",
    "no_attack",
    "prepare",
    "run",
    "run_seeds",
    "static_config",
    "train_method",
    "weighted_mean",
]

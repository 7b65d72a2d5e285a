"""medfed_jax: federated learning for medical AI as pure JAX functions.

Public API (re-exported names only); see README.md for a tour. The building
blocks for your own JAX code are the modules ``mf.aggregators``, ``mf.attacks``,
``mf.privacy``, ``mf.compression`` (compressed uploads), ``mf.drift`` (SCAFFOLD,
FedNova, FedDyn) and ``mf.unreliable`` (dropout, stragglers, FedBuff) (README
"Using the pieces in your own JAX code").

Every name loads its module on first use (PEP 562 module ``__getattr__``):
``import medfed_jax`` itself loads nothing else, not even JAX; ``mf.run`` loads
the engine (JAX, optax, flax). Data sources, plotting and privacy accounting
import their libraries (scikit-learn, matplotlib, dp_accounting, scipy) only
when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from medfed_jax import host_devices  # noqa: E402 (JAX-free)

host_devices.default_before_jax()  # one JAX device per core by default, set before JAX is imported

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Aggregator": "medfed_jax.types",
    "Attack": "medfed_jax.types",
    "Choices": "medfed_jax.config",
    "ClientData": "medfed_jax.types",
    "Engine": "medfed_jax.server",
    "FedState": "medfed_jax.server",
    "FederatedDataset": "medfed_jax.types",
    "HParams": "medfed_jax.config",
    "LocalHParams": "medfed_jax.client",
    "LocalSpec": "medfed_jax.client",
    "Model": "medfed_jax.types",
    "build_aggregator": "medfed_jax.aggregators",
    "build_attack": "medfed_jax.attacks",
    "build_engine": "medfed_jax.server",
    "default_config": "medfed_jax.config",
    "load_dataset": "medfed_jax.data",
    "make_evaluate": "medfed_jax.eval",
    "make_local_update": "medfed_jax.client",
    "make_model": "medfed_jax.models",
    "make_server_optimizer": "medfed_jax.server_optimizer",
    "mean": "medfed_jax.aggregators",
    "no_attack": "medfed_jax.attacks",
    "prepare": "medfed_jax.runner",
    "run": "medfed_jax.runner",
    "run_seeds": "medfed_jax.runner",
    "split": "medfed_jax.config",
    "train_method": "medfed_jax.runner",
    "weighted_mean": "medfed_jax.aggregators",
}

__all__ = sorted(_EXPORTS)
# loaded on first access too: ``mf.aggregators.krum``
LIBRARY_MODULES = ("aggregators", "attacks", "privacy", "compression", "drift", "unreliable")


def __getattr__(name: str) -> Any:
    """Import the public ``name``'s module (or the library module ``name``) on first access; cache it here."""
    if name in LIBRARY_MODULES:
        return importlib.import_module(f"medfed_jax.{name}")  # the import binds it on this package
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medfed_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *LIBRARY_MODULES})

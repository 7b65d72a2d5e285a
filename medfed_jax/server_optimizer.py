"""The server optimizer over the pseudo-gradient ``-aggregate`` (Reddi et al. 2021), and its config section."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import ml_collections
import optax

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


def default_config() -> ml_collections.ConfigDict:
    """Server optimizer applied to the aggregated update (pseudo-gradient)."""
    return ml_collections.ConfigDict(
        dict(
            optimizer="fedavg",  # one of SERVER_OPTIMIZERS
            lr=1.0,  # server learning rate; FedAvg uses 1.0 (numeric knob)
            momentum=0.9,  # fedavgm: server momentum (numeric knob)
            b1=0.9,  # fedadam / fedyogi: first-moment decay (numeric knob)
            b2=0.99,  # fedadam / fedyogi / fedadagrad: second-moment decay (numeric knob)
            eps=1e-3,  # adaptive server optimizers: adaptivity tau of Reddi et al. (numeric knob)
        )
    )


class ServerHParams(NamedTuple):
    """The ``server`` section's numeric settings (traced: sweeping them never recompiles)."""

    lr: Any
    momentum: Any
    b1: Any
    b2: Any
    eps: Any


def make_server_optimizer(name: str, hp: ServerHParams) -> optax.GradientTransformation:
    """Server optimizer over the pseudo-gradient ``-aggregate`` (Reddi et al. 2021).

    ``fedavg``: SGD (lr 1 recovers FedAvg); ``fedavgm``: SGD with momentum;
    ``fedadam``/``fedyogi``/``fedadagrad``: adaptive, with ``server.eps`` the
    paper's tau.
    """
    if name == "fedavg":
        return optax.sgd(hp.lr)
    if name == "fedavgm":
        return optax.sgd(hp.lr, momentum=hp.momentum)
    if name == "fedadam":
        return optax.adam(hp.lr, b1=hp.b1, b2=hp.b2, eps=hp.eps)
    if name == "fedyogi":
        return optax.yogi(hp.lr, b1=hp.b1, b2=hp.b2, eps=hp.eps)
    if name == "fedadagrad":
        return optax.adagrad(hp.lr, initial_accumulator_value=0.0, eps=hp.eps)
    raise ValueError(f"server.optimizer={name!r} is unknown; choose one of {SERVER_OPTIMIZERS}.")


def validate_config(server: Any) -> None:
    """Raise a ValueError naming ``server.<field>`` and the fix."""
    if server.optimizer not in SERVER_OPTIMIZERS:
        raise ValueError(f"server.optimizer={server.optimizer!r} is unknown; choose one of {SERVER_OPTIMIZERS}.")
    lr = server.lr
    if not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
        raise ValueError(
            f"server.lr={lr!r} must be a finite number > 0. FedAvg uses 1.0; FedAdam/FedYogi typically 0.01 to 0.1."
        )
    if not 0 <= server.momentum < 1:
        raise ValueError(f"server.momentum={server.momentum!r} must lie in [0, 1).")
    for name in ("b1", "b2"):
        if not 0 <= server[name] < 1:
            raise ValueError(f"server.{name}={server[name]!r} must lie in [0, 1).")
    if not isinstance(server.eps, (int, float)) or not server.eps > 0 or not math.isfinite(server.eps):
        raise ValueError(f"server.eps={server.eps!r} must be a finite number > 0.")

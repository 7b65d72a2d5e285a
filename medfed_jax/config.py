"""Run configuration: defaults, validation, and the static / numeric split.

A config is an ``ml_collections.ConfigDict`` with one section per part
(``data``, ``model``, ``local``, ``server``, ``aggregator``, ``attack``,
``privacy``, ``personalization``) plus top-level run settings. Each part's module owns its section:
it provides ``default_config()``, ``validate_config(section, context)`` and
``NUMERIC_FIELDS``, the fields that are *numeric knobs*.

Numeric knobs (learning rates, noise multiplier, attacker fraction, ...) are
traced into the compiled program, so sweeping them never recompiles; every
other field is *structural* (static): changing it changes shapes or code and
compiles a new program.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import jax.numpy as jnp
import ml_collections

from medfed_jax import aggregators, attacks, personalize, privacy
from medfed_jax.types import Knobs

CLIENT_OPTIMIZERS = ("sgd", "momentum", "adam")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
MODELS = ("logistic", "mlp", "cnn")
PARALLELISM = ("auto", "vmap", "map")

LOCAL_NUMERIC = ("lr", "momentum", "prox_mu")
SERVER_NUMERIC = ("lr", "momentum", "b1", "b2", "eps")


class BuildContext(NamedTuple):
    """Facts about the data that validation and component builders need."""

    num_clients: int
    cohort_size: int
    num_classes: int
    feature_shape: tuple[int, ...]
    cohort_cap: int = 0  # rows per client of a flat population's cohort block (0: padded storage)


def local_config() -> ml_collections.ConfigDict:
    """Local training: E epochs at batch B, or a fixed number of steps."""
    return ml_collections.ConfigDict(
        dict(
            epochs=1,
            steps=0,  # > 0 selects a fixed number of steps instead of epochs
            batch_size=32,
            optimizer="sgd",
            lr=0.05,
            momentum=0.9,  # used by the 'momentum' optimizer only
            prox_mu=0.0,  # FedProx proximal strength; 0 = FedAvg
            sampling="shuffle",  # 'shuffle' (epochs), 'fixed' or 'poisson' (per step)
        )
    )


def server_config() -> ml_collections.ConfigDict:
    """Server optimizer applied to the aggregated update (pseudo-gradient)."""
    return ml_collections.ConfigDict(dict(optimizer="fedavg", lr=1.0, momentum=0.9, b1=0.9, b2=0.99, eps=1e-3))


def model_config() -> ml_collections.ConfigDict:
    """Model choice; ``widths`` are the MLP's hidden widths."""
    return ml_collections.ConfigDict(dict(name="mlp", widths=(200, 200)))


def data_config() -> ml_collections.ConfigDict:
    """The ``data`` section, owned by `medfed_jax.data`."""
    from medfed_jax import data as data_lib

    return data_lib.default_config()


def default_config() -> ml_collections.ConfigDict:
    """Every field a run understands, with sensible defaults."""
    cfg = ml_collections.ConfigDict()
    cfg.name = "run"
    cfg.seed = 0
    cfg.rounds = 50
    cfg.eval_every = 10
    cfg.cohort_size = 0  # 0 = every client takes part in every round
    cfg.client_parallelism = "auto"  # 'vmap' (all at once), 'map' (chunks), 'auto'
    cfg.client_chunk = 0  # clients per vmapped chunk under 'map'; 0 = backend default
    cfg.baselines = ("local_only", "pooled")
    cfg.data = data_config()
    cfg.model = model_config()
    cfg.local = local_config()
    cfg.server = server_config()
    cfg.aggregator = aggregators.default_config()
    cfg.attack = attacks.default_config()
    cfg.privacy = privacy.default_config()
    cfg.personalization = personalize.default_config()
    cfg.sweep = ml_collections.ConfigDict()
    return cfg


def numeric_fields() -> tuple[str, ...]:
    """Dotted paths of every numeric (traced) config field."""
    return (
        tuple(f"local.{f}" for f in LOCAL_NUMERIC)
        + tuple(f"server.{f}" for f in SERVER_NUMERIC)
        + tuple(f"aggregator.{f}" for f in aggregators.NUMERIC_FIELDS)
        + tuple(f"attack.{f}" for f in attacks.NUMERIC_FIELDS)
        + tuple(f"privacy.{f}" for f in privacy.NUMERIC_FIELDS)
        + tuple(f"personalization.{f}" for f in personalize.NUMERIC_FIELDS)
    )


def get_path(cfg: Any, path: str) -> Any:
    """``get_path(cfg, 'local.lr')`` is ``cfg.local.lr``."""
    for part in path.split("."):
        cfg = cfg[part]
    return cfg


def set_path(cfg: Any, path: str, value: Any) -> None:
    """``set_path(cfg, 'local.lr', 0.1)`` sets ``cfg.local.lr = 0.1``."""
    *parents, leaf = path.split(".")
    for part in parents:
        cfg = cfg[part]
    cfg[leaf] = value


def knobs_from_config(cfg: Any) -> Knobs:
    """The numeric knobs of a config as float32 scalars (traced in programs)."""
    return {path: jnp.asarray(float(get_path(cfg, path)), jnp.float32) for path in numeric_fields()}


def _positive(name: str, value: Any, fix: str = "") -> None:
    if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number > 0.{' ' + fix if fix else ''}")


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; choose one of {choices}.")


def validate_run_settings(cfg: Any, num_clients: int) -> None:
    """Check the top-level, model, local and server settings."""
    if not isinstance(cfg.rounds, int) or cfg.rounds < 1:
        raise ValueError(f"rounds={cfg.rounds!r} must be an integer >= 1.")
    if not isinstance(cfg.eval_every, int) or cfg.eval_every < 1:
        raise ValueError(f"eval_every={cfg.eval_every!r} must be an integer >= 1.")
    if not isinstance(cfg.cohort_size, int) or cfg.cohort_size < 0:
        raise ValueError(f"cohort_size={cfg.cohort_size!r} must be 0 (all clients) or a positive integer.")
    if cfg.cohort_size > num_clients:
        raise ValueError(
            f"cohort_size={cfg.cohort_size} is larger than the population of {num_clients} "
            f"clients; use cohort_size <= {num_clients} (or 0 for all)."
        )
    _one_of("client_parallelism", cfg.client_parallelism, PARALLELISM)
    if not isinstance(cfg.client_chunk, int) or cfg.client_chunk < 0:
        raise ValueError(f"client_chunk={cfg.client_chunk!r} must be 0 (default) or a positive integer.")
    _one_of("model.name", cfg.model.name, MODELS)
    if cfg.model.name == "mlp" and (not cfg.model.widths or min(cfg.model.widths) < 1):
        raise ValueError(f"model.widths={cfg.model.widths!r} must be a non-empty list of positive widths.")
    local = cfg.local
    _one_of("local.optimizer", local.optimizer, CLIENT_OPTIMIZERS)
    _one_of("local.sampling", local.sampling, ("shuffle", "fixed", "poisson"))
    if not isinstance(local.batch_size, int) or local.batch_size <= 0:
        raise ValueError(f"local.batch_size={local.batch_size!r} must be a positive integer.")
    if (local.epochs > 0) == (local.steps > 0):
        raise ValueError(
            f"set exactly one of local.epochs ({local.epochs}) and local.steps ({local.steps}) "
            "to a positive integer and the other to 0."
        )
    if local.sampling == "shuffle" and local.steps > 0:
        raise ValueError("local.sampling='shuffle' walks epochs; with local.steps use 'fixed' or 'poisson'.")
    if local.sampling != "shuffle" and local.epochs > 0:
        raise ValueError(
            f"local.sampling={local.sampling!r} draws a batch per step; set local.steps, not local.epochs."
        )
    _positive("local.lr", local.lr, "Try 0.01 to 0.1 for SGD.")
    if not 0 <= local.momentum < 1:
        raise ValueError(f"local.momentum={local.momentum!r} must lie in [0, 1).")
    if not local.prox_mu >= 0:
        raise ValueError(f"local.prox_mu={local.prox_mu!r} must be >= 0 (0 disables FedProx).")
    server = cfg.server
    _one_of("server.optimizer", server.optimizer, SERVER_OPTIMIZERS)
    _positive("server.lr", server.lr, "FedAvg uses 1.0; FedAdam/FedYogi typically 0.01 to 0.1.")
    if not 0 <= server.momentum < 1:
        raise ValueError(f"server.momentum={server.momentum!r} must lie in [0, 1).")
    for name in ("b1", "b2"):
        if not 0 <= server[name] < 1:
            raise ValueError(f"server.{name}={server[name]!r} must lie in [0, 1).")
    _positive("server.eps", server.eps)


def validate(cfg: Any, context: BuildContext) -> None:
    """Validate a whole config against the data it will run on.

    Raises ValueError naming the field and the fix, before anything compiles.
    """
    validate_run_settings(cfg, context.num_clients)
    aggregators.validate_config(cfg.aggregator, context)
    attacks.validate_config(cfg.attack, context)
    privacy.validate_config(cfg.privacy, context)
    personalize.validate_config(cfg.personalization, context)


def to_json(cfg: Any) -> str:
    """A canonical JSON rendering (sorted keys), used to compare workdirs."""
    return json.dumps(json_safe(cfg.to_dict()), sort_keys=True, indent=2)


def json_safe(value: Any) -> Any:
    """Nested dicts and lists with non-finite floats as strings ("inf", "nan"): strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value

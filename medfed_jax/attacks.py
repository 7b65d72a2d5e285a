"""Byzantine behaviour as pure functions over the stacked client axis.

Each attack is a factory returning `Attack(apply, poison_labels)`; see
`medfed_jax.types.Attack`. ``malicious`` is a ``[C]`` bool mask, fixed for a
run and drawn from the run's key (`malicious_mask`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from medfed_jax.types import Attack, Knobs


def _keep_updates(updates, malicious, key, context):
    del malicious, key, context
    return updates


def _keep_labels(y, malicious, num_classes):
    del malicious, num_classes
    return y


def no_attack() -> Attack:
    """Every client is honest: updates and labels pass unchanged."""
    return Attack(_keep_updates, _keep_labels)


def malicious_mask(key: jax.Array, num_clients: int, num_malicious: jax.Array) -> jax.Array:
    """``[C]`` bool with exactly ``num_malicious`` True entries, uniformly placed.

    ``num_malicious`` may be traced, so the attacker fraction can be swept
    without recompiling.
    """
    rank = jnp.argsort(jax.random.permutation(key, num_clients))
    return rank < num_malicious


ATTACK_NAMES = ("none",)
NUMERIC_FIELDS = ("fraction",)


def default_config() -> ml_collections.ConfigDict:
    """The ``attack`` section of a run config."""
    return ml_collections.ConfigDict(dict(name="none", fraction=0.0))


def num_malicious(fraction: Any, num_clients: int) -> Any:
    """Malicious clients for a fraction of the population: ``round(fraction * C)``."""
    return jnp.round(fraction * num_clients).astype(jnp.int32)


def validate_config(cfg: Any, context: Any) -> None:
    """Raise a ValueError naming ``attack.<field>`` and the fix."""
    if cfg.name not in ATTACK_NAMES:
        raise ValueError(f"attack.name={cfg.name!r} is unknown; choose one of {ATTACK_NAMES}.")
    if not 0.0 <= cfg.fraction < 1.0:
        raise ValueError(f"attack.fraction={cfg.fraction!r} must lie in [0, 1).")


def build_attack(cfg: Any, knobs: Knobs) -> Attack:
    """The attack named by ``cfg.name`` (the config's ``attack`` section)."""
    del knobs
    if cfg.name == "none":
        return no_attack()
    raise ValueError(f"attack.name={cfg.name!r} is unknown; choose one of {ATTACK_NAMES}.")

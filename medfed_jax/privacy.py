"""Differential privacy: clipping + Gaussian mechanisms (jitted) and accounting (host).

Placeholder owned by the privacy work: the engine calls the three ``build_*``
functions below inside the traced round.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from medfed_jax.types import Knobs

NUMERIC_FIELDS = ("noise_multiplier", "clip_norm")


def default_config() -> ml_collections.ConfigDict:
    """The ``privacy`` section of a run config."""
    return ml_collections.ConfigDict(
        dict(mode="none", noise_multiplier=0.0, clip_norm=float("inf"), delta=1e-5)
    )


def validate_config(cfg: Any, context: Any) -> None:
    """Raise a ValueError naming ``privacy.<field>`` and the fix for bad settings."""
    if cfg.mode != "none":
        raise ValueError(f"privacy.mode={cfg.mode!r} is not available yet; use 'none'.")


def build_client_privatizer(cfg: Any, knobs: Knobs):
    """``(update, key) -> update`` applied per client before upload, or None."""
    del cfg, knobs
    return None


def build_central_aggregator(cfg: Any, knobs: Knobs, context: Any):
    """An `Aggregator` that replaces the configured one under central DP, or None."""
    del cfg, knobs, context
    return None


def build_gradient_fn(cfg: Any, knobs: Knobs):
    """A per-batch gradient function for example-level DP-SGD, or None."""
    del cfg, knobs
    return None

"""The DP mechanisms, jitted: clipping, Gaussian noise, DP-FedAvg (and banded-MF noise), local DP, DP-SGD.

All noise comes from explicit keys; see `medfed_jax.privacy` for what each mode guarantees.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from medfed_jax.aggregators import count_nonfinite, make_aggregator, require_key, zero_masked
from medfed_jax.types import Aggregator, PRNGKey

# --------------------------------------------------------------------------- mechanisms (jitted)


def global_norm(tree: Any) -> jax.Array:
    """L2 norm of all leaves of a pytree together."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


def clip_update(update: Any, clip_norm: jax.Array) -> tuple[Any, jax.Array]:
    """Scale ``update`` to L2 norm <= ``clip_norm``; returns ``(clipped, norm)``.

    An update with norm <= ``clip_norm`` passes bit for bit. A non-finite
    update becomes zeros (norm reported as 0), so the output norm is always
    bounded.
    """
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(update)]))
    update = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), update)
    norm = global_norm(update)
    over = norm > clip_norm
    scale = jnp.where(over, clip_norm / jnp.where(over, norm, 1.0), 1.0)
    clipped = jax.tree.map(lambda u: jnp.where(over, u * scale.astype(u.dtype), u), update)
    return clipped, norm


def noise_std(noise_multiplier: jax.Array, clip_norm: jax.Array) -> jax.Array:
    """``sigma * S``, with 0 when ``sigma == 0`` (also for ``S = inf``)."""
    return jnp.where(noise_multiplier == 0, 0.0, noise_multiplier * clip_norm)


def add_gaussian_noise(tree: Any, key: PRNGKey, std: jax.Array) -> Any:
    """``tree + N(0, std^2)`` independently per coordinate.

    One normal draw over the flattened tree: each `jax.random.normal` call
    costs about a second of XLA compile time on a CPU, so one per leaf adds up.
    """
    flat, unravel = ravel_pytree(tree)
    return unravel(flat + (std * jax.random.normal(key, flat.shape)).astype(flat.dtype))


def _clip_rows(rows: Any, clip_norm: jax.Array, keep: jax.Array) -> tuple[Any, jax.Array]:
    """Clip each row of a ``[N, ...]`` pytree; rows with ``keep == False`` become zeros."""
    clipped, norms = jax.vmap(clip_update, in_axes=(0, None))(rows, clip_norm)
    return zero_masked(clipped, keep), norms


def local_privatizer(noise_multiplier: jax.Array, clip_norm: jax.Array) -> Callable[[Any, PRNGKey], Any]:
    """Local DP: ``(update, key) -> clip(update, S) + N(0, (sigma S)^2)`` for one client."""

    def privatize(update, key):
        clipped, _ = clip_update(update, clip_norm)
        return add_gaussian_noise(clipped, key, noise_std(noise_multiplier, clip_norm))

    return privatize


class AdaptiveClip(NamedTuple):
    """Adaptive clipping settings (Andrew et al. 2021), possibly traced."""

    target_quantile: jax.Array
    clip_lr: jax.Array
    count_stddev: jax.Array


def update_noise_multiplier(noise_multiplier: jax.Array, count_stddev: jax.Array) -> jax.Array:
    """Noise multiplier of the update under adaptive clipping (Andrew et al. 2021, Thm. 1).

    The update (sensitivity S) and the centred clipped count (sensitivity 1/2)
    together form one Gaussian mechanism with multiplier ``z`` when
    ``z_update = (z^-2 - (2 count_stddev)^-2)^(-1/2)``; needs ``z < 2 count_stddev``.
    """
    ratio = noise_multiplier / (2.0 * count_stddev)
    return noise_multiplier / jnp.sqrt(1.0 - jnp.square(ratio))


def strategy_coefs(bands: int) -> np.ndarray:
    """Toeplitz coefficients of the ``bands``-banded strategy ``C``: the first ``bands`` of ``A^(1/2)``.

    ``c_k = binom(2k, k) / 4^k`` (Fichtenberger et al. 2023), via
    ``jax_privacy.matrix_factorization.toeplitz.optimal_max_error_strategy_coefs``;
    positive and non-increasing, ``c_0 = 1``.
    """
    from jax_privacy.matrix_factorization import toeplitz

    with jax.ensure_compile_time_eval():  # constants, also when called while tracing
        return np.asarray(toeplitz.optimal_max_error_strategy_coefs(bands), np.float64)


def correlated_noise(bands: int) -> Any:
    """``C^-1`` as jax-privacy's `StreamingMatrix` (``init_multiply(like)``, ``multiply_next(z, state)``)."""
    from jax_privacy.matrix_factorization import toeplitz

    with jax.ensure_compile_time_eval():
        return toeplitz.inverse_as_streaming_matrix(jnp.asarray(strategy_coefs(bands), jnp.float32))


def dp_fedavg(
    noise_multiplier: jax.Array,
    clip_norm: jax.Array,
    expected_cohort: float,
    adaptive: AdaptiveClip | None = None,
    bands: int = 1,
) -> Aggregator:
    """Client-level central DP mean (DP-FedAvg) as an `Aggregator`.

    ``update = (sum_i m_i clip(u_i, S) + N(0, (z S)^2)) / expected_cohort``,
    a denominator fixed in advance (the engine's: the expected number of
    senders, `medfed_jax.config.BuildContext.expected_senders`); ``weights``
    are ignored (weighting by data size would raise the sensitivity).
    ``bands > 1``: the noise is correlated across rounds,
    ``z S (C^-1 w)_t`` for iid ``w_t ~ N(0, I)`` (`correlated_noise`;
    ``mode='bandmf'``), with a buffer of ``bands - 1`` past draws in the
    aggregator state. With ``adaptive``, ``S`` lives in the aggregator state
    and moves geometrically toward the target quantile of the update norms,
    estimated from the noised count of unclipped clients; the overall noise
    multiplier stays ``noise_multiplier``. Randomised: ``aggregate`` needs a
    key (its other arguments default, see `medfed_jax.aggregators.make_aggregator`). Diagnostics: ``clip_norm`` (used
    this round), ``clipped_fraction`` (of taking-part clients; a non-private
    diagnostic), ``nonfinite_clients`` (their updates count as zeros).
    """
    m = float(expected_cohort)
    z_update = (
        noise_multiplier if adaptive is None else update_noise_multiplier(noise_multiplier, adaptive.count_stddev)
    )
    noising = correlated_noise(bands) if bands > 1 else None

    def init(params):
        state = {}
        if adaptive is not None:
            state["clip_norm"] = jnp.asarray(clip_norm, jnp.float32)
        if noising is not None:
            flat, _ = ravel_pytree(params)
            state["noise"] = noising.init_multiply(jax.ShapeDtypeStruct(flat.shape, jnp.float32))
        return state or ()

    def aggregate(updates, weights, mask, state, key):
        del weights
        require_key(key, "dp_fedavg")
        clip = clip_norm if adaptive is None else state["clip_norm"]
        clipped, norms = _clip_rows(updates, clip, mask)
        key_update, key_count = jax.random.split(key)
        total = jax.tree.map(lambda u: jnp.sum(u, axis=0), clipped)
        std = noise_std(z_update, clip)
        if noising is None:
            noisy = add_gaussian_noise(total, key_update, std)
        else:
            flat, unravel = ravel_pytree(total)
            noise, buffer = noising.multiply_next(std * jax.random.normal(key_update, flat.shape), state["noise"])
            noisy, state = unravel(flat + noise), {**state, "noise": buffer}
        update = jax.tree.map(lambda u: u / m, noisy)
        taking_part = jnp.sum(mask)
        diag = {
            "clip_norm": jnp.asarray(clip, jnp.float32),
            "clipped_fraction": jnp.sum(mask & (norms > clip)) / jnp.maximum(taking_part, 1),
            "nonfinite_clients": count_nonfinite(updates, mask),
        }
        if adaptive is not None:
            centred = jnp.sum(jnp.where(mask, (norms <= clip) - 0.5, 0.0))
            noisy_count = centred + adaptive.count_stddev * jax.random.normal(key_count)
            below = noisy_count / m + 0.5
            state = {**state, "clip_norm": clip * jnp.exp(-adaptive.clip_lr * (below - adaptive.target_quantile))}
        return update, state, diag

    return make_aggregator(init, aggregate)


def dpsgd_gradient(noise_multiplier: jax.Array, clip_norm: jax.Array) -> Callable[..., tuple[jax.Array, Any]]:
    """Example-level DP-SGD gradient (Abadi et al. 2016).

    Returns ``grad_fn(example_loss, params, xb, yb, valid, key,
    expected_batch_size) -> (mean_loss, grads)``: per-example gradients of
    ``example_loss(params, x, y)`` by vmap, each clipped to ``C``, summed over
    ``valid`` rows, plus ``N(0, (sigma C)^2)`` per coordinate, divided by
    ``expected_batch_size`` (``B`` for fixed-size batches, ``q n`` for Poisson
    sampling). ``mean_loss`` is the plain mean over valid rows, for logging.
    """

    def grad_fn(example_loss, params, xb, yb, valid, key, expected_batch_size):
        losses, grads = jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0, 0))(params, xb, yb)
        clipped, _ = _clip_rows(grads, clip_norm, valid)
        total = jax.tree.map(lambda g: jnp.sum(g, axis=0), clipped)
        noisy = add_gaussian_noise(total, key, noise_std(noise_multiplier, clip_norm))
        mean_grads = jax.tree.map(lambda g: g / expected_batch_size, noisy)
        mean_loss = jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
        return mean_loss, mean_grads

    return grad_fn

"""What the two digit audits share: scikit-learn's 8x8 digits and the per-example loss of a model."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medfed_jax.types import Array, Params

Apply = Callable[[Params, Array], Array]

DIGITS_SHAPE = (8, 8)


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``x [N, 64]`` float32 in [0, 1] and ``y [N]`` int32."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32)


def example_losses(apply: Apply, params: Params, x: Array, y: Array) -> Array:
    """Per-example softmax cross-entropy ``[N]`` of a model on ``(x, y)``."""
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y)


def batch_gradient(apply: Apply, params: Params, x: Array, y: Array) -> Params:
    """Gradient of the mean cross-entropy over a batch: one client's single-step update direction."""
    return jax.grad(lambda p: jnp.mean(example_losses(apply, p, x, y)))(params)

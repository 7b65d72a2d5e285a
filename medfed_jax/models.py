"""Flax models exposed as pure ``init(key, example_x)`` / ``apply(params, x)``.

- ``logistic``: multinomial logistic regression on the flattened input.
- ``mlp``: ReLU MLP on the flattened input, hidden widths configurable
  (``(200, 200)`` is the 2NN of McMahan et al. 2017).
- ``cnn``: the CNN of McMahan et al. 2017 for any HxWxC input: two 5x5
  convolutions (32, 64 channels), each followed by 2x2 max-pooling, a dense
  layer of 512 units and the output layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medfed_jax.types import Model


class Logistic(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
    num_classes: int
    widths: Sequence[int] = (200, 200)

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.widths):
            x = nn.relu(nn.Dense(width, name=f"hidden{i}")(x))
        return nn.Dense(self.num_classes, name="head")(x)


class CNN(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4:
            raise ValueError(f"the cnn model needs images [B, H, W, C], got an input of shape {x.shape}")
        for i, channels in enumerate((32, 64)):
            x = nn.relu(nn.Conv(channels, (5, 5), padding="SAME", name=f"conv{i}")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = nn.relu(nn.Dense(512, name="hidden")(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, name="head")(x)


def make_model(name: str, num_classes: int, widths: Sequence[int] = (200, 200)) -> Model:
    """A `Model` (pure init/apply) by name: ``'logistic'``, ``'mlp'`` or ``'cnn'``."""
    if name == "logistic":
        module = Logistic(num_classes)
    elif name == "mlp":
        module = MLP(num_classes, tuple(widths))
    elif name == "cnn":
        module = CNN(num_classes)
    else:
        raise ValueError(f"model.name={name!r} is unknown; choose one of ('logistic', 'mlp', 'cnn').")

    def init(key: jax.Array, example_x: jax.Array):
        return module.init(key, example_x)

    def apply(params, x: jax.Array) -> jax.Array:
        return module.apply(params, x)

    return Model(init, apply)


def param_shapes(model: Model, feature_shape: tuple[int, ...]):
    """The model's parameters as `jax.ShapeDtypeStruct` leaves, for inputs of ``feature_shape``.

    `jax.eval_shape` with the key made inside the trace: nothing is compiled
    or computed (an eager ``jax.random.key`` compiles two small programs).
    """
    example = jax.ShapeDtypeStruct((1, *feature_shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), example)


def check_input_fits(model: Model, name: str, feature_shape: tuple[int, ...]) -> None:
    """Raise a clear error if data of ``feature_shape`` cannot feed the model (`param_shapes`)."""
    try:
        param_shapes(model, feature_shape)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix
        hint = " The cnn needs images of shape (H, W, C)." if name == "cnn" else ""
        raise ValueError(
            f"model.name={name!r} cannot take data with feature shape {feature_shape}: {err}.{hint}"
        ) from err


def num_parameters(params) -> int:
    """Number of scalar parameters in a pytree."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(params))

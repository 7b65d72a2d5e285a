"""Local training on one client, as a pure function the caller vmaps.

``local_update(params, data, key, hparams) -> (delta, metrics)`` runs a
`lax.while_loop` of exactly the client's own number of optimizer steps
(`client_steps`). Vmapped over a chunk of clients, the loop runs as many steps
as the chunk's largest member (finished clients keep their state: JAX's
batched while loop selects), not as many as the population's largest client.

Batch sampling (``LocalSpec.sampling``):

- ``'shuffle'``: E epochs at batch size B. The client's ``n`` real rows are
  reshuffled each epoch and read as one stream of ``n * E`` rows, so the client
  makes ``ceil(n * E / B)`` real steps (the last batch may be short).
- ``'fixed'``: ``steps`` steps, each on a fresh batch of ``min(B, n)`` rows
  drawn without replacement.
- ``'poisson'``: ``steps`` steps, each row taking part with probability
  ``min(B / n, 1)`` (the sampling DP-SGD's accounting assumes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec as P

from medfed_jax.drift import LocalTerms, corrected_gradient
from medfed_jax.types import Array, Model, Params

GradientFn = Callable[..., tuple[Array, Params]]
CLIENT_OPTIMIZERS = ("sgd", "momentum", "adam")


def default_config() -> ml_collections.ConfigDict:
    """Local training: E epochs at batch B, or a fixed number of steps."""
    return ml_collections.ConfigDict(
        dict(
            epochs=1,  # local epochs per round (0 when local.steps is set)
            steps=0,  # > 0 selects a fixed number of steps instead of epochs
            batch_size=32,  # examples per local step
            optimizer="sgd",  # one of CLIENT_OPTIMIZERS
            lr=0.05,  # client learning rate (numeric knob)
            momentum=0.9,  # used by the 'momentum' optimizer only (numeric knob)
            prox_mu=0.0,  # FedProx proximal strength; 0 = FedAvg (numeric knob)
            sampling="shuffle",  # 'shuffle' (epochs), 'fixed' or 'poisson' (per step)
        )
    )


class LocalHParams(NamedTuple):
    """The ``local`` section's numeric settings (traced: sweeping them never recompiles)."""

    lr: Array
    momentum: Array
    prox_mu: Array


class LocalSpec(NamedTuple):
    """Static (shape-determining) settings of local training."""

    epochs: int
    steps: int
    batch_size: int
    optimizer: str
    sampling: str
    max_count: int  # N_max, the padded client size

    @classmethod
    def from_config(cls, local: Any, max_count: int) -> LocalSpec:
        """The spec of a config's ``local`` section for clients padded to ``max_count`` rows."""
        return cls(local.epochs, local.steps, local.batch_size, local.optimizer, local.sampling, max_count)

    @property
    def batch_rows(self) -> int:
        """Rows gathered per step (a Poisson step looks at every row)."""
        if self.sampling == "poisson":
            return self.max_count
        if self.sampling == "fixed":
            return min(self.batch_size, self.max_count)
        return self.batch_size


class Anchor(NamedTuple):
    """A pull of strength ``strength`` (lambda) toward fixed parameters ``params`` (Ditto's global model).

    Applied after every optimizer step as the exact proximal map of
    ``lambda/2 ||v - params||^2`` at step size ``lr``:
    ``v <- (v + lr lambda params) / (1 + lr lambda)``. This is the implicit form
    of the explicit step ``v <- v - lr (grad F(v) + lambda (v - params))``:
    identical at ``lambda = 0``, equal to first order in ``lr lambda``, and
    stable for every ``lambda`` (the explicit step diverges once
    ``lr lambda > 2``); ``lambda -> inf`` gives ``v = params``.
    """

    params: Params
    strength: Array


def make_client_optimizer(name: str, hparams: LocalHParams) -> optax.GradientTransformation:
    """The client optimizer: ``'sgd'``, ``'momentum'`` (heavy ball) or ``'adam'``."""
    if name == "sgd":
        return optax.sgd(hparams.lr)
    if name == "momentum":
        return optax.sgd(hparams.lr, momentum=hparams.momentum)
    if name == "adam":
        return optax.adam(hparams.lr)
    raise ValueError(f"local.optimizer={name!r} is unknown; choose one of {CLIENT_OPTIMIZERS}.")


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-example softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def masked_mean_gradient(model: Model) -> GradientFn:
    """Mean loss over the valid rows of a batch, and its gradient."""

    def batch_loss(params, xb, yb, valid):
        losses = cross_entropy(model.apply(params, xb), yb)
        return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

    def gradient(params, xb, yb, valid, key, expected_batch_size):
        del key, expected_batch_size
        return jax.value_and_grad(batch_loss)(params, xb, yb, valid)

    return gradient


def example_loss_fn(model: Model) -> Callable[[Params, Array, Array], Array]:
    """Loss of a single example ``(params, x, y) -> scalar`` (for per-example gradients)."""

    def example_loss(params, x, y):
        return cross_entropy(model.apply(params, x[None])[0], y)

    return example_loss


def epoch_steps(count: Array, epochs: Array | int, batch_size: int) -> Array:
    """Optimizer steps of ``epochs`` epochs over ``count`` rows at batch size ``batch_size``: ``ceil(count E / B)``."""
    return (count * epochs + batch_size - 1) // batch_size


def client_steps(spec: LocalSpec, count: Array) -> Array:
    """Optimizer steps of a client with ``count`` rows: `epoch_steps` of ``spec.epochs``, or ``spec.steps``;
    none without rows."""
    if spec.steps > 0:
        return jnp.where(count > 0, spec.steps, 0)
    return epoch_steps(count, spec.epochs, spec.batch_size)


def _shuffled_order(key: Array, count: Array, max_count: int) -> Array:
    """A random permutation of ``0..count-1`` followed by the padding rows."""
    scores = jnp.where(jnp.arange(max_count) < count, jax.random.uniform(key, (max_count,)), jnp.inf)
    return jnp.argsort(scores)


def _batch_rows(spec: LocalSpec, key: Array, step: Array, count: Array, epoch_orders: Array):
    """Row indices ``[b]``, validity ``[b]`` and expected batch size of one step."""
    if spec.sampling == "shuffle":
        n = jnp.maximum(count, 1)
        position = step * spec.batch_size + jnp.arange(spec.batch_size)
        epoch = jnp.minimum(position // n, spec.epochs - 1)
        rows = epoch_orders[epoch, position % n]
        return rows, position < count * spec.epochs, jnp.asarray(spec.batch_size, jnp.float32)
    step_key = jax.random.fold_in(key, step)
    if spec.sampling == "fixed":
        rows = _shuffled_order(step_key, count, spec.max_count)[: spec.batch_rows]
        valid = jnp.arange(spec.batch_rows) < count
        return rows, valid, jnp.minimum(count, spec.batch_rows).astype(jnp.float32)
    rate = jnp.minimum(spec.batch_size / jnp.maximum(count, 1), 1.0)
    rows = jnp.arange(spec.max_count)
    valid = (rows < count) & jax.random.bernoulli(step_key, rate, (spec.max_count,))
    return rows, valid, rate * count


def make_local_update(
    model: Model, spec: LocalSpec, gradient_fn: GradientFn | None = None
) -> Callable[..., tuple[Params, dict[str, Array]]]:
    """Build ``local_update(params, data, key, hparams, anchor=None, terms=None) -> (delta, metrics)``.

    Args:
      model: the model's pure init/apply pair.
      spec: static local-training settings.
      gradient_fn: ``(params, xb, yb, valid, key, expected_batch_size) ->
        (loss, grads)``; the masked mean gradient by default (DP-SGD swaps in
        a clipped, noised one).

    ``data`` is one client's ``(x[N_max, ...], y[N_max], count)``, or ``(x, y,
    count, steps)`` with its number of steps set (unreliable clients'
    budgets and stragglers, `medfed_jax.unreliable.cohort_work`; at most
    `client_steps`); ``delta`` is
    the trained parameters minus ``params``. ``metrics`` holds the mean batch
    loss over the client's real steps (``train_loss``) and their number.
    ``hparams.prox_mu`` (FedProx) pulls toward the starting ``params``; an
    optional `Anchor` adds a pull toward other parameters (Ditto's personal
    update starts from the personal model and is pulled toward the global one).
    Optional `medfed_jax.drift.LocalTerms` add a drift correction's linear term
    and pull (SCAFFOLD, FedDyn) to every step's gradient, beside ``prox_mu``.
    """
    gradient_fn = gradient_fn or masked_mean_gradient(model)

    def local_update(
        params: Params,
        data: Any,
        key: Array,
        hparams: LocalHParams,
        anchor: Anchor | None = None,
        terms: LocalTerms | None = None,
    ):
        x, y, count, *steps = data
        order_key, step_key, noise_key = jax.random.split(key, 3)
        if spec.sampling == "shuffle":
            epoch_keys = jax.random.split(order_key, spec.epochs)
            epoch_orders = jax.vmap(lambda k: _shuffled_order(k, count, spec.max_count))(epoch_keys)
        else:
            epoch_orders = None
        optimizer = make_client_optimizer(spec.optimizer, hparams)

        def step(carry):
            t, local_params, opt_state, loss_sum = carry
            rows, valid, expected = _batch_rows(spec, step_key, t, count, epoch_orders)
            loss, grads = gradient_fn(local_params, x[rows], y[rows], valid, jax.random.fold_in(noise_key, t), expected)
            if terms is None:
                grads = jax.tree.map(lambda g, w, w0: g + hparams.prox_mu * (w - w0), grads, local_params, params)
            else:
                pull = terms._replace(prox=terms.prox + hparams.prox_mu)
                grads = corrected_gradient(grads, local_params, params, pull)
            updates, new_opt_state = optimizer.update(grads, opt_state, local_params)
            new_params = optax.apply_updates(local_params, updates)
            if anchor is not None:
                shrink = hparams.lr * anchor.strength
                new_params = jax.tree.map(lambda v, a: (v + shrink * a) / (1 + shrink), new_params, anchor.params)
            return t + 1, new_params, new_opt_state, loss_sum + loss

        num_steps = steps[0] if steps else client_steps(spec, count)
        start = (jnp.zeros((), jnp.int32), params, optimizer.init(params), jnp.zeros((), jnp.float32))
        _, final, _, loss_sum = jax.lax.while_loop(lambda carry: carry[0] < num_steps, step, start)
        delta = jax.tree.map(jnp.subtract, final, params)
        metrics = {"train_loss": loss_sum / jnp.maximum(num_steps, 1), "num_steps": num_steps}
        return delta, metrics

    return local_update


def _map_local(fn: Callable, args: tuple, in_axes: tuple, parallelism: str, chunk: int):
    """`map_clients` on one device; a single chunk is a plain vmap (`lax.map` would scan over one step)."""
    mapped = tuple(a for a, ax in zip(args, in_axes) if ax == 0)
    if parallelism == "vmap" or jax.tree.leaves(mapped)[0].shape[0] <= chunk:
        return jax.vmap(fn, in_axes=in_axes)(*args)
    shared = tuple(a for a, ax in zip(args, in_axes) if ax is None)

    def body(per_client):
        it_mapped, it_shared = iter(per_client), iter(shared)
        return fn(*(next(it_mapped) if ax == 0 else next(it_shared) for ax in in_axes))

    return jax.lax.map(body, mapped, batch_size=chunk)


def _pad_clients(tree: Any, padded: int) -> Any:
    """Append all-zero clients up to ``padded`` (a client with ``count == 0`` trains nothing)."""
    return jax.tree.map(lambda a: jnp.pad(a, [(0, padded - a.shape[0])] + [(0, 0)] * (a.ndim - 1)), tree)


def map_clients(
    fn: Callable, args: tuple, in_axes: tuple, parallelism: str, chunk: int, mesh: jax.sharding.Mesh | None = None
):
    """Apply ``fn`` to every client: all at once (``'vmap'``) or in chunks (``'map'``), over ``mesh``'s devices.

    ``in_axes`` marks which of ``args`` carry the client axis (0) and which are
    shared (None). Under ``'map'`` the clients run as a sequential `lax.map`
    whose body vmaps ``chunk`` clients at a time; on a CPU that beats one huge
    vmap (see medfed_jax/DESIGN.md), on a GPU full vmap fills the chip.

    With a ``mesh`` (axis ``'clients'``, `medfed_jax.mesh`), the client axis is
    split into one contiguous block per device (`jax.shard_map`) and each
    device maps its own block as above; shared arguments are replicated. A
    client count the device count does not divide is padded with all-zero
    clients, whose outputs are dropped before anything else sees them. Each
    client's computation is the same program as on one device.
    """
    if mesh is None or mesh.size == 1:
        return _map_local(fn, args, in_axes, parallelism, chunk)
    num_clients = jax.tree.leaves([a for a, ax in zip(args, in_axes) if ax == 0])[0].shape[0]
    padded = -(-num_clients // mesh.size) * mesh.size
    args = tuple(_pad_clients(a, padded) if ax == 0 else a for a, ax in zip(args, in_axes))
    specs = tuple(P(mesh.axis_names[0]) if ax == 0 else P() for ax in in_axes)
    sharded = jax.shard_map(
        lambda *a: _map_local(fn, a, in_axes, parallelism, chunk),
        mesh=mesh,
        in_specs=specs,
        out_specs=P(mesh.axis_names[0]),
        check_vma=False,
    )
    return jax.tree.map(lambda out: out[:num_clients], sharded(*args))

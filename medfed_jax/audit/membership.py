"""Membership inference by loss threshold (Yeom et al. 2018) against DP-SGD models trained on the digits."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medfed_jax import privacy
from medfed_jax.audit.digits import Apply, example_losses, load_digits_images
from medfed_jax.models import make_model
from medfed_jax.types import Array, Params, PRNGKey

MEMBERSHIP_DELTA = 1e-5


def membership_auc(loss_members: np.ndarray, loss_nonmembers: np.ndarray) -> float:
    """AUC of the loss-threshold attack: P(member loss < non-member loss), ties counting 1/2."""
    from sklearn.metrics import roc_auc_score

    members, nonmembers = np.asarray(loss_members, np.float64), np.asarray(loss_nonmembers, np.float64)
    truth = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    return float(roc_auc_score(truth, -np.concatenate([members, nonmembers])))


def accuracy(apply: Apply, params: Params, x: Array, y: Array) -> float:
    """Fraction of ``(x, y)`` classified correctly."""
    return float(jnp.mean(jnp.argmax(apply(params, x), -1) == y))


def train_dpsgd(
    apply: Apply,
    params: Params,
    x: Array,
    y: Array,
    key: PRNGKey,
    noise_multiplier: float,
    clip_norm: float,
    sampling_rate: float,
    steps: int,
    lr: float,
) -> Params:
    """Centralised (DP-)SGD on ``(x, y)``: each step a Poisson sample of the rows at ``sampling_rate``.

    Uses `privacy.dpsgd_gradient` with the expected batch size ``q n``;
    ``noise_multiplier=0`` with ``clip_norm=inf`` is plain SGD on the same batches.
    """
    grad_fn = privacy.dpsgd_gradient(noise_multiplier, clip_norm)
    expected_batch = sampling_rate * x.shape[0]

    def example_loss(p, xi, yi):
        return example_losses(apply, p, xi[None], yi[None])[0]

    def step(p, step_key):
        batch_key, noise_key = jax.random.split(step_key)
        batch = jax.random.bernoulli(batch_key, sampling_rate, (x.shape[0],))
        _, grads = grad_fn(example_loss, p, x, y, batch, noise_key, expected_batch)
        return jax.tree.map(lambda w, g: w - lr * g, p, grads), None

    params, _ = jax.lax.scan(step, params, jax.random.split(key, steps))
    return params


def membership_experiment(
    settings: Sequence[tuple[float, float]],
    members: int = 100,
    width: int = 32,
    sampling_rate: float = 1.0,
    steps: int = 200,
    lr: float = 0.5,
    delta: float = 1e-5,
    seed: int = 0,
) -> list[dict]:
    """Loss-threshold membership AUC of an MLP trained with each ``(noise_multiplier, clip_norm)``.

    ``members`` digits train the model (to over-fitting when non-private); as
    many held-out digits are the non-members. All settings train in one
    vmapped program. Epsilon is DP-SGD's per record (Poisson sampling at
    ``sampling_rate``; the default 1.0 is full-batch DP gradient descent).
    """
    x_all, y_all = load_digits_images()
    order = np.random.default_rng(seed).permutation(len(y_all))
    inside, outside = order[:members], order[members : 2 * members]
    model = make_model("mlp", 10, (width,))
    init = model.init(jax.random.key(seed), jnp.zeros((1, x_all.shape[1])))
    x_in, y_in, x_out, y_out = (jnp.asarray(a) for a in (x_all[inside], y_all[inside], x_all[outside], y_all[outside]))
    sigmas, clips = (jnp.asarray(v, jnp.float32) for v in zip(*settings))
    # One program for all settings: the experiment axis is vmapped.
    train_all = jax.jit(
        jax.vmap(train_dpsgd, in_axes=(None, None, None, None, None, 0, 0, None, None, None)), static_argnums=(0, 8)
    )
    trained = train_all(
        model.apply, init, x_in, y_in, jax.random.key(seed + 1), sigmas, clips, sampling_rate, steps, lr
    )

    rows = []
    for i, (sigma, clip) in enumerate(settings):
        params = jax.tree.map(lambda leaf: leaf[i], trained)  # noqa: B023 - used at once
        loss_in = np.asarray(example_losses(model.apply, params, x_in, y_in))
        loss_out = np.asarray(example_losses(model.apply, params, x_out, y_out))
        rows.append(
            {
                "noise_multiplier": sigma,
                "clip_norm": clip,
                "epsilon": privacy.epsilon(sigma, sampling_rate, steps, delta) if sigma else np.inf,
                "delta": delta,
                "train_accuracy": accuracy(model.apply, params, x_in, y_in),
                "test_accuracy": accuracy(model.apply, params, x_out, y_out),
                "membership_auc": membership_auc(loss_in, loss_out),
                "members": members,
            }
        )
    return rows

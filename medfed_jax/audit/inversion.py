"""Gradient inversion (Zhu et al. 2019 "Deep Leakage from Gradients", the cosine matching loss of Geiping et al.
2020, iDLG label inference of Zhao et al. 2020): a server reconstructs a client's images from its update."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from medfed_jax import privacy
from medfed_jax.audit.digits import DIGITS_SHAPE, Apply, batch_gradient, load_digits_images
from medfed_jax.models import make_model
from medfed_jax.types import Array, ClientData, FederatedDataset, Params, PRNGKey


def simulated_upload(apply: Apply, params: Params, x: Array, y: Array, local_steps: int, lr: float) -> Params:
    """``params - params_K`` after ``local_steps`` full-batch SGD steps on ``(x, y)``: a client's round as the
    server models it (the multi-step attack of Geiping et al. 2020, Sec. 6)."""

    def step(p, _):
        return jax.tree.map(lambda w, g: w - lr * g, p, batch_gradient(apply, p, x, y)), None

    final, _ = jax.lax.scan(step, params, None, length=local_steps)
    return jax.tree.map(jnp.subtract, params, final)


def infer_labels(head_bias_grad: Array, batch_size: int) -> Array:
    """iDLG label inference: the ``batch_size`` most negative entries of the output-bias gradient.

    For cross-entropy the bias gradient is ``mean_i (softmax_i - onehot(y_i))``,
    negative exactly on the labels present when a batch has distinct labels
    and the model is not yet confident.
    """
    return jnp.argsort(head_bias_grad)[:batch_size]


def invert_gradients(
    apply: Apply,
    params: Params,
    observed: Params,
    labels: Array,
    key: PRNGKey,
    feature_dim: int,
    steps: int = 1000,
    restarts: int = 4,
    lr: float = 0.1,
    local_steps: int = 0,
    local_lr: float = 0.1,
) -> tuple[Array, Array]:
    """Reconstruct ``[len(labels), feature_dim]`` inputs in [0, 1] whose gradient matches ``observed``.

    ``local_steps > 0``: ``observed`` is a multi-step upload, matched by the
    dummy batch's `simulated_upload` (``local_steps`` at ``local_lr``) instead
    of its gradient. Minimises ``1 - cos(grad(dummy), observed)`` over all parameters with Adam
    inside `lax.scan`, from ``restarts`` random starts (vmapped); the start
    with the best final match wins. Returns ``(inputs, match_loss)``.
    Inputs are parametrised as ``sigmoid(z)`` to stay in the image range.
    """
    target, _ = ravel_pytree(observed)
    target = target / jnp.maximum(jnp.linalg.norm(target), 1e-12)
    optimizer = optax.adam(lr)

    def mismatch(z):
        x = jax.nn.sigmoid(z)
        upload = (
            simulated_upload(apply, params, x, labels, local_steps, local_lr)
            if local_steps
            else batch_gradient(apply, params, x, labels)
        )
        grads, _ = ravel_pytree(upload)
        return 1.0 - jnp.dot(grads, target) / jnp.maximum(jnp.linalg.norm(grads), 1e-12)

    def one_start(start_key):
        z = 0.5 * jax.random.normal(start_key, (labels.shape[0], feature_dim))

        def step(carry, _):
            z, opt_state = carry
            grads = jax.grad(mismatch)(z)
            updates, opt_state = optimizer.update(grads, opt_state)
            return (optax.apply_updates(z, updates), opt_state), None

        (z, _), _ = jax.lax.scan(step, (z, optimizer.init(z)), None, length=steps)
        return jax.nn.sigmoid(z), mismatch(z)

    inputs, losses = jax.vmap(one_start)(jax.random.split(key, restarts))
    best = jnp.argmin(losses)
    return inputs[best], losses[best]


def _match(reconstructed: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair reconstructions with true images by least total MSE (Hungarian method).

    Returns ``(rows, cols, cost)``: reconstruction ``rows[k]`` goes with true
    image ``cols[k]``; ``cost`` is the ``[n, n]`` MSE matrix.
    """
    from scipy.optimize import linear_sum_assignment

    rec = np.asarray(reconstructed, np.float64).reshape(len(reconstructed), -1)
    ref = np.asarray(true, np.float64).reshape(len(true), -1)
    cost = np.mean((rec[:, None, :] - ref[None, :, :]) ** 2, axis=-1)
    rows, cols = linear_sum_assignment(cost)
    return rows, cols, cost


def reconstruction_error(reconstructed: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """``(MSE, PSNR in dB)`` for images in [0, 1]; the attack does not know the batch order (see `_match`)."""
    rows, cols, cost = _match(reconstructed, true)
    mse = float(cost[rows, cols].mean())
    return mse, float(10 * np.log10(1.0 / max(mse, 1e-12)))


def distinct_label_batch(y: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``batch_size`` records with distinct labels, drawn at random."""
    labels = rng.choice(np.unique(y), size=batch_size, replace=False)
    return np.array([rng.choice(np.flatnonzero(y == label)) for label in labels])


def engine_round(width: int, batch_size: int, local_steps: int, lr: float, seed: int) -> Callable:
    """``round(x, y, sigma) -> (params, upload)``: one client's real round in the engine, under local DP.

    A one-client federation whose client holds the batch ``(x, y)`` trains
    ``local_steps`` SGD steps on it (``local.sampling='fixed'``, the whole batch
    each step) from the global model of ``seed``; with the plain mean of one
    client and server lr 1 the global step is exactly its (privatised) upload.
    The clip norm is the noiseless upload's own norm, so the noise std is
    ``sigma * ||update||``. Returns the negated upload: the direction of the
    summed gradients the attacker matches.
    """
    from medfed_jax import config as config_lib
    from medfed_jax import runner, server
    from medfed_jax.data.base import stack_clients

    x_all, y_all = load_digits_images()
    dataset = FederatedDataset(
        "digits-batch", stack_clients([x_all[:batch_size]], [y_all[:batch_size]]), None, ("client",), 10
    )
    dataset = dataclasses.replace(dataset, test=dataset.train)
    cfg = config_lib.default_config()
    cfg.model.widths, cfg.rounds, cfg.eval_every, cfg.baselines, cfg.seed = (width,), 1, 1, (), seed
    cfg.local.epochs, cfg.local.steps, cfg.local.sampling, cfg.local.batch_size = 0, local_steps, "fixed", batch_size
    cfg.local.lr, cfg.aggregator.name = lr, "mean"
    cfg.privacy.mode, cfg.privacy.clip_norm = "local", 1.0
    cfg.privacy.delta = 0.5  # one client: delta < 1/units; the epsilon rows use their own delta
    prepared = runner.prepare(cfg, dataset)
    engine = server.build_engine(config_lib.split(cfg).static, prepared.context)

    def round_update(x, y, sigma, clip):
        train = ClientData(x[None], y[None], jnp.asarray([batch_size], jnp.int32))
        hp = prepared.hparams
        hp = hp._replace(privacy=hp.privacy._replace(noise_multiplier=sigma, clip_norm=clip))
        state = engine.init(seed, train, hp)
        stepped, _ = engine.round_step(state, train, hp)
        return state.params, jax.tree.map(jnp.subtract, state.params, stepped.params)

    def round_fn(x, y, sigma):
        _, plain = round_update(x, y, jnp.float32(0.0), jnp.float32(jnp.inf))
        return round_update(x, y, sigma, privacy.global_norm(plain))

    return round_fn


def inversion_experiment(
    noise_multipliers: Sequence[float],
    batch_size: int = 4,
    trials: int = 3,
    width: int = 64,
    steps: int = 1000,
    restarts: int = 4,
    delta: float = 1e-5,
    seed: int = 0,
    local_steps: int = 0,
    local_lr: float = 0.1,
) -> tuple[list[dict], dict[float, np.ndarray], np.ndarray]:
    """Gradient inversion against a client update under local DP of several noise multipliers.

    Each trial draws a batch of digits with distinct labels; the client's
    update is its mean gradient on that batch, clipped to its own norm (so
    clipping changes nothing and the noise std is ``sigma * ||update||``; a
    clip norm fixed in advance above the update norm only adds noise) and
    noised as by `privacy.local_privatizer`. ``local_steps > 0``: the update
    is instead the client's real upload after ``local_steps`` SGD steps at
    ``local_lr`` in the engine (`engine_round`), which the attack matches by
    unrolling the same local steps on its dummy batch (`simulated_upload`).
    Labels are inferred iDLG-style
    from the noised update. Rows give means over trials; epsilon is that of
    the single release (local DP, replace-one). Returns ``(rows,
    reconstructions of trial 0 by sigma, true images of trial 0)``.
    """
    x_all, y_all = load_digits_images()
    model = make_model("mlp", 10, (width,))
    params = model.init(jax.random.key(seed), jnp.zeros((1, x_all.shape[1])))
    rng = np.random.default_rng(seed)
    batches = [distinct_label_batch(y_all, batch_size, rng) for _ in range(trials)]
    in_engine = engine_round(width, batch_size, local_steps, local_lr, seed) if local_steps else None

    @jax.jit
    def attack(params, x, y, sigma, key):  # params as an argument: constants would slow XLA's compile
        noise_key, attack_key = jax.random.split(key)
        if in_engine is None:
            update = batch_gradient(model.apply, params, x, y)
            noised = privacy.local_privatizer(sigma, privacy.global_norm(update))(update, noise_key)
        else:
            params, noised = in_engine(x, y, sigma)
        labels = infer_labels(noised["params"]["head"]["bias"], batch_size)
        inputs, match = invert_gradients(
            model.apply, params, noised, labels, attack_key, x.shape[1], steps, restarts, 0.1, local_steps, local_lr
        )
        return inputs, labels, match

    rows, shown = [], {}
    for sigma in noise_multipliers:
        errors = []
        for trial, index in enumerate(batches):
            key = jax.random.fold_in(jax.random.key(seed + 1), trial)
            inputs, labels, match = attack(params, x_all[index], y_all[index], jnp.float32(sigma), key)
            mse, psnr = reconstruction_error(np.asarray(inputs), x_all[index])
            label_ok = set(np.asarray(labels).tolist()) == set(y_all[index].tolist())
            errors.append((mse, psnr, label_ok, float(match)))
            if trial == 0:
                shown[sigma] = np.asarray(inputs)
        mse, psnr, label_rate, match = (float(np.mean([e[i] for e in errors])) for i in range(4))
        rows.append(
            {
                "noise_multiplier": sigma,
                "epsilon_one_release": privacy.epsilon(sigma, 1.0, 1, delta, sampling="fixed") if sigma else np.inf,
                "delta": delta,
                "mse": mse,
                "psnr_db": psnr,
                "label_recovery_rate": label_rate,
                "match_loss": match,
                "trials": trials,
                "batch_size": batch_size,
                "local_steps": local_steps,
            }
        )
    return rows, shown, x_all[batches[0]]


def save_inversion_figure(true: np.ndarray, reconstructions: dict[float, np.ndarray], path: str) -> None:
    """True images (top row) and their reconstructions, one row per noise multiplier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("true", true)] + [(f"sigma={s:g}", _align(r, true)) for s, r in reconstructions.items()]
    fig, axes = plt.subplots(len(rows), len(true), figsize=(1.3 * len(true) + 1, 1.3 * len(rows)), squeeze=False)
    for (name, images), row_axes in zip(rows, axes):
        for image, ax in zip(images, row_axes):
            ax.imshow(image.reshape(DIGITS_SHAPE), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        row_axes[0].set_ylabel(name, fontsize=8)
    fig.suptitle("Gradient inversion of one client update (local DP noise)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _align(reconstructed: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Reorder reconstructions to the true images' order."""
    rows, cols, _ = _match(reconstructed, true)
    aligned = np.empty_like(reconstructed)
    aligned[cols] = reconstructed[rows]
    return aligned

"""Privacy audit: what differential privacy buys against two concrete attacks.

- **Gradient inversion** (Zhu et al. 2019 "Deep Leakage from Gradients",
  with the cosine matching loss of Geiping et al. 2020 and iDLG label
  inference, Zhao et al. 2020): an honest-but-curious server reconstructs a
  client's training images from its single-step update by optimising dummy
  images until their gradient points the same way. Reported as MSE and PSNR
  against the true images, without DP and under local-DP noise of growing
  multiplier.
- **Membership inference** (loss threshold, Yeom et al. 2018): a record with
  low loss under the final model is guessed to be a training member; the
  attack AUC over members vs held-out non-members is 0.5 for a model that
  leaks nothing.
- **Membership inference on the federated release** (`federated_audit`):
  the models the project releases, the federated global model and each
  hospital's personalised model, trained by the engine on a random half of
  every record pool (each record in with probability 1/2, independently),
  attacked by the loss threshold and by LiRA (Carlini et al. 2022, online,
  global variance) with ``shadows`` shadow federations on their own random
  halves, all trained in one vmapped program. AUC per hospital; an empirical
  epsilon lower bound from the LiRA scores by jax-privacy's one-run audit
  (Steinke et al. 2023, ``CanaryScoreAuditor.epsilon_one_run``), beside the
  accounted record-level epsilon (client-level DP under replace-one: a
  record changes one client's update, `record_epsilon`).

``python -m medfed_jax.audit --out=DIR`` runs the first two on scikit-learn's
8x8 digits and writes ``inversion.csv``, ``inversion.png`` and
``membership.csv``; ``--federated=heart_fedavg`` audits that config's
federated training instead (``federated_membership.csv``, ``summary.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from medfed_jax import host_devices, privacy, tabular
from medfed_jax.models import make_model
from medfed_jax.types import Array, ClientData, FederatedDataset, Params, PRNGKey

Apply = Callable[[Params, Array], Array]

DIGITS_SHAPE = (8, 8)
MEMBERSHIP_DELTA = 1e-5


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
    engine = server.build_engine(server.static_config(cfg), prepared.context)

    def round_update(x, y, sigma, clip):
        train = ClientData(x[None], y[None], jnp.asarray([batch_size], jnp.int32))
        knobs = {**prepared.knobs, "privacy.noise_multiplier": sigma, "privacy.clip_norm": clip}
        state = engine.init(seed, train, knobs)
        stepped, _ = engine.round_step(state, train, knobs)
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


# --------------------------------------------------------------------------- the federated release


def record_pool(dataset: FederatedDataset) -> ClientData:
    """Every client's train and test records together, ``[C, P]`` padded: the records a membership audit draws from."""
    train, test = (np.asarray(a) for a in dataset.train[:2]), (np.asarray(a) for a in dataset.test[:2])
    (x_tr, y_tr), (x_te, y_te) = train, test
    n_tr, n_te = np.asarray(dataset.train.count), np.asarray(dataset.test.count)
    width = int(np.max(n_tr + n_te))
    x = np.zeros((len(n_tr), width, *x_tr.shape[2:]), np.float32)
    y = np.zeros((len(n_tr), width), np.int32)
    for c, (a, b) in enumerate(zip(n_tr, n_te)):
        x[c, :a], x[c, a : a + b] = x_tr[c, :a], x_te[c, :b]
        y[c, :a], y[c, a : a + b] = y_tr[c, :a], y_te[c, :b]
    return ClientData(x, y, (n_tr + n_te).astype(np.int32))


def included_block(pool: ClientData, member: Array) -> ClientData:
    """The pool's records with ``member [C, P]`` True, packed to the front of each client's rows."""
    order = jnp.argsort(~member, axis=1, stable=True)
    x = jnp.take_along_axis(pool.x, order.reshape(order.shape + (1,) * (pool.x.ndim - 2)), axis=1)
    count = jnp.sum(member, axis=1).astype(jnp.int32)
    valid = jnp.arange(pool.y.shape[1])[None, :] < count[:, None]
    x = jnp.where(valid.reshape(valid.shape + (1,) * (pool.x.ndim - 2)), x, 0.0)
    return ClientData(x, jnp.where(valid, jnp.take_along_axis(pool.y, order, axis=1), 0), count)


def logit_confidence(logits: Array, y: Array) -> Array:
    """LiRA's statistic ``log p_y - log(1 - p_y)``, stably from the logits."""
    true = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    others = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return true - jax.nn.logsumexp(others, axis=-1)


def lira_scores(target: Array, shadows: Array, shadow_member: Array) -> Array:
    """Online LiRA with a global variance (Carlini et al. 2022): ``log N(t; mu_in, s_in) - log N(t; mu_out, s_out)``.

    ``target [...]``, ``shadows [K, ...]`` statistics and ``shadow_member [K, ...]``;
    the per-record means over the shadows that held (did not hold) each record.
    """
    member = shadow_member.astype(jnp.float32)

    def fit(weight):
        count = jnp.sum(weight, 0)
        mean = jnp.sum(weight * shadows, 0) / jnp.maximum(count, 1)
        spread = jnp.sum(weight * jnp.square(shadows - mean)) / jnp.maximum(jnp.sum(weight) - 1, 1)
        return mean, jnp.sqrt(spread) + 1e-6

    (mu_in, s_in), (mu_out, s_out) = fit(member), fit(1 - member)
    log_normal = lambda t, m, s: -0.5 * jnp.square((t - m) / s) - jnp.log(s)  # noqa: E731
    return log_normal(target, mu_in, s_in) - log_normal(target, mu_out, s_out)


def record_epsilon(cfg: Any) -> float:
    """The accounted epsilon per record of a run without cohort sampling: client-level DP under replace-one.

    Adding or removing a record changes one client's (clipped) update
    arbitrarily, as replacing that client does: sensitivity ``2 S``.
    """
    p = cfg.privacy
    if p.mode == "none":
        return math.inf
    if p.mode == "bandmf":
        return privacy.bandmf_epsilon(p.noise_multiplier / 2, p.bands, cfg.rounds, p.delta)
    return privacy.epsilon(p.noise_multiplier, 1.0, cfg.rounds, p.delta, p.accountant, "fixed")


def check_audit_config(cfg: Any) -> None:
    """The audit trains every client every round with central (or banded-MF) DP or none."""
    if cfg.cohort_size or cfg.cohort_sampling != "fixed":
        raise ValueError(
            f"the federated audit trains every client every round; got cohort_size={cfg.cohort_size}, "
            f"cohort_sampling={cfg.cohort_sampling!r}: set cohort_size=0 and cohort_sampling='fixed'."
        )
    if cfg.privacy.mode not in ("none", *privacy.SERVER_NOISE):
        raise ValueError(
            f"privacy.mode={cfg.privacy.mode!r}: the federated audit accounts client-level central DP "
            f"({privacy.SERVER_NOISE}) or none."
        )


def federated_audit(
    cfg: Any, dataset: FederatedDataset, shadows: int = 16, seed: int = 0, significance: float = 0.05
) -> tuple[list[dict], dict]:
    """Membership inference against the federated (or personalised, per ``cfg.personalization``) models.

    The target and ``shadows`` shadow federations each train on an independent
    Bernoulli(1/2) half of every client's record pool (`record_pool`), in one
    vmapped program of the engine. Returns ``(rows, overall)``: one row per
    hospital (records, loss-threshold and LiRA AUC) and the overall AUCs with
    the one-run epsilon lower bound at ``significance`` and the accounted
    record-level epsilon (`record_epsilon`; inf for personalised models,
    whose local training is not privatised).
    """
    from jax_privacy import auditing

    from medfed_jax import runner, server

    check_audit_config(cfg)
    pool = record_pool(dataset)
    real = np.arange(pool.y.shape[1])[None, :] < pool.count[:, None]
    key = jax.random.key(seed)
    member = jax.random.bernoulli(key, 0.5, (shadows + 1, *real.shape)) & real  # model 0 is the target
    trains = jax.vmap(included_block, in_axes=(None, 0))(pool, member)
    target_view = dataclasses.replace(dataset, train=jax.tree.map(lambda a: np.asarray(a[0]), trains))
    prepared = runner.prepare(cfg, target_view)
    engine = server.build_engine(server.static_config(cfg), prepared.context)
    knobs, model = prepared.knobs, make_model(cfg.model.name, dataset.num_classes, tuple(cfg.model.widths))
    personal = cfg.personalization.method != "none"

    def statistics(run_seed, train):
        state, _ = engine.run_rounds(engine.init(run_seed, train, knobs), train, knobs, cfg.rounds)
        params = engine.eval_params(state, train, knobs)
        if personal:  # client c's records under client c's model
            logits = jax.vmap(model.apply)(params, pool.x)
        else:
            logits = model.apply(params, pool.x.reshape(-1, *pool.x.shape[2:])).reshape(*pool.y.shape, -1)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, pool.y)
        return loss, logit_confidence(logits, pool.y)

    seeds = jnp.asarray(cfg.seed + np.arange(shadows + 1), jnp.uint32)
    losses, confidence = jax.jit(jax.vmap(statistics))(seeds, trains)
    lira = lira_scores(confidence[0], confidence[1:], member[1:])
    target_member, loss = np.asarray(member[0]), -np.asarray(losses[0])  # higher score: "member"
    lira = np.asarray(lira)

    def attack(scores, where):
        inside, outside = scores[where & target_member], scores[where & ~target_member]
        return auditing.CanaryScoreAuditor(inside, outside)

    rows = []
    for c, name in enumerate(dataset.client_names):
        where = np.zeros_like(real)
        where[c] = real[c]
        rows.append(
            {
                "client": name,
                "records": int(real[c].sum()),
                "members": int((where & target_member).sum()),
                "loss_auc": float(attack(loss, where).attack_auroc()),
                "lira_auc": float(attack(lira, where).attack_auroc()),
            }
        )
    everyone = attack(lira, real)
    overall = {
        "records": int(real.sum()),
        "shadows": shadows,
        "loss_auc": float(attack(loss, real).attack_auroc()),
        "lira_auc": float(everyone.attack_auroc()),
        "empirical_epsilon_lower_bound": float(everyone.epsilon_one_run(significance, cfg.privacy.delta)),
        "significance": significance,
        # a personalised model also trains locally on its hospital's records, outside the DP mechanism
        "accounted_record_epsilon": math.inf if personal else record_epsilon(cfg),
        "delta": cfg.privacy.delta,
    }
    return rows, overall


def audit_settings(cfg: Any, noise_multiplier: float, personalization: str) -> list[tuple[str, str, Any]]:
    """``(model, DP, config)``: the global and ``personalization`` models, without DP and with DP-FedAvg."""
    settings = []
    for released, method in (("global", "none"), (personalization, personalization)):
        for dp in ("none", "central"):
            run = cfg.copy_and_resolve_references()
            run.baselines, run.personalization.method, run.aggregator.name = (), method, "mean"
            run.privacy.mode, run.privacy.noise_multiplier = dp, noise_multiplier if dp == "central" else 0.0
            if dp == "none":
                run.privacy.clip_norm = float("inf")
            settings.append((released, f"DP-FedAvg sigma={noise_multiplier:g}" if dp == "central" else "none", run))
    return settings


MAX_CLIENT_COLUMNS = 6  # more clients: `federated_table` gives the overall AUCs and the per-client range


def federated_table(rows: Sequence[dict], summaries: Sequence[dict]) -> str:
    """Markdown: each released model's epsilons and attack AUCs, per hospital (or overall and the clients' range)."""
    clients = [c for c in dict.fromkeys(row["client"] for row in rows) if c != "all"]
    wide = len(clients) <= MAX_CLIENT_COLUMNS
    columns = [*clients, "all"] if wide else ["all", "clients (min–max)"]
    header = ["model", "DP", "ε accounted (record)", "ε lower bound (95%)", "attack", *columns]
    body = []
    for summary in summaries:
        label = (summary["model"], summary["dp"])
        auc = {row["client"]: row for row in rows if (row["model"], row["dp"]) == label}
        accounted = float(summary["audit"]["accounted_record_epsilon"])
        accounted = "∞" if math.isinf(accounted) else f"{accounted:.3g}"
        for attack_name, key in (("loss", "loss_auc"), ("LiRA", "lira_auc")):
            per_client = [float(auc[c][key]) for c in clients]
            cells = [f"{v:.3f}" for v in per_client] if wide else [f"{min(per_client):.3f}–{max(per_client):.3f}"]
            cells = [*cells, f"{float(auc['all'][key]):.3f}"] if wide else [f"{float(auc['all'][key]):.3f}", *cells]
            bound = f"{summary['audit']['empirical_epsilon_lower_bound']:.3g}" if key == "lira_auc" else ""
            body.append([*label, accounted, bound, f"{attack_name} AUC", *cells])
    return tabular.markdown_table(header, body, padded=False)


def table_from_dir(out: str) -> str:
    """`federated_table` of a finished ``--federated`` run's ``federated_membership.csv`` and ``summary.json``."""
    import json

    rows = tabular.read_csv(os.path.join(out, "federated_membership.csv"))
    with open(os.path.join(out, "summary.json")) as f:
        return federated_table(rows, json.load(f)["settings"])


def federated_main(args: argparse.Namespace) -> dict[str, Any]:
    """``--federated=CONFIG``: `federated_audit` of each of `audit_settings`; CSV rows and ``summary.json``."""
    import json

    from medfed_jax import config as config_lib
    from medfed_jax import config_files
    from medfed_jax import data as data_lib

    cfg = config_files.load_config(args.federated)
    cfg.privacy.clip_norm = args.clip_norm
    dataset = data_lib.load_dataset(cfg.data)
    rows, summaries = [], []
    for released, dp, run in audit_settings(cfg, args.dp_noise, args.personalization):
        per_client, overall = federated_audit(run, dataset, args.shadows, args.seed)
        label = {"model": released, "dp": dp}
        rows += [{**label, **row} for row in per_client]
        rows.append({**label, "client": "all", **{k: overall[k] for k in ("records", "loss_auc", "lira_auc")}})
        report = privacy.run_privacy_report(run, dataset.num_clients)
        report.update({k: overall[k] for k in ("empirical_epsilon_lower_bound", "accounted_record_epsilon")})
        summaries.append({**label, "audit": overall, "privacy": report})
        print(f"{released:>10} {dp:>22}: " + ", ".join(f"{k}={v:.4g}" for k, v in overall.items()))
    tabular.write_csv(os.path.join(args.out, "federated_membership.csv"), rows)
    summary = {"config": args.federated, "shadows": args.shadows, "seed": args.seed, "settings": summaries}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(config_lib.json_safe(summary), f, indent=2)
    table = federated_table(rows, summaries)
    tabular.write_text_atomic(os.path.join(args.out, "federated_membership.md"), table + "\n")
    print(table)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: ``python -m medfed_jax.audit --out=DIR`` (gradient inversion + membership inference).

    ``--local_steps=K`` inverts the engine's real round upload after K local
    steps; ``--federated=CONFIG`` runs `federated_main` instead.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 1e-3, 1e-2, 1e-1, 1.0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--inversion_steps", type=int, default=1000)
    parser.add_argument("--membership_steps", type=int, default=200)
    parser.add_argument("--local_steps", type=int, default=0, help="inversion of the engine's real round update")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 2.0, 0.5], help="DP-SGD targets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--federated", help="a config (e.g. heart_fedavg): audit its federated training instead")
    parser.add_argument("--shadows", type=int, default=16, help="--federated: LiRA shadow federations")
    parser.add_argument("--dp_noise", type=float, default=8.0, help="--federated: DP-FedAvg noise multiplier")
    parser.add_argument("--clip_norm", type=float, default=0.1, help="--federated: DP-FedAvg clip norm S")
    parser.add_argument("--personalization", default="finetune", help="--federated: the personalised method")
    args = parser.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's RDP order warnings
    os.makedirs(args.out, exist_ok=True)
    if args.federated:
        return federated_main(args)

    inversion, shown, true = inversion_experiment(
        args.noise, trials=args.trials, steps=args.inversion_steps, seed=args.seed, local_steps=args.local_steps
    )
    tabular.write_csv(os.path.join(args.out, "inversion.csv"), inversion)
    save_inversion_figure(true, shown, os.path.join(args.out, "inversion.png"))
    rate, steps = 1.0, args.membership_steps  # full-batch DP gradient descent
    sigmas = [privacy.calibrate_noise(e, MEMBERSHIP_DELTA, rate, steps, tol=0.01) for e in args.epsilons]
    membership = membership_experiment(
        [(0.0, float("inf"))] + [(sigma, 1.0) for sigma in sigmas],
        sampling_rate=rate,
        steps=steps,
        delta=MEMBERSHIP_DELTA,
        seed=args.seed,
    )
    tabular.write_csv(os.path.join(args.out, "membership.csv"), membership)
    for name, rows in (("inversion", inversion), ("membership", membership)):
        print(name)
        for row in rows:
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return {"inversion": inversion, "membership": membership}


if __name__ == "__main__":
    host_devices.quiet_backend_probe()
    main()

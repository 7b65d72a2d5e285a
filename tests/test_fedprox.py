"""FedProx's proximal term (``local.prox_mu``) on digits, as the utility frontier runs it: a client's local
update against numpy proximal gradient descent (with the cut step counts unreliable clients feed it), and
one engine round under dropout and compute budgets, whose update the term must change."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfed_jax import config_files, runner
from medfed_jax import data as data_lib
from medfed_jax.client import LocalHParams, LocalSpec, make_local_update
from medfed_jax.config import split
from medfed_jax.models import make_model
from medfed_jax.server import build_engine
from medfed_jax.types import ClientData

LR = 0.05  # configs/digits_dirichlet.py's client lr
TOLERANCE = 3e-5  # of the largest coordinate of a delta (float32 error bound below)


@pytest.fixture(scope="module")
def digits():
    cfg = config_files.load_config("digits_dirichlet")
    cfg.data.alpha = 0.1
    return data_lib.load_dataset(cfg.data, 0)


def numpy_prox_descent(w, b, x, y, steps: int, mu: float) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` full-batch steps of ``w <- w - lr (grad F(w) + mu (w - w0))`` on softmax regression (float64);
    returns the deltas ``w - w0``, ``b - b0`` (Li et al. 2020, FedProx's local objective ``F + mu/2 |w - w0|^2``)."""
    w0, b0 = w.copy(), b.copy()
    onehot = np.eye(b.shape[0])[y]
    for _ in range(steps):
        logits = x @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        residual = (p / p.sum(1, keepdims=True) - onehot) / len(y)
        w, b = w - LR * (x.T @ residual + mu * (w - w0)), b - LR * (residual.sum(0) + mu * (b - b0))
    return w - w0, b - b0


@pytest.mark.parametrize("mu", [0.01, 1.0])
def test_local_update_with_cut_steps_is_numpy_proximal_gradient_descent(digits, mu):
    x, y, count = (np.asarray(a) for a in digits.train)
    model = make_model("logistic", digits.num_classes)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *digits.feature_shape)))
    # 'fixed' sampling with a batch of every row: each step is the client's full gradient, in any row order.
    spec = LocalSpec(0, 3, x.shape[1], "sgd", "fixed", x.shape[1])
    update = jax.jit(make_local_update(model, spec))
    head = params["params"]["head"]
    w, b = (np.asarray(head[k], np.float64) for k in ("kernel", "bias"))
    for client, steps in zip(range(4), (1, 2, 3, 3)):  # the (x, y, count, steps) of `unreliable.cohort_work`
        data = (x[client], y[client], count[client], np.int32(steps))
        moved = {}
        for strength in (0.0, mu):
            delta, metrics = update(params, data, jax.random.PRNGKey(client), LocalHParams(LR, 0.0, strength))
            assert int(metrics["num_steps"]) == steps
            moved[strength] = [np.asarray(delta["params"]["head"][k], np.float64) for k in ("kernel", "bias")]
        rows = x[client, : count[client]].reshape(count[client], -1).astype(np.float64)
        plain = numpy_prox_descent(w, b, rows, y[client, : count[client]], steps, 0.0)
        want = numpy_prox_descent(w, b, rows, y[client, : count[client]], steps, mu)
        for got, expected, base, base_expected in zip(moved[mu], want, moved[0.0], plain):
            # float32: a step's gradient sums <= 141 rows (n eps = 8.4e-6 relative at worst), over 3 steps.
            atol = TOLERANCE * np.abs(expected).max()
            np.testing.assert_allclose(got, expected, atol=atol)
            np.testing.assert_allclose(got - base, expected - base_expected, atol=atol)  # the term's own part
        if steps > 1:  # which is resolved: several tolerances (a single step starts at w0, where the pull is 0)
            assert np.abs(want[0] - plain[0]).max() > 3 * TOLERANCE * np.abs(want[0]).max()


def test_one_frontier_digits_round_under_dropout_and_budgets_moves_with_prox_mu(digits):
    """The utility frontier's digits cell (3 epochs, budgets 1..3, 30% dropout): one round's global update with
    ``prox_mu > 0`` differs from FedAvg's, and is pulled toward the start (a smaller update)."""
    cfg = config_files.load_config("digits_dirichlet")
    cfg.data.alpha, cfg.baselines, cfg.rounds, cfg.eval_every = 0.1, (), 1, 1
    cfg.local.epochs = 3
    cfg.unreliable.min_local, cfg.unreliable.dropout = 1, 0.3
    train = ClientData(*map(jnp.asarray, digits.train))
    norms, params, engine = {}, {}, None
    for mu in (0.0, 1.0):
        cfg.local.prox_mu = mu
        prepared = runner.prepare(cfg, digits)
        engine = engine or build_engine(split(cfg).static, prepared.context)  # prox_mu is traced: one program
        state = engine.init(0, train, prepared.hparams)
        new_state, metrics = engine.round_step(state, train, prepared.hparams)
        assert 0 < int(metrics["participants"]) < digits.num_clients  # dropout acted
        norms[mu], params[mu] = float(metrics["update_norm"]), new_state.params
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(*(jax.tree.leaves(params[mu]) for mu in params)))
    assert moved > 1e-2 * norms[0.0] / np.sqrt(sum(a.size for a in jax.tree.leaves(params[0.0])))
    # The pull toward the start (each step adds -lr mu (w - w0)) shortens the clients' deltas, so their mean.
    assert norms[1.0] < norms[0.0]

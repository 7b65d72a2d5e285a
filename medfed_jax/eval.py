"""Evaluation: per-client and pooled accuracy, loss and ROC AUC, padding excluded.

Metric names say which model scored which rows (README "Metrics"):

- ``client_accuracy`` / ``client_loss`` ``[C]``: each client's own test split, scored by the model
  that client uses (the global model, or its personal one); ``worst_client_accuracy`` their minimum.
- ``global_pooled_{accuracy,loss,auc}``: the global model on every client's test rows together
  (federated training, pooled training).
- ``own_client_{accuracy,loss,auc}``: every client's test rows together, each row scored by its own
  client's model (personalised methods; local-only reports the accuracy).
- ``mean_client_model_{accuracy,loss,auc}``: the mean over the client models of each model's score on
  every client's test rows (local-only; ``client_model_pooled_accuracy`` ``[C]`` per model).

A model with any non-finite parameter has *diverged*: it is not scored (its
logits are NaN and argmax would report the class-0 share as accuracy).
Its accuracy, loss and AUC are NaN, and ``diverged`` is 1.0. With one model
per client, a diverged client's own metrics are NaN and so is every pooled
metric (``diverged`` = 1.0 when any client model diverged).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from medfed_jax.client import cross_entropy, map_clients
from medfed_jax.types import Array, ClientData, Model, Params

GLOBAL_POOLED, OWN_CLIENT, MEAN_CLIENT_MODEL = "global_pooled", "own_client", "mean_client_model"
POOLED_SCORES = (GLOBAL_POOLED, MEAN_CLIENT_MODEL, OWN_CLIENT)  # a method's score on all test rows: the first it has


def pooled_score(names: Iterable[str]) -> str:
    """The pooled score (`POOLED_SCORES`) that metrics or CSV columns named ``names`` give for all clients'
    test rows: the global model's, else the mean client model's, else each row's own client model's."""
    stems = {name.removesuffix("_mean") for name in names}
    for score in POOLED_SCORES:
        if f"{score}_accuracy" in stems:
            return score
    raise ValueError(
        f"none of {[f'{s}_accuracy' for s in POOLED_SCORES]} among the {len(stems)} metrics given: results "
        "written before these names (test_accuracy) must be rerun."
    )


def has_diverged(params: Params) -> Array:
    """Whether any parameter is NaN or infinite (bool scalar)."""
    return ~jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)]))


def client_sums(model: Model, params: Params, x: Array, y: Array, count: Array) -> dict[str, Array]:
    """Correct predictions, summed loss and row count of one client's real rows; every row's probabilities;
    whether the model diverged."""
    logits = model.apply(params, x)
    valid = jnp.arange(y.shape[0]) < count
    correct = jnp.where(valid, jnp.argmax(logits, -1) == y, False)
    loss = jnp.where(valid, cross_entropy(logits, y), 0.0)
    return {
        "correct": jnp.sum(correct),
        "loss": jnp.sum(loss),
        "count": count,
        "probs": jax.nn.softmax(logits, axis=-1),
        "labels": y,
        "valid": valid,
        "diverged": has_diverged(params),
    }


def roc_auc(probs: Array, labels: Array, valid: Array) -> Array:
    """Area under the ROC curve over the ``valid`` rows: the macro mean of one-vs-rest AUCs.

    Each class's AUC is the Mann-Whitney statistic of its probability, positives
    (``labels == k``) against the rest, ties counting one half; classes without
    both positives and negatives are skipped (NaN when none has both). With two
    classes this is the usual binary AUC of ``probs[:, 1]``; with more, sklearn's
    ``roc_auc_score(multi_class='ovr', average='macro')``.
    """
    scores = jnp.where(valid[:, None], probs, jnp.inf)  # padding ranks above every real row
    ordered = jnp.sort(scores, axis=0)
    below = jax.vmap(lambda o, s: jnp.searchsorted(o, s, side="left"), in_axes=1, out_axes=1)(ordered, scores)
    upto = jax.vmap(lambda o, s: jnp.searchsorted(o, s, side="right"), in_axes=1, out_axes=1)(ordered, scores)
    rank = (below + upto + 1) / 2.0  # 1-based, ties averaged
    positive = valid[:, None] & (labels[:, None] == jnp.arange(probs.shape[1]))
    n_pos = jnp.sum(positive, axis=0).astype(jnp.float32)
    n_neg = jnp.sum(valid).astype(jnp.float32) - n_pos
    rank_sum = jnp.sum(jnp.where(positive, rank, 0.0), axis=0)
    both = (n_pos > 0) & (n_neg > 0)
    auc = (rank_sum - n_pos * (n_pos + 1) / 2) / jnp.maximum(n_pos * n_neg, 1.0)
    finite = jnp.all(jnp.isfinite(jnp.where(valid[:, None], probs, 0.0)))  # a diverged model has no AUC
    return jnp.where(
        finite & jnp.any(both), jnp.sum(jnp.where(both, auc, 0.0)) / jnp.maximum(jnp.sum(both), 1), jnp.nan
    )


def summarize(sums: dict[str, Array], pooled: str) -> dict[str, Array]:
    """Per-client and pooled accuracy/loss from per-client sums (leaves ``[C]``).

    The pooled scores are named ``<pooled>_accuracy``, ``_loss`` and ``_auc``
    (the `roc_auc` of all real rows); ``worst_client_accuracy`` is the lowest
    ``client_accuracy`` among clients with at least one test row.
    A client whose model diverged (``sums['diverged']``) gets NaN, and so does
    every pooled metric when any did; ``diverged`` is 1.0 then, else 0.0.
    """
    count = sums["count"].astype(jnp.float32)
    probs = sums["probs"]
    total = jnp.maximum(jnp.sum(count), 1.0)
    diverged = sums["diverged"]
    any_diverged = jnp.any(diverged)
    per_client = lambda value: jnp.where(diverged, jnp.nan, value / jnp.maximum(count, 1.0))  # noqa: E731
    unless_diverged = lambda value: jnp.where(any_diverged, jnp.nan, value)  # noqa: E731
    client_accuracy = per_client(sums["correct"])
    auc = roc_auc(probs.reshape(-1, probs.shape[-1]), sums["labels"].reshape(-1), sums["valid"].reshape(-1))
    return {
        f"{pooled}_accuracy": unless_diverged(jnp.sum(sums["correct"]) / total),
        f"{pooled}_loss": unless_diverged(jnp.sum(sums["loss"]) / total),
        "client_accuracy": client_accuracy,
        "client_loss": per_client(sums["loss"]),
        "worst_client_accuracy": unless_diverged(jnp.min(jnp.where(count > 0, client_accuracy, jnp.inf))),
        f"{pooled}_auc": unless_diverged(auc),
        "diverged": any_diverged.astype(jnp.float32),
    }


def make_evaluate(model: Model, parallelism: str = "vmap", chunk: int = 1) -> Callable[[Params, ClientData], dict]:
    """``evaluate(params, test) -> metrics`` for one global model.

    ``global_pooled_accuracy``/``_loss``/``_auc`` are over the pooled test set
    (every real row of every client); ``client_accuracy``/``client_loss`` are
    ``[C]``, each client's own test split.
    """

    def evaluate(params: Params, test: ClientData) -> dict[str, Array]:
        fn = lambda x, y, n: client_sums(model, params, x, y, n)  # noqa: E731
        sums = map_clients(fn, tuple(test), (0, 0, 0), parallelism, chunk)
        return summarize(sums, GLOBAL_POOLED)

    return evaluate


def make_evaluate_personal(model: Model, parallelism: str = "vmap", chunk: int = 1) -> Callable[..., dict]:
    """``evaluate(client_params, test) -> metrics`` for one model per client (personalised FL).

    ``client_params`` has a leading client axis; client ``c``'s model is
    evaluated on client ``c``'s own test split only. ``client_accuracy`` /
    ``client_loss`` are ``[C]``; ``own_client_accuracy`` / ``_loss`` / ``_auc`` pool
    every client's own test rows, each predicted by its own client's model (the
    accuracy is the count-weighted mean of ``client_accuracy``);
    ``worst_client_accuracy`` is the lowest client.
    """

    def evaluate(client_params: Params, test: ClientData) -> dict[str, Array]:
        fn = lambda p, x, y, n: client_sums(model, p, x, y, n)  # noqa: E731
        return summarize(map_clients(fn, (client_params, *test), (0, 0, 0, 0), parallelism, chunk), OWN_CLIENT)

    return evaluate


def make_evaluate_per_client_models(model: Model) -> Callable[[Params, ClientData], dict]:
    """Evaluate one model per client (leading client axis on ``params``).

    Returns each client's accuracy on its own test split (``client_accuracy``,
    their count-weighted pool ``own_client_accuracy`` and the lowest
    ``worst_client_accuracy``) and each client model's accuracy on the pooled
    test set (``client_model_pooled_accuracy``, ``[C]``), plus the means over the
    models (``mean_client_model_accuracy``, ``_loss``, ``_auc``).
    """
    evaluate_own = make_evaluate_personal(model)

    def evaluate(client_params: Params, test: ClientData) -> dict[str, Array]:
        own_metrics = evaluate_own(client_params, test)

        def on_pooled(p):
            sums = jax.vmap(lambda x, y, n: client_sums(model, p, x, y, n))(*test)
            return summarize(sums, "client_model_pooled")

        pooled = jax.lax.map(on_pooled, client_params)
        return {
            "client_accuracy": own_metrics["client_accuracy"],
            "client_loss": own_metrics["client_loss"],
            f"{OWN_CLIENT}_accuracy": own_metrics[f"{OWN_CLIENT}_accuracy"],
            "worst_client_accuracy": own_metrics["worst_client_accuracy"],
            "client_model_pooled_accuracy": pooled["client_model_pooled_accuracy"],
            f"{MEAN_CLIENT_MODEL}_accuracy": jnp.mean(pooled["client_model_pooled_accuracy"]),
            f"{MEAN_CLIENT_MODEL}_loss": jnp.mean(pooled["client_model_pooled_loss"]),
            f"{MEAN_CLIENT_MODEL}_auc": jnp.mean(pooled["client_model_pooled_auc"]),
            "diverged": own_metrics["diverged"],
        }

    return evaluate

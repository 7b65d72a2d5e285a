"""Membership inference on the federated release: the loss threshold and LiRA (Carlini et al. 2022) against the
global and personalised models, with jax-privacy's one-run epsilon lower bound (Steinke et al. 2023)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medfed_jax import privacy, tabular
from medfed_jax.models import make_model
from medfed_jax.types import Array, ClientData, FederatedDataset


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

    from medfed_jax import config as config_lib
    from medfed_jax import runner, server

    check_audit_config(cfg)
    pool = record_pool(dataset)
    real = np.arange(pool.y.shape[1])[None, :] < pool.count[:, None]
    key = jax.random.key(seed)
    member = jax.random.bernoulli(key, 0.5, (shadows + 1, *real.shape)) & real  # model 0 is the target
    trains = jax.vmap(included_block, in_axes=(None, 0))(pool, member)
    target_view = dataclasses.replace(dataset, train=jax.tree.map(lambda a: np.asarray(a[0]), trains))
    prepared = runner.prepare(cfg, target_view)
    engine = server.build_engine(config_lib.split(cfg).static, prepared.context)
    hparams, model = prepared.hparams, make_model(cfg.model.name, dataset.num_classes, tuple(cfg.model.widths))
    personal = cfg.personalization.method != "none"

    def statistics(run_seed, train):
        state, _ = engine.run_rounds(engine.init(run_seed, train, hparams), train, hparams, cfg.rounds)
        params = engine.eval_params(state, train, hparams)
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

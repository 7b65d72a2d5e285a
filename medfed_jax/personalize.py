"""Personalised federated learning: one model per client, kept on the client axis.

``personalization.method`` picks how each client gets its own model:

- ``'none'``: plain federated training; every client uses the global model.
- ``'finetune'``: FedAvg, then each client fine-tunes the global model on its
  own training data for ``finetune_steps`` steps (fresh ``min(B, n)``-row
  batches, the local optimizer and ``local.lr``, no FedProx pull). It is done
  at every evaluation from the current global model, so each evaluation of the
  history answers "FedAvg so far, then fine-tuned"; nothing personal is
  carried between rounds.
- ``'ditto'`` (Li et al. 2021): FedAvg for the global model ``w`` and, on the
  same batches, a personal model per client ``v <- v - lr grad F_k(v)``
  pulled toward the round's global model ``w^t`` with strength ``ditto_lambda``
  (see `client.Anchor`: the implicit form of the paper's step
  ``v <- v - lr (grad F_k(v) + lambda (v - w^t))``, stable for every lambda).
  ``lambda = 0`` is local-only training; ``lambda -> inf`` gives ``v = w^t``.
- ``'fedper'`` (partial personalisation: FedPer, Arivazhagan et al. 2019;
  FedBN, Li et al. 2021, when the named layers are normalisation layers):
  parameters whose ``'/'``-joined path (``params/head/kernel``) contains one
  of ``local_paths`` stay on their client; only the rest is federated.
- ``'apfl'`` (Deng et al. 2020): each client keeps a local model ``v`` and a
  mixing weight ``alpha`` and predicts with ``alpha v + (1 - alpha) w``. Every
  local step, on the same batch: ``w <- w - lr grad f(w)`` (sent to the
  server), ``v <- v - lr alpha grad f(vbar)`` and ``alpha <- alpha - lr
  <v - w, grad f(vbar)>`` with ``vbar = alpha v + (1 - alpha) w``; ``alpha``
  is clipped to [0, 1] in the mixture and after each round. ``learn_alpha =
  False`` keeps ``alpha`` fixed at ``personalization.alpha`` (0 is FedAvg,
  1 is local-only); otherwise that value is the initial alpha.

What leaves a client: only the *shared* part of its update. The engine hands
the privatizer (local DP), the attack, the aggregator (robust or central DP)
and the server optimizer the shared subtree only (the whole model except
``local_paths`` for ``'fedper'``; the global model ``w`` for the others), so
every aggregator, attack and DP mechanism works unchanged and never sees a
personal parameter. Under example-level DP-SGD the shared gradient is the DP
one while the local subtrees (``'fedper'``), the personal model (``'ditto'``)
and ``v``, ``alpha`` (``'apfl'``) train on exact gradients: they never leave
the client.

Personal state lives in ``FedState.clients`` with a leading client axis and is
carried through the scan over rounds; a client that is not sampled in a round
keeps its personal state unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from medfed_jax.client import Anchor, GradientFn, LocalSpec, make_local_update, map_clients, masked_mean_gradient
from medfed_jax.types import Array, ClientData, Model, Params, broadcast_to_clients, hparams_of, per_client_keys

METHODS = ("none", "finetune", "ditto", "fedper", "apfl")
PERSONAL_METHODS = METHODS[1:]
LOCAL_ONLY = "local_only"  # the local-only baseline (`medfed_jax.baselines`): built here, not a user choice


class PersonalizationHParams(NamedTuple):
    """The ``personalization`` section's numeric settings (traced: sweeping them never recompiles)."""

    ditto_lambda: Any  # ditto: pull of the personal model toward the global one
    alpha: Any  # apfl: mixing weight of the local model, fixed or initial


def default_config() -> ml_collections.ConfigDict:
    """The ``personalization`` section of a run config."""
    return ml_collections.ConfigDict(
        dict(
            method="none",  # one of METHODS
            finetune_steps=20,  # finetune: local steps on the global model before evaluation
            ditto_lambda=1.0,  # ditto: pull of the personal model toward the global one (numeric knob)
            local_paths=("head",),  # fedper: substrings of parameter paths that stay local
            alpha=0.5,  # apfl: mixing weight of the local model, fixed or initial (numeric knob)
            learn_alpha=True,  # apfl: learn alpha per client (False keeps it fixed)
        )
    )


# --------------------------------------------------------------------------- validation


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_config(cfg: Any, context: Any) -> None:
    """Raise a ValueError naming ``personalization.<field>`` and the fix."""
    del context
    if cfg.method not in METHODS:
        raise ValueError(f"personalization.method={cfg.method!r} is unknown; choose one of {METHODS}.")
    steps = cfg.finetune_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(
            f"personalization.finetune_steps={steps!r} must be an integer >= 0 (0 evaluates the global model)."
        )
    lam = cfg.ditto_lambda
    if not _is_number(lam) or lam < 0:
        raise ValueError(
            f"personalization.ditto_lambda={lam!r} must be a finite number >= 0: 0 trains each personal model "
            "alone, larger values pull it toward the global model (Ditto uses 0.1 to 2)."
        )
    alpha = cfg.alpha
    if not _is_number(alpha) or not 0 <= alpha <= 1:
        raise ValueError(
            f"personalization.alpha={alpha!r} must lie in [0, 1]: the weight of the local model in APFL's "
            "mixture (0 = the global model, 1 = the local model)."
        )
    if not isinstance(cfg.learn_alpha, bool):
        raise ValueError(f"personalization.learn_alpha={cfg.learn_alpha!r} must be True or False.")
    paths = cfg.local_paths
    if isinstance(paths, str) or not all(isinstance(p, str) and p for p in paths):
        raise ValueError(f"personalization.local_paths={paths!r} must be a list of non-empty strings, e.g. ('head',).")


def param_paths(params: Params) -> tuple[str, ...]:
    """The ``'/'``-joined path of every leaf, e.g. ``'params/head/kernel'`` (flatten order)."""

    def name(entry: Any) -> str:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)

    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return tuple("/".join(name(entry) for entry in path) for path, _ in flat)


def validate_local_paths(cfg: Any, paths: Sequence[str]) -> None:
    """Check ``personalization.local_paths`` against a model's parameter paths (for ``'fedper'``)."""
    patterns = tuple(cfg.local_paths)
    if not patterns:
        raise ValueError(
            "personalization.local_paths is empty: fedper needs at least one local subtree, e.g. ('head',)."
        )
    unmatched = [p for p in patterns if not any(p in path for path in paths)]
    if unmatched:
        raise ValueError(
            f"personalization.local_paths: {unmatched} match no parameter of the model; its parameter paths "
            f"are {tuple(paths)}; name a substring of one of them, e.g. 'head'."
        )
    if all(any(p in path for p in patterns) for path in paths):
        raise ValueError(
            f"personalization.local_paths={patterns!r} makes every parameter local {tuple(paths)}: nothing is "
            "left to federate; keep at least one parameter shared (e.g. ('head/bias',) for a logistic model, or "
            "a model with hidden layers)."
        )


# --------------------------------------------------------------------------- shared / local split


class Partition(NamedTuple):
    """Which leaves of a parameter tree stay on the client (all static).

    ``split`` gives two flat dicts keyed by parameter path (shared, local);
    ``merge`` puts them back into the original tree.
    """

    treedef: Any
    paths: tuple[str, ...]
    local: tuple[bool, ...]

    def split(self, params: Params) -> tuple[dict[str, Array], dict[str, Array]]:
        leaves = self.treedef.flatten_up_to(params)
        shared = {p: x for p, x, loc in zip(self.paths, leaves, self.local) if not loc}
        local = {p: x for p, x, loc in zip(self.paths, leaves, self.local) if loc}
        return shared, local

    def merge(self, shared: dict[str, Array], local: dict[str, Array]) -> Params:
        leaves = [local[p] if loc else shared[p] for p, loc in zip(self.paths, self.local)]
        return jax.tree.unflatten(self.treedef, leaves)


def partition(params: Params, patterns: Sequence[str]) -> Partition:
    """The partition of ``params`` that keeps paths containing any of ``patterns`` local."""
    paths = param_paths(params)
    local = tuple(any(p in path for p in patterns) for path in paths)
    return Partition(jax.tree.structure(params), paths, local)


# --------------------------------------------------------------------------- the engine's hook


class Personalizer(NamedTuple):
    """How a personalisation method plugs into the federated round (pure functions).

    ``init(params, num_clients) -> clients``: the personal state, leaves ``[C, ...]``.
    ``shared(params) -> tree``: the federated part of the global model (what
    the aggregator, attack, privatizer and server optimizer see).
    ``merge(params, shared) -> params``: the global model with a new shared part.
    ``client_update(params, client, data, key, hparams) -> (shared_delta,
    client, metrics)``: one client's round (the caller vmaps it).
    ``personal_params(params, clients, train, key, hparams) -> params[C, ...]``:
    each client's model for evaluation, or None to evaluate the global model.
    """

    init: Callable[[Params, int], Any]
    shared: Callable[[Params], Any]
    merge: Callable[[Params, Any], Params]
    client_update: Callable[..., tuple[Any, Any, dict[str, Array]]]
    personal_params: Callable[..., Params] | None


def _add(tree: Any, delta: Any) -> Any:
    return jax.tree.map(jnp.add, tree, delta)


def _whole_model(init: Callable, client_update: Callable, personal_params: Callable | None) -> Personalizer:
    """A `Personalizer` that federates the whole global model."""
    return Personalizer(init, lambda params: params, lambda params, shared: shared, client_update, personal_params)


def _federated(local_update: Callable, personal_params: Callable | None = None) -> Personalizer:
    """Plain federated training: no personal state carried between rounds."""

    def client_update(params, client, data, key, hparams):
        delta, metrics = local_update(params, data, key, hparams)
        return delta, client, metrics

    return _whole_model(lambda params, num_clients: (), client_update, personal_params)


def _local_only(local_update: Callable) -> Personalizer:
    """Local-only training: every client's own model, trained alone; nothing is shared (an empty tree)."""

    def client_update(params, personal, data, key, hparams):
        delta, metrics = local_update(personal, data, key, hparams)
        return {}, _add(personal, delta), metrics

    return Personalizer(
        init=broadcast_to_clients,
        shared=lambda params: {},
        merge=lambda params, shared: params,
        client_update=client_update,
        personal_params=lambda params, clients, train, key, hparams: clients,
    )


def _finetune(cfg: Any, model: Model, spec: LocalSpec, parallelism: str, chunk: int) -> Callable[..., Params]:
    """``personal_params``: every client fine-tunes the global model for ``finetune_steps`` steps."""
    if cfg.finetune_steps == 0:
        return lambda params, clients, train, key, hparams: broadcast_to_clients(params, train.count.shape[0])
    tune = make_local_update(model, spec._replace(epochs=0, steps=cfg.finetune_steps, sampling="fixed"))

    def personal_params(params, clients, train: ClientData, key, hparams):
        keys = per_client_keys(key, jnp.arange(train.count.shape[0]))
        plain = hparams._replace(prox_mu=0.0)
        deltas, _ = map_clients(tune, (params, tuple(train), keys, plain), (None, 0, 0, None), parallelism, chunk)
        return jax.tree.map(jnp.add, params, deltas)

    return personal_params


def _ditto(strength: Any, model: Model, spec: LocalSpec, local_update: Callable) -> Personalizer:
    """Ditto: FedAvg plus a personal model per client pulled toward the round's global model."""
    personal_update = make_local_update(model, spec)  # exact gradients: the personal model never leaves

    def client_update(params, personal, data, key, hparams):
        delta, metrics = local_update(params, data, key, hparams)
        step, _ = personal_update(personal, data, key, hparams._replace(prox_mu=0.0), Anchor(params, strength))
        return delta, _add(personal, step), metrics

    return _whole_model(broadcast_to_clients, client_update, lambda params, clients, train, key, hparams: clients)


def _fedper(cfg: Any, model: Model, spec: LocalSpec, gradient_fn: GradientFn | None) -> Personalizer:
    """Partial personalisation: the leaves named by ``local_paths`` never leave their client."""
    part_of = lambda params: partition(params, cfg.local_paths)  # noqa: E731
    exact = masked_mean_gradient(model)

    def shared_dp_gradient(params, xb, yb, valid, key, expected):
        """DP-SGD's gradient on the shared leaves, the exact one on the local leaves."""
        loss, private = gradient_fn(params, xb, yb, valid, key, expected)
        _, plain = exact(params, xb, yb, valid, key, expected)
        part = part_of(params)
        return loss, part.merge(part.split(private)[0], part.split(plain)[1])

    local_update = make_local_update(model, spec, shared_dp_gradient if gradient_fn is not None else None)

    def client_update(params, local, data, key, hparams):
        part = part_of(params)
        delta, metrics = local_update(part.merge(part.split(params)[0], local), data, key, hparams)
        shared_delta, local_delta = part.split(delta)
        return shared_delta, _add(local, local_delta), metrics

    def merge(params, shared):
        part = part_of(params)
        return part.merge(shared, part.split(params)[1])

    def personal_params(params, clients, train, key, hparams):
        part = part_of(params)
        return jax.vmap(part.merge, in_axes=(None, 0))(part.split(params)[0], clients)

    return Personalizer(
        init=lambda params, num_clients: broadcast_to_clients(part_of(params).split(params)[1], num_clients),
        shared=lambda params: part_of(params).split(params)[0],
        merge=merge,
        client_update=client_update,
        personal_params=personal_params,
    )


def mixture(v: Params, w: Params, alpha: Array) -> Params:
    """APFL's personalised model ``alpha v + (1 - alpha) w``."""
    return jax.tree.map(lambda vi, wi: alpha * vi + (1 - alpha) * wi, v, w)


def _apfl(cfg: Any, initial: Any, model: Model, spec: LocalSpec, gradient_fn: GradientFn | None) -> Personalizer:
    """APFL: a local model and a mixing weight per client, trained beside the global model."""
    base = gradient_fn or masked_mean_gradient(model)
    alpha_of = (lambda client: jnp.clip(client["alpha"], 0.0, 1.0)) if cfg.learn_alpha else (lambda client: initial)

    def joint_gradient(joint, xb, yb, valid, key, expected):
        """Gradients of f(w) in w and of f(alpha v + (1 - alpha) w) in v and alpha, on one batch."""
        loss, grad_w = base(joint["w"], xb, yb, valid, key, expected)
        w = joint["w"]  # a constant of the mixture: w moves by grad f(w) only
        mixed = Model(model.init, lambda client, x: model.apply(mixture(client["v"], w, alpha_of(client)), x))
        client = {k: v for k, v in joint.items() if k != "w"}
        _, grad_client = masked_mean_gradient(mixed)(client, xb, yb, valid, key, expected)
        return loss, {"w": grad_w, **grad_client}

    joint_update = make_local_update(model, spec, joint_gradient)

    def init(params, num_clients):
        client = {"v": broadcast_to_clients(params, num_clients)}
        if cfg.learn_alpha:
            client["alpha"] = jnp.full((num_clients,), initial, jnp.float32)
        return client

    def client_update(params, client, data, key, hparams):
        delta, metrics = joint_update({"w": params, **client}, data, key, hparams)
        new = _add(client, {k: delta[k] for k in client})
        if cfg.learn_alpha:
            new["alpha"] = jnp.clip(new["alpha"], 0.0, 1.0)
        return delta["w"], new, metrics

    def personal_params(params, clients, train, key, hparams):
        return jax.vmap(lambda client: mixture(client["v"], params, alpha_of(client)))(clients)

    return _whole_model(init, client_update, personal_params)


def build_personalizer(
    cfg: Any,
    hparams: PersonalizationHParams | None,
    model: Model,
    spec: LocalSpec,
    gradient_fn: GradientFn | None = None,
    parallelism: str = "vmap",
    chunk: int = 1,
) -> Personalizer:
    """The `Personalizer` of ``cfg.method`` (the config's ``personalization`` section).

    Called inside the traced program: ``ditto_lambda`` and ``alpha`` come from
    ``hparams`` (traced; the config's values when None); ``gradient_fn`` is the
    local gradient (DP-SGD's, or None for the exact one) used for everything
    that leaves the client.
    """
    if cfg.method not in (*METHODS, LOCAL_ONLY):
        raise ValueError(f"personalization.method={cfg.method!r} is unknown; choose one of {METHODS}.")
    hp = hparams_of(PersonalizationHParams, cfg) if hparams is None else hparams
    if cfg.method == "fedper":
        return _fedper(cfg, model, spec, gradient_fn)
    if cfg.method == "apfl":
        return _apfl(cfg, hp.alpha, model, spec, gradient_fn)
    local_update = make_local_update(model, spec, gradient_fn)
    if cfg.method == LOCAL_ONLY:
        return _local_only(local_update)
    if cfg.method == "ditto":
        return _ditto(hp.ditto_lambda, model, spec, local_update)
    finetune = _finetune(cfg, model, spec, parallelism, chunk) if cfg.method == "finetune" else None
    return _federated(local_update, finetune)

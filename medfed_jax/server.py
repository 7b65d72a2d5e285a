"""The federated round as one pure function, and many rounds under `lax.scan`.

``round_step(state, train, knobs) -> (state, metrics)``: sample a cohort
(``cohort_size`` clients uniformly, or Poisson: each client with probability
``sampling_rate`` in ``max_cohort`` padded slots, those not taking part
masked out; metric ``participants``),
poison labels (data attacks), train every cohort client locally (vmapped or
chunk-mapped), privatise (local DP), replace malicious updates (model
attacks), aggregate, and apply the server optimizer. Personalisation
(`medfed_jax.personalize`) hooks in through a `Personalizer`: the cohort's
personal state is gathered from ``FedState.clients``, updated by the local
step and scattered back, and only the *shared* part of each update reaches
the privatizer, attack, aggregator and server optimizer. ``train`` is the full
population: padded `ClientData`, or a flat (or generated) population whose
cohort is drawn in O(cohort) and gathered (or generated) into a
``[cohort, cap]`` block ordered by client size (`medfed_jax.data.population`);
``knobs`` the traced numeric settings. The engine is built once per
*structural* config (`build_engine`, cached) and every function
it returns is jitted with no static arguments, so numeric knobs never
recompile.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medfed_jax import aggregators, attacks, personalize, privacy
from medfed_jax import config as config_lib
from medfed_jax import mesh as mesh_lib
from medfed_jax.client import LocalHParams, LocalSpec, example_loss_fn, map_clients
from medfed_jax.data import population
from medfed_jax.eval import make_evaluate, make_evaluate_personal
from medfed_jax.models import make_model
from medfed_jax.types import Array, AttackContext, ClientData, Knobs, Metrics, Params

# Structural fields a program can switch between at run time (see `build_engine`).
SWITCHABLE = ("aggregator.name", "attack.name")
Switches = tuple[tuple[str, tuple[str, ...]], ...]

# Aggregators that only sum over the client axis: on a mesh they reduce where the updates lie.
MEANS = {"mean", "weighted_mean"}

# Purposes of the per-round keys, folded into the round key.
_SAMPLE, _LOCAL, _PRIVACY, _ATTACK, _AGGREGATE, _PERSONAL, _SUBSAMPLE = range(7)


class FedState(NamedTuple):
    """Everything a federated run carries from one round to the next.

    Attributes:
      params: global model parameters.
      server_opt_state: optax state of the server optimizer.
      agg_state: the aggregator's state (e.g. the previous aggregate).
      round: number of rounds done (int32 scalar).
      key: the run's base PRNG key; round ``r`` uses ``fold_in(key, r)``.
      malicious: ``[C]`` bool, the run's malicious clients (fixed for a run).
      clients: per-client state on the client axis (personal models, see
        `medfed_jax.personalize`), or ().
    """

    params: Params
    server_opt_state: Any
    agg_state: Any
    round: Array
    key: Array
    malicious: Array
    clients: Any = ()


def make_server_optimizer(name: str, knobs: Knobs) -> optax.GradientTransformation:
    """Server optimizer over the pseudo-gradient ``-aggregate`` (Reddi et al. 2021).

    ``fedavg``: SGD (lr 1 recovers FedAvg); ``fedavgm``: SGD with momentum;
    ``fedadam``/``fedyogi``/``fedadagrad``: adaptive, with ``server.eps`` the
    paper's tau.
    """
    lr, b1, b2, eps = (knobs[f"server.{k}"] for k in ("lr", "b1", "b2", "eps"))
    if name == "fedavg":
        return optax.sgd(lr)
    if name == "fedavgm":
        return optax.sgd(lr, momentum=knobs["server.momentum"])
    if name == "fedadam":
        return optax.adam(lr, b1=b1, b2=b2, eps=eps)
    if name == "fedyogi":
        return optax.yogi(lr, b1=b1, b2=b2, eps=eps)
    if name == "fedadagrad":
        return optax.adagrad(lr, initial_accumulator_value=0.0, eps=eps)
    raise ValueError(f"server.optimizer={name!r} is unknown; choose one of {config_lib.SERVER_OPTIMIZERS}.")


def local_hparams(knobs: Knobs) -> LocalHParams:
    """The traced local-training settings."""
    return LocalHParams(knobs["local.lr"], knobs["local.momentum"], knobs["local.prox_mu"])


def static_config(cfg: Any, switched: Sequence[str] = ()) -> ml_collections.FrozenConfigDict:
    """The structural part of a config: numeric knobs removed, frozen, hashable.

    Reading a numeric field from it fails loudly, so code inside a program can
    only see numeric settings through the traced ``knobs``. ``switched`` fields
    (see `build_engine`) are removed too: the program reads them from ``knobs``.
    """
    plain = cfg.to_dict()
    for path in (*config_lib.numeric_fields(), *switched):
        *parents, leaf = path.split(".")
        section = plain
        for part in parents:
            section = section[part]
        section.pop(leaf, None)
    for run_level in ("sweep", "seed", "name", "baselines"):  # host-side only: never change the program
        plain.pop(run_level, None)
    return ml_collections.FrozenConfigDict(plain)


# Clients per vmapped chunk under 'map' when ``client_chunk`` is 0: the fastest of 1, 2, 3, 4, 5, 8, 10
# and 25 for W1 on the 2-core AVX-512 CPU with the cohort split over both cores (benchmarks/RESULTS.md).
DEFAULT_CHUNK = 2


def default_parallelism(cfg: Any) -> tuple[str, int]:
    """Client-parallel strategy: full vmap on accelerators, chunked map (`DEFAULT_CHUNK`) on CPU."""
    mode = cfg.client_parallelism
    if mode == "auto":
        mode = "map" if jax.default_backend() == "cpu" else "vmap"
    return mode, (cfg.client_chunk or DEFAULT_CHUNK)


def global_params(state: Any, train: ClientData, knobs: Knobs) -> Any:
    """What an engine without personal models evaluates: ``state.params``."""
    del train, knobs
    return state.params


class Engine(NamedTuple):
    """The jitted pure functions of one structural config.

    ``init(seed, train, knobs) -> FedState``;
    ``round_step(state, train, knobs) -> (state, metrics)``;
    ``run_rounds(state, train, knobs, num_rounds) -> (state, metrics[R])``
    (``num_rounds`` static);
    ``evaluate(params, test) -> metrics``;
    ``program(seed, train, test, knobs) -> history`` (the whole run, evaluated
    after each of `eval_rounds`, one XLA program: what sweeps vmap);
    ``eval_params(state, train, knobs) -> params``: what ``evaluate`` takes
    for a state, ``state.params`` unless the engine has one model per client
    (personalised methods: the personal models ``[C, ...]``). Evaluate a state
    with ``evaluate(eval_params(state, train, knobs), test)``.
    """

    init: Callable
    round_step: Callable
    run_rounds: Callable
    evaluate: Callable
    program: Callable
    context: config_lib.BuildContext
    eval_params: Callable = global_params
    mesh: jax.sharding.Mesh | None = None  # the 'clients' mesh local training is split over; None: one device


def eval_rounds(rounds: int, eval_every: int) -> tuple[int, ...]:
    """The rounds after which a run of ``rounds`` rounds evaluates: every ``eval_every``-th and the last.

    ``eval_rounds(7, 5) == (5, 7)``, ``eval_rounds(3, 5) == (3,)``; every path
    (single runs, seeds, programs, sweeps) trains exactly ``rounds`` rounds.
    """
    return (*range(eval_every, rounds, eval_every), rounds)


def chunk_lengths(rounds: int, eval_every: int, done: int = 0) -> tuple[int, ...]:
    """Rounds trained before each evaluation of `eval_rounds` still ahead after round ``done``."""
    ahead = [r for r in eval_rounds(rounds, eval_every) if r > done]
    return tuple(b - a for a, b in zip([done, *ahead], ahead))


def advance(round_step: Callable, state: Any, train: ClientData, knobs: Knobs, num_rounds: Array):
    """``num_rounds`` (traced, >= 1) rounds of ``round_step``; returns (state, the last round's metrics).

    A loop with a traced trip count: one compiled program trains chunks of any length.
    """
    _, like = jax.eval_shape(round_step, state, train, knobs)
    metrics = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), like)
    return jax.lax.fori_loop(0, num_rounds, lambda _, carry: round_step(carry[0], train, knobs), (state, metrics))


def make_chunk(round_step: Callable, evaluate: Callable, eval_params: Callable = global_params) -> Callable:
    """``chunk(state, train, test, knobs, num_rounds) -> (state, metrics)``: one evaluation chunk.

    `advance` ``num_rounds`` rounds, then ``evaluate(eval_params(state, train,
    knobs), test)``; the metrics are the last round's training metrics and the
    evaluation. What a whole-run program scans and the host loop of
    `medfed_jax.runner` calls.
    """

    def chunk(state: Any, train: ClientData, test: ClientData, knobs: Knobs, num_rounds: Array):
        state, metrics = advance(round_step, state, train, knobs, num_rounds)
        return state, {**metrics, **evaluate(eval_params(state, train, knobs), test)}

    return chunk


def make_program(
    init: Callable,
    round_step: Callable,
    evaluate: Callable,
    rounds: int,
    eval_every: int,
    eval_params: Callable = global_params,
):
    """A whole run as one function: init, then a scan over the evaluation chunks of `eval_rounds`.

    Returns ``program(seed, train, test, knobs) -> history`` whose leaves have a
    leading axis of ``len(eval_rounds(rounds, eval_every))`` evaluations (see
    `make_chunk`): exactly ``rounds`` rounds, the last chunk shorter when
    ``eval_every`` does not divide ``rounds``.
    """
    chunk = make_chunk(round_step, evaluate, eval_params)
    lengths = np.asarray(chunk_lengths(rounds, eval_every), np.int32)

    def program(seed: Array, train: ClientData, test: ClientData, knobs: Knobs) -> Metrics:
        step = lambda state, num_rounds: chunk(state, train, test, knobs, num_rounds)  # noqa: E731
        _, history = jax.lax.scan(step, init(seed, train, knobs), lengths)
        return history

    return program


def _scalar_metrics(metrics: Metrics) -> Metrics:
    return {k: v for k, v in metrics.items() if jnp.ndim(v) == 0}


def _switchable(cfg: Any, switches: Switches, section: str, build: Callable, combine: Callable) -> Callable:
    """``knobs -> component``: the section's component, or a run-time switch over the ``switches`` choices."""
    choices = dict(switches).get(f"{section}.name")
    if not choices:
        return lambda knobs: build(cfg[section], knobs)
    variants = [ml_collections.ConfigDict({**cfg[section].to_dict(), "name": name}) for name in choices]
    return lambda knobs: combine([build(v, knobs) for v in variants], knobs[f"{section}.name"])


@functools.lru_cache(maxsize=32)
def build_engine(
    cfg: ml_collections.FrozenConfigDict,
    context: config_lib.BuildContext,
    switches: Switches = (),
    mesh: jax.sharding.Mesh | None = None,
) -> Engine:
    """Build (and cache) the engine for a structural config; see `Engine`.

    ``switches``: ``(('aggregator.name', names), ('attack.name', names))``
    (either, both or none). Each switched choice is compiled into the program
    as a `jax.lax.switch` branch, and ``knobs['<section>.name']`` (an int32
    index into ``names``, traced) picks one at run time; ``cfg`` then lacks
    that field (`static_config` with ``switched``). Sweeps use this to compile
    the aggregator x attack matrix once.

    ``mesh``: the ``'clients'`` mesh the cohort's local training is split over
    (`medfed_jax.mesh.client_mesh`, every selected device by default; a
    one-device mesh runs on one device). Outputs are replicated on it; place
    the data with `medfed_jax.mesh.put` (`medfed_jax.runner.place_data`).
    """
    mesh = mesh_lib.client_mesh(context.cohort_size) if mesh is None else (mesh if mesh.size > 1 else None)
    core = _build_round_functions(_without_schedule(cfg), context, switches, mesh)
    program = make_program(core.init, core.round_step, core.evaluate, cfg.rounds, cfg.eval_every, core.eval_params)
    return core._replace(program=jit_on(mesh)(program))


def jit_on(mesh: jax.sharding.Mesh | None) -> Callable:
    """`jax.jit`, with outputs replicated on ``mesh`` (readable by every process)."""
    return jax.jit if mesh is None else functools.partial(jax.jit, out_shardings=mesh_lib.replicated(mesh))


SCHEDULE = ("rounds", "eval_every")  # only a whole-run program depends on them


def _without_schedule(cfg: ml_collections.FrozenConfigDict) -> ml_collections.FrozenConfigDict:
    return ml_collections.FrozenConfigDict({k: v for k, v in cfg.items() if k not in SCHEDULE})


@functools.lru_cache(maxsize=32)
def _build_round_functions(
    cfg: ml_collections.FrozenConfigDict,
    context: config_lib.BuildContext,
    switches: Switches,
    mesh: jax.sharding.Mesh | None,
) -> Engine:
    """The engine's jitted functions but ``program`` (None): shared by configs that differ in their schedule only."""
    unknown = [path for path, _ in switches if path not in SWITCHABLE]
    if unknown:
        raise ValueError(f"build_engine: {unknown} cannot be switched at run time; switchable: {SWITCHABLE}.")
    model = make_model(cfg.model.name, context.num_classes, tuple(cfg.model.widths))
    build_rule = _switchable(cfg, switches, "aggregator", aggregators.build_aggregator, aggregators.switch)
    build_attack = _switchable(cfg, switches, "attack", attacks.build_attack, attacks.switch)
    parallelism, chunk = default_parallelism(cfg)
    num_clients, cohort = context.num_clients, context.cohort_size
    poisson = context.sampling_rate > 0  # Poisson cohorts in ``cohort`` slots (`population.poisson_cohort`)
    sampled = cohort < num_clients or poisson
    rules = dict(switches).get("aggregator.name") or (cfg.aggregator.name,)
    by_coordinate = cfg.privacy.mode not in privacy.SERVER_NOISE and not set(rules) <= MEANS  # see spread_coordinates
    flat = context.cohort_cap > 0  # a flat or generated population, in [cohort, cohort_cap] blocks
    indexed = sampled or flat  # the round's clients are train[index], not train itself

    def block_rows(train: Any) -> int:
        """Rows per client of a round's cohort block."""
        return context.cohort_cap if flat else train.y.shape[1]

    def build_personalizer(knobs: Knobs, max_count: int) -> personalize.Personalizer:
        spec = LocalSpec.from_config(cfg.local, max_count)
        gradient_fn = privacy.build_gradient_fn(cfg.privacy, knobs)  # DP-SGD's, over per-example losses
        if gradient_fn is not None:
            gradient_fn = functools.partial(gradient_fn, example_loss_fn(model))
        return personalize.build_personalizer(cfg.personalization, knobs, model, spec, gradient_fn, parallelism, chunk)

    def components(knobs: Knobs, max_count: int):
        aggregator = privacy.build_central_aggregator(cfg.privacy, knobs, context)
        aggregator = aggregator or build_rule(knobs)
        return (
            build_personalizer(knobs, max_count),
            privacy.build_client_privatizer(cfg.privacy, knobs),
            build_attack(knobs),
            aggregator,
            make_server_optimizer(cfg.server.optimizer, knobs),
        )

    def init(seed: Array, train: ClientData, knobs: Knobs) -> FedState:
        key = jax.random.PRNGKey(seed)
        model_key, attack_key, run_key = jax.random.split(key, 3)
        params = model.init(model_key, jnp.zeros((1, *train.feature_shape), jnp.float32))
        personal, _, _, aggregator, server_opt = components(knobs, block_rows(train))
        malicious = attacks.attack_mask(cfg.attack, attack_key, knobs, num_clients)
        shared = personal.shared(params)
        return FedState(
            params=params,
            server_opt_state=server_opt.init(shared),
            agg_state=aggregator.init(shared),
            round=jnp.zeros((), jnp.int32),
            key=run_key,
            malicious=malicious,
            clients=personal.init(params, num_clients),
        )

    def round_step(state: FedState, train: ClientData, knobs: Knobs) -> tuple[FedState, Metrics]:
        personal, privatizer, attack, aggregator, server_opt = components(knobs, block_rows(train))
        round_key = jax.random.fold_in(state.key, state.round)
        key_for = lambda purpose: jax.random.fold_in(round_key, purpose)  # noqa: E731
        taking = None  # Poisson cohorts: which of the ``cohort`` slots take part this round
        if poisson:
            index, taking = population.poisson_cohort(key_for(_SAMPLE), num_clients, context.sampling_rate, cohort)
            if flat:
                index, taking = population.by_size(train, index, taking)
        elif flat:
            index = (
                population.draw_cohort(key_for(_SAMPLE), train, cohort)
                if sampled
                else jnp.argsort(train.count, stable=True)
            )
        elif sampled:
            index = jax.random.choice(key_for(_SAMPLE), num_clients, (cohort,), replace=False)
        else:
            index = jnp.arange(num_clients)
        if flat:
            data = population.cohort_block(train, index, context.cohort_cap, key_for(_SUBSAMPLE))
        else:
            data = train.take(index) if sampled else train
        malicious = state.malicious[index] if indexed else state.malicious
        if poisson:  # a slot not taking part holds no rows: masked out of training, attacks and aggregation
            data, malicious = data._replace(count=jnp.where(taking, data.count, 0)), malicious & taking
        cohort_clients = jax.tree.map(lambda s: s[index], state.clients) if indexed else state.clients
        labels = attack.poison_labels(data.y, malicious, context.num_classes)
        client_keys = jax.vmap(lambda i: jax.random.fold_in(key_for(_LOCAL), i))(index)
        deltas, cohort_clients, local_metrics = map_clients(
            personal.client_update,
            (state.params, cohort_clients, (data.x, labels, data.count), client_keys, local_hparams(knobs)),
            (None, 0, 0, 0, None),
            parallelism,
            chunk,
            mesh,
        )
        clients = cohort_clients
        if indexed:  # clients outside the cohort (and in slots not taking part) keep their personal state
            kept = index if taking is None else jnp.where(taking, index, num_clients)
            clients = jax.tree.map(lambda s, new: s.at[kept].set(new, mode="drop"), state.clients, cohort_clients)
        if by_coordinate:
            deltas = mesh_lib.spread_coordinates(deltas, mesh)
        if privatizer is not None:
            deltas = jax.vmap(privatizer)(deltas, jax.random.split(key_for(_PRIVACY), index.shape[0]))
        weights, mask = data.count, data.count > 0
        aggregate = lambda u: aggregator.aggregate(u, weights, mask, state.agg_state, key_for(_AGGREGATE))  # noqa: E731
        shared = personal.shared(state.params)

        def server_step(update):  # -> (params, server optimizer state)
            pseudo_gradient = jax.tree.map(jnp.negative, mesh_lib.gather(update, mesh))
            server_updates, opt_state = server_opt.update(pseudo_gradient, state.server_opt_state, shared)
            return personal.merge(state.params, optax.apply_updates(shared, server_updates)), opt_state

        attack_context = AttackContext(
            weights,
            mask,
            context.num_classes,
            aggregate=lambda u: aggregate(u)[0],
            step=lambda update: server_step(update)[0],
            loss=lambda p, clients: attacks.mean_loss(
                model.apply, p, data.x, data.y, data.valid_mask() & clients[:, None]
            ),
        )
        deltas = attack.apply(deltas, malicious, key_for(_ATTACK), attack_context)
        update, agg_state, diagnostics = aggregate(deltas)
        params, opt_state = server_step(update)
        update = mesh_lib.gather(update, mesh)
        new_state = state._replace(
            params=params,
            server_opt_state=opt_state,
            agg_state=agg_state,
            round=state.round + 1,
            clients=clients,
        )
        honest = mask & ~malicious
        loss_weight = jnp.where(honest, weights, 0).astype(jnp.float32)
        metrics = {
            "train_loss": jnp.sum(loss_weight * local_metrics["train_loss"]) / jnp.maximum(jnp.sum(loss_weight), 1),
            "update_norm": optax.global_norm(update),
            **_scalar_metrics(diagnostics),
        }
        if poisson:
            metrics["participants"] = jnp.sum(mask).astype(jnp.int32)
        return new_state, metrics

    def run_rounds(state: FedState, train: ClientData, knobs: Knobs, num_rounds: int):
        return jax.lax.scan(lambda s, _: round_step(s, train, knobs), state, None, length=num_rounds)

    def personal_params(state: FedState, train: ClientData, knobs: Knobs):
        personal = build_personalizer(knobs, train.y.shape[1])
        key = jax.random.fold_in(jax.random.fold_in(state.key, state.round), _PERSONAL)
        return personal.personal_params(state.params, state.clients, train, key, local_hparams(knobs))

    if cfg.personalization.method in personalize.PERSONAL_METHODS:
        evaluate, eval_params = make_evaluate_personal(model, parallelism, chunk), personal_params
    else:
        evaluate, eval_params = make_evaluate(model, parallelism, chunk), global_params

    jit = jit_on(mesh)
    return Engine(
        init=jit(init),
        round_step=jit(round_step),
        run_rounds=jit(run_rounds, static_argnums=3),
        evaluate=jit(evaluate),
        program=None,
        context=context,
        eval_params=jit(eval_params),
        mesh=mesh,
    )

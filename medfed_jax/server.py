"""The federated round as one pure function, and many rounds under `lax.scan`.

``round_step(spec, parts, hparams, state, train) -> (state, metrics)``: sample
a cohort (``cohort_size`` clients uniformly, or Poisson: each client with
probability ``sampling_rate`` in ``max_cohort`` padded slots, those not taking
part masked out; metric ``participants``), drop unreliable clients and cut
their local steps (`medfed_jax.unreliable`), poison labels (data attacks),
train every cohort client locally (vmapped or chunk-mapped; a drift method's
terms and per-client state, `medfed_jax.drift`), privatise (local DP),
compress the uploads (`medfed_jax.compression`; metric ``uploaded_bytes``),
replace malicious updates (model attacks), aggregate (through a drift
method's server step), and apply the server optimizer. Every optional stage
is skipped in Python when not configured. ``parts`` are the round's
`Components`; ``spec`` the static facts (`medfed_jax.cohort.RoundSpec`).
Personalisation (`medfed_jax.personalize`) hooks in through a `Personalizer`:
the cohort's personal state is gathered from ``FedState.clients``, updated by
the local step and scattered back, and only
the *shared* part of each update reaches the privatizer, attack, aggregator and
server optimizer. ``train`` is the full population: padded `ClientData`, or a
flat (or generated) population whose cohort is drawn in O(cohort) and gathered
(or generated) into a ``[cohort, cap]`` block ordered by client size
(`medfed_jax.data.population`).

The engine is built once per *structural* config (`build_engine`, cached on
``static`` of `medfed_jax.config.split`), and every function it returns is
jitted with no static arguments: it takes the traced `medfed_jax.config.HParams`
pytree and, last, the run-time switch indices (`medfed_jax.config.Choices`), so
numeric settings and switched choices never recompile.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from medfed_jax import aggregators, asynchronous, attacks, compression, drift, personalize, privacy, unreliable
from medfed_jax import config as config_lib
from medfed_jax import mesh as mesh_lib
from medfed_jax.client import LocalHParams, LocalSpec, example_loss_fn, make_local_update, map_clients
from medfed_jax.cohort import RoundSpec, draw_cohort, gather_clients, scatter_clients
from medfed_jax.config import NO_CHOICES, Choices, HParams
from medfed_jax.eval import make_evaluate, make_evaluate_per_client_models, make_evaluate_personal
from medfed_jax.models import make_model
from medfed_jax.program import global_params, jit_on, make_program
from medfed_jax.server_optimizer import make_server_optimizer
from medfed_jax.types import Aggregator, Array, Attack, AttackContext, Metrics, Params, per_client_keys

# Structural fields a program can switch between at run time (see `build_engine`).
SWITCHABLE = ("aggregator.name", "attack.name")
Switches = tuple[tuple[str, tuple[str, ...]], ...]

# Aggregators that only sum over the client axis: on a mesh they reduce where the updates lie.
MEANS = {"mean", "weighted_mean"}

# Purposes of the per-round keys, folded into the round key (new ones appended: existing keys never move).
_SAMPLE, _LOCAL, _PRIVACY, _ATTACK, _AGGREGATE, _PERSONAL, _SUBSAMPLE, _DROPOUT, _STRAGGLE, _COMPRESS, _ASYNC = range(
    11
)
# The run's per-client compute budgets: fold_in(run key, BUDGET_ROUND), a round number no run reaches (int32).
BUDGET_ROUND = 2**31
# FedBuff's per-client median latencies and first dispatch: fold_in(run key, FEDBUFF_START), likewise.
FEDBUFF_START = 2**31 + 1


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
      drift: a drift correction's `medfed_jax.drift.DriftState` (server state
        and per-client state ``[C, ...]``), or ().
      compression: each client's compressor state ``[C, ...]`` (error
        feedback's residual, `medfed_jax.compression`), or ().
      asynchronous: FedBuff's clients in flight and their pending updates
        (`medfed_jax.asynchronous.FedBuffState`), or ().
    """

    params: Params
    server_opt_state: Any
    agg_state: Any
    round: Array
    key: Array
    malicious: Array
    clients: Any = ()
    drift: Any = ()
    compression: Any = ()
    asynchronous: Any = ()


# Clients per vmapped chunk under 'map' when ``client_chunk`` is 0: the fastest of 1, 2, 3, 4, 5, 8, 10
# and 25 for W1 on the 2-core AVX-512 CPU with the cohort split over both cores (benchmarks/RESULTS.md).
DEFAULT_CHUNK = 2


def default_parallelism(cfg: Any) -> tuple[str, int]:
    """Client-parallel strategy: full vmap on accelerators, chunked map (`DEFAULT_CHUNK`) on CPU."""
    mode = cfg.client_parallelism
    if mode == "auto":
        mode = "map" if jax.default_backend() == "cpu" else "vmap"
    return mode, (cfg.client_chunk or DEFAULT_CHUNK)


class Engine(NamedTuple):
    """The jitted pure functions of one structural config.

    ``init(seed, train, hparams) -> FedState``;
    ``round_step(state, train, hparams) -> (state, metrics)``;
    ``run_rounds(state, train, hparams, num_rounds) -> (state, metrics[R])``
    (``num_rounds`` static);
    ``evaluate(params, test) -> metrics``;
    ``program(seed, train, test, hparams) -> history`` (the whole run, evaluated
    after each of `eval_rounds`, one XLA program: what sweeps vmap);
    ``eval_params(state, train, hparams) -> params``: what ``evaluate`` takes
    for a state, ``state.params`` unless the engine has one model per client
    (personalised methods: the personal models ``[C, ...]``). Evaluate a state
    with ``evaluate(eval_params(state, train, hparams), test)``. ``hparams``
    is a `medfed_jax.config.HParams` pytree; every function but ``evaluate``
    takes the run-time switch indices (`medfed_jax.config.Choices`) as an
    optional last argument (needed only when the engine has switches).
    """

    init: Callable
    round_step: Callable
    run_rounds: Callable
    evaluate: Callable
    program: Callable
    context: config_lib.BuildContext
    eval_params: Callable = global_params
    mesh: jax.sharding.Mesh | None = None  # the 'clients' mesh local training is split over; None: one device


def _scalar_metrics(metrics: Metrics) -> Metrics:
    return {k: v for k, v in metrics.items() if jnp.ndim(v) == 0}


class Components(NamedTuple):
    """The parts a round is built from, for one setting of the hparams (pure functions, state explicit)."""

    personalizer: personalize.Personalizer  # personal state, and the shared part of the model
    privatizer: Callable | None  # local DP: ``(update, key) -> update`` per client before upload, or None
    attack: Attack
    aggregator: Aggregator
    server_optimizer: optax.GradientTransformation
    drift: drift.DriftRound | None = None  # SCAFFOLD, FedNova, FedDyn (replaces the personaliser's client step)
    compressor: compression.Compressor | None = None  # of each upload, after local DP and before the attack


def _client_step(parts: Components, state: FedState) -> tuple[Callable, Any, Any]:
    """The mapped per-client function, its shared argument, and the per-client state it updates: the
    personaliser's, or a drift method's (drift methods refuse personal state)."""
    if parts.drift is None:
        return parts.personalizer.client_update, state.params, state.clients
    return parts.drift.client_update, (state.params, state.drift.server), state.drift.clients


def _honest_loss(losses: Array, weights: Array, honest: Array) -> Array:
    """The row-weighted mean local training loss of the ``honest`` clients (0 when there are none)."""
    weight = jnp.where(honest, weights, 0).astype(jnp.float32)
    return jnp.sum(weight * losses) / jnp.maximum(jnp.sum(weight), 1)


def server_step(parts: Components, state: FedState, update: Any) -> tuple[Params, Any]:
    """The aggregated (gathered, whole) shared ``update`` applied by the server optimizer: ``(params, opt state)``."""
    shared = parts.personalizer.shared(state.params)
    pseudo_gradient = jax.tree.map(jnp.negative, update)
    server_updates, opt_state = parts.server_optimizer.update(pseudo_gradient, state.server_opt_state, shared)
    return parts.personalizer.merge(state.params, optax.apply_updates(shared, server_updates)), opt_state


def _attack_context(spec: RoundSpec, parts: Components, state: FedState, data: Any, aggregate: Callable):
    """What an attack may query about the updates it joins: the cohort's ``data``, the round's ``aggregate``
    (``updates -> (update, agg_state, diagnostics)``), the server step and the model's loss."""
    return AttackContext(
        data.count,
        data.count > 0,
        spec.context.num_classes,
        aggregate=lambda u: aggregate(u)[0],
        step=lambda update: server_step(parts, state, mesh_lib.gather(update, spec.mesh))[0],
        loss=lambda p, clients: attacks.mean_loss(
            spec.model.apply, p, data.x, data.y, data.valid_mask() & clients[:, None]
        ),
    )


def round_step(
    spec: RoundSpec, parts: Components, hparams: LocalHParams, state: FedState, train: Any
) -> tuple[FedState, Metrics]:
    """One federated round (see the module docstring); ``hparams``: local training's traced settings."""
    round_key = jax.random.fold_in(state.key, state.round)
    key_for = lambda purpose: jax.random.fold_in(round_key, purpose)  # noqa: E731
    index, taking, data = draw_cohort(spec, key_for(_SAMPLE), key_for(_SUBSAMPLE), train)
    steps = ()  # each client's local steps, when unreliable clients cut them (else `client.client_steps`)
    if spec.unreliable is not None:
        keys = unreliable.CohortWork(key_for(_DROPOUT), key_for(_STRAGGLE), jax.random.fold_in(state.key, BUDGET_ROUND))
        taking, data, steps = unreliable.unreliable_cohort(spec.unreliable, keys, index, taking, data)
    malicious = state.malicious[index] if spec.indexed else state.malicious
    if taking is not None:  # a slot not taking part is masked out of training, attacks and aggregation
        malicious = malicious & taking
    client_update, shared_args, per_client = _client_step(parts, state)
    gather = functools.partial(gather_clients, spec, index)
    scatter = functools.partial(scatter_clients, spec, index, taking)
    before = gather(per_client)
    labels = parts.attack.poison_labels(data.y, malicious, spec.context.num_classes)
    local_key = round_key if spec.own_keys else key_for(_LOCAL)
    client_keys = per_client_keys(local_key, index)
    deltas, cohort_clients, local_metrics = map_clients(
        client_update,
        (shared_args, before, (data.x, labels, data.count, *steps), client_keys, hparams),
        (None, 0, 0, 0, None),
        spec.parallelism,
        spec.chunk,
        spec.mesh,
    )
    clients = scatter(per_client, cohort_clients)
    drift_clients, clients = (clients, state.clients) if parts.drift is not None else ((), clients)
    weights, mask = data.count, data.count > 0
    train_loss = _honest_loss(local_metrics["train_loss"], weights, mask & ~malicious)
    shared = parts.personalizer.shared(state.params)
    if not jax.tree.leaves(shared):  # nothing leaves a client (local-only training): no server side
        return state._replace(round=state.round + 1, clients=clients), {"train_loss": train_loss}
    if spec.by_coordinate:
        deltas = mesh_lib.spread_coordinates(deltas, spec.mesh)
    if parts.privatizer is not None:
        deltas = jax.vmap(parts.privatizer)(deltas, jax.random.split(key_for(_PRIVACY), index.shape[0]))
    compressed, uploaded = state.compression, {}
    if parts.compressor is not None:
        deltas, states, sizes = compression.compress_cohort(
            parts.compressor, deltas, gather(state.compression), key_for(_COMPRESS), index
        )
        uploaded = jnp.sum(jnp.where(mask, sizes, 0.0))  # the bytes of the clients that sent
        if parts.drift is not None:  # SCAFFOLD's control-variate change travels beside the update, in float32
            uploaded = uploaded + drift.side_upload_bytes(parts.drift.method, shared, mask)
        compressed, uploaded = scatter(state.compression, states), {"uploaded_bytes": uploaded}
    aggregate = lambda u: parts.aggregator.aggregate(u, weights, mask, state.agg_state, key_for(_AGGREGATE))  # noqa: E731
    attack_context = _attack_context(spec, parts, state, data, aggregate)
    deltas = parts.attack.apply(deltas, malicious, key_for(_ATTACK), attack_context)
    if parts.drift is None:
        (update, agg_state, diagnostics), drift_state = aggregate(deltas), state.drift
    else:  # the drift's server step around the aggregator
        cohort = drift.Cohort(
            deltas, local_metrics["num_steps"], weights, mask, before, cohort_clients, spec.context.num_clients
        )
        (update, agg_state, diagnostics), drift_state = drift.server_round(
            parts.drift, state.drift, cohort, aggregate, drift_clients
        )
    update = mesh_lib.gather(update, spec.mesh)
    params, opt_state = server_step(parts, state, update)
    new_state = state._replace(params=params, server_opt_state=opt_state, agg_state=agg_state, round=state.round + 1)
    new_state = new_state._replace(clients=clients, drift=drift_state, compression=compressed)
    metrics = {
        "train_loss": train_loss,
        "update_norm": optax.global_norm(update),
        **_scalar_metrics(diagnostics),
        **uploaded,
    }
    if spec.poisson or spec.unreliable is not None:
        metrics["participants"] = jnp.sum(mask).astype(jnp.int32)
    return new_state, metrics


def _dispatch(spec: RoundSpec, parts: Components, hparams: LocalHParams, state: FedState, train: Any, clients: Array):
    """FedBuff: ``clients`` train on ``state.params`` (server version ``state.round``) with that version's keys,
    those synchronous round ``state.round`` would use. Returns ``(updates [S, ...], losses [S], bytes [S],
    compression)``: each update as it will be uploaded (compressed, when configured), and the population's
    compressor state after it."""
    version_key = jax.random.fold_in(state.key, state.round)
    key_for = lambda purpose: jax.random.fold_in(version_key, purpose)  # noqa: E731
    data = train.take(clients)
    labels = parts.attack.poison_labels(data.y, state.malicious[clients], spec.context.num_classes)
    deltas, _, local_metrics = map_clients(
        parts.personalizer.client_update,
        (state.params, (), (data.x, labels, data.count), per_client_keys(key_for(_LOCAL), clients), hparams),
        (None, 0, 0, 0, None),
        spec.parallelism,
        spec.chunk,
        spec.mesh,
    )
    sizes, compressed = jnp.zeros(clients.shape, jnp.float32), state.compression
    if parts.compressor is not None:
        rows = asynchronous.take_slots(state.compression, clients)
        deltas, rows, sizes = compression.compress_cohort(parts.compressor, deltas, rows, key_for(_COMPRESS), clients)
        compressed = asynchronous.put_slots(state.compression, clients, rows)
    return deltas, local_metrics["train_loss"], sizes, compressed


def fedbuff_start(spec: RoundSpec, parts: Components, hparams: LocalHParams, state: FedState, train: Any) -> FedState:
    """``state`` (before server step 0) with FedBuff's first ``M`` clients dispatched and trained on its model."""
    settings = spec.asynchronous
    medians_key, dispatch_key = jax.random.split(jax.random.fold_in(state.key, FEDBUFF_START))
    medians = unreliable.client_medians(medians_key, spec.context.num_clients, settings.client_latency_spread)
    in_flight = unreliable.fedbuff_init(
        dispatch_key, spec.context.num_clients, settings.concurrency, medians, settings.latency_spread
    )
    pending, losses, sizes, compressed = _dispatch(spec, parts, hparams, state, train, in_flight.client)
    flight = asynchronous.FedBuffState(in_flight, pending, losses, sizes, medians)
    return state._replace(asynchronous=flight, compression=compressed)


def fedbuff_step(
    spec: RoundSpec, parts: Components, hparams: LocalHParams, state: FedState, train: Any
) -> tuple[FedState, Metrics]:
    """One FedBuff server step (`medfed_jax.asynchronous`): the buffer's ``K`` arrivals, discounted by their
    staleness, through the attack, the aggregator and the server optimizer; then ``K`` idle clients dispatched
    and trained on the new model into the arrivals' slots."""
    settings, flight = spec.asynchronous, state.asynchronous
    round_key = jax.random.fold_in(state.key, state.round)
    key_for = lambda purpose: jax.random.fold_in(round_key, purpose)  # noqa: E731
    buffer, in_flight = unreliable.fedbuff_step(
        flight.in_flight,
        key_for(_ASYNC),
        spec.context.num_clients,
        settings.buffer_size,
        flight.median_latency,
        settings.latency_spread,
        settings.staleness_exponent,
    )
    data, malicious = train.take(buffer.clients), state.malicious[buffer.clients]
    weights, mask = data.count, data.count > 0
    arrived_loss, arrived_bytes = flight.train_loss[buffer.slots], flight.uploaded_bytes[buffer.slots]

    def aggregate(uploads):  # the server discounts what arrives by its staleness
        discounted = asynchronous.discounted(buffer, uploads)
        return parts.aggregator.aggregate(discounted, weights, mask, state.agg_state, key_for(_AGGREGATE))

    uploads = asynchronous.take_slots(flight.pending, buffer.slots)
    uploads = parts.attack.apply(
        uploads, malicious, key_for(_ATTACK), _attack_context(spec, parts, state, data, aggregate)
    )
    update, agg_state, diagnostics = aggregate(uploads)
    params, opt_state = server_step(parts, state, update)
    state = state._replace(params=params, server_opt_state=opt_state, agg_state=agg_state, round=state.round + 1)
    pending, losses, sizes, compressed = _dispatch(spec, parts, hparams, state, train, buffer.dispatched)
    flight = flight._replace(
        in_flight=in_flight,
        pending=asynchronous.put_slots(flight.pending, buffer.slots, pending),
        train_loss=flight.train_loss.at[buffer.slots].set(losses),
        uploaded_bytes=flight.uploaded_bytes.at[buffer.slots].set(sizes),
    )
    metrics = {
        "train_loss": _honest_loss(arrived_loss, weights, mask & ~malicious),
        "update_norm": optax.global_norm(update),
        "staleness": jnp.mean(buffer.staleness.astype(jnp.float32)),
        "virtual_time": in_flight.clock,
        **_scalar_metrics(diagnostics),
    }
    if parts.compressor is not None:
        metrics["uploaded_bytes"] = jnp.sum(arrived_bytes)
    return state._replace(asynchronous=flight, compression=compressed), metrics


def _switched(cfg: Any, switches: Switches, section: str, build: Callable, combine: Callable, hp: Any, index: Any):
    """The section's component, or a run-time switch (``index``) over the ``switches`` choices."""
    choices = dict(switches).get(f"{section}.name")
    if not choices:
        return build(cfg[section], hp)
    variants = [ml_collections.ConfigDict({**cfg[section].to_dict(), "name": name}) for name in choices]
    return combine([build(v, hp) for v in variants], index)


def _local_training(cfg: Any, spec: RoundSpec, hparams: HParams, max_count: int) -> tuple[LocalSpec, Any]:
    """The local spec for clients of ``max_count`` rows and the gradient (DP-SGD's under ``dpsgd``, else None)."""
    gradient_fn = privacy.build_gradient_fn(cfg.privacy, hparams.privacy)  # over per-example losses
    if gradient_fn is not None:
        gradient_fn = functools.partial(gradient_fn, example_loss_fn(spec.model))
    return LocalSpec.from_config(cfg.local, max_count), gradient_fn


def build_personalizer(cfg: Any, spec: RoundSpec, hparams: HParams, max_count: int) -> personalize.Personalizer:
    """The configured `Personalizer` for clients of ``max_count`` rows (DP-SGD's gradient under ``dpsgd``)."""
    local, gradient_fn = _local_training(cfg, spec, hparams, max_count)
    return personalize.build_personalizer(
        cfg.personalization, hparams.personalization, spec.model, local, gradient_fn, spec.parallelism, spec.chunk
    )


def build_components(
    cfg: Any, switches: Switches, spec: RoundSpec, hparams: HParams, choices: Choices, max_count: int
) -> Components:
    """The `Components` of a structural config ``cfg`` at these (traced) hparams and switch indices."""
    aggregator = privacy.build_central_aggregator(cfg.privacy, hparams.privacy, spec.context)
    if aggregator is None:
        build = aggregators.build_aggregator, aggregators.switch, hparams.aggregator, choices.aggregator
        aggregator = _switched(cfg, switches, "aggregator", *build)
    attack = _switched(cfg, switches, "attack", attacks.build_attack, attacks.switch, hparams.attack, choices.attack)
    method, drift_round = drift.build_drift(cfg.drift, cfg.local, hparams.local), None
    if method is not None:
        drift_round = drift.client_round(
            method, make_local_update(spec.model, *_local_training(cfg, spec, hparams, max_count))
        )
    return Components(
        personalizer=build_personalizer(cfg, spec, hparams, max_count),
        privatizer=privacy.build_client_privatizer(cfg.privacy, hparams.privacy),
        attack=attack,
        aggregator=aggregator,
        server_optimizer=make_server_optimizer(cfg.server.optimizer, hparams.server),
        drift=drift_round,
        compressor=compression.build_compressor(cfg.compression),
    )


def init(
    cfg: Any,
    switches: Switches,
    spec: RoundSpec,
    seed: Array,
    train: Any,
    hparams: HParams,
    choices: Choices = NO_CHOICES,
):
    """The `FedState` before round 0: the model from ``PRNGKey(seed)``, the run's malicious clients, personal state."""
    model_key, attack_key, run_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = spec.model.init(model_key, jnp.zeros((1, *train.feature_shape), jnp.float32))
    parts = build_components(cfg, switches, spec, hparams, choices, spec.block_rows(train))
    num_clients = spec.context.num_clients
    shared = parts.personalizer.shared(params)
    state = FedState(
        params=params,
        server_opt_state=parts.server_optimizer.init(shared),
        agg_state=parts.aggregator.init(shared),
        round=jnp.zeros((), jnp.int32),
        key=run_key,
        malicious=attacks.attack_mask(cfg.attack, attack_key, hparams.attack.fraction, num_clients),
        clients=parts.personalizer.init(params, num_clients),
        drift=() if parts.drift is None else parts.drift.method.init(shared, num_clients),
        compression=() if parts.compressor is None else compression.init_clients(parts.compressor, shared, num_clients),
    )
    return state if spec.asynchronous is None else fedbuff_start(spec, parts, hparams.local, state, train)


def _engine_round(cfg, switches, spec, state, train, hparams: HParams, choices: Choices = NO_CHOICES):
    parts = build_components(cfg, switches, spec, hparams, choices, spec.block_rows(train))
    step = round_step if spec.asynchronous is None else fedbuff_step
    return step(spec, parts, hparams.local, state, train)


def _run_rounds(step: Callable, state, train, hparams: HParams, num_rounds: int, choices: Choices = NO_CHOICES):
    return jax.lax.scan(lambda s, _: step(s, train, hparams, choices), state, None, length=num_rounds)


def _personal_params(cfg, spec, state, train, hparams: HParams, choices: Choices = NO_CHOICES):
    del choices
    personal = build_personalizer(cfg, spec, hparams, train.y.shape[1])
    key = jax.random.fold_in(jax.random.fold_in(state.key, state.round), _PERSONAL)
    return personal.personal_params(state.params, state.clients, train, key, hparams.local)


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
    as a `jax.lax.switch` branch, and ``choices.<section>`` (an int32 index
    into ``names``, traced) picks one at run time; ``cfg`` then lacks that
    field (`medfed_jax.config.split` with ``switches``). Sweeps use this to
    compile the aggregator x attack matrix once.

    ``mesh``: the ``'clients'`` mesh the cohort's local training is split over
    (`medfed_jax.mesh.client_mesh`, every selected device by default; a
    one-device mesh runs on one device). Outputs are replicated on it; place
    the data with `medfed_jax.mesh.put` (`medfed_jax.runner.place_data`).
    """
    mesh = mesh_lib.client_mesh(context.cohort_size) if mesh is None else (mesh if mesh.size > 1 else None)
    core = _round_functions(_without_schedule(cfg), context, switches, mesh)
    program = make_program(core.init, core.round_step, core.evaluate, cfg.rounds, cfg.eval_every, core.eval_params)
    return core._replace(program=jit_on(mesh)(program))


SCHEDULE = ("rounds", "eval_every")  # only a whole-run program depends on them


def _without_schedule(cfg: ml_collections.FrozenConfigDict) -> ml_collections.FrozenConfigDict:
    return ml_collections.FrozenConfigDict({k: v for k, v in cfg.items() if k not in SCHEDULE})


def round_spec(cfg: Any, context: config_lib.BuildContext, switches: Switches, mesh: jax.sharding.Mesh | None):
    """The `RoundSpec` of a structural config."""
    model = make_model(cfg.model.name, context.num_classes, tuple(cfg.model.widths))
    rules = dict(switches).get("aggregator.name") or (cfg.aggregator.name,)
    by_coordinate = cfg.privacy.mode not in privacy.SERVER_NOISE and not set(rules) <= MEANS  # see spread_coordinates
    own_keys = cfg.personalization.method == personalize.LOCAL_ONLY
    unreliable_spec = unreliable.Unreliable.from_config(cfg.unreliable, cfg.local)
    fedbuff = asynchronous.FedBuff.from_config(cfg.asynchronous, context.cohort_size)
    return RoundSpec(context, model, *default_parallelism(cfg), mesh, by_coordinate, own_keys, unreliable_spec, fedbuff)


@functools.lru_cache(maxsize=32)
def _round_functions(
    cfg: ml_collections.FrozenConfigDict,
    context: config_lib.BuildContext,
    switches: Switches,
    mesh: jax.sharding.Mesh | None,
) -> Engine:
    """The engine's jitted functions but ``program`` (None): shared by configs that differ in their schedule only."""
    unknown = [path for path, _ in switches if path not in SWITCHABLE]
    if unknown:
        raise ValueError(f"build_engine: {unknown} cannot be switched at run time; switchable: {SWITCHABLE}.")
    spec = round_spec(cfg, context, switches, mesh)
    step = functools.partial(_engine_round, cfg, switches, spec)
    if spec.own_keys:  # local-only: each client's model on its own test split and on every client's
        evaluate, eval_params = (
            make_evaluate_per_client_models(spec.model),
            functools.partial(_personal_params, cfg, spec),
        )
    elif cfg.personalization.method in personalize.PERSONAL_METHODS:
        evaluate = make_evaluate_personal(spec.model, spec.parallelism, spec.chunk)
        eval_params = functools.partial(_personal_params, cfg, spec)
    else:
        evaluate, eval_params = make_evaluate(spec.model, spec.parallelism, spec.chunk), global_params
    jit = jit_on(mesh)
    return Engine(
        init=jit(functools.partial(init, cfg, switches, spec)),
        round_step=jit(step),
        run_rounds=jit(functools.partial(_run_rounds, step), static_argnums=3),
        evaluate=jit(evaluate),
        program=None,
        context=context,
        eval_params=jit(eval_params),
        mesh=mesh,
    )

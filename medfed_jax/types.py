"""Pytree aliases and the small containers every part of medfed_jax shares.

Everything that varies per client lives on a leading *client axis* ``[C, ...]``.
Clients are padded to the largest one; ``count`` says how many rows are real,
and padding never enters a loss, a gradient, a metric or a weight. A
`Population` stores the same clients compactly (flat rows with per-client
offsets, see `medfed_jax.data.population`) for populations far larger than a
cohort.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PRNGKey = jax.Array
Params = Any  # a pytree of arrays (flax variables)
Updates = Any  # a pytree whose leaves carry a leading client axis [C, ...]
Metrics = dict[str, Array]


def per_client_keys(key: PRNGKey, clients: Array) -> Array:
    """``[C]`` keys ``fold_in(key, c)``, one per population index ``c`` in ``clients``: a client's key for one
    purpose does not depend on the cohort it was drawn into, nor on its slot."""
    return jax.vmap(lambda c: jax.random.fold_in(key, c))(clients)


def broadcast_to_clients(tree: Any, num_clients: int) -> Any:
    """``tree`` repeated along a new leading client axis ``[num_clients, ...]``."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients, *jnp.shape(x))), tree)


def hparams_of(cls: type, section: Any) -> Any:
    """A section's numeric settings ``cls`` (a NamedTuple, e.g. `medfed_jax.client.LocalHParams`) read from a
    config section: what a component built outside the engine uses (the engine passes traced ones)."""
    return cls(*(section[field] for field in cls._fields))


class ClientData(NamedTuple):
    """Stacked, padded client data.

    Attributes:
      x: ``[C, N_max, *feature_shape]`` float32 features.
      y: ``[C, N_max]`` int32 labels.
      count: ``[C]`` int32 number of real rows per client; rows at or past
        ``count[c]`` are padding.
    """

    x: Any
    y: Any
    count: Any

    @property
    def num_clients(self) -> int:
        return int(self.count.shape[0])

    @property
    def max_count(self) -> int:
        return int(self.y.shape[1])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[2:])

    def valid_mask(self):
        """``[C, N_max]`` bool: True on real rows, False on padding."""
        n_max = self.y.shape[1]
        xp = np if isinstance(self.count, np.ndarray) else jax.numpy
        return xp.arange(n_max)[None, :] < self.count[:, None]

    def take(self, index) -> ClientData:
        """The clients at ``index`` (an int array), padded as before."""
        return ClientData(self.x[index], self.y[index], self.count[index])


class Population(NamedTuple):
    """Clients stored flat: no padding (see `medfed_jax.data.population`).

    Attributes:
      x: ``[R, *feature_shape]`` float32 features, every client's rows back to back.
      y: ``[R]`` int32 labels.
      offset: ``[C]`` int32 first row of each client in ``x``/``y``.
      count: ``[C]`` int32 number of rows of each client (at least 0).
    """

    x: Any
    y: Any
    offset: Any
    count: Any

    @property
    def num_clients(self) -> int:
        return int(self.count.shape[0])

    @property
    def total_rows(self) -> int:
        return int(self.y.shape[0])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


class GeneratedPopulation(NamedTuple):
    """Linear-teacher clients generated on device from per-client keys: no stored rows.

    Row ``j`` of client ``c``'s split ``s`` (0 train, 1 test) is the ``j``-th
    row of ``normal(fold_in(fold_in(key, s), c), (n, F))`` (a prefix of the
    client's own stream, whatever ``n``), labelled ``argmax(x @ teacher)``
    (`medfed_jax.data.population.generate`).

    Attributes:
      key: the population's PRNG key (raw ``uint32[2]``).
      teacher: ``[F, num_classes]`` float32 teacher weights.
      count: ``[C]`` int32 training rows per client.
    """

    key: Any
    teacher: Any
    count: Any

    @property
    def num_clients(self) -> int:
        return int(self.count.shape[0])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.teacher.shape[:1])


@dataclasses.dataclass(frozen=True)
class FederatedDataset:
    """Train and test data of one federation, with client names.

    ``train`` is padded `ClientData`, a flat `Population` or a
    `GeneratedPopulation`. ``test`` (always
    `ClientData`) holds the test splits of the evaluated clients: every client
    (``eval_clients is None``; client ``c``'s own test split is ``test`` row
    ``c``) or the population indices ``eval_clients`` (a seeded sample of a
    huge population, `medfed_jax.data.population.store`). The pooled test set
    is all real test rows.
    """

    name: str
    train: ClientData | Population | GeneratedPopulation
    test: ClientData
    client_names: tuple[str, ...]
    num_classes: int
    info: dict = dataclasses.field(default_factory=dict, compare=False)
    eval_clients: np.ndarray | None = dataclasses.field(default=None, compare=False)

    @property
    def eval_names(self) -> tuple[str, ...]:
        """Names of the clients on ``test``'s client axis."""
        if self.eval_clients is None:
            return self.client_names
        return tuple(self.client_names[c] for c in self.eval_clients)

    @property
    def num_clients(self) -> int:
        return self.train.num_clients

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self.train.feature_shape


def no_state(params: Params) -> tuple:
    """The state of a stateless component (aggregator, compressor): none, whatever the model."""
    del params
    return ()


def no_precondition(num_clients: int) -> None:
    """A rule that runs on any number of clients."""
    del num_clients


class Aggregator(NamedTuple):
    """A robust (or plain) aggregation rule, as a pair of pure functions.

    ``init(params) -> agg_state``.
    ``aggregate(updates, weights, mask, agg_state, key) -> (update, agg_state,
    diagnostics)``: ``updates`` has leaves ``[C, ...]``, ``weights`` is ``[C]``
    (sample counts), ``mask`` is ``[C]`` bool (which clients took part). A
    masked-out client must not influence any output. ``diagnostics`` is a dict
    of arrays whose keys and shapes do not depend on the data. The rules of
    `medfed_jax.aggregators` default all but ``updates``
    (`medfed_jax.aggregators.make_aggregator`); the engine passes all five.
    ``check(n)`` raises a ValueError naming the bound when the rule cannot
    run on ``n`` clients.
    """

    init: Callable[[Params], Any]
    aggregate: Callable[..., tuple[Params, Any, Metrics]]
    check: Callable[[int], None] = no_precondition


class AttackContext(NamedTuple):
    """What an attacker may know in a round (omniscient threat model).

    Attributes:
      weights: ``[C]`` sample counts of the clients in the round.
      mask: ``[C]`` bool, clients that take part this round.
      num_classes: number of label classes (static).
      aggregate: ``updates -> update``, the round's aggregator (its state and
        key included), for attacks adapted to the rule in use; None outside
        the engine.
      step: ``update -> params``, the global parameters after the server
        optimizer applies an aggregate; None outside the engine.
      loss: ``(params, clients) -> scalar``, the mean loss over the training
        rows of the ``[C]`` bool ``clients`` this round; None outside the engine.
    """

    weights: Array
    mask: Array
    num_classes: int
    aggregate: Callable[[Any], Any] | None = None
    step: Callable[[Any], Params] | None = None
    loss: Callable[[Params, Array], Array] | None = None


class Attack(NamedTuple):
    """Byzantine behaviour as pure functions over the stacked client axis.

    ``apply(updates, malicious, key, context) -> updates`` replaces the rows of
    malicious clients (``malicious`` is ``[C]`` bool) after local training
    (model poisoning). ``poison_labels(y, malicious, num_classes) -> y``
    rewrites the labels ``[C, N]`` of malicious clients before local training
    (data poisoning). The attacks of `medfed_jax.attacks` default ``key`` and
    ``context`` (`medfed_jax.attacks.make_attack`); the engine passes both.
    """

    apply: Callable[..., Updates]
    poison_labels: Callable[..., Array]


class Model(NamedTuple):
    """A model as two pure functions; the engine never sees how it is written.

    ``init(key, example_x) -> params`` where ``example_x`` is one batch
    ``[B, *feature_shape]``; ``apply(params, x) -> logits [B, num_classes]``.
    """

    init: Callable[[PRNGKey, Array], Params]
    apply: Callable[[Params, Array], Array]

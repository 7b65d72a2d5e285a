"""Run configuration: defaults, validation, and the split into static settings, hparams and choices.

A config is an ``ml_collections.ConfigDict`` with one section per part
(``data``, ``model``, ``local``, ``server``, ``aggregator``, ``attack``,
``privacy``, ``personalization``, ``unreliable``, ``drift``, ``compression``, ``asynchronous``) plus top-level
run settings. Each part's module owns its section:
it provides ``default_config()``, ``validate_config(section, context)`` and,
beside them, a NamedTuple of the section's *numeric* fields (`HPARAMS`: e.g.
`medfed_jax.client.LocalHParams`), whose fields are the list of them.

`split` gives the three views a program needs: ``static``, the structural
fields (frozen, hashable: changing one changes shapes or code and compiles a
new program); ``hparams``, an `HParams` pytree of float32 scalars (learning
rates, noise multiplier, attacker fraction, ...), traced into the program, so
sweeping them never recompiles (sweeps vmap it); and ``choices``, the int32
indices of the run-time switches (`Choices`).

Each field's meaning is the comment on the line that sets its default
(`field_docs` reads them; ``python -m medfed_jax --help`` prints them with the
defaults, and a test requires one for every field). `check_fields` refuses a
config with a field `default_config` lacks ("did you mean"), a value of
another kind than the default's, or an integer outside ``[0, 2**31 - 1]``
(seeds: ``[0, 2**32 - 1]``); the sections' validators then check the ranges
that depend on meaning (``rounds >= 1``, ...).
"""

from __future__ import annotations

import difflib
import functools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from medfed_jax import (
    aggregators,
    asynchronous,
    attacks,
    client,
    compression,
    drift,
    personalize,
    privacy,
    server_optimizer,
    unreliable,
)
from medfed_jax.client import CLIENT_OPTIMIZERS

MODELS = ("logistic", "mlp", "cnn")
PARALLELISM = ("auto", "vmap", "map")
COHORT_SAMPLINGS = ("fixed", "poisson")

INT_MAX = 2**31 - 1  # integer fields size loops and arrays (int32 on the device)
SEED_MAX = 2**32 - 1  # seeds are uint32
SEED_FIELDS = ("seed", "data.seed")
OPTIONAL_SEEDS = ("data.seed",)  # None (the default) follows the run seed
FREE_FORM = ("sweep",)  # sections checked by their own parser (`medfed_jax.sweep.SWEEP_FIELDS`)
HOST_ONLY = ("sweep", "seed", "name", "baselines")  # run-level fields that never change a program


class BuildContext(NamedTuple):
    """Facts about the data that validation and component builders need."""

    num_clients: int
    cohort_size: int
    num_classes: int
    feature_shape: tuple[int, ...]
    cohort_cap: int = 0  # rows per client of a flat population's cohort block (0: padded storage)
    sampling_rate: float = 0.0  # Poisson cohorts: each client's probability per round (0: fixed-size cohorts)
    dropout: float = 0.0  # unreliable.dropout: a sampled client's probability of not sending

    @property
    def expected_cohort(self) -> float:
        """Clients expected per round: ``q C`` under Poisson sampling, else ``cohort_size``."""
        return self.sampling_rate * self.num_clients if self.sampling_rate else float(self.cohort_size)

    @property
    def expected_senders(self) -> float:
        """Updates expected per round: `expected_cohort` times ``1 - dropout`` (each sampled client sends or not)."""
        return self.expected_cohort * (1.0 - self.dropout)


def model_config() -> ml_collections.ConfigDict:
    """Model choice."""
    return ml_collections.ConfigDict(
        dict(
            name="mlp",  # one of MODELS
            widths=(200, 200),  # mlp: hidden layer widths
        )
    )


def sections() -> dict[str, Callable[[], ml_collections.ConfigDict]]:
    """Each config section and the function that makes its defaults (owned by the part's module)."""
    from medfed_jax import data as data_lib

    return {
        "data": data_lib.default_config,
        "model": model_config,
        "local": client.default_config,
        "server": server_optimizer.default_config,
        "aggregator": aggregators.default_config,
        "attack": attacks.default_config,
        "privacy": privacy.default_config,
        "personalization": personalize.default_config,
        "unreliable": unreliable.default_config,
        "drift": drift.default_config,
        "compression": compression.default_config,
        "asynchronous": asynchronous.default_config,
    }


def default_config() -> ml_collections.ConfigDict:
    """Run settings: every field a run understands, with sensible defaults."""
    cfg = ml_collections.ConfigDict()
    cfg.name = "run"  # a label for the run (tables, sweep.json)
    cfg.seed = 0  # training seed: initialisation, batches, cohorts, noise; in [0, 2**32)
    cfg.rounds = 50  # federated rounds to train
    cfg.eval_every = 10  # rounds between evaluations (and checkpoints)
    cfg.cohort_size = 0  # clients per round; 0 = every client takes part in every round
    cfg.cohort_sampling = "fixed"  # one of COHORT_SAMPLINGS: cohort_size clients per round, or each with prob. q
    cfg.sampling_rate = 0.0  # cohort_sampling='poisson': probability q in (0, 1] that a client takes part
    cfg.max_cohort = 0  # poisson: client slots per round (a larger cohort is cut at random); 0 = all clients
    cfg.client_parallelism = "auto"  # 'vmap' (all at once), 'map' (chunks), 'auto'
    cfg.client_chunk = 0  # clients per vmapped chunk under 'map'; 0 = backend default
    cfg.baselines = ("local_only", "pooled")  # methods run beside federated: local_only, pooled, personalised ones
    for name, make in sections().items():
        cfg[name] = make()
    cfg.sweep = ml_collections.ConfigDict()  # a sweep (grid, cells, ...; see medfed_jax.sweep); empty = one run
    return cfg


def leaf_values(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{'local.lr': 0.05, ...}``: every field of a config, the free-form sections (`FREE_FORM`) aside."""
    leaves: dict[str, Any] = {}
    for key, value in cfg.items():
        if not prefix and key in FREE_FORM:
            continue
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            leaves.update(leaf_values(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def unknown_field(path: str, known: Any) -> str:
    """The message for a field that does not exist, with the closest known fields."""
    close = difflib.get_close_matches(path, list(known), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"config field {path!r} does not exist; {hint}Every field: python -m medfed_jax --help"


def kind_of(default: Any) -> str:
    """How a field of this default is described in messages ("an integer", "a number", ...)."""
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a string"
    if isinstance(default, (tuple, list)):
        return "a tuple"
    return "a Python literal"


def _has_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(default, int):
        return isinstance(value, (int, np.integer))
    if isinstance(default, float):
        return isinstance(value, (int, float, np.integer, np.floating))
    if isinstance(default, str):
        return isinstance(value, str)
    return isinstance(value, (tuple, list))


def check_value(path: str, value: Any, default: Any) -> None:
    """Refuse a value of the wrong kind for ``path`` (kind of ``default``), or an integer out of range."""
    if path in OPTIONAL_SEEDS:
        if value is None:
            return
        default = 0  # else a seed like any other
    if not _has_kind(value, default):
        quoted = isinstance(value, str) and not isinstance(default, str)
        fix = "write it without quotes" if quoted else f"e.g. {path}={default!r}"
        raise ValueError(f"{path}={value!r} is a {type(value).__name__}, but {path} takes {kind_of(default)}; {fix}.")
    if isinstance(default, int) and not isinstance(default, bool):
        high = SEED_MAX if path in SEED_FIELDS else INT_MAX
        if not 0 <= value <= high:
            bound = "seeds are integers in [0, 2**32 - 1]" if path in SEED_FIELDS else f"it takes [0, {high}]"
            raise ValueError(f"{path}={value!r} is out of range: {bound}; e.g. {path}={default!r}.")


@functools.cache
def _default_leaves() -> dict[str, Any]:
    return leaf_values(default_config())  # immutable values (numbers, strings, tuples); read, never changed


def check_fields(cfg: Any) -> None:
    """Refuse fields that `default_config` lacks ("did you mean"), values of the wrong kind, integers out of range."""
    defaults, given = _default_leaves(), leaf_values(cfg)
    for path in given:
        if path not in defaults:
            inside = [p for p in defaults if p.startswith(f"{path}.")]
            if inside:
                raise ValueError(f"{path} is a config section, not a value; set its fields, e.g. {inside[0]}.")
            raise ValueError(unknown_field(path, defaults))
    missing = [p for p in defaults if p not in given]
    if missing:
        raise ValueError(
            f"the config lacks the fields {missing[:4]}{' ...' if len(missing) > 4 else ''}; build it from "
            "medfed_jax.config.default_config() and change what you need."
        )
    for path, value in given.items():
        check_value(path, value, defaults[path])


HPARAMS: dict[str, type] = {  # section -> the NamedTuple of its numeric fields, declared beside its default_config
    "local": client.LocalHParams,
    "server": server_optimizer.ServerHParams,
    "aggregator": aggregators.AggregatorHParams,
    "attack": attacks.AttackHParams,
    "privacy": privacy.PrivacyHParams,
    "personalization": personalize.PersonalizationHParams,
}
HParams = NamedTuple("HParams", list(HPARAMS.items()))
HParams.__doc__ = "Every numeric (traced) setting of a run, one NamedTuple per section (a pytree; sweeps vmap it)."


def numeric_fields() -> tuple[str, ...]:
    """Dotted paths of every numeric (traced) config field: the fields of each section's NamedTuple."""
    return tuple(f"{section}.{f}" for section, cls in HPARAMS.items() for f in cls._fields)


class Choices(NamedTuple):
    """The run-time switches' int32 indices (see `medfed_jax.server.build_engine`); 0 where nothing is switched."""

    aggregator: Any = np.int32(0)  # index into the switched aggregator names
    attack: Any = np.int32(0)  # index into the switched attack names

    @classmethod
    def of(cls, index: dict[str, int]) -> Choices:
        """From ``{'aggregator.name': i, ...}``, the switched paths' indices."""
        return cls(**{path.split(".")[0]: np.int32(i) for path, i in index.items()})


NO_CHOICES = Choices()  # what an engine without switches is called with


class Split(NamedTuple):
    """A config as a program sees it (`split`)."""

    static: ml_collections.FrozenConfigDict
    hparams: HParams
    choices: Choices


def _static(cfg: Any, switched: Sequence[str]) -> ml_collections.FrozenConfigDict:
    """The structural fields: each section's fields but its numeric ones and the ``switched`` ones."""
    numeric, plain = set(numeric_fields()) | set(switched), {}
    for key, value in cfg.items():
        if key in HOST_ONLY:
            continue
        if isinstance(value, ml_collections.ConfigDict):
            value = {k: v for k, v in value.to_dict().items() if f"{key}.{k}" not in numeric}
        plain[key] = value
    return ml_collections.FrozenConfigDict(plain)


def split(cfg: Any, switches: Sequence[tuple[str, Sequence[str]]] = ()) -> Split:
    """``(static, hparams, choices)`` of a config; see the module docstring.

    ``switches``: ``(('aggregator.name', names), ...)``, the structural choices
    a program picks at run time (`medfed_jax.server.build_engine`): they leave
    ``static`` and their index into ``names`` is in ``choices``. Reading a
    numeric field from ``static`` fails loudly, so code inside a program sees
    numbers only through ``hparams``. The scalars are placed with
    `jax.device_put`, which compiles nothing (``jnp.asarray`` of a Python
    float compiles a small conversion program).
    """
    put = lambda value: jax.device_put(np.float32(float(value)))  # noqa: E731
    hparams = HParams(**{s: cls(*(put(cfg[s][f]) for f in cls._fields)) for s, cls in HPARAMS.items()})
    choices = Choices.of({path: list(names).index(get_path(cfg, path)) for path, names in switches})
    return Split(_static(cfg, [path for path, _ in switches]), hparams, choices)


def filled_hparams(leaf: Any) -> HParams:
    """An `HParams` whose every leaf is ``leaf`` (e.g. a `jax.ShapeDtypeStruct` to compile for)."""
    return HParams(**{section: cls(*(leaf for _ in cls._fields)) for section, cls in HPARAMS.items()})


def get_path(cfg: Any, path: str) -> Any:
    """``get_path(cfg, 'local.lr')`` is ``cfg.local.lr``."""
    for part in path.split("."):
        cfg = cfg[part]
    return cfg


def set_path(cfg: Any, path: str, value: Any) -> None:
    """``set_path(cfg, 'local.lr', 0.1)`` sets ``cfg.local.lr = 0.1``."""
    *parents, leaf = path.split(".")
    for part in parents:
        cfg = cfg[part]
    cfg[leaf] = value


def _positive(name: str, value: Any, fix: str = "") -> None:
    if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number > 0.{' ' + fix if fix else ''}")


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; choose one of {choices}.")


def validate_run_settings(cfg: Any, num_clients: int) -> None:
    """Check the fields (`check_fields`), then the top-level, model, local and server settings."""
    check_fields(cfg)
    if not isinstance(cfg.rounds, int) or cfg.rounds < 1:
        raise ValueError(f"rounds={cfg.rounds!r} must be an integer >= 1.")
    if not isinstance(cfg.eval_every, int) or cfg.eval_every < 1:
        raise ValueError(f"eval_every={cfg.eval_every!r} must be an integer >= 1.")
    if not isinstance(cfg.cohort_size, int) or cfg.cohort_size < 0:
        raise ValueError(f"cohort_size={cfg.cohort_size!r} must be 0 (all clients) or a positive integer.")
    if cfg.cohort_size > num_clients:
        raise ValueError(
            f"cohort_size={cfg.cohort_size} is larger than the population of {num_clients} "
            f"clients; use cohort_size <= {num_clients} (or 0 for all)."
        )
    _one_of("cohort_sampling", cfg.cohort_sampling, COHORT_SAMPLINGS)
    q = cfg.sampling_rate
    if cfg.cohort_sampling == "poisson":
        if not 0 < q <= 1:
            raise ValueError(f"sampling_rate={q!r} must lie in (0, 1] with cohort_sampling='poisson', e.g. 0.1.")
        if cfg.cohort_size:
            raise ValueError(
                f"cohort_size={cfg.cohort_size} with cohort_sampling='poisson': the cohort's size is random "
                "(sampling_rate x clients expected); set cohort_size=0 and max_cohort for the slots."
            )
    elif q or cfg.max_cohort:
        raise ValueError(
            f"sampling_rate={q!r} / max_cohort={cfg.max_cohort!r} apply to cohort_sampling='poisson' only "
            "(it is 'fixed'); set them to 0, or cohort_sampling='poisson'."
        )
    _one_of("client_parallelism", cfg.client_parallelism, PARALLELISM)
    if not isinstance(cfg.client_chunk, int) or cfg.client_chunk < 0:
        raise ValueError(f"client_chunk={cfg.client_chunk!r} must be 0 (default) or a positive integer.")
    _one_of("model.name", cfg.model.name, MODELS)
    widths = cfg.model.widths
    whole = all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) and 1 <= w <= INT_MAX for w in widths)
    if cfg.model.name == "mlp" and (not widths or not whole):
        raise ValueError(f"model.widths={widths!r} must be a non-empty tuple of integer widths >= 1, e.g. (64,).")
    local = cfg.local
    _one_of("local.optimizer", local.optimizer, CLIENT_OPTIMIZERS)
    _one_of("local.sampling", local.sampling, ("shuffle", "fixed", "poisson"))
    if not isinstance(local.batch_size, int) or local.batch_size <= 0:
        raise ValueError(f"local.batch_size={local.batch_size!r} must be a positive integer.")
    if (local.epochs > 0) == (local.steps > 0):
        raise ValueError(
            f"set exactly one of local.epochs ({local.epochs}) and local.steps ({local.steps}) "
            "to a positive integer and the other to 0."
        )
    if local.sampling == "shuffle" and local.steps > 0:
        raise ValueError("local.sampling='shuffle' walks epochs; with local.steps use 'fixed' or 'poisson'.")
    if local.sampling != "shuffle" and local.epochs > 0:
        raise ValueError(
            f"local.sampling={local.sampling!r} draws a batch per step; set local.steps, not local.epochs."
        )
    _positive("local.lr", local.lr, "Try 0.01 to 0.1 for SGD.")
    if not 0 <= local.momentum < 1:
        raise ValueError(f"local.momentum={local.momentum!r} must lie in [0, 1).")
    if not local.prox_mu >= 0:
        raise ValueError(f"local.prox_mu={local.prox_mu!r} must be >= 0 (0 disables FedProx).")
    server_optimizer.validate_config(cfg.server)


def cohort_slots(cfg: Any, num_clients: int) -> int:
    """Clients trained per round (a shape): ``cohort_size``, ``max_cohort`` under Poisson, or all (when 0)."""
    size = cfg.max_cohort if cfg.cohort_sampling == "poisson" else cfg.cohort_size
    return size or num_clients


def check_max_cohort(cfg: Any, num_clients: int) -> None:
    """Refuse Poisson slots outside ``[ceil(q C), C]``: fewer slots than the expected cohort cut most rounds.

    (The privacy cost of truncation is accounted in `medfed_jax.privacy`, which
    also refuses slots too few for its RDP truncation bound.)
    """
    if cfg.cohort_sampling != "poisson" or not cfg.max_cohort:
        return
    low = math.ceil(cfg.sampling_rate * num_clients)
    if not low <= cfg.max_cohort <= num_clients:
        raise ValueError(
            f"max_cohort={cfg.max_cohort} must lie in [{low}, {num_clients}]: at least the expected cohort "
            f"(sampling_rate x clients = {cfg.sampling_rate * num_clients:g}), at most the {num_clients} "
            "clients; 0 keeps a slot for every client (no truncation)."
        )


def validate(cfg: Any, context: BuildContext) -> None:
    """Validate a whole config against the data it will run on.

    Raises ValueError naming the field and the fix, before anything compiles.
    """
    validate_run_settings(cfg, context.num_clients)
    check_max_cohort(cfg, context.num_clients)
    asynchronous.validate_config(cfg, context)
    aggregated = asynchronous.aggregation_context(cfg, context)  # a FedBuff step aggregates its buffer
    aggregators.validate_config(cfg.aggregator, aggregated)
    attacks.validate_config(cfg.attack, aggregated)
    privacy.validate_config(cfg.privacy, context)
    personalize.validate_config(cfg.personalization, context)
    unreliable.validate_config(cfg.unreliable, cfg.local)
    drift.validate_config(cfg.drift, cfg.local, cfg.privacy.mode, cfg.personalization.method)
    compression.validate_config(cfg.compression)


def to_json(cfg: Any) -> str:
    """A canonical JSON rendering (sorted keys), used to compare workdirs."""
    return json.dumps(json_safe(cfg.to_dict()), sort_keys=True, indent=2)


def json_safe(value: Any) -> Any:
    """Nested dicts and lists with non-finite floats as strings ("inf", "nan"): strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value

"""A whole run as programs: the evaluation schedule, chunks of rounds with a traced length, one program per run.

Every function here takes a ``round_step(state, train, hparams, choices) ->
(state, metrics)`` and an ``evaluate`` (`medfed_jax.server.Engine`) and adds
no wiring of its own: `make_chunk` is what the host loop of `medfed_jax.runner`
calls, `make_program` what sweeps vmap.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medfed_jax import mesh as mesh_lib
from medfed_jax.config import NO_CHOICES, Choices, HParams
from medfed_jax.types import Array, ClientData, Metrics


def global_params(state: Any, train: ClientData, hparams: HParams, choices: Choices = NO_CHOICES) -> Any:
    """What an engine without personal models evaluates: ``state.params``."""
    del train, hparams, choices
    return state.params


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


def advance(
    round_step: Callable,
    state: Any,
    train: ClientData,
    hparams: HParams,
    num_rounds: Array,
    choices: Choices = NO_CHOICES,
):
    """``num_rounds`` (traced, >= 1) rounds of ``round_step``; returns (state, the last round's metrics).

    A loop with a traced trip count: one compiled program trains chunks of any length.
    """
    step = lambda state: round_step(state, train, hparams, choices)  # noqa: E731
    _, like = jax.eval_shape(step, state)
    metrics = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), like)
    return jax.lax.fori_loop(0, num_rounds, lambda _, carry: step(carry[0]), (state, metrics))


def make_chunk(round_step: Callable, evaluate: Callable, eval_params: Callable = global_params) -> Callable:
    """``chunk(state, train, test, hparams, num_rounds, choices=NO_CHOICES) -> (state, metrics)``: one evaluation chunk.

    `advance` ``num_rounds`` rounds, then ``evaluate(eval_params(state, train,
    hparams, choices), test)``; the metrics are the last round's training
    metrics and the evaluation. What a whole-run program scans and the host
    loop of `medfed_jax.runner` calls.
    """

    def chunk(
        state: Any,
        train: ClientData,
        test: ClientData,
        hparams: HParams,
        num_rounds: Array,
        choices: Choices = NO_CHOICES,
    ):
        state, metrics = advance(round_step, state, train, hparams, num_rounds, choices)
        return state, {**metrics, **evaluate(eval_params(state, train, hparams, choices), test)}

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

    Returns ``program(seed, train, test, hparams, choices=NO_CHOICES) -> history`` whose leaves have a
    leading axis of ``len(eval_rounds(rounds, eval_every))`` evaluations (see
    `make_chunk`): exactly ``rounds`` rounds, the last chunk shorter when
    ``eval_every`` does not divide ``rounds``.
    """
    chunk = make_chunk(round_step, evaluate, eval_params)
    lengths = np.asarray(chunk_lengths(rounds, eval_every), np.int32)

    def program(
        seed: Array, train: ClientData, test: ClientData, hparams: HParams, choices: Choices = NO_CHOICES
    ) -> Metrics:
        step = lambda state, num_rounds: chunk(state, train, test, hparams, num_rounds, choices)  # noqa: E731
        _, history = jax.lax.scan(step, init(seed, train, hparams, choices), lengths)
        return history

    return program


def jit_on(mesh: jax.sharding.Mesh | None) -> Callable:
    """`jax.jit`, with outputs replicated on ``mesh`` (readable by every process)."""
    return jax.jit if mesh is None else functools.partial(jax.jit, out_shardings=mesh_lib.replicated(mesh))

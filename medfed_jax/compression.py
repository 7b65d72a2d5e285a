"""Compressed client uploads as pure functions of one client's update (the caller vmaps).

Each compressor is a factory returning `Compressor(name, init, compress)`,
optax's init/apply shape:

- ``init(params) -> state``: one client's state (``()`` for stateless ones;
  error feedback's residual otherwise). Stacked on a leading client axis it is
  per-client state like personalisation's ``FedState.clients``
  (`init_clients`).
- ``compress(update, state, key) -> (sent, state, bytes)``: ``sent`` is what
  the server decodes (same tree, shapes and float32 dtype as ``update``),
  ``bytes`` the float32 scalar size of the message on the wire (exact below
  2**24 bytes). Jittable and vmappable over the client axis
  (`compress_clients`); randomness only from ``key``.

Compressors:

- ``identity()``: float32 transport, 4 bytes per coordinate.
- ``bfloat16()``: each coordinate rounded to bfloat16 (round to nearest even)
  and back; 2 bytes per coordinate.
- ``stochastic_quantization(bits, per_tensor, norm)``: QSGD (Alistarh et al.
  2017, "QSGD: Communication-Efficient SGD via Gradient Quantization and
  Encoding"). With ``s = 2**(bits - 1) - 1`` magnitude levels and a scale
  ``m`` (the L2 norm, as in the paper, or the max norm), each coordinate is
  sent as ``sign(v) m l / s`` where ``l = floor(s |v| / m) + Bernoulli(frac)``
  (``frac`` the fractional part), so ``E[sent] = v`` (unbiased) and
  ``Var[sent_i] = (m / s)**2 frac (1 - frac) <= m**2 / (4 s**2)``. The scale
  is per tensor (per leaf) or one per client. Bytes: ``bits`` per coordinate
  (one sign bit, ``bits - 1`` level bits, fixed width: no Elias coding) plus
  32 per scale.
- ``top_k(fraction)``: per leaf of ``d`` coordinates the ``k = ceil(fraction d)``
  of largest magnitude (ties: lower index), the others zero; biased, so use it
  under `error_feedback`. Bytes: ``k (32 + ceil(log2 d))`` bits per leaf
  (float32 values and fixed-width indices).
- ``error_feedback(inner)`` (Stich et al. 2018, "Sparsified SGD with Memory";
  Karimireddy et al. 2019, "Error Feedback Fixes SignSGD and other Gradient
  Compression Schemes"): the client compresses ``p = update + residual`` and
  keeps ``residual <- p - sent``, so what is not sent now is sent later:
  ``sent + new residual == update + old residual`` (to the one float32
  rounding of ``p``; for top-k, whose sent and residual coordinates are
  disjoint, exactly ``p``).

Each message's bytes are rounded up to whole bytes. A dropped client sends
nothing: the round multiplies ``bytes`` by its mask (see
`medfed_jax.unreliable`).

In the engine (config section ``compression``, `default_config`;
`build_compressor`): each sent update is compressed after local training and
local DP, before the attack and the aggregator; the per-client state (error
feedback's residual) lives in ``FedState.compression`` ``[N, ...]``, and the
round reports ``uploaded_bytes``, the bytes the clients that sent uploaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from medfed_jax.types import Array, Params, PRNGKey, broadcast_to_clients, no_state, per_client_keys

FLOAT_BITS = 32  # a float32 value (top-k values, quantisation scales)
NORMS = ("l2", "max")
COMPRESSORS = ("none", "float32", "bfloat16", "qsgd", "top_k")


def default_config() -> ml_collections.ConfigDict:
    """Compression of client uploads (structural settings; 'none' skips the hook, no uploaded_bytes metric)."""
    return ml_collections.ConfigDict(
        dict(
            method="none",  # one of COMPRESSORS: none, float32 (counts bytes only), bfloat16, qsgd, top_k
            bits=4,  # qsgd: bits per coordinate in [2, 16] (one sign bit, bits - 1 level bits)
            norm="l2",  # qsgd: the scale, one of NORMS
            per_tensor=True,  # qsgd: one scale per leaf (true) or per client (false)
            fraction=0.1,  # top_k: the fraction in (0, 1] of each leaf's coordinates sent
            error_feedback=False,  # keep each client's unsent residual and add it to its next update
        )
    )


def validate_config(cfg: Any) -> None:
    """Refuse unknown compressors and out-of-range settings (one line each)."""
    if cfg.method not in COMPRESSORS:
        raise ValueError(f"compression.method={cfg.method!r} is unknown; choose one of {COMPRESSORS}.")
    if cfg.method == "qsgd":
        if not 2 <= cfg.bits <= 16:
            raise ValueError(f"compression.bits={cfg.bits!r} must lie in [2, 16] for qsgd; e.g. compression.bits=4.")
        if cfg.norm not in NORMS:
            raise ValueError(f"compression.norm={cfg.norm!r} is unknown; choose one of {NORMS}.")
    if cfg.method == "top_k" and not 0 < cfg.fraction <= 1:
        raise ValueError(f"compression.fraction={cfg.fraction!r} must lie in (0, 1]; e.g. compression.fraction=0.1.")
    if cfg.error_feedback and cfg.method == "none":
        raise ValueError("compression.error_feedback=True with compression.method='none': choose a compressor.")


def build_compressor(cfg: Any) -> Compressor | None:
    """The configured compressor (with error feedback when set), or None for ``'none'`` (the round skips it)."""
    if cfg.method == "none":
        return None
    inner = {
        "float32": identity,
        "bfloat16": bfloat16,
        "qsgd": lambda: stochastic_quantization(cfg.bits, cfg.per_tensor, cfg.norm),
        "top_k": lambda: top_k(cfg.fraction),
    }[cfg.method]()
    return error_feedback(inner) if cfg.error_feedback else inner


class Compressor(NamedTuple):
    """A compressor of one client's update; see the module docstring for the contract."""

    name: str
    init: Callable[[Params], Any]
    compress: Callable[[Params, Any, PRNGKey], tuple[Params, Any, Array]]


def _message_bytes(bits: int) -> Array:
    """Whole bytes of a ``bits``-bit message, as the float32 scalar every compressor returns."""
    return jnp.asarray(-(-bits // 8), jnp.float32)


def _sizes(update: Params) -> list[int]:
    return [math.prod(leaf.shape) for leaf in jax.tree.leaves(update)]


def identity() -> Compressor:
    """Full-precision float32 transport: sends ``update`` as it is, 4 bytes per coordinate."""

    def compress(update, state, key):
        del key
        return update, state, _message_bytes(FLOAT_BITS * sum(_sizes(update)))

    return Compressor("none", no_state, compress)


def bfloat16() -> Compressor:
    """bfloat16 transport: each float32 coordinate rounded to nearest-even bfloat16 and decoded; 2 bytes each."""

    def compress(update, state, key):
        del key
        sent = jax.tree.map(lambda u: u.astype(jnp.bfloat16).astype(u.dtype), update)
        return sent, state, _message_bytes(16 * sum(_sizes(update)))

    return Compressor("bfloat16", no_state, compress)


def _check_bits(bits: Any) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(
            f"stochastic_quantization: bits={bits!r} must be an integer in [2, 16] (one sign bit and at least "
            "one level bit; 2 is ternary {-m, 0, m}); use bfloat16() for 16-bit floats."
        )


def _scale(leaves: list[Array], norm: str) -> Array:
    """The QSGD scale of the coordinates in ``leaves``: their L2 norm or their largest magnitude."""
    if norm == "l2":
        return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in leaves))
    return jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)) for leaf in leaves]))


def _quantize(v: Array, scale: Array, levels: int, key: PRNGKey) -> Array:
    """``sign(v) scale l / s`` with ``l`` the stochastic rounding of ``s |v| / scale`` (unbiased)."""
    ratio = jnp.where(scale > 0, jnp.abs(v) / jnp.where(scale > 0, scale, 1.0), 0.0)
    r = jnp.clip(ratio * levels, 0.0, levels)
    low = jnp.floor(r)
    level = low + (jax.random.uniform(key, v.shape) < r - low)
    return (jnp.sign(v) * level * (scale / levels)).astype(v.dtype)


def stochastic_quantization(bits: int, per_tensor: bool = True, norm: str = "l2") -> Compressor:
    """QSGD to ``bits`` bits per coordinate (Alistarh et al. 2017): unbiased, see the module docstring.

    ``per_tensor``: one scale per leaf (True) or one for the client's whole
    update. ``norm``: ``'l2'`` (the paper's scale) or ``'max'`` (the largest
    magnitude: a common variant with lower variance at few bits).
    """
    _check_bits(bits)
    if norm not in NORMS:
        raise ValueError(f"stochastic_quantization: norm={norm!r} is unknown; choose one of {NORMS}.")
    levels = 2 ** (bits - 1) - 1

    def compress(update, state, key):
        leaves, treedef = jax.tree.flatten(update)
        keys = jax.random.split(key, len(leaves))
        if per_tensor:
            scales = [_scale([leaf], norm) for leaf in leaves]
        else:
            scales = [_scale(leaves, norm)] * len(leaves)
        sent = [_quantize(leaf, m, levels, k) for leaf, m, k in zip(leaves, scales, keys)]
        num_scales = len(leaves) if per_tensor else 1
        message = bits * sum(_sizes(update)) + FLOAT_BITS * num_scales
        return jax.tree.unflatten(treedef, sent), state, _message_bytes(message)

    return Compressor(f"qsgd{bits}", no_state, compress)


def top_k_count(size: int, fraction: float) -> int:
    """Coordinates a leaf of ``size`` keeps under `top_k`: ``ceil(fraction size)``, at least 1."""
    return max(1, math.ceil(fraction * size))


def index_bits(size: int) -> int:
    """Bits of a fixed-width index into ``size`` coordinates: ``ceil(log2 size)`` (0 for one coordinate)."""
    return (size - 1).bit_length()


def top_k(fraction: float) -> Compressor:
    """Top-k sparsification: each leaf keeps its ``ceil(fraction d)`` largest-magnitude coordinates.

    Sends ``k`` float32 values and ``k`` indices of ``ceil(log2 d)`` bits per
    leaf. Biased on its own: wrap it in `error_feedback`.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(
            f"top_k: fraction={fraction!r} must lie in (0, 1]: the share of each tensor's coordinates sent "
            "(0.01 sends 1%; 1 sends everything)."
        )

    def keep_largest(leaf: Array) -> Array:
        flat = leaf.reshape(-1)
        _, index = jax.lax.top_k(jnp.abs(flat), top_k_count(flat.shape[0], fraction))
        return jnp.zeros_like(flat).at[index].set(flat[index]).reshape(leaf.shape)

    def compress(update, state, key):
        del key
        message = sum(top_k_count(d, fraction) * (FLOAT_BITS + index_bits(d)) for d in _sizes(update))
        return jax.tree.map(keep_largest, update), state, _message_bytes(message)

    return Compressor(f"top_k{fraction:g}", no_state, compress)


def error_feedback(inner: Compressor) -> Compressor:
    """``inner`` with error feedback (Stich et al. 2018; Karimireddy et al. 2019).

    State ``(residual, inner state)``, the residual starting at zero:
    ``p = update + residual``, ``sent = inner(p)``, ``residual <- p - sent``.
    Where ``sent`` equals ``p`` or is zero (top-k) the new residual is zero or
    ``p``, exactly.
    """

    def init(params):
        return jax.tree.map(jnp.zeros_like, params), inner.init(params)

    def compress(update, state, key):
        residual, inner_state = state
        corrected = jax.tree.map(jnp.add, update, residual)
        sent, inner_state, message = inner.compress(corrected, inner_state, key)
        residual = jax.tree.map(jnp.subtract, corrected, sent)
        return sent, (residual, inner_state), message

    return Compressor(f"ef_{inner.name}", init, compress)


def init_clients(compressor: Compressor, params: Params, num_clients: int) -> Any:
    """Every client's initial state, stacked on a leading client axis ``[num_clients, ...]``."""
    return broadcast_to_clients(compressor.init(params), num_clients)


def compress_clients(compressor: Compressor, updates: Any, states: Any, keys: Array) -> tuple[Any, Any, Array]:
    """`Compressor.compress` vmapped over the client axis: ``keys`` is ``[C]`` keys, bytes ``[C]``."""
    return jax.vmap(compressor.compress)(updates, states, keys)


def compress_cohort(
    compressor: Compressor, updates: Any, states: Any, key: PRNGKey, clients: Array
) -> tuple[Any, Any, Array]:
    """A cohort's uploads: `compress_clients` with client ``c``'s key ``fold_in(key, c)`` (population index);
    bytes ``[C]`` per message (the round counts those of the clients that sent)."""
    return compress_clients(compressor, updates, states, per_client_keys(key, clients))

"""Compressed uploads against plain-numpy references, hand counts and concentration bounds.

References: numpy float32 bit arithmetic (bfloat16 round-to-nearest-even), a
stable numpy argsort (top-k), the error-feedback recursion written out in
numpy, and Hoeffding's inequality for the unbiasedness of QSGD.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from float32_bounds import EPS32

from medfed_jax import compression

SHAPES = {"w": (3, 4), "b": (4,)}  # 16 coordinates in two leaves


def random_tree(rng: np.random.Generator, lead: tuple[int, ...] = ()) -> dict:
    return {k: rng.normal(size=lead + s).astype(np.float32) for k, s in SHAPES.items()}


def as_jax(tree: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in tree.items()}


# --------------------------------------------------------------------------- bfloat16


def bfloat16_reference(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) on the bits, and back to float32."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return rounded.astype(np.uint32).view(np.float32)


def test_bfloat16_rounds_to_nearest_even_like_numpy_bits():
    rng = np.random.default_rng(0)
    magnitudes = 10.0 ** rng.uniform(-30, 30, size=2000)  # normal float32 numbers only (no subnormals)
    values = (rng.choice([-1.0, 1.0], size=2000) * magnitudes).astype(np.float32)
    # exact ties (low 16 bits 0x8000) with even and odd kept parts, and values just either side
    tie_bits = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F807FFF, 0x3F808001], np.uint32)
    values = np.concatenate([values, tie_bits.view(np.float32), np.array([0.0, -0.0, 1.0], np.float32)])
    sent, state, size = compression.bfloat16().compress({"x": jnp.asarray(values)}, (), None)
    np.testing.assert_array_equal(np.asarray(sent["x"]).view(np.uint32), bfloat16_reference(values).view(np.uint32))
    assert state == () and float(size) == 2 * values.size


# --------------------------------------------------------------------------- bytes


@pytest.mark.parametrize(
    "compressor, hand_count",
    [
        (compression.identity(), 16 * 4),  # 16 float32 coordinates
        (compression.bfloat16(), 16 * 2),
        # 4 bits x 16 coordinates + one 32-bit scale per leaf: (64 + 64) / 8
        (compression.stochastic_quantization(4), (4 * 16 + 32 * 2) / 8),
        (compression.stochastic_quantization(4, per_tensor=False), (4 * 16 + 32) / 8),
        # w: k = ceil(0.25 * 12) = 3 values of 32 bits + 3 indices of ceil(log2 12) = 4 bits;
        # b: k = 1 value + 1 index of ceil(log2 4) = 2 bits; 108 + 34 = 142 bits -> 18 whole bytes
        (compression.top_k(0.25), 18),
        (compression.error_feedback(compression.top_k(0.25)), 18),
        # k = 1 of 12 and 1 of 4 at the smallest fraction: (32 + 4) + (32 + 2) = 70 bits -> 9 bytes
        (compression.top_k(1e-6), 9),
    ],
)
def test_bytes_match_a_hand_count(compressor, hand_count):
    tree = as_jax(random_tree(np.random.default_rng(1)))
    _, _, size = jax.jit(compressor.compress)(tree, compressor.init(tree), jax.random.key(0))
    assert float(size) == hand_count


def test_index_bits_is_ceil_log2():
    for size in (1, 2, 3, 4, 5, 12, 1024, 1025):
        assert compression.index_bits(size) == (math.ceil(math.log2(size)) if size > 1 else 0)


# --------------------------------------------------------------------------- top-k


def top_k_reference(x: np.ndarray, fraction: float) -> np.ndarray:
    """Keep the ceil(fraction d) largest magnitudes (ties: lower index first), zero the rest."""
    flat = x.reshape(-1)
    k = max(1, math.ceil(fraction * flat.size))
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(x.shape)


@pytest.mark.parametrize("integers", [False, True], ids=["continuous", "ties"])
def test_top_k_keeps_the_largest_magnitudes(integers):
    rng = np.random.default_rng(2)
    tree = random_tree(rng)
    if integers:  # many equal magnitudes: the lower index wins, as in the reference
        tree = {k: np.round(2 * v).astype(np.float32) for k, v in tree.items()}
    sent, _, _ = jax.jit(compression.top_k(0.3).compress)(as_jax(tree), (), None)
    for name, leaf in tree.items():
        np.testing.assert_array_equal(sent[name], top_k_reference(leaf, 0.3))


# --------------------------------------------------------------------------- error feedback


def test_error_feedback_carries_the_residual_exactly_over_rounds_and_clients():
    """Three clients, four rounds of top-k with error feedback against the numpy recursion, bit for bit."""
    rng = np.random.default_rng(3)
    clients, rounds, fraction = 3, 4, 0.2
    updates = [random_tree(rng, (clients,)) for _ in range(rounds)]
    ef = compression.error_feedback(compression.top_k(fraction))
    states = compression.init_clients(ef, as_jax(random_tree(rng)), clients)
    compress = jax.jit(lambda u, s, k: compression.compress_clients(ef, u, s, k))
    residual = {k: np.zeros((clients, *s), np.float32) for k, s in SHAPES.items()}
    for update in updates:
        old = residual
        sent, states, size = compress(as_jax(update), states, jax.random.split(jax.random.key(0), clients))
        for name in SHAPES:
            corrected = update[name] + old[name]  # one float32 addition, as on device
            want_sent = np.stack([top_k_reference(row, fraction) for row in corrected])
            np.testing.assert_array_equal(sent[name], want_sent)
            np.testing.assert_array_equal(states[0][name], corrected - want_sent)
            # what is sent plus what is kept is exactly update + old residual
            np.testing.assert_array_equal(np.asarray(sent[name]) + np.asarray(states[0][name]), corrected)
        residual = {k: np.asarray(v) for k, v in states[0].items()}
        assert size.shape == (clients,)


def test_error_feedback_around_quantisation_keeps_what_was_not_sent():
    """sent + residual == update + old residual to the rounding of ``p - sent`` (one ulp of |p| + |sent|)."""
    rng = np.random.default_rng(4)
    ef = compression.error_feedback(compression.stochastic_quantization(2))
    old = random_tree(rng)
    update = random_tree(rng)
    sent, (residual, _), _ = jax.jit(ef.compress)(as_jax(update), (as_jax(old), ()), jax.random.key(5))
    for name in SHAPES:
        p = update[name] + old[name]
        s, r = np.asarray(sent[name], np.float64), np.asarray(residual[name], np.float64)
        bound = EPS32 * (np.abs(p) + np.abs(s))  # |fl(p - s) - (p - s)| <= u |p - s|, u = eps / 2
        assert np.all(np.abs(s + r - p) <= bound)
        assert np.any(s != p)  # two bits did change the update: the residual is not trivially zero


# --------------------------------------------------------------------------- stochastic quantisation


@pytest.mark.parametrize("bits, per_tensor, norm", [(3, True, "l2"), (3, False, "max"), (2, True, "max")])
def test_stochastic_quantization_is_unbiased_and_on_its_grid(bits, per_tensor, norm):
    """Each draw is one of the two levels around its input, the upper one with probability frac, and the mean of M
    draws is within a Hoeffding bound of the input.

    A draw of coordinate i lies in an interval of width w = m / s (two adjacent
    levels), so P(|mean - v_i| >= t) <= 2 exp(-2 M t^2 / w^2); with t = w
    sqrt(log(2 D / delta) / (2 M)) every one of the D coordinates passes with
    probability >= 1 - delta (delta = 1e-6, seeds fixed). Rounding to the
    nearest level instead would be off by up to w / 2, ~25 t at M = 20000.
    """
    rng = np.random.default_rng(6)
    tree = random_tree(rng)
    draws = 20000
    quantize = compression.stochastic_quantization(bits, per_tensor, norm)
    keys = jax.random.split(jax.random.key(7), draws)
    sent = jax.jit(jax.vmap(lambda k: quantize.compress(as_jax(tree), (), k)[0]))(keys)
    levels = 2 ** (bits - 1) - 1
    leaves = {k: v.astype(np.float64) for k, v in tree.items()}

    def scale(values):
        flat = np.concatenate([v.reshape(-1) for v in values])
        return np.sqrt(np.sum(flat**2)) if norm == "l2" else np.max(np.abs(flat))

    whole = scale(list(leaves.values()))
    num_coordinates = sum(v.size for v in leaves.values())
    for name, v in leaves.items():
        m = scale([v]) if per_tensor else whole
        width = m / levels
        low = np.floor(np.abs(v) / width)
        draws_of = np.asarray(sent[name], np.float64)
        grid = np.sign(v) * width * np.stack([low, low + 1])  # the two admissible values per coordinate
        on_grid = np.isclose(draws_of[:, None], grid[None], rtol=4 * EPS32, atol=0).any(axis=1)
        assert on_grid.all(), f"{name}: a draw is not one of the two levels around its coordinate"
        t = width * math.sqrt(math.log(2 * num_coordinates / 1e-6) / (2 * draws))
        bias = np.abs(draws_of.mean(axis=0) - v)
        assert np.all(bias <= t + 4 * EPS32 * np.abs(v)), f"{name}: bias {bias.max():.3g} > Hoeffding bound {t:.3g}"
        # the upper level comes with probability frac = |v| / w - low: a binomial count per coordinate, within
        # 6 standard deviations (each coordinate fails with probability < 2e-9); that is the variance of the docstring
        upper = np.isclose(draws_of, grid[1][None], rtol=4 * EPS32, atol=0).sum(axis=0)
        frac = np.abs(v) / width - low
        assert np.all(np.abs(upper - draws * frac) <= 6 * np.sqrt(draws * frac * (1 - frac)) + 1), name


def test_quantising_zero_sends_zero():
    zero = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    sent, _, _ = compression.stochastic_quantization(4).compress(zero, (), jax.random.key(0))
    assert all(np.all(np.asarray(v) == 0) for v in sent.values())


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: compression.stochastic_quantization(1), r"bits=1 must be an integer in \[2, 16\]"),
        (lambda: compression.stochastic_quantization(4.0), r"bits=4.0 must be an integer"),
        (lambda: compression.stochastic_quantization(4, norm="l1"), r"norm='l1' is unknown"),
        (lambda: compression.top_k(0.0), r"fraction=0.0 must lie in \(0, 1\]"),
        (lambda: compression.top_k(1.5), r"fraction=1.5 must lie in \(0, 1\]"),
    ],
)
def test_bad_settings_are_refused_with_one_line(build, match):
    with pytest.raises(ValueError, match=match):
        build()

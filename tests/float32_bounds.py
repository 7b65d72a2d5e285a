"""Rounding-error bounds for comparing float32 results with float64 references.

A float32 sum of ``n`` terms, in any order, is within ``(n - 1) u sum|x_i|``
of the exact sum (Higham, *Accuracy and Stability of Numerical Algorithms*,
eq. 4.4; ``u = eps / 2`` the unit roundoff); each term computed with ``k``
rounded operations adds ``k u |x_i|``. The bounds below use ``eps`` for ``u``:
a factor 2 of headroom, and independent of the order and fusion (FMA, SIMD
width) the CPU's code generator picks, so they hold on any x86-64 CPU.
Relative tolerances fail for sums with cancellation (``|sum x| << sum|x|``),
which is why the tests compare against these absolute bounds.
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7


def sum_bound(abs_terms: np.ndarray, ops_per_term: int = 1, axis: int = 0) -> np.ndarray:
    """Bound on |float32 sum - exact sum| of terms bounded by ``abs_terms`` (summed along ``axis``)."""
    abs_terms = np.asarray(abs_terms, np.float64)
    n = abs_terms.shape[axis]
    return (n - 1 + ops_per_term) * EPS32 * abs_terms.sum(axis=axis)


def assert_within(got, want, bound, what: str = "") -> None:
    """|got - want| <= bound elementwise, with the worst ratio in the message."""
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    ratio = float(np.max(err / np.maximum(bound, np.finfo(np.float64).tiny), initial=0.0))
    assert np.all(err <= bound), f"{what}: error {err} exceeds the float32 bound {bound} (worst ratio {ratio:.2f})"

"""Aggregation rules against independent plain-numpy implementations written here.

Each reference works on the taking-part clients only, in float64, with
explicit Python loops where the published algorithm has them. Inputs cover
two pytree layouts, odd and even client counts, continuous data and small
integers (many ties, where tie-breaking by lower client index must match),
and random masks whose masked-out rows hold garbage (1e30 and NaN).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from float32_bounds import assert_within, sum_bound

from medfed_jax import aggregators as agg
from medfed_jax.config import BuildContext

F_KRUM, F_TRIM, F_BULYAN, F_NNM = 2, 2, 1, 2
NU, TAU, GM_ITERS, CC_ITERS = 1e-3, 1.5, 4, 3
# The rules run on XLA's sort here (quick to compile); `sort_clients` is checked on its own and
# the bitonic path (the CPU default) end to end in test_bitonic_sort_path_matches_reference.
XLA = "xla"
LAYOUTS = {"two_leaves": ((2, 3), (4,)), "one_coordinate": ((1,),)}

# ---------------------------------------------------------------------------
# Pytree <-> [C, P] plumbing.


def to_tree(u: np.ndarray, layout: str) -> dict:
    c, out, start = u.shape[0], {}, 0
    for i, shape in enumerate(LAYOUTS[layout]):
        size = math.prod(shape)
        out[f"leaf{i}"] = jnp.asarray(u[:, start : start + size].reshape((c, *shape)), jnp.float32)
        start += size
    return out


def flat(tree: dict) -> np.ndarray:
    return np.concatenate([np.asarray(tree[k], np.float64).reshape(-1) for k in sorted(tree)])


def num_coords(layout: str) -> int:
    return sum(math.prod(s) for s in LAYOUTS[layout])


# ---------------------------------------------------------------------------
# numpy references (inputs: the taking-part rows V [n, P], weights a [n]).


def np_weighted_mean(v, a):
    return (a[:, None] * v).sum(0) / a.sum()


def np_median(v):
    return np.median(v, axis=0)


def np_trimmed_mean(v, f):
    s = np.sort(v, axis=0)
    return s[f : len(v) - f].mean(0)


def np_krum_order(v, f):
    """Indices by Krum score: the sum of squared distances to the n - f - 2 nearest others (at
    least 1); ties by the sum of squared distances to all others, then by index (see agg._krum_order)."""
    n = len(v)
    d = np.array([[np.sum((v[i] - v[j]) ** 2) for j in range(n)] for i in range(n)])
    scores = [sum(sorted(d[i, j] for j in range(n) if j != i)[: max(n - f - 2, 1)]) for i in range(n)]
    return np.lexsort((np.arange(n), d.sum(1), scores))


def np_multi_krum(v, f, m):
    chosen = np_krum_order(v, f)[: (m or len(v) - f)]
    return v[chosen].mean(0), chosen


def np_geometric_median(v, a, nu, iters):
    a = a / a.sum()
    z = np.zeros(v.shape[1])
    for _ in range(iters):
        beta = np.array([ai / max(nu, np.linalg.norm(z - vi)) for ai, vi in zip(a, v)])
        z = (beta[:, None] * v).sum(0) / beta.sum()
    return z


def np_centered_clipping(v, v0, tau, iters):
    x = v0.copy()
    for _ in range(iters):
        x = x + np.mean([(vi - x) * min(1.0, tau / max(np.linalg.norm(vi - x), 1e-300)) for vi in v], axis=0)
    return x


def np_bulyan(v, f):
    n = len(v)
    remaining, selected = list(range(n)), []
    for _ in range(n - 2 * f):
        selected.append(remaining.pop(int(np_krum_order(v[remaining], f)[0])))
    s = v[sorted(selected)]
    beta = len(s) - 2 * f
    out = np.empty(v.shape[1])
    for k in range(v.shape[1]):  # the beta values closest to the median; lower values first on ties
        closest = np.lexsort((s[:, k], np.abs(s[:, k] - np.median(s[:, k]))))[:beta]
        out[k] = s[closest, k].mean()
    return out, sorted(selected)


def np_nnm(v, f):
    n = len(v)
    out = np.empty_like(v)
    for i in range(n):
        d = np.array([np.sum((v[i] - v[j]) ** 2) for j in range(n)])
        out[i] = v[np.argsort(d, kind="stable")[: n - f]].mean(0)
    return out


def np_norm_clip(v, tau):
    norms = np.linalg.norm(v, axis=1)
    threshold = tau if tau > 0 else np.median(norms)
    return v * np.minimum(1.0, threshold / np.maximum(norms, 1e-300))[:, None]


# name -> (factory, reference(V, a) -> vector)
CASES = {
    "mean": (agg.mean, lambda v, a: v.mean(0)),
    "weighted_mean": (agg.weighted_mean, np_weighted_mean),
    "coordinate_median": (lambda: agg.coordinate_median(XLA), lambda v, a: np_median(v)),
    "trimmed_mean": (lambda: agg.trimmed_mean(F_TRIM, XLA), lambda v, a: np_trimmed_mean(v, F_TRIM)),
    "krum": (lambda: agg.krum(F_KRUM), lambda v, a: np_multi_krum(v, F_KRUM, 1)[0]),
    "multi_krum": (lambda: agg.multi_krum(F_KRUM, 3), lambda v, a: np_multi_krum(v, F_KRUM, 3)[0]),
    "multi_krum_default_m": (lambda: agg.multi_krum(F_KRUM), lambda v, a: np_multi_krum(v, F_KRUM, 0)[0]),
    "geometric_median": (
        lambda: agg.geometric_median(NU, GM_ITERS),
        lambda v, a: np_geometric_median(v, a, NU, GM_ITERS),
    ),
    "centered_clipping": (
        lambda: agg.centered_clipping(TAU, CC_ITERS),
        lambda v, a: np_centered_clipping(v, np.zeros(v.shape[1]), TAU, CC_ITERS),
    ),
    "bulyan": (lambda: agg.bulyan(F_BULYAN, XLA), lambda v, a: np_bulyan(v, F_BULYAN)[0]),
    "clip_nnm_krum": (
        lambda: agg.chain(agg.norm_clip(0.0), agg.nearest_neighbor_mixing(F_NNM), agg.krum(F_KRUM)),
        lambda v, a: np_multi_krum(np_nnm(np_norm_clip(v, 0.0), F_NNM), F_KRUM, 1)[0],
    ),
    "nnm_trimmed_mean": (
        lambda: agg.chain(agg.nearest_neighbor_mixing(F_NNM), agg.trimmed_mean(F_TRIM, XLA)),
        lambda v, a: np_trimmed_mean(np_nnm(v, F_NNM), F_TRIM),
    ),
    "fixed_clip_median": (
        lambda: agg.chain(agg.norm_clip(1.0), agg.coordinate_median(XLA)),
        lambda v, a: np_median(np_norm_clip(v, 1.0)),
    ),
}
ROBUST = [name for name in CASES if name not in ("mean", "weighted_mean")]
CHAINS = ("clip_nnm_krum", "nnm_trimmed_mean", "fixed_clip_median")


@functools.cache
def jitted(name: str):
    return jax.jit(CASES[name][0]().aggregate)


def run(name, u, weights, mask, layout, state=None, key=0):
    tree = to_tree(u, layout)
    if state is None:
        state = CASES[name][0]().init(jax.tree.map(lambda x: x[0], tree))
    out, state, diag = jitted(name)(tree, jnp.asarray(weights), jnp.asarray(mask), state, jax.random.PRNGKey(key))
    return flat(out), state, diag


def make_inputs(rng, c, p, kind, masked, garbage=np.nan):
    """``kind``: 'continuous', 'ties' (small integers: exact arithmetic, many ties) or 'duplicates'.

    With ``masked``, two random clients do not take part and hold 1e30 and ``garbage``.
    """
    u = rng.normal(size=(c, p)) if kind != "ties" else rng.integers(-2, 3, size=(c, p)).astype(float)
    if kind != "continuous":
        u[1], u[4] = u[0], u[3]  # duplicated clients
    weights = rng.integers(1, 20, size=c).astype(np.float32)
    mask = np.ones(c, bool)
    if masked:
        dropped = rng.choice(c, 2, replace=False)
        mask[dropped] = False
        u[dropped[0]] = 1e30  # garbage that must not leak
        u[dropped[1]] = garbage
    return u, weights, mask


# ---------------------------------------------------------------------------
# Against the references.


@pytest.mark.parametrize("layout,c", [("two_leaves", 9), ("one_coordinate", 10)])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy_reference(name, layout, c):
    rng = np.random.default_rng([sum(map(ord, name)), c, len(layout)])
    # Chains with rescaling or mixing break exact arithmetic: tie-breaking between distinct but
    # equidistant clients is then up to rounding, so they get duplicated clients instead.
    for kind in ("continuous", "duplicates" if name in CHAINS else "ties"):
        for masked, garbage in ((False, 0.0), (True, np.nan), (True, -1e30)):  # NaN / all-finite paths
            u, weights, mask = make_inputs(rng, c, num_coords(layout), kind, masked, garbage)
            got, _, diag = run(name, u, weights, mask, layout)
            want = CASES[name][1](u[mask], weights[mask].astype(float))
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=f"{kind} {masked} {garbage}")
            assert int(diag["nonfinite_clients"]) == 0


@pytest.mark.parametrize("method", ["xla", "bitonic"])
def test_sort_clients_sorts_along_the_client_axis(method):
    rng = np.random.default_rng(11)
    sort = jax.jit(functools.partial(agg.sort_clients, method=method))
    for c in (2, 9):
        for x in (rng.integers(0, 3, size=(c, 4, 2)), rng.normal(size=(c, 4, 2))):  # ties, and none
            x = x.astype(np.float32)
            np.testing.assert_array_equal(sort(jnp.asarray(x)), np.sort(x, axis=0))


def test_bitonic_sort_path_matches_reference():
    """Median, trimmed mean and Bulyan share `masked_sort`; one of them runs the bitonic path."""
    aggregate = jax.jit(agg.coordinate_median(sort="bitonic").aggregate)
    rng = np.random.default_rng(12)
    for kind in ("continuous", "ties"):
        u, weights, mask = make_inputs(rng, 9, 10, kind, masked=True)
        out, _, _ = aggregate(
            to_tree(u, "two_leaves"), jnp.asarray(weights), jnp.asarray(mask), (), jax.random.PRNGKey(0)
        )
        np.testing.assert_allclose(flat(out), np.median(u[mask], axis=0), rtol=2e-5, atol=2e-5)


def test_median_even_count_averages_the_two_middle_values():
    u = np.array([[1.0], [4.0], [2.0], [10.0], [7.0], [3.0], [9.0], [8.0], [5.0], [6.0]])
    got, _, _ = run("coordinate_median", u, np.ones(10, np.float32), np.ones(10, bool), "one_coordinate")
    np.testing.assert_allclose(got, [5.5])  # (5 + 6) / 2


def test_krum_diagnostics_name_the_selected_clients():
    rng = np.random.default_rng(1)
    u, weights, mask = make_inputs(rng, 9, 10, "continuous", masked=True)
    _, _, diag = run("krum", u, weights, mask, "two_leaves")
    taking_part = np.flatnonzero(mask)
    _, chosen = np_multi_krum(u[mask], F_KRUM, 1)
    assert int(diag["selected_client"]) == taking_part[chosen[0]]
    assert np.flatnonzero(np.asarray(diag["selected"])).tolist() == [taking_part[chosen[0]]]
    _, _, diag = run("multi_krum", u, weights, mask, "two_leaves")
    _, chosen = np_multi_krum(u[mask], F_KRUM, 3)
    assert np.flatnonzero(np.asarray(diag["selected"])).tolist() == sorted(taking_part[chosen])
    _, _, diag = run("bulyan", u, weights, mask, "two_leaves")
    assert np.flatnonzero(np.asarray(diag["selected"])).tolist() == list(taking_part[np_bulyan(u[mask], 1)[1]])


def test_norm_diagnostics_and_clipped_counts():
    rng = np.random.default_rng(2)
    u, weights, mask = make_inputs(rng, 9, 10, "continuous", masked=True)
    norms = np.linalg.norm(u[mask], axis=1)
    _, _, diag = run("fixed_clip_median", u, weights, mask, "two_leaves")
    np.testing.assert_allclose(
        [diag["norm_min"], diag["norm_median"], diag["norm_max"]],
        [norms.min(), np.median(norms), norms.max()],
        rtol=1e-5,
    )
    assert int(diag["norm_clip/clipped"]) == int(np.sum(norms > 1.0))
    np.testing.assert_allclose(diag["norm_clip/tau"], 1.0)
    _, _, diag = run("clip_nnm_krum", u, weights, mask, "two_leaves")
    np.testing.assert_allclose(diag["norm_clip/tau"], np.median(norms), rtol=1e-5)


def test_centered_clipping_restarts_from_the_previous_aggregate():
    rng = np.random.default_rng(3)
    u1, weights, mask = make_inputs(rng, 9, 10, "continuous", masked=False)
    u2 = rng.normal(size=u1.shape) + 3.0
    out1, state, diag = run("centered_clipping", u1, weights, mask, "two_leaves")
    out2, _, diag = run("centered_clipping", u2, weights, mask, "two_leaves", state=state)
    v1 = np_centered_clipping(u1, np.zeros(10), TAU, CC_ITERS)
    v2 = np_centered_clipping(u2, v1, TAU, CC_ITERS)
    np.testing.assert_allclose(out2, v2, rtol=2e-5, atol=2e-5)
    x = np_centered_clipping(u2, v1, TAU, CC_ITERS - 1)
    assert int(diag["clipped"]) == int(np.sum(np.linalg.norm(u2 - x, axis=1) > TAU))


def test_geometric_median_converges_to_the_minimiser_of_summed_distances():
    """With many steps the Weiszfeld iterate minimises sum_i a_i |z - u_i| (checked by scipy)."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(4)
    u = rng.normal(size=(8, 3)) * [1.0, 2.0, 0.5]
    a = rng.integers(1, 10, size=8).astype(float)
    tree = {"leaf0": jnp.asarray(u, jnp.float32)}
    out, _, _ = jax.jit(agg.geometric_median(1e-6, 300).aggregate)(
        tree, jnp.asarray(a), jnp.ones(8, bool), (), jax.random.PRNGKey(0)
    )
    objective = lambda z: np.sum(a * np.linalg.norm(u - z, axis=1))  # noqa: E731
    best = minimize(objective, u.mean(0), method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-12}).x
    np.testing.assert_allclose(np.asarray(out["leaf0"]), best, atol=1e-3)


# ---------------------------------------------------------------------------
# Properties.


@pytest.mark.parametrize("name", ROBUST)
def test_permutation_invariance(name):
    rng = np.random.default_rng(5)
    u, weights, mask = make_inputs(rng, 9, 10, "continuous", masked=True)
    perm = rng.permutation(9)
    got, _, _ = run(name, u, weights, mask, "two_leaves")
    shuffled, _, _ = run(name, u[perm], weights[perm], mask[perm], "two_leaves")
    # Reordered clients reorder the float32 sums: each order is within (c - 1 + 3) eps max|u| of the exact
    # aggregate of the same clients (a weighted mean of rows, tests/float32_bounds.py), so two orders within
    # twice that. The rules that select or sort are order-free on distinct continuous values.
    bound = 2 * sum_bound(np.full((len(u), got.size), np.abs(u[mask]).max() / mask.sum()), ops_per_term=3)
    assert_within(shuffled, got, bound, name)


# name: number of 1e12 outliers among 9 clients, the most the rule's f (see CASES) tolerates.
BOUNDED = {"coordinate_median": 4, "geometric_median": 4, "trimmed_mean": F_TRIM, "krum": F_KRUM, "bulyan": F_BULYAN}


@pytest.mark.parametrize("name", list(BOUNDED))
def test_bounded_output_under_huge_outliers(name):
    num_bad = BOUNDED[name]
    rng = np.random.default_rng(6)
    honest = rng.normal(size=(9 - num_bad, 10))
    outliers = 1e12 * np.sign(rng.normal(size=(num_bad, 10)))
    outliers[: num_bad // 2] = 1e12  # some identical (colluding), some spread
    u, ones, everyone = np.concatenate([outliers, honest]), np.ones(9, np.float32), np.ones(9, bool)
    out, _, _ = run(name, u, ones, everyone, "two_leaves")
    if name == "krum":  # Krum returns one of the honest updates
        assert np.min(np.abs(honest - out).max(axis=1)) < 1e-5
    elif name == "geometric_median":  # in norm: |GM - c| <= 2(n - f)/(n - 2f) max_h |u_h - c|
        centre = honest.mean(0)
        bound = 2 * (9 - num_bad) / (9 - 2 * num_bad) * np.linalg.norm(honest - centre, axis=1).max()
        assert np.linalg.norm(out - centre) <= bound
    else:  # coordinate-wise rules stay inside the honest range per coordinate
        assert np.all(out >= honest.min(0) - 1e-5) and np.all(out <= honest.max(0) + 1e-5)
    mean_out, _, _ = run("mean", u, ones, everyone, "two_leaves")
    assert np.abs(mean_out).max() > 1e10


@pytest.mark.parametrize("name", ROBUST)
def test_non_finite_clients_are_dropped_as_outliers(name):
    rng = np.random.default_rng(7)
    u, weights, mask = make_inputs(rng, 9, 10, "continuous", masked=False)
    u[2, 3], u[5, 0], u[6, 7] = np.nan, np.inf, -np.inf
    mask[6] = False  # not taking part: not counted
    got, _, diag = run(name, u, weights, mask, "two_leaves")
    keep = mask.copy()
    keep[[2, 5]] = False
    np.testing.assert_allclose(got, CASES[name][1](u[keep], weights[keep].astype(float)), rtol=2e-5, atol=2e-5)
    assert int(diag["nonfinite_clients"]) == 2


def test_mean_reports_non_finite_contamination():
    rng = np.random.default_rng(8)
    u, weights, mask = make_inputs(rng, 9, 10, "continuous", masked=True)
    u[np.flatnonzero(mask)[0], 2] = np.nan
    for name in ("mean", "weighted_mean"):
        got, _, diag = run(name, u, weights, mask, "two_leaves")
        assert np.isnan(got[2]) and int(diag["nonfinite_clients"]) == 1
    chained = jax.jit(agg.chain(agg.mean()).aggregate)  # a chain drops non-finite clients first
    out, _, diag = chained(to_tree(u, "two_leaves"), jnp.asarray(weights), jnp.asarray(mask), (), jax.random.PRNGKey(0))
    keep = mask.copy()
    keep[np.flatnonzero(mask)[0]] = False
    # A float32 mean of signed terms (cancellation: no relative tolerance): input rounding and the division
    # per term, a sum over all 9 clients (tests/float32_bounds.py).
    terms = np.where(keep[:, None], np.abs(u), 0.0) / keep.sum()
    assert_within(flat(out), u[keep].mean(0), sum_bound(terms, ops_per_term=3), "chained mean")
    assert int(diag["nonfinite_clients"]) == 1


# ---------------------------------------------------------------------------
# Bucketing (random): structure checked on one-hot client updates.


@functools.cache
def bucketing_apply(s: int):
    return jax.jit(agg.bucketing(s).apply)


def test_bucketing_groups_each_taking_part_client_once():
    c, s = 10, 3
    mask = np.ones(c, bool)
    mask[[2, 7]] = False
    weights = np.arange(1, c + 1, dtype=np.float32)
    apply = bucketing_apply(s)
    groupings = set()
    for seed in range(4):
        out, w, valid, _ = apply({"x": jnp.eye(c)}, jnp.asarray(weights), jnp.asarray(mask), jax.random.PRNGKey(seed))
        out, w, valid = np.asarray(out["x"]), np.asarray(w), np.asarray(valid)
        assert out.shape == (4, c) and valid.tolist() == [True, True, True, False]
        members = [np.flatnonzero(row > 0) for row in out[valid]]
        assert sorted(len(m) for m in members) == [2, 3, 3]
        assert sorted(np.concatenate(members).tolist()) == np.flatnonzero(mask).tolist()
        for row, m, wb in zip(out[valid], members, w[valid]):
            np.testing.assert_allclose(row[m], 1.0 / len(m), rtol=1e-6)
            np.testing.assert_allclose(wb, weights[m].sum())
        groupings.add(tuple(tuple(m) for m in members))
    assert len(groupings) > 1  # the key drives the permutation


def test_bucketing_then_median_is_the_median_of_bucket_means():
    rng = np.random.default_rng(9)
    u, weights, mask = make_inputs(rng, 10, 10, "continuous", masked=True)
    composed = jax.jit(agg.chain(agg.bucketing(3), agg.coordinate_median(XLA)).aggregate)
    key = jax.random.PRNGKey(3)
    out, _, _ = composed(to_tree(u, "two_leaves"), jnp.asarray(weights), jnp.asarray(mask), (), key)
    # Recover the grouping the chain's key produced from one-hot inputs.
    pre_key = jax.random.split(key, 2)[0]
    groups, _, valid, _ = bucketing_apply(3)({"x": jnp.eye(10)}, jnp.ones(10), jnp.asarray(mask), pre_key)
    members = [np.flatnonzero(row > 0) for row in np.asarray(groups["x"])[np.asarray(valid)]]
    bucket_means = np.stack([u[m].mean(0) for m in members])
    np.testing.assert_allclose(flat(out), np.median(bucket_means, axis=0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Config: validation and building with traced knobs.


def context(n: int) -> BuildContext:
    return BuildContext(num_clients=20, cohort_size=n, num_classes=2, feature_shape=(3,))


def section(**fields) -> ml_collections.ConfigDict:
    cfg = agg.default_config()
    cfg.update(fields)
    return cfg


@pytest.mark.parametrize(
    "fields,n,needles",
    [
        ({"name": "krum", "f": 2}, 6, ["aggregator.f=2", "n > 2f + 2", "f <= 1", "at least 7"]),
        ({"name": "multi_krum", "f": 3}, 8, ["n > 2f + 2", "f <= 2"]),
        ({"name": "bulyan", "f": 2}, 10, ["n >= 4f + 3", "f <= 1", "at least 11"]),
        ({"name": "bulyan", "f": 1}, 5, ["n >= 4f + 3", "f <= 0"]),
        ({"name": "bulyan", "f": 1}, 2, ["n >= 4f + 3", "use at least 7"]),
        ({"name": "trimmed_mean", "f": 2}, 4, ["2f < n", "f <= 1"]),
        ({"name": "krum", "f": 2, "pre": ("bucketing",), "bucket_size": 2}, 12, ["6 buckets", "f <= 1"]),
        ({"name": "mean", "f": 5, "pre": ("nnm",)}, 10, ["'nnm'", "2f < n", "f <= 4"]),
        ({"name": "multi_krum", "f": 1, "m": 9}, 9, ["aggregator.m=9", "m <= 8"]),
        ({"name": "median"}, 9, ["aggregator.name", "coordinate_median"]),
        ({"pre": ("norm_clip", "bogus")}, 9, ["aggregator.pre", "bogus"]),
        ({"pre": ("nnm", "nnm")}, 9, ["repeats"]),
        ({"name": "geometric_median", "nu": 0.0}, 9, ["aggregator.nu=0.0"]),
        ({"clip_tau": -1.0}, 9, ["aggregator.clip_tau", "median client norm"]),
        ({"gm_iters": 0}, 9, ["aggregator.gm_iters"]),
        ({"sort": "quick"}, 9, ["aggregator.sort", "bitonic"]),
        ({"bucket_size": 12, "pre": ("bucketing",)}, 9, ["aggregator.bucket_size=12"]),
    ],
)
def test_validate_config_names_the_bound_and_the_fix(fields, n, needles):
    with pytest.raises(ValueError) as err:
        agg.validate_config(section(**fields), context(n))
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize(
    "fields,n",
    [
        ({"name": "krum", "f": 2}, 7),
        ({"name": "bulyan", "f": 2}, 11),
        ({"name": "trimmed_mean", "f": 4}, 9),
        ({"name": "krum", "f": 1, "pre": ("bucketing",), "bucket_size": 2}, 10),
        ({"name": "coordinate_median", "pre": ("norm_clip", "nnm", "bucketing")}, 5),
    ],
)
def test_validate_config_accepts_the_edge_of_each_bound(fields, n):
    agg.validate_config(section(**fields), context(n))


def test_built_chain_with_traced_knobs_matches_reference():
    cfg = section(name="geometric_median", pre=("norm_clip", "nnm"), f=2, gm_iters=3)
    rng = np.random.default_rng(10)
    u, weights, mask = make_inputs(rng, 9, 10, "continuous", masked=True)

    @jax.jit
    def aggregate(tree, weights, mask, knobs):
        a = agg.build_aggregator(cfg, knobs)
        return a.aggregate(tree, weights, mask, a.init(jax.tree.map(lambda x: x[0], tree)), jax.random.PRNGKey(0))

    for nu, clip_tau in ((1e-3, 0.0), (0.5, 1.2)):
        knobs = agg.AggregatorHParams(nu=jnp.float32(nu), tau=jnp.float32(1.0), clip_tau=clip_tau)
        out, _, _ = aggregate(to_tree(u, "two_leaves"), jnp.asarray(weights), jnp.asarray(mask), knobs)
        v = np_nnm(np_norm_clip(u[mask], clip_tau), 2)
        want = np_geometric_median(v, weights[mask].astype(float), nu, 3)
        np.testing.assert_allclose(flat(out), want, rtol=2e-5, atol=2e-5)
    assert aggregate._cache_size() == 1  # knobs are traced: no recompilation


@pytest.mark.parametrize("name", ROBUST)
def test_nobody_taking_part_gives_a_zero_update(name):
    got, _, _ = run(name, np.full((9, 10), 5.0), np.ones(9, np.float32), np.zeros(9, bool), "two_leaves")
    np.testing.assert_array_equal(got, 0.0)


def test_every_name_builds_from_config():
    cfg = agg.default_config()
    for field in agg.AggregatorHParams._fields:
        assert isinstance(cfg[field], float)
    tree = {"x": jnp.ones((9, 3))}
    common = {"nonfinite_clients", "norm_min", "norm_median", "norm_max"}
    specific = {"krum": {"selected", "selected_client"}, "multi_krum": {"selected"}, "bulyan": {"selected"}}
    specific |= {"geometric_median": {"gm_objective"}, "centered_clipping": {"clipped"}}
    for name in agg.AGGREGATOR_NAMES:
        a = agg.build_aggregator(section(name=name, pre=("norm_clip",)))
        args = (tree, jnp.ones(9), jnp.ones(9, bool), a.init({"x": jnp.ones(3)}), jax.random.PRNGKey(0))
        out, _, diag = jax.eval_shape(a.aggregate, *args)  # traces (wiring, shapes) without compiling
        assert out["x"].shape == (3,)
        assert set(diag) == common | specific.get(name, set()) | {"norm_clip/clipped", "norm_clip/tau"}, name


def test_switch_runs_the_chosen_rule_and_keeps_each_state():
    """`agg.switch` with a traced index gives each rule's numpy reference; only its state moves."""
    rng = np.random.default_rng(11)
    u, weights, mask = make_inputs(rng, 9, 10, "continuous", masked=True)
    v, a = u[mask], weights[mask]
    names = ("mean", "coordinate_median", "centered_clipping", "krum")
    switched = agg.switch([CASES[n][0]() for n in names], jnp.int32(0))  # index replaced below
    tree = to_tree(u, "two_leaves")
    state = switched.init(jax.tree.map(lambda x: x[0], tree))

    @jax.jit
    def aggregate(index, state):
        rule = agg.switch([CASES[n][0]() for n in names], index)
        return rule.aggregate(tree, jnp.asarray(weights), jnp.asarray(mask), state, jax.random.PRNGKey(0))

    for i, name in enumerate(names):
        out, new_state, diag = aggregate(jnp.int32(i), state)
        np.testing.assert_allclose(flat(out), CASES[name][1](v, a), rtol=2e-5, atol=2e-5, err_msg=name)
        for j, (old, new) in enumerate(zip(state, new_state)):
            same = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(old), jax.tree.leaves(new)))
            assert same == (j != i or not jax.tree.leaves(old)), (name, j)
        # Diagnostics: the union over the rules; NaN for keys the chosen rule does not report.
        assert np.isnan(diag["selected_client"]) == (name != "krum")
        assert np.isnan(diag["clipped"]) == (name != "centered_clipping")
        np.testing.assert_allclose(diag["norm_max"], np.linalg.norm(v, axis=1).max(), rtol=1e-5)

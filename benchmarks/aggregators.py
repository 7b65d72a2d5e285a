"""Cost of each aggregation rule as a multiple of ``mean()``, on stacked updates ``[C, P]``.

    python benchmarks/aggregators.py            # C in {10, 100, 1000} x P in {2e5, 1.6e6}
    python benchmarks/aggregators.py --quick    # C in {10, 100} x P = 2e5

Every rule is compiled ahead of time, then timed (median of up to 5 calls) on
the same random updates, all clients taking part; the table gives the time and
the ratio to ``mean()`` measured in the same run. ``f = max(1, C // 10)``.
C = 1000 x P = 1.6e6 is skipped: its updates alone are 6.4 GB of float32,
beyond the ~4 GB this benchmark allows itself. The coordinate median is timed
three ways: the library's bitonic sorting network (the CPU default), XLA's
``sort`` (the GPU/TPU default), and a selection with ``lax.top_k`` (defined
here, only for this comparison); the XLA-sort and top_k variants are skipped at
C = 1000 on CPU, where each takes minutes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from medfed_jax import aggregators as agg
from medfed_jax.types import Aggregator

MAX_BYTES = 4e9
SLOW_ON_CPU_AT_1000 = ("coordinate_median (xla sort)", "coordinate_median (top_k)")


def top_k_median() -> Aggregator:
    """Coordinate-wise median by selection: the ``C // 2 + 1`` largest values per coordinate (``lax.top_k``)."""

    def rule(updates, weights, valid, state, key):
        del weights, key
        n = jnp.sum(valid)

        def leaf(u):
            c = u.shape[0]
            v = jnp.where(agg.broadcast_clients(valid, u), u, -jnp.inf).reshape(c, -1).T  # [P, C]
            top = jax.lax.top_k(v, c // 2 + 1)[0]  # descending: the n valid values come first
            lo, hi = top[:, (n - 1) // 2], top[:, n // 2]  # mirror images of the middle pair
            return ((lo + hi) / 2).reshape(u.shape[1:])

        return jax.tree.map(leaf, updates), state, {}

    return agg.robust(rule)


def rules(c: int) -> dict[str, Aggregator]:
    f = max(1, c // 10)
    return {
        "mean": agg.mean(),
        "weighted_mean": agg.weighted_mean(),
        "coordinate_median (bitonic)": agg.coordinate_median("bitonic"),
        "coordinate_median (xla sort)": agg.coordinate_median("xla"),
        "coordinate_median (top_k)": top_k_median(),
        f"trimmed_mean(f={f})": agg.trimmed_mean(f),
        f"krum(f={f})": agg.krum(f),
        f"multi_krum(f={f})": agg.multi_krum(f),
        "geometric_median(iters=4)": agg.geometric_median(1e-5, 4),
        "centered_clipping(iters=1)": agg.centered_clipping(1.0, 1),
        f"bulyan(f={f})": agg.bulyan(f),
        "norm_clip -> mean": agg.chain(agg.norm_clip(0.0), agg.mean()),
        f"nnm(f={f}) -> mean": agg.chain(agg.nearest_neighbor_mixing(f), agg.mean()),
        "bucketing(2) -> median": agg.chain(agg.bucketing(2), agg.coordinate_median()),
    }


def time_rule(rule: Aggregator, updates, weights, mask, key, budget_s: float = 1.0, max_repeats: int = 5) -> float:
    """Median seconds per call of the compiled rule; repeats while under ``budget_s``."""
    state = rule.init(jax.tree.map(lambda u: u[0], updates))
    aggregate = jax.jit(rule.aggregate).lower(updates, weights, mask, state, key).compile()
    times: list[float] = []
    while len(times) < max_repeats and sum(times) < budget_s:
        start = time.perf_counter()
        jax.block_until_ready(aggregate(updates, weights, mask, state, key))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="C in {10, 100}, P = 2e5 only")
    parser.add_argument("--out", default="", help="also write the markdown report to this file")
    args = parser.parse_args()
    clients = (10, 100) if args.quick else (10, 100, 1000)
    params = (200_000,) if args.quick else (200_000, 1_600_000)
    combos = [(c, p) for p in params for c in clients]
    load = os.getloadavg()[0]
    results: dict[tuple[int, int], dict[str, float]] = {}
    for c, p in combos:
        if 4 * c * p > MAX_BYTES:
            print(f"skip C={c} P={p:.1e}: {4 * c * p / 1e9:.1f} GB of updates > {MAX_BYTES / 1e9:.0f} GB", flush=True)
            continue
        key = jax.random.PRNGKey(0)
        updates = jax.block_until_ready({"w": jax.random.normal(key, (c, p), jnp.float32)})
        weights, mask = jnp.ones(c), jnp.ones(c, bool)
        results[c, p] = {}
        for name, rule in rules(c).items():
            if c >= 1000 and name in SLOW_ON_CPU_AT_1000 and jax.default_backend() == "cpu":
                continue
            seconds = time_rule(rule, updates, weights, mask, key)
            results[c, p][name] = seconds
            print(f"C={c:5d} P={p:.1e} {name:32s} {1e3 * seconds:10.1f} ms", flush=True)
        del updates
    report = render(results, args, load)
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report)


def render(results: dict[tuple[int, int], dict[str, float]], args: argparse.Namespace, load: float) -> str:
    combos = list(results)
    names = list(dict.fromkeys(n.split("(f=")[0] for r in results.values() for n in r))

    def cell(combo, base):
        match = [n for n in results[combo] if n.split("(f=")[0] == base]
        if not match:
            return "skipped"
        seconds, mean_s = results[combo][match[0]], results[combo]["mean"]
        return f"{1e3 * seconds:.1f} ms ({seconds / mean_s:.1f}x)"

    header = "| rule | " + " | ".join(f"C={c}, P={p:.1e}" for c, p in combos) + " |"
    lines = [header, "|" + "---|" * (len(combos) + 1)]
    lines += [f"| {base.strip()} | " + " | ".join(cell(combo, base) for combo in combos) + " |" for base in names]
    command = "python benchmarks/aggregators.py" + (" --quick" if args.quick else "")
    return "\n".join(
        [
            "## Aggregator cost (time per call, and multiple of mean() in the same run)",
            "",
            f"- date: {datetime.date.today().isoformat()}",
            f"- machine: {platform.machine()} {os.cpu_count()}-core CPU, backend {jax.default_backend()}, "
            f"jax {jax.__version__}; load average at start {load:.1f} (shared machine)",
            f"- command: `{command}`",
            "- f = max(1, C // 10); all clients take part; compilation excluded; median of up to 5 calls "
            "(1 call when it takes over 1 s)",
            "",
            *lines,
            "",
        ]
    )


if __name__ == "__main__":
    main()

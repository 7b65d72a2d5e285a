"""DP-FTRL / banded MF vs DP-FedAvg at equal epsilon: runs `configs/privacy_mf.py`, prints the README table.

Final test accuracy (mean and t-based 95% confidence half-width over the data
splits, each paired with its run seed) per dataset, mechanism and epsilon;
then why (`error_table`): each strategy's sensitivity and prefix-sum noise
when every client takes part in every round.

    python benchmarks/privacy_mf.py --workdir=runs/privacy_mf                  # the README table
    python benchmarks/privacy_mf.py --workdir=/tmp/mf --rounds=4 --splits=2    # a quick check
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import privacy_mf  # noqa: E402
from medfed_jax import host_devices, privacy, sweep  # noqa: E402

ACCURACY = "global_pooled_accuracy"


def row_key(row: dict) -> tuple[str, float, str]:
    """``(dataset, epsilon, mechanism)`` of a results row."""
    mode, bands = row["privacy.mode"], int(row["privacy.bands"])
    mechanism = {"none": "no DP", "central": "DP-FedAvg"}.get(mode, f"BandMF, {bands} bands")
    eps = row.get("epsilon") or "inf"
    return row["data.name"], float(eps), mechanism


def table(rows: list[dict], rounds: int) -> str:
    """Markdown: one line per (dataset, epsilon, mechanism), final accuracy over the splits."""
    from scipy import stats

    accuracy: dict[tuple, list[float]] = {}
    sigma: dict[tuple, float] = {}
    for row in rows:
        if int(row["round"]) == rounds:
            accuracy.setdefault(row_key(row), []).append(100 * float(row[ACCURACY]))
            sigma[row_key(row)] = float(row["privacy.noise_multiplier"])
    lines = [
        "| dataset | ε (δ = 1e-5) | mechanism | noise multiplier σ | test accuracy (%) | 95% CI (±) | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in sorted(accuracy, key=lambda k: (k[0] != "heart", -k[1], k[2] != "DP-FedAvg", k[2])):
        values = np.asarray(accuracy[key])
        n = len(values)
        half = stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
        eps = "∞" if math.isinf(key[1]) else f"{key[1]:.3g}"
        lines.append(f"| {key[0]} | {eps} | {key[2]} | {sigma[key]:.3g} | {values.mean():.1f} | {half:.1f} | {n} |")
    return "\n".join(lines)


def tree_aggregation_error(rounds: int) -> tuple[float, float]:
    """``(sens^2, mean prefix error x sens^2)`` of binary-tree aggregation when a client is in every round.

    Every complete dyadic node of ``[1, rounds]`` is released with its own noise; prefix ``t`` sums
    ``popcount(t)`` nodes (Kairouz et al. 2021). Unit noise and clip norm.
    """
    nodes = [(level, j) for level in range(rounds.bit_length()) for j in range(rounds >> level)]
    counts = np.array([2**level for level, _ in nodes], np.float64)  # the client's rounds in each node
    popcount = np.array([bin(t).count("1") for t in range(1, rounds + 1)])
    sens2 = float(np.sum(counts**2))
    return sens2, sens2 * float(popcount.mean())


def error_table(rounds: int) -> str:
    """Markdown: sensitivity^2 and prefix-sum noise (mean squared error x sensitivity^2) at full participation."""
    from jax_privacy.matrix_factorization import toeplitz

    lines = ["| strategy | sens² (every round) | prefix-sum noise at equal ε |", "|---|---|---|"]
    for bands in (1, *privacy_mf.BANDS):
        sens2 = privacy.bandmf_sensitivity_squared(bands, rounds)
        coefs = np.asarray(privacy.strategy_coefs(bands), np.float32)
        error = float(np.mean(toeplitz.per_query_error(strategy_coef=coefs, n=rounds))) * sens2
        name = "identity (DP-FedAvg)" if bands == 1 else f"BandMF, {bands} bands"
        lines.append(f"| {name} | {sens2:.0f} | {error:.0f} |")
    sens2, error = tree_aggregation_error(rounds)
    lines.append(f"| binary tree (Kairouz et al. 2021) | {sens2:.0f} | {error:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="sweep output (results.csv, summary.csv); resumes")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--splits", type=int, default=len(privacy_mf.SPLITS), help="data splits x seeds")
    args = parser.parse_args(argv)
    cfg = privacy_mf.get_config(rounds=args.rounds, splits=tuple(range(args.splits)))
    result = sweep.run_sweep(cfg, args.workdir)
    text = table(result.rows, args.rounds) + "\n\n" + error_table(args.rounds)
    print(text)
    with open(os.path.join(args.workdir, "privacy_mf_table.md"), "w") as f:
        f.write(text + "\n")
    return text


if __name__ == "__main__":
    host_devices.quiet_backend_probe()
    main()

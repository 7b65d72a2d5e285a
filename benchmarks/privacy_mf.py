"""DP-FTRL / banded MF vs DP-FedAvg at equal epsilon: runs `configs/privacy_mf.py`, prints the README table.

Final test accuracy (mean and t-based 95% confidence half-width over the data
splits, each paired with its run seed) per dataset, mechanism and epsilon.

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
from medfed_jax import host_devices, sweep  # noqa: E402

ACCURACY = "test_accuracy"


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


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="sweep output (results.csv, summary.csv); resumes")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--splits", type=int, default=len(privacy_mf.SPLITS), help="data splits x seeds")
    args = parser.parse_args(argv)
    cfg = privacy_mf.get_config(rounds=args.rounds, splits=tuple(range(args.splits)))
    result = sweep.run_sweep(cfg, args.workdir)
    text = table(result.rows, args.rounds)
    print(text)
    with open(os.path.join(args.workdir, "privacy_mf_table.md"), "w") as f:
        f.write(text + "\n")
    return text


if __name__ == "__main__":
    host_devices.quiet_backend_probe()
    main()

"""``python -m medfed_jax.audit``: the command line and the files it writes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from medfed_jax import privacy, tabular
from medfed_jax.audit.federated import audit_settings, federated_audit, federated_table
from medfed_jax.audit.inversion import inversion_experiment, save_inversion_figure
from medfed_jax.audit.membership import MEMBERSHIP_DELTA, membership_experiment


def federated_main(args: argparse.Namespace) -> dict[str, Any]:
    """``--federated=CONFIG``: `federated_audit` of each of `audit_settings`; CSV rows and ``summary.json``."""
    import json

    from medfed_jax import config as config_lib
    from medfed_jax import config_files
    from medfed_jax import data as data_lib

    cfg = config_files.load_config(args.federated)
    cfg.privacy.clip_norm = args.clip_norm
    dataset = data_lib.load_dataset(cfg.data)
    rows, summaries = [], []
    for released, dp, run in audit_settings(cfg, args.dp_noise, args.personalization):
        per_client, overall = federated_audit(run, dataset, args.shadows, args.seed)
        label = {"model": released, "dp": dp}
        rows += [{**label, **row} for row in per_client]
        rows.append({**label, "client": "all", **{k: overall[k] for k in ("records", "loss_auc", "lira_auc")}})
        report = privacy.run_privacy_report(run, dataset.num_clients)
        report.update({k: overall[k] for k in ("empirical_epsilon_lower_bound", "accounted_record_epsilon")})
        summaries.append({**label, "audit": overall, "privacy": report})
        print(f"{released:>10} {dp:>22}: " + ", ".join(f"{k}={v:.4g}" for k, v in overall.items()))
    tabular.write_csv(os.path.join(args.out, "federated_membership.csv"), rows)
    summary = {"config": args.federated, "shadows": args.shadows, "seed": args.seed, "settings": summaries}
    text = json.dumps(config_lib.json_safe(summary), indent=2)
    tabular.write_text_atomic(os.path.join(args.out, "summary.json"), text)
    table = federated_table(rows, summaries)
    tabular.write_text_atomic(os.path.join(args.out, "federated_membership.md"), table + "\n")
    print(table)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: ``python -m medfed_jax.audit --out=DIR`` (gradient inversion + membership inference).

    ``--local_steps=K`` inverts the engine's real round upload after K local
    steps; ``--federated=CONFIG`` runs `federated_main` instead.
    """
    summary = sys.modules[__package__].__doc__.split("\n\n")[0]  # the package's first line
    parser = argparse.ArgumentParser(prog="python -m medfed_jax.audit", description=summary)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 1e-3, 1e-2, 1e-1, 1.0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--inversion_steps", type=int, default=1000)
    parser.add_argument("--membership_steps", type=int, default=200)
    parser.add_argument("--local_steps", type=int, default=0, help="inversion of the engine's real round update")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 2.0, 0.5], help="DP-SGD targets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--federated", help="a config (e.g. heart_fedavg): audit its federated training instead")
    parser.add_argument("--shadows", type=int, default=16, help="--federated: LiRA shadow federations")
    parser.add_argument("--dp_noise", type=float, default=8.0, help="--federated: DP-FedAvg noise multiplier")
    parser.add_argument("--clip_norm", type=float, default=0.1, help="--federated: DP-FedAvg clip norm S")
    parser.add_argument("--personalization", default="finetune", help="--federated: the personalised method")
    args = parser.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's RDP order warnings
    os.makedirs(args.out, exist_ok=True)
    if args.federated:
        return federated_main(args)

    inversion, shown, true = inversion_experiment(
        args.noise, trials=args.trials, steps=args.inversion_steps, seed=args.seed, local_steps=args.local_steps
    )
    tabular.write_csv(os.path.join(args.out, "inversion.csv"), inversion)
    save_inversion_figure(true, shown, os.path.join(args.out, "inversion.png"))
    rate, steps = 1.0, args.membership_steps  # full-batch DP gradient descent
    sigmas = [privacy.calibrate_noise(e, MEMBERSHIP_DELTA, rate, steps, tol=0.01) for e in args.epsilons]
    membership = membership_experiment(
        [(0.0, float("inf"))] + [(sigma, 1.0) for sigma in sigmas],
        sampling_rate=rate,
        steps=steps,
        delta=MEMBERSHIP_DELTA,
        seed=args.seed,
    )
    tabular.write_csv(os.path.join(args.out, "membership.csv"), membership)
    for name, rows in (("inversion", inversion), ("membership", membership)):
        print(name)
        for row in rows:
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return {"inversion": inversion, "membership": membership}

"""The README's experiment tables (`report.collaboration_table`, `security_table`, `personalization_table`)
from made-up per-seed results, against numpy computed here (mean, sample std with ddof 1, win counts)."""

from __future__ import annotations

import json
import os
import re

import numpy as np

from medfed_jax import report, tabular

CLIENTS = ("a", "b", "c")
PER_CLIENT = re.compile(r"(.+)\[(.+)\]")  # a made-up row's <metric>[<client>] entries
SEEDS = range(5)


def write_workdir(path, name: str, knobs: list[str], rows: list[dict]) -> report.SweepTables:
    meta = {"name": name, "knobs": knobs, "numeric_knobs": [], "structural_knobs": knobs, "cells": len(rows)}
    with open(os.path.join(path, "sweep.json"), "w") as f:
        json.dump(meta, f)
    # Tidy, as a sweep writes them: each row a cell; scalars in results.csv, <metric>[<client>] long in clients.csv.
    wide = [{k: PER_CLIENT.fullmatch(k) for k in r} for r in rows]
    scalars = [
        {"cell": str(i), **{k: str(v) for k, v in r.items() if not w[k]}} for i, (r, w) in enumerate(zip(rows, wide))
    ]
    clients = [
        {"cell": str(i), "round": str(r["round"]), "client": w[k][2], "metric": w[k][1], "value": str(v)}
        for i, (r, w) in enumerate(zip(rows, wide))
        for k, v in r.items()
        if w[k]
    ]
    with open(os.path.join(path, "results.csv"), "w") as f:
        f.write(tabular.to_csv(scalars))
    with open(os.path.join(path, "clients.csv"), "w") as f:
        f.write(tabular.to_csv(clients))
    with open(os.path.join(path, "summary.csv"), "w") as f:
        f.write("n\n")
    return report.load(str(path))


def expected(values) -> str:
    values = 100 * np.asarray(values, np.float64)
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def client_row(rng, **knobs) -> dict:
    accuracy = rng.uniform(0.5, 0.95, len(CLIENTS))
    row = {**knobs, **{f"client_accuracy[{c}]": a for c, a in zip(CLIENTS, accuracy)}}
    return {**row, "global_pooled_accuracy": rng.uniform(0.5, 0.95)}


def table_row(table: str, *first: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[: len(first)] == list(first):
            return cells
    raise AssertionError(f"no row {first} in\n{table}")


def test_collaboration_table_scores_both_test_sets_at_the_last_round(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        client_row(rng, **{"data.name": d, "method": m, "seed": s, "round": r})
        for d in ("heart", "digits")
        for m in ("local_only", "federated")
        for s in SEEDS
        for r in (10, 50)
    ]
    table = report.collaboration_table(write_workdir(tmp_path, "collaboration", ["data.name", "method", "seed"], rows))
    # t_{0.975, 4} / sqrt(5) = 2.7764 / 2.2361 = 1.24: the CI half-width per std at n = 5.
    assert "n = 5 seeds" in table and "sample std (ddof 1)" in table and "95% CI half-width 1.24 × std" in table
    for d in ("heart", "digits"):
        for m in ("local_only", "federated"):
            final = [r for r in rows if r["data.name"] == d and r["method"] == m and r["round"] == 50]
            clients = np.asarray([[r[f"client_accuracy[{c}]"] for c in CLIENTS] for r in final])
            want = [
                expected(clients.mean(1)),
                expected(clients.min(1)),
                expected([r["global_pooled_accuracy"] for r in final]),
            ]
            assert table_row(table, d, m)[2:] == want


def test_security_table_reads_both_budgets_and_counts_where_the_median_wins(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for partition in ("iid", "dirichlet"):
        for attack, scale in (("none", 1.0), ("sign_flip", 1.0), ("sign_flip", 4.0)):
            for aggregator in ("mean", "coordinate_median"):
                for s in SEEDS:
                    for r in (50, 100, 300):
                        knobs = {"data.partition": partition, "attack.name": attack, "attack.scale": scale}
                        rows.append(
                            {
                                **knobs,
                                "aggregator.name": aggregator,
                                "seed": s,
                                "round": r,
                                "global_pooled_accuracy": rng.random(),
                            }
                        )
    knobs = ["data.partition", "attack.name", "attack.scale", "aggregator.name", "seed"]
    table = report.security_table(write_workdir(tmp_path, "signflip_attack", knobs, rows))
    assert "After 50 rounds" not in table
    for budget in (100, 300):
        section = table.split(f"After {budget} rounds")[1].split("After")[0]
        for partition in ("iid", "dirichlet"):
            means = {}
            for attack, scale in (("none", 1.0), ("sign_flip", 1.0), ("sign_flip", 4.0)):
                label = "none" if attack == "none" else f"sign_flip x{scale:g}"
                cells = table_row(section, partition, label)[2:]
                for aggregator, cell in zip(("mean", "coordinate_median"), cells):
                    values = [
                        r["global_pooled_accuracy"]
                        for r in rows
                        if (r["data.partition"], r["attack.name"], r["attack.scale"], r["aggregator.name"])
                        == (partition, attack, scale, aggregator)
                        and r["round"] == budget
                    ]
                    assert cell == expected(values)
                    means[label, aggregator] = np.mean(values)
            wins = sum(means[a, "coordinate_median"] > means[a, "mean"] for a in ("sign_flip x1", "sign_flip x4"))
            assert f"- {partition}, {budget} rounds: the median beats the mean under attack at {wins} of 2" in table


def test_personalization_table_counts_the_splits_a_method_beats_local_only(tmp_path):
    local = np.asarray([[0.8, 0.7, 0.6]] * 5) + 0.01 * np.arange(5)[:, None]
    # fedper: better mean on splits 0-3, better worst client on splits 0, 1 and 4.
    fedper = local + np.asarray(
        [[0.05, 0.05, 0.01], [0.05, 0.05, 0.01], [0.1, 0.0, -0.01], [0.1, 0, -0.05], [-0.1, 0, 0.02]]
    )
    rows = [
        {"model.name": "logistic", "method": m, "seed": s, "round": 50, "global_pooled_accuracy": 0.5,
         **{f"client_accuracy[{c}]": v for c, v in zip(CLIENTS, values[s])}}
        for m, values in (("local_only", local), ("fedper", fedper))
        for s in SEEDS
    ]  # fmt: skip
    table = report.personalization_table(write_workdir(tmp_path, "personalization", ["model.name", "method"], rows))
    assert table_row(table, "logistic fedper")[1:] == [
        expected(fedper.mean(1)), expected(fedper.min(1)), "4/5", "3/5", "2/5"
    ]  # fmt: skip
    assert table_row(table, "logistic local_only")[3:] == ["0/5", "0/5", "0/5"]

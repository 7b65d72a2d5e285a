"""Per-client results whose size grows linearly with the evaluated clients.

Up to `PER_CLIENT_COLUMNS` evaluated clients, a history row carries one
column per client (``accuracy[<name>]``) as it always has. Beyond that, the
row carries quantiles of the client accuracies (``client_accuracy_p0`` (the
worst), ``_p10``, ``_p50``, ``_p90``, ``_p100``) and keeps every client's
accuracy and loss under `VALUES`; the CLI writes those to ``clients.csv`` in
long format (`long_rows`: ``method, [seed,] round, client, metric, value``),
one line per value in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PER_CLIENT_COLUMNS = 100
QUANTILES = (0, 10, 50, 90, 100)  # percent, over the evaluated clients
VALUES = "per_client"  # a history row's per-client values beyond PER_CLIENT_COLUMNS
LONG_METRICS = ("client_accuracy", "client_loss")


def summarised(num_clients: int) -> bool:
    """Whether ``num_clients`` evaluated clients are summarised rather than given one column each."""
    return num_clients > PER_CLIENT_COLUMNS


def columns(metrics: dict, names: Sequence[str]) -> dict:
    """The per-client entries of a history row, from an evaluation's ``[C]`` metrics (numpy).

    Named ``accuracy[<name>]`` columns, or quantiles plus `VALUES` (JSON-safe lists).
    """
    accuracy = np.asarray(metrics["client_accuracy"], np.float64)
    if accuracy.shape != (len(names),):
        return {}
    if not summarised(len(names)):
        return {f"accuracy[{c}]": float(v) for c, v in zip(names, accuracy)}
    row = {f"client_accuracy_p{q}": float(v) for q, v in zip(QUANTILES, np.percentile(accuracy, QUANTILES))}
    row[VALUES] = {m: np.asarray(metrics[m], np.float64).tolist() for m in LONG_METRICS if m in metrics}
    return row


def split(rows: list[dict]) -> tuple[list[dict], bool]:
    """History rows without `VALUES`, and whether any row had them."""
    return [{k: v for k, v in row.items() if k != VALUES} for row in rows], any(VALUES in row for row in rows)


def long_rows(rows: list[dict], names: Sequence[str]) -> list[dict]:
    """``clients.csv``'s rows: every `VALUES` entry of ``rows`` as ``method, [seed,] round, client, metric, value``."""
    seeded = any("seed" in row for row in rows)
    out = []
    for row in rows:
        head = {"method": row["method"], **({"seed": row.get("seed", "")} if seeded else {}), "round": row["round"]}
        for metric, values in row.get(VALUES, {}).items():
            out.extend({**head, "client": name, "metric": metric, "value": value} for name, value in zip(names, values))
    return out

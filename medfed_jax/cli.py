"""Command line: ``python -m medfed_jax --config=configs/<name>.py --workdir=<dir>``.

A config with a non-empty ``sweep`` runs as a sweep (`medfed_jax.sweep`):
``results.csv``, ``summary.csv``, ``sweep.json`` and per-chunk results in the
workdir, resumed after a crash by running the same command again; ``--seeds=N``
adds a seed axis. Otherwise it is one run per method:

Any config field can be overridden (``--config.rounds=50``). Every method
trains exactly ``rounds`` rounds, evaluated every ``eval_every`` rounds and at
the last (`medfed_jax.server.eval_rounds`), in chunks: a line for the compile,
then a progress line per evaluation (rounds/s after compiling, ETA). With
``--seeds=N`` every method runs N seeds vmapped, chunk by chunk the same way,
and the run ends with a mean +- std table (over the seeds whose model did not
diverge; a diverged model reads ``diverged``). The workdir receives
``config.json``, ``history.csv`` (with ``elapsed_s`` and ``diverged``
columns) and ``summary.json`` (atomic writes); a workdir that holds a
different config is refused unless ``--overwrite``, and a run killed midway
resumes from its checkpoints when started again with the same command.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from typing import Any

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from medfed_jax import config as config_lib
from medfed_jax import report, runner, sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, checkpoints and the resolved config.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a workdir that holds a different config.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds per method; > 1 runs them vmapped and reports mean +- std.")


def prepare_workdir(workdir: str, cfg: Any, overwrite: bool, extra: dict | None = None) -> None:
    """Create the workdir or check that it holds this config; refuse a different one."""
    text = (
        config_lib.to_json(cfg)
        if not extra
        else json.dumps({"config": json.loads(config_lib.to_json(cfg)), **extra}, sort_keys=True, indent=2)
    )
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            same = f.read() == text
        if not same and not overwrite:
            raise SystemExit(
                f"error: {workdir} holds results of a different config ({path}). "
                "Use another --workdir, or pass --overwrite to replace them."
            )
        if not same:
            shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    runner.write_text_atomic(path, text)


def rows_to_csv(rows: list[dict]) -> str:
    """A CSV table whose columns are the union of the rows' keys (first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table with padded columns."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def finite_mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and std of the finite ``values`` (NaN, NaN when none)."""
    values = np.asarray(values, np.float64).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std())


def final_accuracy_table(finals: dict[str, dict[str, np.ndarray]], client_names: tuple[str, ...]) -> str:
    """Methods x (each client's own test split, their mean and worst, pooled test set) in %, and the pooled
    ROC AUC; mean +- std over seeds.

    A diverged model (`medfed_jax.eval`) is not scored: a cell shows the mean
    +- std over the seeds whose value is finite, ``diverged`` when none is, and
    the method column counts the diverged seeds.
    """

    def cell(values: np.ndarray, diverged: np.ndarray, scale: float = 100, digits: int = 1) -> str:
        values = np.asarray(values, np.float64)
        kept = values[~np.asarray(diverged, bool)]
        if kept.size == 0:
            return "diverged"
        if kept.size > 1:
            return f"{scale * kept.mean():.{digits}f} ± {scale * kept.std():.{digits}f}"
        return f"{scale * kept.mean():.{digits}f}"

    rows = []
    for method, final in finals.items():
        per_client = np.asarray(final["client_accuracy"]).reshape(-1, len(client_names))
        seed_diverged = np.asarray(final["diverged"]).reshape(-1) > 0
        label = method + (f" ({seed_diverged.sum()}/{seed_diverged.size} diverged)" if seed_diverged.any() else "")
        mean, worst = per_client.mean(1), per_client.min(1)
        rows.append(
            [
                label,
                *(cell(per_client[:, c], np.isnan(per_client[:, c])) for c in range(len(client_names))),
                cell(mean, np.isnan(mean)),
                cell(worst, np.isnan(worst)),
                cell(final["test_accuracy"], seed_diverged),
                cell(final["test_auc"], seed_diverged, scale=1, digits=3),
            ]
        )
    header = ["method", *client_names, "mean of clients", "worst client", "pooled test", "pooled AUC"]
    return format_table(header, rows)


FINAL_METRICS = ("test_accuracy", "test_auc", "client_accuracy", "diverged")


def _run_methods(prepared: runner.Prepared, workdir: str | None, seeds: list[int], seed_axis: bool) -> dict:
    """Every method of the run in evaluation chunks (progress lines, checkpoints in the workdir), then `_finish`."""
    rows, finals = [], {}
    for method in runner.methods_of(prepared.cfg):
        checkpoint = os.path.join(workdir, f"checkpoint_{method}.npz") if workdir else None
        evaluations = runner.train_evaluations(method, prepared, seeds, seed_axis, checkpoint)
        rows.extend(runner.history_rows(method, prepared, evaluations, seeds if seed_axis else None))
        finals[method] = {k: evaluations[-1].metrics[k] for k in FINAL_METRICS}
    return _finish(workdir, prepared, rows, finals, seeds)


def run_single(prepared: runner.Prepared, workdir: str | None) -> dict:
    """One seed (``cfg.seed``) per method, chunked with progress lines and checkpoints."""
    return _run_methods(prepared, workdir, [prepared.cfg.seed], seed_axis=False)


def run_many_seeds(prepared: runner.Prepared, workdir: str | None, num_seeds: int) -> dict:
    """Every method over ``num_seeds`` seeds (``cfg.seed``, ``cfg.seed + 1``, ...), vmapped, chunked likewise."""
    return _run_methods(prepared, workdir, [prepared.cfg.seed + s for s in range(num_seeds)], seed_axis=True)


def final_summary(final: dict[str, np.ndarray], num_clients: int) -> dict:
    """summary.json's ``final`` entry of one method: mean and std over the seeds with finite values."""
    per_client = np.asarray(final["client_accuracy"]).reshape(-1, num_clients)
    accuracy, auc = (finite_mean_std(final[k]) for k in ("test_accuracy", "test_auc"))
    clients = [finite_mean_std(per_client[:, c]) for c in range(num_clients)]
    return {
        "test_accuracy_mean": accuracy[0],
        "test_accuracy_std": accuracy[1],
        "test_auc_mean": auc[0],
        "test_auc_std": auc[1],
        "client_accuracy_mean": [c[0] for c in clients],
        "client_accuracy_std": [c[1] for c in clients],
        "diverged_seeds": int(np.sum(np.asarray(final["diverged"]) > 0)),
    }


def _finish(workdir, prepared, rows, finals, seeds) -> dict:
    names = prepared.dataset.client_names
    rounds = max(row["round"] for row in rows)  # the rounds trained (every method trains cfg.rounds)
    table = final_accuracy_table(finals, names)
    print(
        f"\nFinal test accuracy (%) on {prepared.dataset.name}, {len(seeds)} seed(s), "
        f"{rounds} rounds: each client's own test split, their mean, and the pooled test set; "
        "then the pooled test set's ROC AUC (macro one-vs-rest)\n"
    )
    print(table)
    summary = {
        "dataset": prepared.dataset.name,
        "client_names": list(names),
        "seeds": seeds,
        "rounds": rounds,
        "privacy": prepared.accounting.report(rounds),
        "final": {m: final_summary(f, len(names)) for m, f in finals.items()},
        "table": table,
    }
    if workdir:
        runner.write_text_atomic(os.path.join(workdir, "history.csv"), rows_to_csv(rows))
        runner.write_text_atomic(
            os.path.join(workdir, "summary.json"), json.dumps(config_lib.json_safe(summary), indent=2)
        )
        print(f"\nwrote {workdir}/history.csv, summary.json, config.json")
    return summary


def run_sweep_command(cfg: Any, workdir: str | None, num_seeds: int, overwrite: bool) -> sweep.SweepResult:
    """Check the sweep and its data (refusing bad input before anything is written), then run it."""
    try:
        prepared = sweep.prepare_sweep(cfg, num_seeds)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if workdir:
        prepare_workdir(workdir, cfg, overwrite, {"seeds": num_seeds} if num_seeds > 1 else None)
    result = sweep.run_prepared(prepared, workdir)
    print(f"\nFinal round, mean ± std over seeds (%):\n\n{report.final_table(result.summary, result.plan.knobs)}")
    if workdir:
        print(f"\nwrote {workdir}/results.csv, summary.csv, sweep.json")
        print(f"figures and report.md: python -m medfed_jax.report --workdir={workdir}")
    return result


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config=configs/<name>.py is required.")
    if _SEEDS.value < 1:
        raise app.UsageError(f"--seeds={_SEEDS.value} must be >= 1.")
    workdir = _WORKDIR.value
    if sweep.is_sweep(cfg):
        run_sweep_command(cfg, workdir, _SEEDS.value, _OVERWRITE.value)
        return
    prepared = runner.prepare(cfg)
    if workdir:
        prepare_workdir(workdir, cfg, _OVERWRITE.value, {"seeds": _SEEDS.value} if _SEEDS.value > 1 else None)
    if _SEEDS.value > 1:
        run_many_seeds(prepared, workdir, _SEEDS.value)
    else:
        run_single(prepared, workdir)


def run_main() -> None:
    app.run(main)

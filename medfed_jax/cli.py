"""Command line: ``python -m medfed_jax --config=configs/<name>.py --workdir=<dir>``.

A config with a non-empty ``sweep`` runs as a sweep (`medfed_jax.sweep`):
``results.csv``, ``summary.csv``, ``sweep.json`` and per-chunk results in the
workdir, resumed after a crash by running the same command again; ``--seeds=N``
adds a seed axis. Otherwise it is one run per method:

Any config field can be overridden (``--config.rounds=50``). With
``--seeds=N`` every method runs N seeds as one compiled program each and the
run ends with a mean +- std table. The workdir receives ``config.json``,
``history.csv`` and ``summary.json`` (atomic writes); a workdir that holds a
different config is refused unless ``--overwrite``, and a run killed midway
resumes from its checkpoints when started again with the same command.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from typing import Any

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from medfed_jax import client_results, report, runner, sweep
from medfed_jax import config as config_lib

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
    columns = list(dict.fromkeys(k for row in rows for k in row))  # linear in the cells
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


def final_accuracy_table(finals: dict[str, dict[str, np.ndarray]], client_names: tuple[str, ...]) -> str:
    """Methods x (each client's own test split, their mean and worst, pooled test set) in %, and the pooled
    ROC AUC; mean +- std over seeds."""

    def cell(values: np.ndarray, scale: float = 100, digits: int = 1) -> str:
        values = scale * np.asarray(values, np.float64)
        if values.size > 1:
            return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"
        return f"{values.mean():.{digits}f}"

    shown = () if client_results.summarised(len(client_names)) else tuple(range(len(client_names)))
    rows = []
    for method, final in finals.items():
        per_client = np.asarray(final["client_accuracy"]).reshape(-1, len(client_names))
        rows.append(
            [
                method,
                *(cell(per_client[:, c]) for c in shown),
                cell(per_client.mean(1)),
                cell(per_client.min(1)),
                cell(final["test_accuracy"]),
                cell(final["test_auc"], scale=1, digits=3),
            ]
        )
    header = [
        "method",
        *(client_names[c] for c in shown),
        "mean of clients",
        "worst client",
        "pooled test",
        "pooled AUC",
    ]
    return format_table(header, rows)


def run_single(cfg: Any, workdir: str | None) -> dict:
    """One seed per method, chunked with progress lines and checkpoints."""
    prepared = runner.prepare(cfg)
    histories, finals = {}, {}
    for method in runner.methods_of(cfg):
        checkpoint = os.path.join(workdir, f"checkpoint_{method}.npz") if workdir else None
        histories[method] = runner.train_method(method, prepared, checkpoint=checkpoint)
        last = histories[method][-1]
        finals[method] = {
            "test_accuracy": np.asarray(last["test_accuracy"]),
            "test_auc": np.asarray(last["test_auc"]),
            "client_accuracy": client_results.final_accuracy(last, prepared.dataset.eval_names),
        }
    rows = [row for method in histories for row in histories[method]]
    return _finish(workdir, prepared, rows, finals, seeds=[cfg.seed])


def run_many_seeds(cfg: Any, workdir: str | None, num_seeds: int) -> dict:
    """Every method over ``num_seeds`` seeds, one vmapped program per method."""
    prepared = runner.prepare(cfg)
    seeds = [cfg.seed + s for s in range(num_seeds)]
    rows, finals = [], {}
    for method in runner.methods_of(cfg):
        start = time.perf_counter()
        history = runner.run_seeds(prepared, method, seeds)
        print(
            f"[{method}] {num_seeds} seeds x {cfg.rounds} rounds in {time.perf_counter() - start:.1f}s "
            f"(compile included)"
        )
        finals[method] = {k: history[k][:, -1] for k in ("test_accuracy", "test_auc", "client_accuracy")}
        for s, seed in enumerate(seeds):
            for e in range(history["test_accuracy"].shape[1]):
                metrics = {k: v[s, e] for k, v in history.items()}
                row = runner._row(metrics, method, (e + 1) * cfg.eval_every, 0.0, prepared.dataset.eval_names)
                rows.append({"seed": seed, **row})
    return _finish(workdir, prepared, rows, finals, seeds)


def _finish(workdir, prepared, rows, finals, seeds) -> dict:
    names = prepared.dataset.eval_names
    table = final_accuracy_table(finals, names)
    evaluated = prepared.dataset.info.get("eval_sample", "every client")
    sampled = f"; evaluated on {evaluated}" if "eval_sample" in prepared.dataset.info else ""
    print(
        f"\nFinal test accuracy (%) on {prepared.dataset.name}, {len(seeds)} seed(s), "
        f"{prepared.cfg.rounds} rounds: each client's own test split, their mean, and the pooled test set; "
        f"then the pooled test set's ROC AUC (macro one-vs-rest){sampled}\n"
    )
    print(table)
    summary = {
        "dataset": prepared.dataset.name,
        "client_names": list(names),
        "evaluated_clients": evaluated,
        "seeds": seeds,
        "rounds": prepared.cfg.rounds,
        "privacy": prepared.accounting.report(prepared.cfg.rounds),
        "final": {
            m: {
                "test_accuracy_mean": float(np.mean(f["test_accuracy"])),
                "test_accuracy_std": float(np.std(f["test_accuracy"])),
                "test_auc_mean": float(np.mean(f["test_auc"])),
                "test_auc_std": float(np.std(f["test_auc"])),
                "client_accuracy_mean": np.asarray(f["client_accuracy"]).reshape(-1, len(names)).mean(0).tolist(),
                "client_accuracy_std": np.asarray(f["client_accuracy"]).reshape(-1, len(names)).std(0).tolist(),
            }
            for m, f in finals.items()
        },
        "table": table,
    }
    if workdir:
        history, per_client = client_results.split(rows)
        runner.write_text_atomic(os.path.join(workdir, "history.csv"), rows_to_csv(history))
        if per_client:
            runner.write_text_atomic(os.path.join(workdir, "clients.csv"), client_results.long_csv(rows, names))
        runner.write_text_atomic(
            os.path.join(workdir, "summary.json"), json.dumps(config_lib.json_safe(summary), indent=2)
        )
        print(f"\nwrote {workdir}/history.csv, {'clients.csv, ' if per_client else ''}summary.json, config.json")
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
    if workdir:
        prepare_workdir(workdir, cfg, _OVERWRITE.value, {"seeds": _SEEDS.value} if _SEEDS.value > 1 else None)
    if _SEEDS.value > 1:
        run_many_seeds(cfg, workdir, _SEEDS.value)
    else:
        run_single(cfg, workdir)


def run_main() -> None:
    app.run(main)

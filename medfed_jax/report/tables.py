"""Markdown tables from a sweep's rows: ``report.md``'s final table, the worst case over the attacks, and
the README's experiment tables (one per shipped sweep, `EXPERIMENT_TABLES`).

Per-seed values come from results.csv (one row per cell x evaluation); every ± is a sample std (ddof 1,
`medfed_jax.sweep.mean_std_ci`) over the seeds, each seed its own partition and train/test split.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

import numpy as np

from medfed_jax import sweep, tabular
from medfed_jax.report.rows import (
    DIVERGED_TEXT,
    NAMES,
    SweepTables,
    _last_round,
    _pct,
    _reference,
    client_values,
    diverged,
    final_rows,
    pooled,
    results,
    seed_groups,
    value,
)


def format_mean_std(row: dict, metric: str | None = None) -> str:
    """``mean ± std`` in percent; ``diverged (k/n)`` where seeds diverged, ``—`` where missing."""
    mean, std = _pct(row, "mean", metric), _pct(row, "std", metric)
    if diverged(row, metric):
        return _diverged_text(row)
    if math.isnan(mean):
        return "—"
    return f"{mean:.1f} ± {std:.1f}" if not math.isnan(std) else f"{mean:.1f}"


def _epsilon_text(row: dict) -> str:
    eps = value(row, "epsilon")
    return "∞ (no DP)" if math.isnan(eps) or math.isinf(eps) else f"{eps:.3g}"


def final_table(summary: Sequence[dict], knobs: Sequence[str]) -> str:
    """Markdown: one row per knob combination, final-round test accuracy (%) mean ± std, 95% CI, n."""
    rows = final_rows(summary, knobs)
    if not rows:
        return "(no finished cells yet)"
    labels = sweep.label_knobs(rows, [k for k in knobs if k != "seed"])
    private = "epsilon" in rows[0]
    header = [NAMES.get(k, k) for k in labels] + (["ε"] if private else [])
    header += ["round", "test accuracy (%)", "95% CI (±)", "n"]
    body = []
    for row in rows:
        ci = _pct(row, "ci95")
        body.append(
            [row[k] for k in labels]
            + ([_epsilon_text(row)] if private else [])
            + [row["round"], format_mean_std(row), "—" if math.isnan(ci) or diverged(row) else f"{ci:.1f}", row["n"]]
        )
    return tabular.markdown_table(header, body)


def mean_std_text(values: Sequence[float], scale: float = 100, digits: int = 1) -> str:
    """``mean ± sample std`` of the finite ``values`` (x ``scale``), ``(k/n diverged)`` after it where some
    are not (a diverged model scores nan), ``diverged (n/n)`` where none is; ``—`` without values."""
    v = np.asarray(values, np.float64).reshape(-1, 1)
    finite = np.isfinite(v)
    if v.size == 0:
        return "—"
    if not finite.any():
        return f"{DIVERGED_TEXT} ({v.size}/{v.size})"
    mean, std, _ = sweep.mean_std_ci(np.where(finite, v, 0.0), finite)
    text = f"{scale * mean[0]:.{digits}f}" + (f" ± {scale * std[0]:.{digits}f}" if np.isfinite(std[0]) else "")
    return text + (f" ({v.size - finite.sum()}/{v.size} {DIVERGED_TEXT})" if not finite.all() else "")


def spread_note(sizes: Sequence[int]) -> str:
    """``mean ± sample std, n = ... seeds (each its own split)`` and, where n allows, the t-based 95% CI
    half-width as a multiple of the std (``t_{0.975, n-1} / sqrt(n)``: 1.24 at n = 5)."""
    import scipy.stats  # here, not at module level: scipy.stats takes ~0.7 s to import

    n = sorted(set(sizes))
    ci = [f"{scipy.stats.t.ppf(0.975, k - 1) / math.sqrt(k):.2f} × std at n = {k}" for k in n if k > 1]
    return f"mean ± sample std (ddof 1), n = {'/'.join(map(str, n))} seeds (each its own split)" + (
        f"; 95% CI half-width {', '.join(ci)}" if ci else ""
    )


def _n(groups: dict[tuple, list[dict]]) -> str:
    return spread_note([len(g) for g in groups.values()])


def collaboration_table(tables: SweepTables) -> str:
    """Dataset x method: accuracy on the clients' own test splits (mean of clients, worst client) and on all
    clients' test rows together; local-only models are each scored on both (their mean)."""
    rows = results(tables)
    groups = seed_groups(rows, ["data.name", "method"], _last_round(rows))
    body = [
        [
            *key,
            mean_std_text([client_values(r).mean() for r in members]),
            mean_std_text([client_values(r).min() for r in members]),
            mean_std_text([value(r, pooled(r)) for r in members]),
        ]
        for key, members in groups.items()
    ]
    header = ["dataset", "method", "own clients' test splits: mean of clients", "worst client", "all clients' test set"]
    return (
        f"Test accuracy (%) after {_last_round(rows)} rounds, {_n(groups)}. Local-only: each client's own "
        "model; on all clients' test set, the mean over those models (`mean_client_model_accuracy`; the others: "
        "the global model, `global_pooled_accuracy`).\n\n" + tabular.markdown_table(header, body)
    )


def _attack_label(row: dict) -> str:
    return "none" if row["attack.name"] == "none" else f"{row['attack.name']} x{float(row['attack.scale']):g}"


def security_table(tables: SweepTables) -> str:
    """Partition x attack (scale), one column per aggregator, at each evaluated budget of ``BUDGETS``, then the
    verdict on the seed's claim (the median beats the mean under attack) per partition and budget."""
    rows = results(tables)
    aggregators = list(dict.fromkeys(r["aggregator.name"] for r in rows))
    settings = list(dict.fromkeys((r["data.partition"], _attack_label(r)) for r in rows))
    budgets = sorted({int(r["round"]) for r in rows} & set(SECURITY_BUDGETS)) or [_last_round(rows)]
    parts, verdicts = [], []
    for budget in budgets:
        at = [r for r in rows if int(r["round"]) == budget]
        cells = {}
        for r in at:
            cells.setdefault((r["data.partition"], _attack_label(r), r["aggregator.name"]), []).append(
                value(r, pooled(r))
            )
        body = [[p, a, *(mean_std_text(cells.get((p, a, g), [])) for g in aggregators)] for p, a in settings]
        parts.append(
            f"After {budget} rounds: the global model's test accuracy (%), "
            f"{spread_note([len(v) for v in cells.values()])}.\n\n"
            + tabular.markdown_table(["partition", "attack (25% of clients)", *aggregators], body)
        )
        for partition in dict.fromkeys(p for p, _ in settings):
            attacked = [a for p, a in settings if p == partition and a != "none"]
            # A diverged model has no accuracy: the verdict counts it as 0%.
            score = {k: np.mean(np.nan_to_num(v)) for k, v in cells.items()}
            gaps = [score[partition, a, "coordinate_median"] - score[partition, a, "mean"] for a in attacked]
            wins = sum(g > 0 for g in gaps)
            verdicts.append(
                f"- {partition}, {budget} rounds: the median beats the mean under attack at {wins} of "
                f"{len(gaps)} scales (median − mean: {', '.join(f'{100 * g:+.1f}' for g in gaps)} points, a "
                "diverged seed counted as 0%); clean: "
                f"mean {mean_std_text(cells.get((partition, 'none', 'mean'), []))}, median "
                f"{mean_std_text(cells.get((partition, 'none', 'coordinate_median'), []))}."
            )
    return "\n\n".join(
        parts + ["Where the seed's claim holds (median above mean under attack):\n\n" + "\n".join(verdicts)]
    )


SECURITY_BUDGETS = (100, 300)  # rounds the security table reads (configs/signflip_attack.py BUDGETS)


def _epsilon_cell(row: dict, column: str) -> str:
    eps = value(row, column)
    return "—" if math.isnan(eps) else ("∞ (no DP)" if math.isinf(eps) else f"{eps:.3g}")


def privacy_table(tables: SweepTables) -> str:
    """Client-level DP-FedAvg: noise multiplier, epsilon under add/remove-one and replace-one, accuracy."""
    rows = results(tables)
    last = _last_round(rows)
    groups = seed_groups(rows, ["data.name", "privacy.mode", "privacy.noise_multiplier"], last)
    body = [
        [
            key[0],
            "none" if key[1] == "none" else key[2],
            _epsilon_cell(members[0], "epsilon") if key[1] != "none" else "∞ (no DP)",
            _epsilon_cell(members[0], "epsilon_replace_one") if key[1] != "none" else "∞ (no DP)",
            mean_std_text([value(r, pooled(r)) for r in members]),
        ]
        for key, members in groups.items()
    ]
    header = ["dataset", "noise multiplier", "ε add/remove one client", "ε replace one client", "test accuracy (%)"]
    return (
        f"Unit: one client (hospital); every client in every round, {last} rounds, δ = "
        f"{_delta(tables)}. Test accuracy (%) of the global model on all clients' test set "
        f"(`global_pooled_accuracy`), {_n(groups)}.\n\n" + tabular.markdown_table(header, body)
    )


def _delta(tables: SweepTables) -> str:
    found = re.search(r"delta=([0-9.e+-]+)", tables.meta.get("privacy", ""))
    return found.group(1) if found else "?"


def record_dp_table(tables: SweepTables) -> str:
    """Record-level DP-SGD inside each hospital: every hospital's epsilon (a patient the unit) and accuracy."""
    rows = results(tables)
    last = _last_round(rows)
    groups = seed_groups(rows, ["privacy.mode", "privacy.noise_multiplier"], last)
    clients = [m.group(1) for k in rows[0] for m in [re.fullmatch(r"client_accuracy\[(.+)\]", k)] if m]
    body = []
    for (mode, sigma), members in groups.items():
        eps = [_epsilon_cell(members[0], f"epsilon[{c}]") if mode != "none" else "∞" for c in clients]
        body.append(
            [
                "none" if mode == "none" else sigma,
                *eps,
                mean_std_text([value(r, pooled(r)) for r in members]),
                mean_std_text([client_values(r).mean() for r in members]),
                mean_std_text([client_values(r).min() for r in members]),
            ]
        )
    header = [
        "noise multiplier",
        *(f"ε {c}" for c in clients),
        "all test rows (global model)",
        "mean of hospitals",
        "worst",
    ]
    return (
        f"Unit: one patient, within each hospital (DP-SGD); δ = {_delta(tables)}, {last} rounds. Each "
        f"hospital's ε from its own Poisson sampling rate. Accuracy (%), {_n(groups)}.\n\n"
        + tabular.markdown_table(header, body)
    )


def _setting(row: dict, knobs: Sequence[str]) -> str:
    """``<model> <method>``, with Ditto's lambda and FedPer's local parameters."""
    shown = {k: row[k] for k in knobs}
    text = f"{shown.get('model.name', '')} {shown.get('method', '')}".strip()
    if shown.get("method") == "ditto":
        text += f" λ={shown['personalization.ditto_lambda']}"
    if shown.get("method") == "fedper" and "personalization.local_paths" in shown:
        text += f" local={', '.join(json.loads(shown['personalization.local_paths']))}"
    return text


def personalization_table(tables: SweepTables) -> str:
    """Each setting vs local-only (same model, logistic where absent) on the hospitals' own test splits, per
    split: the splits where it beats local-only on the mean of hospitals, on the worst hospital, on both."""
    rows = results(tables)
    shown = ("model.name", "method", "personalization.ditto_lambda", "personalization.local_paths")
    knobs = [k for k in tables.knobs if k in shown]
    groups = seed_groups(rows, knobs, _last_round(rows))
    per_seed = {key: {r["seed"]: client_values(r) for r in members} for key, members in groups.items()}
    reference = next(k for k in groups if dict(zip(knobs, k)).get("method") == "local_only")
    own = per_seed[reference]
    body = []
    for key, members in groups.items():
        seeds = per_seed[key]
        beat_mean = sum(seeds[s].mean() > own[s].mean() for s in seeds if s in own)
        beat_worst = sum(seeds[s].min() > own[s].min() for s in seeds if s in own)
        both = sum(seeds[s].mean() > own[s].mean() and seeds[s].min() > own[s].min() for s in seeds if s in own)
        body.append(
            [
                _setting(members[0], knobs),
                mean_std_text([v.mean() for v in seeds.values()]),
                mean_std_text([v.min() for v in seeds.values()]),
                f"{beat_mean}/{len(seeds)}",
                f"{beat_worst}/{len(seeds)}",
                f"{both}/{len(seeds)}",
            ]
        )
    header = ["setting", "mean of hospitals", "worst hospital", "beats local-only: mean", "worst", "both"]
    return (
        f"Accuracy (%) on each hospital's own test split after {_last_round(rows)} rounds, {_n(groups)}; the "
        f"last columns count the splits on which the setting beats {_setting(groups[reference][0], knobs)} on "
        "that split.\n\n" + tabular.markdown_table(header, body)
    )


EXPERIMENT_TABLES = {  # sweep name -> the table the README shows for it (others: `final_table`)
    "collaboration": collaboration_table,
    "signflip_attack": security_table,
    "privacy_utility": privacy_table,
    "record_dp": record_dp_table,
    "personalization": personalization_table,
}


def _diverged_text(row: dict) -> str:
    share = value(row, "diverged_mean")
    n = int(row.get("n") or 0)
    return f"{DIVERGED_TEXT} ({round(share * n)}/{n})" if share > 0 and n else DIVERGED_TEXT


def worst_case(final: Sequence[dict], knobs: Sequence[str], among: Sequence[str] | None = None) -> list[dict]:
    """Per setting but the attack (aggregator, malicious fraction, ...): the final row of its worst attack.

    The worst attack has the lowest mean final accuracy; a diverged setting
    (non-finite model) is worse than any accuracy. Candidates: the attacks
    ``among`` (default: all), never the no-attack rows. Rows keep the
    setting's first-seen order.
    """
    others = [k for k in knobs if k not in ("seed", "attack.name")]
    worst: dict[tuple, dict] = {}
    rank = lambda r: -math.inf if diverged(r) else _pct(r, "mean")  # noqa: E731
    for row in final:
        if _reference(row, "attack.name") or (among is not None and row["attack.name"] not in among):
            continue
        key = tuple(row[k] for k in others)
        if key not in worst or rank(row) < rank(worst[key]):
            worst[key] = row
    return list(worst.values())


def _worst_case_applies(tables: SweepTables) -> bool:
    if not all(k in tables.knobs for k in ("aggregator.name", "attack.name", "attack.fraction")):
        return False
    return len({r["attack.name"] for r in tables.final if not _reference(r, "attack.name")}) > 1


def worst_case_table(tables: SweepTables) -> str:
    """Markdown: each aggregator's lowest final accuracy (%) over the attacks at each malicious fraction.

    Cells: ``mean ± std (attack)`` of the worst attack; the no-attack column
    is the reference. Rows sorted by the worst case at the largest fraction,
    best first (diverged last).
    """
    final, knobs = tables.final, tables.meta["knobs"]
    worst = worst_case(final, knobs)
    fractions = sorted({r["attack.fraction"] for r in worst}, key=float)
    clean = {r["aggregator.name"]: r for r in final if _reference(r, "attack.name")}
    by = {(r["aggregator.name"], r["attack.fraction"]): r for r in worst}
    names = list(dict.fromkeys(r["aggregator.name"] for r in worst))
    last = lambda name: by.get((name, fractions[-1]))  # noqa: E731
    names.sort(key=lambda a: math.inf if last(a) is None or diverged(last(a)) else -_pct(last(a), "mean"))
    header = ["aggregator", "no attack", *(f"{100 * float(f):g}% attackers: worst (attack)" for f in fractions)]
    body = []
    for name in names:
        cells = [format_mean_std(clean[name]) if name in clean else "—"]
        for f in fractions:
            row = by.get((name, f))
            cells.append("—" if row is None else f"{format_mean_std(row)} ({row['attack.name']})")
        body.append([name, *cells])
    return tabular.markdown_table(header, body)


def adaptive_vs_fixed_table(tables: SweepTables) -> str | None:
    """Markdown: per aggregator and fraction, the worst fixed attack, the worst adaptive one, and the gap.

    Adaptive: `medfed_jax.attacks.ADAPTIVE_ATTACKS`. None unless the sweep has both kinds.
    """
    from medfed_jax.attacks import ADAPTIVE_ATTACKS

    if not _worst_case_applies(tables):
        return None
    names = {r["attack.name"] for r in tables.final if not _reference(r, "attack.name")}
    fixed, adaptive = sorted(names - set(ADAPTIVE_ATTACKS)), sorted(names & set(ADAPTIVE_ATTACKS))
    if not fixed or not adaptive:
        return None
    knobs = tables.meta["knobs"]
    key = lambda r: (r["aggregator.name"], r["attack.fraction"])  # noqa: E731
    worst_fixed = {key(r): r for r in worst_case(tables.final, knobs, fixed)}
    header = ["aggregator", "attackers", "worst fixed attack", "worst adaptive attack", "adaptive - fixed (points)"]
    body = []
    for row in worst_case(tables.final, knobs, adaptive):
        other = worst_fixed[key(row)]
        gap = "—" if diverged(row) or diverged(other) else f"{_pct(row, 'mean') - _pct(other, 'mean'):+.1f}"
        cells = [f"{format_mean_std(r)} ({r['attack.name']})" for r in (other, row)]
        body.append([row["aggregator.name"], f"{100 * float(row['attack.fraction']):g}%", *cells, gap])
    return tabular.markdown_table(header, body)

"""The worst case over the attacks: each aggregator's lowest final accuracy per malicious fraction."""

from __future__ import annotations

import pytest
from test_report import _synthetic_workdir

from medfed_jax import report
from medfed_jax.report import plotting as report_plotting
from medfed_jax.report import rows as report_rows


def test_worst_case_picks_the_lowest_attack_per_aggregator_and_fraction(tmp_path):
    expected = _synthetic_workdir(str(tmp_path), attacks=("sign_flip", "ipm", "alie"), fractions=(0.1, 0.3))
    tables = report.load(str(tmp_path))
    worst = report.worst_case(tables.final, tables.meta["knobs"])
    assert len(worst) == 2 * 2  # aggregators x fractions; the no-attack rows are not candidates
    for row in worst:
        key = (row["aggregator.name"], float(row["attack.fraction"]))
        candidates = {at: acc for (ag, at, fr), acc in expected.items() if (ag, fr) == key and at != "none"}
        assert row["attack.name"] == min(candidates, key=candidates.get) == "ipm"
        assert report_rows._pct(row, "mean") == pytest.approx(min(candidates.values()), abs=1e-4)
    table = report.worst_case_table(tables)
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["aggregator", "no attack", "10% attackers: worst (attack)", "30% attackers: worst (attack)"]
    median = next(line for line in lines if line.startswith("| coordinate_median "))
    assert f"{expected[('coordinate_median', 'ipm', 0.3)]:.1f} ± " in median and "(ipm)" in median
    assert [line.split()[1] for line in lines[2:]] == ["coordinate_median", "mean"]  # best worst case first
    assert "## Worst case over the attacks" in open(report.write_report(str(tmp_path))[0]).read()


def test_a_diverged_attack_is_the_worst_case_and_shows_as_diverged(tmp_path):
    _synthetic_workdir(str(tmp_path), diverged=(("mean", "sign_flip"),))
    tables = report.load(str(tmp_path))
    worst = {
        (r["aggregator.name"], r["attack.fraction"]): r for r in report.worst_case(tables.final, tables.meta["knobs"])
    }
    assert worst[("mean", "0.1")]["attack.name"] == "sign_flip" and report.diverged(worst[("mean", "0.1")])
    line = next(r for r in report.worst_case_table(tables).splitlines() if r.startswith("| mean "))
    assert "diverged (2/2) (sign_flip)" in line and "nan" not in line
    fig = report.draw_worst_case(tables)
    assert report.DIVERGED_TEXT in [t.get_text() for ax in fig.axes for t in ax.texts]
    report_plotting._pyplot().close(fig)


def test_adaptive_vs_fixed_table_gives_each_kind_its_worst_and_the_gap(tmp_path):
    expected = _synthetic_workdir(str(tmp_path), attacks=("sign_flip", "ipm", "opt_ipm"), fractions=(0.1, 0.3))
    table = report.adaptive_vs_fixed_table(report.load(str(tmp_path)))
    lines = table.splitlines()[2:]
    assert len(lines) == 4  # aggregators x fractions
    for line in lines:
        aggregator, attackers, fixed, adaptive, gap = (c.strip() for c in line.strip("|").split("|"))
        fraction = float(attackers.rstrip("%")) / 100
        assert fixed.endswith("(ipm)") and adaptive.endswith("(opt_ipm)")  # the synthetic ipm loses 5 points more
        want = expected[(aggregator, "opt_ipm", fraction)] - expected[(aggregator, "ipm", fraction)]
        assert float(gap) == pytest.approx(want, abs=0.051)
    assert report.adaptive_vs_fixed_table(report.load(_only_fixed(tmp_path))) is None


def _only_fixed(tmp_path):
    path = tmp_path / "fixed"
    path.mkdir()
    _synthetic_workdir(str(path))
    return str(path)

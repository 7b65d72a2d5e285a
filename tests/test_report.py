"""Reports: every promised figure from a tiny sweep, the heatmap's numbers, the README section."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_sweep import tiny_sweep

from medfed_jax import report, sweep


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    """A real tiny sweep: lr x noise multiplier x malicious fraction x 2 seeds on 4 clients."""
    workdir = str(tmp_path_factory.mktemp("tiny"))
    sweep.run_sweep(tiny_sweep(), workdir, log=None)
    return workdir


def test_report_on_a_tiny_sweep_writes_its_figures_and_tables(tiny_workdir):
    path, figures = report.write_report(tiny_workdir)
    names = sorted(os.path.basename(f) for f in figures)
    # No aggregator x attack grid in this sweep, so no heatmap; every other figure applies.
    assert names == ["clients.png", "curves.png", "epsilon.png", "fraction.png"]
    for figure in figures:
        with open(figure, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    text = open(path).read()
    for name in names:
        assert f"]({name})" in text
    assert "Aggregator x attack heatmap: not drawn" in text
    # The final table's numbers are summary.csv's final round, in percent.
    final = report.read_csv(os.path.join(tiny_workdir, "final.csv"))
    assert len(final) == 8 and {r["round"] for r in final} == {"4"}
    first = final[0]
    cell = f"{100 * float(first['test_accuracy_mean']):.1f} ± {100 * float(first['test_accuracy_std']):.1f}"
    assert cell in text


def _synthetic_workdir(path: str) -> dict:
    """summary.csv + sweep.json of a made-up aggregator x attack x fraction sweep with known accuracies."""

    def accuracy(aggregator, attack, fraction, seed, round_done):
        drop = {"mean": 1.0, "coordinate_median": 0.2}[aggregator] * fraction + (0.05 if attack == "ipm" else 0.0)
        return 0.9 - drop - 0.01 * seed - (0.1 if round_done == 5 else 0.0)

    settings = [("none", 0.0)] + [(a, f) for a in ("sign_flip", "ipm") for f in (0.1, 0.3)]
    rows = []
    for attack, fraction in settings:
        for aggregator in ("mean", "coordinate_median"):
            for seed in (0, 1):
                for round_done in (5, 10):
                    rows.append(
                        {
                            "cell": "0",
                            "attack.name": attack,
                            "attack.fraction": repr(fraction),
                            "aggregator.name": aggregator,
                            "seed": str(seed),
                            "round": str(round_done),
                            "test_accuracy": sweep.format_float(
                                accuracy(aggregator, attack, fraction, seed, round_done)
                            ),
                        }
                    )
    knobs = ("attack.name", "attack.fraction", "aggregator.name", "seed")
    plan = sweep.Plan(knobs, (), (), 0)
    with open(os.path.join(path, "summary.csv"), "w") as f:
        f.write(sweep.to_csv(sweep.summary_rows(plan, rows)))
    meta = {"name": "synthetic", "knobs": list(knobs), "numeric_knobs": ["attack.fraction", "seed"]}
    meta.update(structural_knobs=["attack.name", "aggregator.name"], cells=20, privacy="", programs=[{}] * 6)
    with open(os.path.join(path, "sweep.json"), "w") as f:
        json.dump(meta, f)
    return {
        (ag, at, fr): 100 * np.mean([accuracy(ag, at, fr, s, 10) for s in (0, 1)])
        for at, fr in settings
        for ag in ("mean", "coordinate_median")
    }


def test_heatmap_holds_final_means_with_the_no_attack_row_in_every_panel(tmp_path):
    expected = _synthetic_workdir(str(tmp_path))
    tables = report.load(str(tmp_path))
    panels = report._panel_rows(tables.final, ["attack.fraction"])
    assert list(panels) == [("0.1",), ("0.3",)]
    for (fraction,), rows in panels.items():
        aggregators, attacks, matrix = report.heatmap_matrix(rows)
        assert aggregators == ["mean", "coordinate_median"] and attacks == ["none", "sign_flip", "ipm"]
        for i, ag in enumerate(aggregators):
            for j, at in enumerate(attacks):
                want = expected[(ag, at, 0.0 if at == "none" else float(fraction))]
                assert matrix[i, j] == pytest.approx(want, abs=1e-4)
    _, figures = report.write_report(str(tmp_path))
    assert sorted(os.path.basename(f) for f in figures) == ["curves.png", "fraction.png", "heatmap.png"]


def test_readme_section_is_replaced_from_the_generated_tables(tiny_workdir, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n\n{report.START}\nold results\n{report.END}\n\n## After\n")
    section = report.results_section([tiny_workdir], str(tmp_path), str(tmp_path / "assets"), "make reproduce", "")
    report.update_readme(str(readme), section)
    text = readme.read_text()
    assert "old results" not in text and text.startswith("# title") and text.endswith("## After\n")
    tables = report.load(tiny_workdir)
    assert report.final_table(tables.summary, tables.meta["knobs"]) in text
    copied = sorted(os.listdir(tmp_path / "assets" / os.path.basename(tiny_workdir)))
    assert copied == ["clients.png", "curves.png", "epsilon.png", "fraction.png"]
    plain = tmp_path / "PLAIN.md"
    plain.write_text("# no markers\n")
    report.update_readme(str(plain), section)
    assert plain.read_text().startswith("# no markers\n\n" + report.START)

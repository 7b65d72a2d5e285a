"""Reports: every promised figure from a tiny sweep, the heatmap's numbers, the README section."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from test_sweep import tiny_sweep

from medfed_jax import report, sweep, tabular
from medfed_jax.report import figures as report_figures
from medfed_jax.report import plotting as report_plotting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    final = tabular.read_csv(os.path.join(tiny_workdir, "final.csv"))
    assert len(final) == 8 and {r["round"] for r in final} == {"4"}
    first = final[0]
    mean, std = (100 * float(first[f"global_pooled_accuracy_{stat}"]) for stat in ("mean", "std"))
    cell = f"{mean:.1f} ± {std:.1f}"
    assert cell in text


def _synthetic_workdir(path: str, diverged: tuple = (), attacks=("sign_flip", "ipm"), fractions=(0.1, 0.3)) -> dict:
    """summary.csv + sweep.json of a made-up aggregator x attack x fraction sweep with known accuracies.

    ``diverged``: (aggregator, attack) pairs whose models diverge under attack: accuracy nan, ``diverged`` 1.
    """

    def accuracy(aggregator, attack, fraction, seed, round_done):
        drop = {"mean": 1.0, "coordinate_median": 0.2}[aggregator] * fraction + (0.05 if attack == "ipm" else 0.0)
        return 0.9 - drop - 0.01 * seed - (0.1 if round_done == 5 else 0.0)

    settings = [("none", 0.0)] + [(a, f) for a in attacks for f in fractions]
    rows = []
    for attack, fraction in settings:
        for aggregator in ("mean", "coordinate_median"):
            broken = (aggregator, attack) in diverged
            for seed in (0, 1):
                for round_done in (5, 10):
                    value = math.nan if broken else accuracy(aggregator, attack, fraction, seed, round_done)
                    rows.append(
                        {
                            "cell": "0",
                            "attack.name": attack,
                            "attack.fraction": repr(fraction),
                            "aggregator.name": aggregator,
                            "seed": str(seed),
                            "round": str(round_done),
                            "global_pooled_accuracy": sweep.format_float(value),
                            "diverged": str(int(broken)),
                        }
                    )
    knobs = ("attack.name", "attack.fraction", "aggregator.name", "seed")
    plan = sweep.Plan(knobs, (), (), 0)
    with open(os.path.join(path, "summary.csv"), "w") as f:
        f.write(tabular.to_csv(sweep.summary_rows(plan, rows)))
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
    panels = report_figures._panel_rows(tables.final, ["attack.fraction"])
    assert list(panels) == [("0.1",), ("0.3",)]
    for (fraction,), rows in panels.items():
        aggregators, attacks, matrix, broken = report.heatmap_matrix(rows)
        assert not broken.any()
        assert aggregators == ["mean", "coordinate_median"] and attacks == ["none", "sign_flip", "ipm"]
        for i, ag in enumerate(aggregators):
            for j, at in enumerate(attacks):
                want = expected[(ag, at, 0.0 if at == "none" else float(fraction))]
                assert matrix[i, j] == pytest.approx(want, abs=1e-4)
    _, figures = report.write_report(str(tmp_path))
    assert sorted(os.path.basename(f) for f in figures) == [
        "curves.png",
        "fraction.png",
        "heatmap.png",
        "worst_case.png",
    ]


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


def _png_size(fig) -> tuple[int, int]:
    """(width, height) in pixels of the figure as saved."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=report.DPI)
    header = buffer.getvalue()[16:24]
    return int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in [*ax.texts, *ax.get_xticklabels()]]


def test_every_figure_has_one_legend_outside_its_panels_and_fits_the_readme_width(tiny_workdir, tmp_path):
    _synthetic_workdir(str(tmp_path))
    # Figure -> legends: one per figure with several settings; none for the heatmap (a colour bar) and
    # for the tiny sweep's fraction plot (one line per panel).
    expected = {
        tiny_workdir: {"curves.png": 1, "fraction.png": 0, "epsilon.png": 1, "clients.png": 1},
        str(tmp_path): {"curves.png": 1, "heatmap.png": 0, "fraction.png": 1, "worst_case.png": 1},
    }
    for workdir, legends in expected.items():
        tables = report.load(workdir)
        drawn = {name: draw(tables) for name, draw, _ in report.FIGURES}
        assert {name for name, fig in drawn.items() if fig is not None} == set(legends)
        for name, count in legends.items():
            fig = drawn[name]
            assert all(ax.get_legend() is None for ax in fig.axes), name  # nothing drawn over the data
            assert len(fig.legends) == count, name
            assert _png_size(fig)[0] <= report.MAX_WIDTH_INCHES * report.DPI + 1, name
            report_plotting._pyplot().close(fig)


def test_the_wide_heatmap_is_a_grid_within_the_readme_width(tmp_path):
    """Seven attacks x three fractions (the robustness matrix's shape) would be 3 panels in a row, 3672 px."""
    attacks = ("sign_flip", "ipm", "alie", "gaussian", "scaling", "label_flip", "non_finite")
    _synthetic_workdir(str(tmp_path), attacks=attacks, fractions=(0.1, 0.2, 0.3))
    fig = report.draw_heatmap(report.load(str(tmp_path)))
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == 3 and len(panels[0].get_xticklabels()) == 1 + len(attacks)
    assert _png_size(fig)[0] <= report.MAX_WIDTH_INCHES * report.DPI + 1
    assert len({ax.get_position().y0 for ax in panels}) > 1  # more than one row of panels


def test_fraction_plot_labels_the_zero_point_as_no_attack(tmp_path):
    _synthetic_workdir(str(tmp_path))
    fig = report.draw_fraction(report.load(str(tmp_path)))
    for ax in fig.axes[:1]:
        labels = {t.get_position()[0]: t.get_text() for t in ax.get_xticklabels()}
        assert labels[0] == report.NO_ATTACK_TEXT and "no attack" in labels[0]


def test_diverged_settings_show_as_diverged_never_as_a_number(tmp_path):
    _synthetic_workdir(str(tmp_path), diverged=(("mean", "sign_flip"),))
    tables = report.load(str(tmp_path))
    panel = report_figures._panel_rows(tables.final, ["attack.fraction"])[("0.1",)]
    aggregators, attacks, matrix, broken = report.heatmap_matrix(panel)
    at = aggregators.index("mean"), attacks.index("sign_flip")
    assert broken[at] and broken.sum() == 1 and math.isnan(matrix[at])
    heatmap = report.draw_heatmap(tables)
    ax = heatmap.axes[0]
    cell_texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in ax.texts}
    assert cell_texts[at[::-1]] == report.DIVERGED_TEXT  # (x = attack, y = aggregator)
    assert any(p.get_hatch() for p in ax.patches)
    assert "10.0" not in cell_texts.values()
    for draw in (report.draw_fraction, report.draw_curves):  # a labelled cross, explained in the legend
        fig = draw(tables)
        assert report.DIVERGED_TEXT in _texts(fig)
        assert report.DIVERGED_LEGEND in [t.get_text() for t in fig.legends[0].get_texts()]
    table = report.final_table(tables.summary, tables.meta["knobs"])
    line = next(r for r in table.splitlines() if "| sign_flip " in r and "| mean " in r)
    assert "diverged (2/2)" in line and "nan" not in line


def test_section_flag_writes_the_results_section_to_a_file_and_leaves_the_readme_alone(tiny_workdir, tmp_path):
    """`make reproduce` runs this; only `make readme` (--readme) rewrites README.md."""
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.START}\nold results\n{report.END}\n")
    section = tmp_path / "runs" / "results_section.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    args = [f"--workdir={tiny_workdir}", f"--section={section}", f"--assets={tmp_path / 'figures'}"]
    done = subprocess.run(
        [sys.executable, "-m", "medfed_jax.report", *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote the Results section to {section}" in done.stdout and "README.md unchanged" in done.stdout
    assert readme.read_text() == f"{report.START}\nold results\n{report.END}\n"
    text = section.read_text()
    assert text.startswith(report.START) and text.rstrip().endswith(report.END)
    tables = report.load(tiny_workdir)
    assert report.final_table(tables.summary, tables.meta["knobs"]) in text
    assert f"](../figures/{os.path.basename(tiny_workdir)}/curves.png)" in text  # relative to the section file

"""The command line: help, refusals (one line, exit 2, nothing written), configs by name, the workdir, corrupt files."""

import csv
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import ml_collections
import numpy as np
import pytest

from medfed_jax import cli, config_files, runner, sweep, tabular
from medfed_jax import config as config_lib
from medfed_jax.data import heart, medmnist

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ("--config=quickstart", "--config.rounds=2", "--config.eval_every=1", "--config.model.widths=(4,)")


def run_cli(*args: str) -> None:
    """What ``python -m medfed_jax <args>`` does, in this process."""
    cli.main(cli.parse_or_refuse(["medfed_jax", *args]))


def refused(capsys, *args: str) -> str:
    """Run a command that must be refused: exit status 2 and one ``error:`` line on stderr (returned)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def write_config(tmp_path, body: str, name: str = "exp.py") -> str:
    path = tmp_path / name
    path.write_text("from medfed_jax import config\n\n\ndef get_config():\n    cfg = config.default_config()\n" + body)
    return str(path)


def leaves(section, prefix=""):
    """Independent walk of a ConfigDict: dotted path -> value (sections are not leaves, ``sweep`` is one)."""
    out = {}
    for key, value in section.items():
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------- --help


def test_help_lists_every_config_field_with_its_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_command_line(["medfed_jax", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for path, value in leaves(config_lib.default_config()).items():
        shown = (
            "{}" if isinstance(value, ml_collections.ConfigDict) else value if isinstance(value, str) else repr(value)
        )
        flag = f"--config.{path}={shown}"
        line = next((line for line in lines if line.strip().startswith(flag + " ")), None)
        assert line is not None, f"{flag} missing from --help"
        assert len(line.strip()[len(flag) :].strip()) > 8, f"{flag} has no meaning in --help"
    for name in config_files.shipped_names():
        assert name in out
    for section in ("run", "data", "privacy", "personalization"):
        assert f"[{section}]" in out


def test_help_for_one_section_shows_only_that_section(capsys):
    with pytest.raises(SystemExit):
        cli.parse_command_line(["medfed_jax", "--help=privacy"])
    out = capsys.readouterr().out
    fields = [line.split("=")[0].strip() for line in out.splitlines() if line.strip().startswith("--config.")]
    want = [f"--config.{p}" for p in leaves(config_lib.default_config()) if p.startswith("privacy.")]
    assert sorted(fields) == sorted(want)
    assert "choose one of run, data" in refused(capsys, "--help=privcy")


# --------------------------------------------------------------------------- refusals


BAD_FILES = {
    "syntax": ("    return cfg(\n", "exp.py, line 6", "syntax error"),
    "unknown_field": (
        "    cfg.local.lrr = 0.1\n    return cfg\n",
        "'local.lrr' does not exist; did you mean 'local.lr'",
        "",
    ),
    "string_for_number": ("    cfg.rounds = '10'\n    return cfg\n", "exp.py, line 6: rounds", "without quotes"),
    "negative_seed": ("    cfg.seed = -1\n    return cfg\n", "seed=-1 is out of range", "2**32 - 1"),
    "huge_epochs": ("    cfg.local.epochs = 2**40\n    return cfg\n", "local.epochs=1099511627776 is out of range", ""),
    "bool_for_int": ("    cfg.rounds = True\n    return cfg\n", "rounds=True is a bool", "integer"),
    "no_get_config": (None, "defines no get_config", ""),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_config_files_are_refused_in_one_line(case, tmp_path, capsys, forbid_compile):
    body, want, also = BAD_FILES[case]
    path = write_config(tmp_path, body) if body else str(tmp_path / "exp.py")
    if body is None:
        pathlib.Path(path).write_text("x = 1\n")
    workdir = tmp_path / "run"
    err = refused(capsys, f"--config={path}", f"--workdir={workdir}")
    assert want in err and also in err
    assert not workdir.exists()


BAD_FLAGS = {
    "missing_file": (("--config=nowhere/exp.py",), "config file nowhere/exp.py not found"),
    "unknown_name": (("--config=heart_fedav",), "did you mean 'heart_fedavg'"),
    "no_config": ((), "--config is required"),
    "seed_2_32": (("--config=quickstart", "--config.seed=4294967296"), "seed=4294967296 is out of range"),
    "seed_negative": (("--config=quickstart", "--config.seed=-1"), "seed=-1 is out of range"),
    "seeds_overflow": (("--config=quickstart", "--config.seed=4294967295", "--seeds=2"), "beyond 2**32 - 1"),
    "seeds_zero": (("--config=quickstart", "--seeds=0"), "--seeds=0 must be >= 1"),
    "string_for_int": (("--config=quickstart", "--config.rounds=ten"), "rounds takes an integer"),
    "float_for_int": (("--config=quickstart", "--config.local.batch_size=1.5"), "local.batch_size takes an integer"),
    "string_for_float": (("--config=quickstart", "--config.local.lr=fast"), "local.lr takes a number"),
    "bad_bool": (("--config=quickstart", "--config.privacy.adaptive_clipping=maybe"), "takes true or false"),
    "typo_override": (("--config=quickstart", "--config.local.lrr=0.1"), "did you mean 'local.lr'"),
    "negative_batch": (("--config=quickstart", "--config.local.batch_size=-3"), "local.batch_size=-3 is out of range"),
    "float_width": (("--config=quickstart", "--config.model.widths=(8.5,)"), "model.widths=(8.5,) must be"),
    "zero_rounds": (("--config=quickstart", "--config.rounds=0"), "rounds=0"),
    "zero_eval_every": (("--config=quickstart", "--config.eval_every=0"), "eval_every=0"),
    "big_cohort": (("--config=quickstart", "--config.cohort_size=9"), "cohort_size=9"),
    "zero_clients": (("--config=quickstart", "--config.data.num_clients=0"), "data.num_clients=0"),
    "no_value": (("--config=quickstart", "--config.rounds"), "give the value with '='"),
    "unknown_flag": (("--config=quickstart", "--workdri=x"), "Did you mean: workdir"),
    "bad_seeds_flag": (("--config=quickstart", "--seeds=two"), "--seeds=two"),
    "positional": (("--config=quickstart", "extra"), "unexpected arguments ['extra']"),
    "sweep_knob": (("--config=signflip_attack", "--config.sweep.chunk_size=-1"), "sweep.chunk_size=-1"),
    "sweep_devices": (("--config=signflip_attack", "--sweep_devices=gpu"), "--sweep_devices='gpu' is unknown"),
    "sweep_devices_one": (("--config=signflip_attack", "--sweep_devices=cells"), "splits work over several devices"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_command_lines_are_refused_in_one_line(case, tmp_path, capsys, forbid_compile):
    args, want = BAD_FLAGS[case]
    workdir = tmp_path / "run"
    err = refused(capsys, *args, f"--workdir={workdir}")
    assert want in err
    assert not workdir.exists()


def test_missing_data_file_is_refused_naming_it(tmp_path, capsys, forbid_compile):
    args = ("--config.data.name=medmnist", "--config.data.partition=iid", f"--config.data.root={tmp_path}")
    err = refused(capsys, "--config=quickstart", *args)
    assert f"{tmp_path}/pathmnist.npz" in err and "python -m medmnist download" in err


def test_debug_shows_the_exception_itself(tmp_path):
    with pytest.raises(config_files.ConfigError, match="did you mean 'rounds'"):
        run_cli("--config=quickstart", "--config.roundz=3", "--debug")


# --------------------------------------------------------------------------- configs by name, in the wheel


def test_a_config_by_name_equals_the_same_file_by_path():
    for name in ("heart_fedavg", "signflip_attack"):
        by_name = config_files.load_config(name)
        by_path = config_files.load_config(str(REPO / "configs" / f"{name}.py"))
        assert config_lib.to_json(by_name) == config_lib.to_json(by_path)
    # sweeps built from sibling configs by name: the heart cell carries heart_fedavg's settings
    heart_cfg = config_files.load_config("heart_fedavg")
    cells = config_files.load_config("collaboration").sweep.cells
    heart_cell = next(c for c in cells if c["data.name"] == "heart")
    assert heart_cell["model.name"] == heart_cfg.model.name == "logistic"


def test_overrides_parse_as_the_fields_kind():
    cfg = config_files.load_config("quickstart")
    for path, text, want in [
        ("model.widths", "(8, 4)", (8, 4)),
        ("privacy.adaptive_clipping", "true", True),
        ("local.lr", "1", 1.0),
        ("data.name", "digits", "digits"),
        ("baselines", "()", ()),
        ("seed", "4294967295", 2**32 - 1),
    ]:
        config_files.apply_override(cfg, path, text)
        got = config_lib.get_path(cfg, path)
        assert got == want and type(got) is type(want), (path, got)


def test_the_wheel_ships_the_configs_and_finds_them_by_name(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("medfed_jax", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(source), "-w", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("medfed_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (REPO / "configs").glob("*.py"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("medfed_jax/configs/")) == shipped
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    found = config_files.shipped_dir(site / "medfed_jax")
    assert found == site / "medfed_jax" / "configs"
    cfg = config_files.load_config(str(found / "heart_fedavg.py"))
    assert cfg.data.name == "heart"


# --------------------------------------------------------------------------- the workdir


def small(**overrides):
    cfg = config_files.load_config("quickstart")
    for path, value in overrides.items():
        config_lib.set_path(cfg, path, value)
    return cfg


OURS = ("history.csv", "summary.json", "checkpoint_federated.npz", "results.csv", "chunks/0123abcd.json", "report.md")
THEIRS = ("notes.txt", "data/patients.csv", "chunks/mine.txt", "history.csv.bak", "draft.tmp123")


def fill(workdir: pathlib.Path, names) -> None:
    for name in names:
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text(f"content of {name}")


def snapshot(workdir: pathlib.Path) -> dict:
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


def test_overwrite_removes_only_medfed_jax_files(tmp_path):
    workdir = tmp_path / "run"
    cli.prepare_workdir(str(workdir), small(), overwrite=False)
    fill(workdir, OURS + THEIRS + ("summary.csv.tmp4242",))
    with pytest.raises(ValueError, match="different config"):
        cli.prepare_workdir(str(workdir), small(**{"local.lr": 0.2}), overwrite=False)
    cli.prepare_workdir(str(workdir), small(**{"local.lr": 0.2}), overwrite=True)
    assert sorted(snapshot(workdir)) == sorted(["config.json", *THEIRS])
    assert '"lr": 0.2' in (workdir / "config.json").read_text()


def test_a_refused_overwrite_changes_nothing(tmp_path, capsys, forbid_compile):
    workdir = tmp_path / "run"
    cli.prepare_workdir(str(workdir), small(), overwrite=False)
    fill(workdir, OURS + THEIRS)
    before = snapshot(workdir)
    refused(capsys, "--config=quickstart", "--config.local.lr=-1", f"--workdir={workdir}", "--overwrite")
    refused(capsys, "--config=quickstart", "--config.local.lr=0.3", f"--workdir={workdir}")  # different config
    assert snapshot(workdir) == before


def test_stale_temporaries_are_removed_on_the_next_run(tmp_path):
    workdir = tmp_path / "run"
    cli.prepare_workdir(str(workdir), small(), overwrite=False)
    fill(workdir, OURS + THEIRS + ("summary.json.tmp999999", "chunks/0123abcd.json.tmp7", "config.json.tmp12"))
    cli.prepare_workdir(str(workdir), small(), overwrite=False)  # same config: resume
    assert sorted(snapshot(workdir)) == sorted(["config.json", *OURS, *THEIRS])


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("old")

    def fail(f):
        f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        tabular.write_atomic(str(path), fail)
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"] and path.read_text() == "old"


def test_run_resume_corrupt_checkpoint_and_overwrite(tmp_path):
    """A run, its checkpoint truncated, the same command as a user runs it, then ``--overwrite``.

    The real entry point (a subprocess) refuses in one stderr line with exit
    status 2, after the backend started: no traceback, no backend INFO line.
    """
    workdir = tmp_path / "run"
    args = (*TINY, "--config.baselines=()", f"--workdir={workdir}")
    run_cli(*args)
    checkpoint = workdir / "checkpoint_federated.npz"
    rows = history_without_times(workdir)
    assert [r["round"] for r in rows] == ["1", "2"]
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # truncated, as by a full disk
    resumed = subprocess.run(
        [sys.executable, "-m", "medfed_jax", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
    )
    assert resumed.returncode == 2 and resumed.stderr.count("\n") == 1, resumed.stderr
    assert resumed.stderr.startswith(f"error: {checkpoint} is corrupt")
    assert "rerun with --overwrite or delete it" in resumed.stderr
    run_cli(*args, "--overwrite")
    assert history_without_times(workdir) == rows  # the same run again, from scratch


def history_without_times(workdir: pathlib.Path) -> list[dict]:
    with open(workdir / "history.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(f)]


@pytest.mark.parametrize("damage", ["truncated", "random_bytes", "other_shapes"])
def test_corrupt_checkpoints_name_the_file_and_the_remedy(tmp_path, damage):
    path = str(tmp_path / "checkpoint_federated.npz")
    state = {"w": np.arange(6.0).reshape(2, 3), "round": np.int32(4)}
    evaluation = runner.Evaluation(
        round=4, elapsed_s=1.5, metrics={"global_pooled_accuracy": np.asarray([0.75], np.float32)}
    )
    runner.save_checkpoint(path, state, [evaluation])
    restored, history = runner.load_checkpoint(path, state)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert [(e.round, e.elapsed_s, e.metrics["global_pooled_accuracy"].tolist()) for e in history] == [(4, 1.5, [0.75])]
    if damage == "truncated":
        data = pathlib.Path(path).read_bytes()
        pathlib.Path(path).write_bytes(data[: len(data) // 2])
    elif damage == "random_bytes":
        pathlib.Path(path).write_bytes(np.random.default_rng(0).bytes(500))
    else:
        runner.save_checkpoint(path, {"w": np.zeros((3, 3)), "round": np.int32(4)}, [])
    with pytest.raises(runner.CorruptFile, match=re.escape(path) + " is corrupt.*rerun with --overwrite or delete it"):
        runner.load_checkpoint(path, state)


@pytest.mark.parametrize("text", ['{"cells": [0, 1], "history": {"test_acc', "[1, 2]", ""])
def test_a_corrupt_sweep_chunk_names_the_file_and_the_remedy(tmp_path, text):
    path = tmp_path / "chunk.json"
    path.write_text(text)
    with pytest.raises(runner.CorruptFile, match=re.escape(str(path)) + " is corrupt.*delete it"):
        sweep.load_chunk(str(path))


# --------------------------------------------------------------------------- corrupt data files


def test_corrupt_medmnist_files_name_the_file_and_the_remedy(tmp_path):
    path = tmp_path / "pneumoniamnist.npz"
    path.write_bytes(np.random.default_rng(1).bytes(2000))
    with pytest.raises(ValueError, match=re.escape(f"{path} is not") + ".*python -m medmnist download") as err:
        medmnist.load_medmnist("pneumoniamnist", root=tmp_path)
    assert "allow_pickle" not in str(err.value)
    rng = np.random.default_rng(2)
    arrays = {f"{s}_images": rng.integers(0, 255, (8, 28, 28), dtype=np.uint8) for s in medmnist.SPLITS}
    arrays.update({f"{s}_labels": np.zeros((8, 1), np.uint8) for s in medmnist.SPLITS})
    np.savez_compressed(path, **arrays)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 300])  # truncated download
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable .npz file")):
        medmnist.load_medmnist("pneumoniamnist", root=tmp_path)


def bundled_heart_lines() -> list[str]:
    source = heart.importlib.resources.files("medfed_jax.data").joinpath("heart_disease_uci.csv")
    return source.read_text().splitlines()


@pytest.mark.parametrize(
    "column, value, message",
    [("chol", "abc", "'abc' is not a number"), ("cp", "chest pain", "unknown value 'chest pain'"), ("num", "x", "")],
)
def test_a_malformed_heart_csv_value_names_file_line_and_column(tmp_path, column, value, message):
    lines = bundled_heart_lines()
    header = lines[0].split(",")
    row = lines[10].split(",")
    row[header.index(column)] = value
    lines[10] = ",".join(row)
    path = tmp_path / "heart.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 11, column '{column}': ") + message) as err:
        heart.read_heart_disease(path)
    assert "restore it" in str(err.value)


def test_the_bundled_heart_csv_reads_as_before():
    x, y, hospital = heart.read_heart_disease()
    assert x.shape == (740, 13) and y.shape == (740,)
    assert [int(np.sum(hospital == h)) for h in heart.HOSPITALS] == [304, 260, 46, 130]


# --------------------------------------------------------------------------- the final table


def test_a_wide_final_table_shows_client_quartiles_and_keeps_narrow_ones_whole():
    rng = np.random.default_rng(3)
    names = tuple(f"client{c}" for c in range(20))
    acc = rng.uniform(0.4, 0.9, size=(3, 20))  # 3 seeds
    finals = {
        "federated": {
            "client_accuracy": acc,
            "global_pooled_accuracy": acc.mean(1),
            "global_pooled_auc": acc.mean(1),
            "diverged": np.zeros(3),
        }
    }
    wide = cli.final_accuracy_table(finals, names)
    assert max(len(line) for line in wide.splitlines()) <= cli.MAX_TABLE_WIDTH
    assert "client0" not in wide and "20 clients" in wide
    header = [c.strip() for c in wide.splitlines()[0].split("|")[1:-1]]
    row = [c.strip() for c in wide.splitlines()[2].split("|")[1:-1]]
    median = 100 * np.median(acc, axis=1)
    assert row[header.index("client 50%")] == f"{median.mean():.1f} ± {median.std(ddof=1):.1f}"
    best = 100 * acc.max(1)
    assert row[header.index("best client")] == f"{best.mean():.1f} ± {best.std(ddof=1):.1f}"
    narrow = cli.final_accuracy_table(
        {"federated": {k: v[:, :4] if v.ndim == 2 else v for k, v in finals["federated"].items()}}, names[:4]
    )
    assert all(name in narrow.splitlines()[0] for name in names[:4]) and "quartiles" not in narrow


def test_the_python_api_refuses_unknown_fields_and_wrong_kinds_too():
    cfg = small()
    cfg.local.lrr = 0.1  # a ConfigDict accepts new fields silently
    with pytest.raises(ValueError, match="'local.lrr' does not exist; did you mean 'local.lr'"):
        runner.prepare(cfg)
    cfg = small()
    cfg.privacy = ml_collections.ConfigDict({"mode": "none"})  # a section built by hand, fields missing
    with pytest.raises(ValueError, match="lacks the fields .*privacy.accountant"):
        runner.prepare(cfg)
    cfg = small(**{"data.seed": 2**32})
    with pytest.raises(ValueError, match=re.escape("data.seed=4294967296 is out of range")):
        runner.prepare(cfg)

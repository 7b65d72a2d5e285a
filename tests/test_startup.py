"""Fast start: a light ``import medfed_jax`` and the persistent compilation cache (each in a fresh subprocess)."""

import json
import os
import subprocess
import sys

import pytest

import medfed_jax
from medfed_jax import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("sklearn", "matplotlib", "scipy", "dp_accounting")  # loaded only by the features that need them
CACHE_VARS = (compilation_cache.ENV_VAR, "JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE")


def python(code: str, *args: str, **env: str) -> str:
    """Run ``python -c code`` in a fresh interpreter with this checkout first on the path, return its stdout.

    The child sees no cache setting of the test process (conftest turns the cache off) except ``env``.
    """
    child = {k: v for k, v in os.environ.items() if k not in CACHE_VARS}
    child.update(PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), **env)
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=child, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_and_engine_modules_load_no_heavy_library():
    code = (
        "import sys, json\n"
        "loaded = lambda names: sorted({m.split('.')[0] for m in sys.modules} & set(names))\n"
        "import medfed_jax as mf\n"
        "after_import = loaded(['jax', *sys.argv[1:]])\n"
        "mf.run, mf.build_engine, mf.load_dataset, mf.default_config, mf.make_model\n"
        "import medfed_jax.cli, medfed_jax.sweep, medfed_jax.report\n"
        "print(json.dumps([after_import, loaded(sys.argv[1:])]))\n"
    )
    after_import, after_engine = json.loads(python(code, *HEAVY))
    assert after_import == []  # not even JAX
    assert after_engine == []


def test_every_public_name_resolves_to_its_module():
    for name in medfed_jax.__all__:
        value = getattr(medfed_jax, name)
        assert value.__module__.startswith("medfed_jax."), name
    assert set(medfed_jax.__all__) <= set(dir(medfed_jax))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        medfed_jax.nope  # noqa: B018


def test_default_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for xdg in (None, "", "relative/cache"):  # unset, empty and relative values are ignored (XDG spec)
        if xdg is None:
            monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        else:
            monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        assert compilation_cache.default_dir() == str(tmp_path / "home" / ".cache" / "medfed_jax" / "jax")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation_cache.default_dir() == str(tmp_path / "xdg" / "medfed_jax" / "jax")


def test_empty_setting_is_refused_naming_its_source():
    with pytest.raises(ValueError, match=r"MEDFED_JAX_CACHE_DIR=' ' is empty: give a folder .* or 'off'"):
        compilation_cache.check_setting(" ", "MEDFED_JAX_CACHE_DIR")


def test_unusable_folder_turns_the_cache_off_with_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compilation_cache, "_configured", False)  # restored after the test
    (tmp_path / "file").write_text("")
    assert compilation_cache.enable(str(tmp_path / "file" / "cache")) is None  # a folder inside a file
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "compilation cache off: cannot use" in warning and "file/cache" in warning


# A tiny federated run through the Python entry point; prints how many compiles asked the cache, how many it
# answered, and the history (timings left out).
TINY_RUN = """
import json
import jax
events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
import medfed_jax as mf
cfg = mf.default_config()
cfg.model.name, cfg.rounds, cfg.eval_every, cfg.baselines = "logistic", 2, 1, ()
rows = [{k: v for k, v in row.items() if k != "elapsed_s"} for row in mf.run(cfg, log=None)["federated"]]
asked = events.count("/jax/compilation_cache/compile_requests_use_cache")
print(json.dumps({"asked": asked, "hits": events.count("/jax/compilation_cache/cache_hits"), "rows": rows}))
"""


def cache_entries(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_default_cache_fills_on_a_cold_run_and_answers_every_compile_of_a_warm_one(tmp_path):
    folder = tmp_path / "medfed_jax" / "jax"  # the default under XDG_CACHE_HOME=tmp_path
    cold = json.loads(python(TINY_RUN, XDG_CACHE_HOME=str(tmp_path)))
    entries = cache_entries(folder)
    assert cold["asked"] > 0 and cold["hits"] == 0
    assert len(entries) == cold["asked"]  # every program is kept, however short its compile
    warm = json.loads(python(TINY_RUN, XDG_CACHE_HOME=str(tmp_path)))
    assert warm["hits"] == warm["asked"] == cold["asked"]
    assert cache_entries(folder) == entries
    assert warm["rows"] == cold["rows"]  # a program read from the cache computes the same numbers, bit for bit


def test_cache_off_or_moved_by_flag_and_environment(tmp_path):
    xdg, moved, own = tmp_path / "xdg", tmp_path / "moved", tmp_path / "own"
    off = json.loads(python(TINY_RUN, XDG_CACHE_HOME=str(xdg), MEDFED_JAX_CACHE_DIR="off"))
    assert off["asked"] == 0 and not xdg.exists()
    # a user's own JAX setting is used as it is
    jax_env = {"JAX_COMPILATION_CACHE_DIR": str(own), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    python(TINY_RUN, XDG_CACHE_HOME=str(xdg), **jax_env)
    assert cache_entries(own) and not xdg.exists()
    # the command line's flag wins over the environment variable, both ways
    cli = "import sys; from medfed_jax.cli import run_main; sys.argv = ['medfed_jax', *sys.argv[1:]]; run_main()"
    tiny = ["--config=configs/quickstart.py", "--config.rounds=1", "--config.eval_every=1", "--config.baselines=()"]
    tiny.append("--config.model.name=logistic")
    python(cli, *tiny, f"--compilation_cache={moved}", MEDFED_JAX_CACHE_DIR="off", XDG_CACHE_HOME=str(xdg))
    assert cache_entries(moved) and not xdg.exists()
    other = tmp_path / "other"
    python(cli, *tiny, "--compilation_cache=off", MEDFED_JAX_CACHE_DIR=str(other), XDG_CACHE_HOME=str(xdg))
    assert not other.exists() and not xdg.exists()


# `python -m medfed_jax` in this process (`medfed_jax.__main__`, then its `run_main`), printing the name of
# every program XLA compiled.
COUNTED_CLI = """
import json, sys
import jax
compiled = []
jax.monitoring.register_event_time_span_listener(
    lambda event, start, end, **kwargs: compiled.append(kwargs["fun_name"])
    if event == "/jax/core/compile/backend_compile_duration" else None
)
from medfed_jax import __main__ as entry
sys.argv = ["medfed_jax", *sys.argv[1:]]
try:
    entry.run_main()
except SystemExit as exit:
    assert exit.code in (None, 0), exit.code
print(json.dumps(sorted(compiled)))
"""


def test_a_heart_federated_run_compiles_its_two_programs_and_nothing_else(tmp_path):
    # init and the chunk program; validation, the knobs and the data placement compile nothing eagerly
    heart = ["--config=configs/heart_fedavg.py", "--config.baselines=()", "--config.rounds=2", "--config.eval_every=1"]
    out = python(COUNTED_CLI, *heart, "--compilation_cache=off", f"--workdir={tmp_path}")
    assert json.loads(out.splitlines()[-1]) == ["jit(chunk)", "jit(init)"]

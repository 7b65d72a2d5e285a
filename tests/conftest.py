"""Shared test fixtures."""

import os

import pytest

# One device, whatever the machine's core count: results must not depend on it. Sharded runs are
# tested in subprocesses with their own device count (tests/test_sharding.py).
os.environ.setdefault("MEDFED_JAX_DEVICES", "1")

from medfed_jax import compilation_cache, runner  # noqa: E402

# Tests never write a persistent compilation cache (least of all into the user's home);
# tests/test_startup.py turns it on in subprocesses, in a tmp folder.
os.environ[compilation_cache.ENV_VAR] = compilation_cache.OFF


@pytest.fixture
def forbid_compile(monkeypatch):
    """Make building any engine fail, to prove an error is raised before compiling."""

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before validating")

    monkeypatch.setattr(runner, "build_engine", no_compile)
    monkeypatch.setattr(runner.baselines, "build_local_only", no_compile)

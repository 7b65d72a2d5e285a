"""Shared test fixtures."""

import os

import pytest

# One device, whatever the machine's core count: results must not depend on it. Sharded runs are
# tested in subprocesses with their own device count (tests/test_sharding.py).
os.environ.setdefault("MEDFED_JAX_DEVICES", "1")

from medfed_jax import runner  # noqa: E402


@pytest.fixture
def forbid_compile(monkeypatch):
    """Make building any engine fail, to prove an error is raised before compiling."""

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before validating")

    monkeypatch.setattr(runner, "build_engine", no_compile)
    monkeypatch.setattr(runner.baselines, "build_local_only", no_compile)

"""Shared test fixtures."""

import pytest

from medfed_jax import runner


@pytest.fixture
def forbid_compile(monkeypatch):
    """Make building any engine fail, to prove an error is raised before compiling."""

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before validating")

    monkeypatch.setattr(runner, "build_engine", no_compile)
    monkeypatch.setattr(runner.baselines, "build_local_only", no_compile)

"""Two processes on this machine (`jax.distributed` over 127.0.0.1, Gloo CPU collectives) give the
one-process result, and only process 0 writes files (`medfed_jax.mesh`)."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from medfed_jax import cli, runner
from medfed_jax import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U = 2.0**-24
NORM_RTOL = (8 * 32 + 32 + 32 * 2 + 2 + 2) * U  # (P + 2) u for quickstart's MLP 8-32-2 (P = 354)
OVERRIDES = {"rounds": 3, "eval_every": 1, "data.num_clients": 6, "aggregator.name": "coordinate_median"}


def quickstart():
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    try:
        import quickstart as module  # noqa: PLC0415
    finally:
        sys.path.pop(0)
    cfg = module.get_config()
    cfg.rounds, cfg.eval_every, cfg.baselines = OVERRIDES["rounds"], OVERRIDES["eval_every"], ()
    cfg.data.num_clients, cfg.aggregator.name = OVERRIDES["data.num_clients"], OVERRIDES["aggregator.name"]
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(process_id: int, port: int, workdir: str) -> subprocess.Popen:
    """``python -m medfed_jax`` as process ``process_id`` of 2, each with 2 CPU devices (README's launch)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "MEDFED_JAX_DEVICES": "2",
        "MEDFED_JAX_COORDINATOR": f"127.0.0.1:{port}",
        "MEDFED_JAX_NUM_PROCESSES": "2",
        "MEDFED_JAX_PROCESS_ID": str(process_id),
    }
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + ["--config.baselines=()"]
    command = [sys.executable, "-m", "medfed_jax", f"--config={ROOT}/configs/quickstart.py", f"--workdir={workdir}"]
    return subprocess.Popen([*command, *flags], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_two_processes_give_the_one_process_result(tmp_path):
    port = free_port()
    workdirs = [str(tmp_path / f"process{i}") for i in range(2)]
    processes = [launch(i, port, workdirs[i]) for i in range(2)]
    logs = [p.communicate(timeout=600)[0].decode() for p in processes]
    for p, log in zip(processes, logs):
        assert p.returncode == 0, log[-3000:]
    assert os.listdir(workdirs[1]) == []  # process 1 computes alongside but writes nothing
    with open(os.path.join(workdirs[0], "history.csv")) as f:
        two = list(csv.DictReader(f))
    one = runner.run(quickstart(), log=None)["federated"]  # this process: one device (conftest)
    assert len(two) == len(one) == OVERRIDES["rounds"]
    for row_two, row_one in zip(two, one):
        for metric, value in row_one.items():
            if metric in ("method", "elapsed_s"):
                continue
            # the median compares whole client columns: equal models. Reordered sums (tests/test_sharding.py):
            # the weighted train_loss over 6 clients, within 2 gamma_5 + 2u; update norms over P coordinates
            rtol = 12 * U if metric == "train_loss" else NORM_RTOL if "norm" in metric else 0.0
            np.testing.assert_allclose(float(row_two[metric]), value, rtol=rtol, atol=0, err_msg=metric)


def test_a_partial_distributed_launch_is_one_clear_error(monkeypatch, forbid_compile):
    monkeypatch.setenv("MEDFED_JAX_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.delenv("MEDFED_JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("MEDFED_JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match=r"MEDFED_JAX_NUM_PROCESSES, MEDFED_JAX_PROCESS_ID missing"):
        cli.setup_devices(None)
    bad = {"MEDFED_JAX_COORDINATOR": "127.0.0.1:1", "MEDFED_JAX_NUM_PROCESSES": "2", "MEDFED_JAX_PROCESS_ID": "2"}
    with pytest.raises(ValueError, match=r"MEDFED_JAX_PROCESS_ID='2' must be an integer in \[0, 1\]"):
        mesh_lib.distributed_settings(bad)
    assert mesh_lib.distributed_settings({}) is None

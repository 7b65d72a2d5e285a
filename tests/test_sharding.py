"""The client axis split over 4 host devices gives the one-device results (`medfed_jax.mesh`); so do a
sweep's cells split over them (`medfed_jax.sweep.Execution`).

One subprocess (``tests/sharding_worker.py``, ``MEDFED_JAX_DEVICES=4``) runs every case on one
device and on four; the tests compare them, and the means also against numpy in float64.

Tolerances. Local training is the same program per client on any device, and order statistics
(median, trimmed mean, Krum) sort or compare whole client columns, so the models are equal bit for
bit. A sum over a split axis becomes per-device partial sums plus an all-reduce: another summation
order. For ``s = sum_i a_i`` in float32 any order satisfies ``|s_hat - s| <= gamma_{n-1} sum_i
|a_i|`` (Higham, Accuracy and Stability, 2nd ed., eq. 4.4), ``gamma_n = n u / (1 - n u)``,
``u = 2^-24``. Where it applies:

- the means (client axis split): with the coefficients' own rounding (``c_i = w_i / sum w``, one
  division) a mean is within ``(n + 1) u sum_i |c_i x_i|`` of the exact value, two orders within
  twice that of each other;
- the round's weighted ``train_loss`` (non-negative terms): two orders within ``2 gamma_{n-1} + 2u``
  relative;
- update norms (``update_norm``, ``norm_*``) under the order statistics, whose ``P`` coordinates are
  split (`medfed_jax.mesh.spread_coordinates`): ``sqrt`` of a sum of ``P`` squares, two orders
  within ``gamma_{P-1} + 2u <= (P + 2) u`` relative.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_sweep import tiny_sweep

from medfed_jax import host_devices, sweep
from medfed_jax import mesh as mesh_lib

U = 2.0**-24
NUM_PARAMS = 6 * 8 + 8 + 8 * 3 + 3  # the worker's MLP 6-8-3
WORKER = os.path.join(os.path.dirname(__file__), "sharding_worker.py")


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


@pytest.fixture(scope="module")
def worker_dir(tmp_path_factory):
    """The worker's folder: ``results.npz`` and its sweeps' workdirs."""
    folder = tmp_path_factory.mktemp("sharding")
    env = {**os.environ, "MEDFED_JAX_DEVICES": "4", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, WORKER, str(folder / "results.npz")], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def results(worker_dir):
    with np.load(worker_dir / "results.npz") as saved:
        return dict(saved)


@pytest.mark.parametrize("rule", ["weighted_mean", "mean"])
def test_sharded_means_within_the_summation_bound_of_numpy(results, rule):
    mask = results["mask"]
    weights = np.where(mask, results["weights"] if rule == "weighted_mean" else 1, 0).astype(np.float64)
    coeffs = weights / weights.sum()
    n = int(mask.sum())
    for leaf in ("a", "b"):
        x = results[f"updates/{leaf}"].astype(np.float64)
        exact = np.tensordot(coeffs, x, axes=1)
        bound = 2 * (n + 1) * U * np.tensordot(coeffs, np.abs(x), axes=1)  # 2x: margin over the derivation
        for devices in ("1", "4"):
            got = results[f"agg/{rule}/{devices}/{leaf}"]
            assert np.all(np.abs(got - exact) <= bound), (rule, leaf, devices, np.max(np.abs(got - exact) / bound))


@pytest.mark.parametrize("rule", ["coordinate_median", "trimmed_mean", "krum"])
def test_sharded_order_statistics_equal_one_device_bit_for_bit(results, rule):
    for leaf in ("a", "b"):
        np.testing.assert_array_equal(results[f"agg/{rule}/4/{leaf}"], results[f"agg/{rule}/1/{leaf}"])
    if rule == "coordinate_median":  # and against numpy: (a + b) / 2 of the middle pair, one rounding
        exact = np.median(results["updates/b"][results["mask"]].astype(np.float64), axis=0)
        np.testing.assert_allclose(results["agg/coordinate_median/4/b"], exact, rtol=2 * U, atol=0)


def _histories(results, case):
    one = {k.split("/")[-1]: v for k, v in results.items() if k.startswith(f"engine/{case}/1/")}
    four = {k.split("/")[-1]: v for k, v in results.items() if k.startswith(f"engine/{case}/4/")}
    assert one and one.keys() == four.keys()
    return one, four


def _check_train_loss(one, four, cohort):
    # sum_i w_i l_i / sum_i w_i with l_i >= 0: two summation orders differ by <= 2 gamma_{n-1} train_loss
    bound = 2 * gamma(cohort - 1) * one["train_loss"] + 2 * U * one["train_loss"]
    assert np.all(np.abs(four["train_loss"] - one["train_loss"]) <= bound)


@pytest.mark.parametrize("case", ["coordinate_median-12-10"])
def test_sharded_median_run_equals_one_device(results, case):
    """Every round's model equal bit for bit (evaluations equal): a cohort of 10 of 12, padded to 12."""
    one, four = _histories(results, case)
    for metric in one:
        if "norm" in metric:  # sqrt(sum of P squares), summed per coordinate slice: see the module
            np.testing.assert_allclose(four[metric], one[metric], rtol=(NUM_PARAMS + 2) * U, atol=0)
        elif metric != "train_loss":
            np.testing.assert_array_equal(four[metric], one[metric], err_msg=metric)
    _check_train_loss(one, four, int(case.split("-")[-1]) or 12)


@pytest.mark.parametrize("case", ["mean-10-0"])
def test_sharded_mean_run_matches_one_device(results, case):
    """Equal up to the all-reduce's order: per round the models differ by at most 2 (n + 1) u
    sum_i c_i |delta_i| (test above), under 3e-6 relative for n = 10; three rounds of this small
    model's SGD (lr 0.2, 3 steps per round) grow that by well under 3x, so losses and norms agree to
    1e-5 relative. 10 clients on 4 devices are padded to 12 with count-0 clients."""
    one, four = _histories(results, case)
    for metric in ("global_pooled_loss", "update_norm", "norm_median", "norm_max"):
        np.testing.assert_allclose(four[metric], one[metric], rtol=1e-5, atol=0, err_msg=metric)
    _check_train_loss(one, four, int(case.split("-")[1]))


def test_bad_device_counts_are_refused_in_one_line():
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(ValueError, match=r"--devices='?.*'? must be 'all' or a positive integer"):
            host_devices.parse_devices(bad, "--devices")
    assert host_devices.parse_devices("all", "--devices") is None and host_devices.parse_devices(" 4 ", "x") == 4
    with pytest.raises(ValueError, match=r"devices=8 but only 1 device\(s\) are available"):
        mesh_lib.client_mesh(16, devices=8)


def test_device_count_after_the_backend_started_is_refused(monkeypatch):
    """This process runs on 1 device (conftest): asking for 4 now names the variable to set instead."""
    import jax

    jax.devices()  # the backend is up
    with pytest.raises(ValueError, match=r"--devices='4': JAX's CPU backend already started with 1 device"):
        mesh_lib.configure_devices("4", "--devices")
    monkeypatch.setenv(mesh_lib.ENV_DEVICES, "1")
    mesh_lib.configure_devices()  # the count it already has: fine


def test_device_settings_precedence():
    """An explicit setting wins; the default (every core) yields to the user's own JAX or XLA count."""
    cores = host_devices.host_cores()
    resolve = host_devices.resolve_devices
    assert resolve(environ={}) == (None, cores, False)
    assert resolve("3", environ={"JAX_NUM_CPU_DEVICES": "5"}) == (3, 3, True)
    assert resolve(environ={"MEDFED_JAX_DEVICES": "all", "JAX_NUM_CPU_DEVICES": "5"}) == (None, cores, True)
    assert resolve(environ={"JAX_NUM_CPU_DEVICES": "5"}) == (None, None, False)
    assert resolve(environ={"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}) == (None, None, False)


def _sweep(results, mode):
    """cell -> metric -> history of the worker's sweep in ``mode``."""
    found: dict[int, dict] = {}
    for key, value in results.items():
        if key.startswith(f"sweep/{mode}/"):
            _, _, cell, metric = key.split("/")
            found.setdefault(int(cell), {})[metric] = value
    return found


@pytest.mark.parametrize("mode", ["cells", "clients"])
def test_sweep_over_four_devices_matches_the_threaded_run(results, mode):
    """Cells split over the 4 devices (chunks of 3 padded to 4), or each cohort split over them, against one device.

    Each cell runs the same program on any device, but XLA compiles a program split over 4 devices anew and may
    re-associate float32 sums (cells) or sum over the devices in another order (clients, the means: see
    `test_sharded_mean_run_matches_one_device`): equal to 1e-5, the tolerance of `tests/test_sweep.py`'s
    vmapped-vs-alone comparison (another compile of the same cell's program), bitwise where the compiles agree.
    """
    threads, split = _sweep(results, "threads"), _sweep(results, mode)
    assert threads.keys() == split.keys() == set(range(6))
    for cell, history in threads.items():
        assert history.keys() == split[cell].keys()
        for metric, value in history.items():
            np.testing.assert_allclose(split[cell][metric], value, rtol=1e-5, atol=1e-5, err_msg=f"{cell} {metric}")
    finals = {float(h["global_pooled_loss"][-1]) for h in split.values()}
    assert len(finals) == 6  # every cell its own (a misplaced or padded cell would repeat one)


def _read(folder):
    return {name: (folder / name).read_bytes() for name in ("results.csv", "summary.csv", "sweep.json")}


def test_sweep_cells_mode_writes_only_real_cells_and_resumes_byte_identical(worker_dir):
    """Chunk files hold their own 3 cells (the padding cell never written); a run killed after its first chunk
    and rerun ends with the uninterrupted run's files; chunk names say how the devices split them."""
    cells, resumed, threads = (worker_dir / f"sweep-{m}" for m in ("cells", "cells-resumed", "threads"))
    chunks = sorted((cells / "chunks").iterdir())
    assert [json.loads(p.read_text())["cells"] for p in chunks] in ([[0, 1, 2], [3, 4, 5]], [[3, 4, 5], [0, 1, 2]])
    assert len((cells / "results.csv").read_text().splitlines()) == 1 + 6 * 2  # header + 6 cells x 2 evaluations
    assert _read(resumed) == _read(cells)
    assert not {p.name for p in chunks} & {p.name for p in (threads / "chunks").iterdir()}


def test_sweep_device_modes_are_checked_before_anything_loads(forbid_compile, monkeypatch):
    """This process has 1 device (conftest): only ``threads`` runs; the others are refused in one line, and so is
    a sweep launched as one of several processes."""
    assert sweep.execution().mode == "threads" and sweep.allowed_sweep_devices() == ("threads",)
    with pytest.raises(ValueError, match=r"--sweep_devices='gpu' is unknown: choose one of cells, threads, clients"):
        sweep.prepare_sweep(tiny_sweep(), sweep_devices="gpu")
    for mode in ("cells", "clients"):
        with pytest.raises(ValueError, match=rf"--sweep_devices='{mode}' splits work over several devices, but"):
            sweep.prepare_sweep(tiny_sweep(), sweep_devices=mode)
    assert sweep.default_sweep_devices(4) == sweep.CPU_DEFAULT  # this backend is a CPU
    cells, threads = sweep.Execution("cells", 4), sweep.Execution("threads", 4)
    assert [cells.padded(n) for n in (1, 3, 4, 5)] == [4, 4, 4, 8] and threads.padded(3) == 3
    assert threads.layout == () and cells.layout == ("cells", 4)
    assert cells.parallel == 4 and threads.parallel == threads.workers  # the cost estimate's chunks at once
    plan = sweep.plan_sweep(tiny_sweep())
    assert sweep.effective_chunk_size(plan, cells.split) == plan.chunk_size == 4  # as given
    automatic = dataclasses.replace(plan, chunk_size=0)
    assert sweep.effective_chunk_size(automatic, cells.split) == 4 * sweep.AUTO_CHUNK["cpu"]  # per device
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"a sweep runs in one process, but this launch has 2"):
        sweep.prepare_sweep(tiny_sweep())

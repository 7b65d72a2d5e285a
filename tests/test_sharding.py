"""The client axis split over 4 host devices gives the one-device results (`medfed_jax.mesh`).

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

import os
import subprocess
import sys

import numpy as np
import pytest

from medfed_jax import host_devices
from medfed_jax import mesh as mesh_lib

U = 2.0**-24
NUM_PARAMS = 6 * 8 + 8 + 8 * 3 + 3  # the worker's MLP 6-8-3
WORKER = os.path.join(os.path.dirname(__file__), "sharding_worker.py")


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharding") / "results.npz"
    env = {**os.environ, "MEDFED_JAX_DEVICES": "4", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, WORKER, str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(path) as saved:
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
    for metric in ("test_loss", "update_norm", "norm_median", "norm_max"):
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

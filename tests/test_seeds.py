"""Seeds vary the data: each run seed draws its own partition and train/test split unless ``data.seed`` pins it.

References: the partition and split computed here with `partition` and
`partition.split_train_test` from the seed directly; per-seed results of the
vmapped paths (``--seeds``, a sweep's seed axis) against each seed trained
alone on its own split.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from medfed_jax import config as config_lib
from medfed_jax import data as data_lib
from medfed_jax import runner, sweep
from medfed_jax.data import builtin, partition

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The vmapped and the single paths differ by float32 rounding only: 2 rounds of a logistic model on
# standardised features (values O(1)), a few ulp per operation, far below the gap between seeds' splits.
RTOL, ATOL = 1e-4, 1e-5


def digits_data(seed=None):
    cfg = data_lib.default_config()
    cfg.update(name="digits", partition="dirichlet", num_clients=6, alpha=0.5, seed=seed)
    return cfg


def train_rows(dataset):
    return [np.sort(r) for r in dataset.info["rows"]["train"]]


def reference_parts(seed: int):
    """digits over 6 Dirichlet(0.5) clients, partitioned and split with ``seed`` (what load_dataset promises)."""
    x, y = builtin.digits()
    parts = partition.dirichlet(y, 6, 0.5, seed, min_samples=10)
    rng = np.random.default_rng(seed)
    return [np.sort(p[~partition.split_train_test(y[p], 0.2, rng)]) for p in parts]


def test_the_split_follows_the_run_seed_unless_data_seed_pins_it():
    follow = [data_lib.load_dataset(digits_data(), run_seed=s) for s in (0, 1)]
    for s, dataset in enumerate(follow):
        for got, want in zip(train_rows(dataset), reference_parts(s)):
            np.testing.assert_array_equal(got, want)
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(*map(train_rows, follow)))
    pinned = [data_lib.load_dataset(digits_data(seed=3), run_seed=s) for s in (0, 1)]
    for a, b, want in zip(*map(train_rows, pinned), reference_parts(3)):
        np.testing.assert_array_equal(a, want)
        np.testing.assert_array_equal(b, want)


def heart_config(**overrides):
    cfg = config_lib.default_config()
    cfg.data.name, cfg.data.partition, cfg.data.test_fraction = "heart", "natural", 0.34
    cfg.model.name, cfg.rounds, cfg.eval_every = "logistic", 2, 2
    cfg.local.batch_size, cfg.local.lr = 16, 0.05
    for path, value in overrides.items():
        config_lib.set_path(cfg, path, value)
    return cfg


def test_seeds_train_each_on_its_own_split_and_a_pinned_seed_shares_one():
    prepared = runner.prepare(heart_config())
    datasets = runner.seed_datasets(prepared, [0, 1])
    assert datasets[0] is prepared.dataset
    assert any((a != b).any() for a, b in zip(*map(train_rows, datasets)))
    vmapped = runner.run_seeds(prepared, "federated", [0, 1])
    for s in (0, 1):
        alone = runner.train_method("federated", prepared, seed=s, log=None)[-1]
        for metric in ("global_pooled_loss", "train_loss", "global_pooled_accuracy"):
            np.testing.assert_allclose(vmapped[metric][s, -1], alone[metric], rtol=RTOL, atol=ATOL)
    # The two seeds' results differ by more than rounding (they see other patients).
    assert abs(vmapped["global_pooled_loss"][0, -1] - vmapped["global_pooled_loss"][1, -1]) > 100 * ATOL

    pinned = runner.prepare(heart_config(**{"data.seed": 0}))
    assert not pinned.split_follows_seed
    assert all(d is pinned.dataset for d in runner.seed_datasets(pinned, [0, 1, 2]))


def test_a_sweeps_seed_axis_draws_a_split_per_seed_in_one_program():
    cfg = heart_config()
    cfg.sweep.grid = {"seed": (0, 1)}
    result = sweep.run_sweep(cfg, log=None)
    assert result.programs_compiled == 1
    prepared = runner.prepare(heart_config())
    for cell in result.plan.cells:
        alone = runner.train_method("federated", prepared, seed=cell.values["seed"], log=None)[-1]
        np.testing.assert_allclose(
            result.histories[cell.index]["global_pooled_loss"][-1], alone["global_pooled_loss"], rtol=RTOL, atol=ATOL
        )
    pinned = heart_config(**{"data.seed": 0})
    pinned.sweep.grid = {"seed": (0, 1)}
    program = sweep.prepare_sweep(pinned).programs[0]
    assert program.split_index is None


@pytest.mark.parametrize("value", [-1, 2**32, 1.5, "0"])
def test_a_bad_data_seed_is_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=r"data\.seed="):
        config_lib.check_value("data.seed", value, None)


def test_none_and_seeds_are_valid_data_seeds():
    for value in (None, 0, 2**32 - 1):
        config_lib.check_value("data.seed", value, None)


CELLS_SCRIPT = """
import numpy as np
from medfed_jax import sweep
from test_seeds import heart_config
cfg = heart_config()
cfg.sweep.grid = {"seed": (0, 1, 2)}
runs = [sweep.run_sweep(cfg, log=None, sweep_devices=mode) for mode in ("cells", "threads")]
for a, b in zip(*(r.histories for r in runs)):
    assert runs[0].histories[a].keys() == runs[1].histories[b].keys()
    for name in ("global_pooled_loss", "global_pooled_accuracy"):
        np.testing.assert_allclose(runs[0].histories[a][name], runs[1].histories[b][name], rtol=1e-5, atol=1e-6)
print("same")
"""


def test_per_seed_splits_split_over_the_cells_mesh_like_one_device():
    # 3 cells on 2 devices (padded to 4): each device gathers its own cells' splits. Same float32 work per cell,
    # only the placement differs, so rounding-level tolerances.
    env = {**os.environ, "MEDFED_JAX_DEVICES": "2", "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    done = subprocess.run([sys.executable, "-c", CELLS_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "same" in done.stdout, done.stderr[-2000:]

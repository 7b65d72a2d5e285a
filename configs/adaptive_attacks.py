"""Adaptive vs fixed attacks on digits with IID data and 20% attackers: median, trimmed mean and Krum.

The setting of the adaptive-attack claim in the README: 20 IID clients (digits,
the model and training of `digits_dirichlet.py`), 4 of them malicious,
``aggregator.f = 4``, 100 rounds, 5 seeds; every attack (fixed and adaptive)
against coordinate-wise median, trimmed mean and Krum, plus the no-attack row.
One compiled program (aggregator and attack switched at run time).

    python -m medfed_jax --config=adaptive_attacks --workdir=runs/adaptive_attacks
    python -m medfed_jax.report --workdir=runs/adaptive_attacks
"""

from medfed_jax import config_files

AGGREGATORS = ("coordinate_median", "trimmed_mean", "krum")
FRACTION = 0.2


def get_config():
    cfg = config_files.load_config("robustness_matrix")
    cfg.name = "adaptive_attacks"
    cfg.data.partition = "iid"
    cfg.sweep.cells = [c for c in cfg.sweep.cells if c["attack.fraction"] in (0.0, FRACTION)]
    cfg.sweep.grid.aggregator.name = AGGREGATORS
    return cfg

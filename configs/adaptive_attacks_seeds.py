"""Does `mimic_ipm` beat fixed IPM beyond the 5 seeds of `adaptive_attacks.py`? 10 further seeds.

The settings of `adaptive_attacks.py` (digits, 20 IID clients, 4 malicious,
``aggregator.f = 4``, 100 rounds, coordinate median, trimmed mean and Krum),
seeds 5 to 14 (each its own split), fixed IPM against `mimic_ipm`. The
README's adaptive-attack paragraph quotes it.

    python -m medfed_jax --config=adaptive_attacks_seeds --workdir=runs/adaptive_attacks_seeds
"""

from medfed_jax import config_files

SEEDS = tuple(range(5, 15))


def get_config():
    cfg = config_files.load_config("adaptive_attacks")
    cfg.name = "adaptive_attacks_seeds"
    cfg.sweep.cells = [{"attack.name": name, "attack.fraction": 0.2} for name in ("ipm", "mimic_ipm")]
    cfg.sweep.grid.seed = SEEDS
    return cfg

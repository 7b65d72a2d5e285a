"""Can an adaptive attack beat fixed IPM against Krum on IID digits? The settings of `adaptive_attacks.py`.

Krum only, 4 of 20 IID clients malicious, 100 rounds, 5 seeds (each its own
split): the differentiable attacker at smaller stealth budgets (0.1, 0.25,
0.5 times the farthest honest update; 1 is in `adaptive_attacks.py`) and
min-max / min-sum with each perturbation direction. The README's adaptive-
attack paragraph quotes it.

    python -m medfed_jax --config=adaptive_krum --workdir=runs/adaptive_krum
    python -m medfed_jax.report --workdir=runs/adaptive_krum
"""

from medfed_jax import config_files

BUDGETS = (0.1, 0.25, 0.5)
PERTURBATIONS = ("unit_vec", "sign", "std")


def get_config():
    cfg = config_files.load_config("adaptive_attacks")
    cfg.name = "adaptive_krum"
    cfg.sweep.cells = [{"attack.name": "grad_ascent", "attack.budget": budget} for budget in BUDGETS] + [
        {"attack.name": name, "attack.perturbation": perturbation}
        for name in ("min_max", "min_sum")
        for perturbation in PERTURBATIONS
    ]
    cfg.sweep.grid = {"aggregator": {"name": ("krum",)}, "attack": {"fraction": (0.2,)}, "seed": (0, 1, 2, 3, 4)}
    return cfg

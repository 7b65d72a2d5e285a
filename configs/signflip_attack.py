"""Security table: 25% of clients sign-flip; plain mean vs coordinate-wise median, 5 seeds.

Sign flip (`attacks.sign_flip`): each malicious client sends minus its own
honest update. On (a) digits over 20 Dirichlet(0.5) clients (5 malicious) and
(b) the four heart-disease hospitals (1 malicious hospital), with the settings
of `digits_dirichlet.py` and `heart_fedavg.py` but 100 rounds (the median is
still climbing at 50 on digits); no attack is the reference row.
The malicious clients are drawn from each run's key. 2 datasets x 2 attack
settings x 2 aggregators = 8 compiled programs, the 5 seeds of each vmapped.

    python -m medfed_jax --config=signflip_attack --workdir=runs/signflip
    python -m medfed_jax.report --workdir=runs/signflip
"""

from medfed_jax import config_files, sweep

ATTACKS = ({"attack.name": "none", "attack.fraction": 0.0}, {"attack.name": "sign_flip", "attack.fraction": 0.25})


def get_config():
    digits, heart = (config_files.load_config(name) for name in ("digits_dirichlet", "heart_fedavg"))
    cfg = digits.copy_and_resolve_references()
    cfg.name = "signflip_attack"
    cfg.rounds = 100
    cfg.sweep.cells = [{**data, **attack} for data in sweep.variant_cells([digits, heart]) for attack in ATTACKS]
    cfg.sweep.grid = {"aggregator": {"name": ("mean", "coordinate_median")}, "seed": (0, 1, 2, 3, 4)}
    return cfg

"""Security table: 25% of clients sign-flip at scales 1, 2 and 4; mean vs robust rules, 5 seeds (splits).

Sign flip (`attacks.sign_flip`): each malicious client sends minus ``scale``
times its own honest update. Digits over 20 clients (5 malicious, drawn from
each run's key) with the settings of `digits_dirichlet.py`, split IID, by
plain Dirichlet(0.5) and by NIID-Bench's capped Dirichlet(0.5)
(``data.partition='dirichlet_capped'``); no attack is the reference row.
Aggregators: the plain mean, the coordinate-wise median, the trimmed mean
(``aggregator.f = 5``: the 25% attackers) and centered clipping. 300 rounds,
evaluated every 50: the round-100 and round-300 evaluations are the two
budgets (a constant learning rate, so a 100-round run equals the first 100
rounds of this one). Each seed draws its own split. The attack scale and
fraction are numeric knobs and the aggregator and attack run-time switches:
one compiled program per partition, 3 in all.

    python -m medfed_jax --config=signflip_attack --workdir=runs/signflip
    python -m medfed_jax.report --workdir=runs/signflip
"""

from medfed_jax import config_files

PARTITIONS = ("iid", "dirichlet", "dirichlet_capped")
SCALES = (1.0, 2.0, 4.0)
AGGREGATORS = ("mean", "coordinate_median", "trimmed_mean", "centered_clipping")
BUDGETS = (100, 300)  # rounds at which the table reads the accuracy
ATTACKS = [{"attack.name": "none", "attack.fraction": 0.0, "attack.scale": 1.0}] + [
    {"attack.name": "sign_flip", "attack.fraction": 0.25, "attack.scale": scale} for scale in SCALES
]


def get_config():
    cfg = config_files.load_config("digits_dirichlet")
    cfg.name = "signflip_attack"
    cfg.rounds, cfg.eval_every = max(BUDGETS), 50
    cfg.aggregator.f = 5
    cfg.sweep.cells = [{"data.partition": p, **attack} for p in PARTITIONS for attack in ATTACKS]
    cfg.sweep.grid = {"aggregator": {"name": AGGREGATORS}, "seed": (0, 1, 2, 3, 4)}
    return cfg

"""Robustness matrix: every aggregator x every attack at malicious fractions {0.1, 0.2, 0.3}, 5 seeds.

Digits over 20 Dirichlet(0.5) clients (the settings of `digits_dirichlet.py`),
100 rounds; the no-attack runs are the reference row. The attacks are the
fixed recipes and the adaptive ones (`medfed_jax.attacks.ADAPTIVE_ATTACKS`:
Opt-IPM and Opt-ALIE searched against the aggregator in use, Fang et al.'s
Krum and trimmed-mean attacks, min-max and min-sum, the differentiable
attacker, and mimic-then-reverse). Aggregators that need the number of Byzantine clients use
``aggregator.f = 4``, the most Bulyan allows with 20 clients (n >= 4f + 3):
it matches 20% attackers and under-states 30% (6 attackers), as a defender
who guessed low would. One compiled program for the whole matrix: the
aggregator and the attack are run-time switches, the fractions and seeds of
each pair are vmapped. The report writes ``final.csv``, ``heatmap.png`` and
the worst case over the attacks (``worst_case.png``, a table in ``report.md``).

    python -m medfed_jax --config=robustness_matrix --workdir=runs/robustness_matrix
    python -m medfed_jax.report --workdir=runs/robustness_matrix
"""

from medfed_jax import aggregators, attacks, config_files

FRACTIONS = (0.1, 0.2, 0.3)


def matrix_config(aggregator_names, attack_names, fractions=FRACTIONS, seeds=(0, 1, 2, 3, 4), rounds=100):
    """The matrix over the given aggregators and attacks ('none' adds the no-attack reference row)."""
    cfg = config_files.load_config("digits_dirichlet")
    cfg.name = "robustness_matrix"
    cfg.rounds, cfg.eval_every = rounds, 10
    cfg.aggregator.f = 4
    cfg.sweep.cells = [
        {"attack.name": name, "attack.fraction": fraction}
        for name in attack_names
        for fraction in ((0.0,) if name == "none" else fractions)
    ]
    cfg.sweep.grid = {"aggregator": {"name": tuple(aggregator_names)}, "seed": tuple(seeds)}
    return cfg


def get_config():
    return matrix_config(aggregators.AGGREGATOR_NAMES, attacks.ATTACK_NAMES)

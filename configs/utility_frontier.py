"""Utility frontier (issue 18): drift corrections under unreliable clients, as one sweep.

On the four heart hospitals (`heart_fedavg.py`) and on digits over 20 clients
with Dirichlet(0.1) and Dirichlet(0.5) label skew (`digits_dirichlet.py`), every
client runs a compute budget of 1 to 3 local epochs (``unreliable.min_local``,
one draw per client and run) and drops out of each round with probability 0.3
(``unreliable.dropout``). FedAvg, FedProx (``local.prox_mu=1``, Li et al.
2020's value for their image tasks, MNIST and FEMNIST, from {0.001, 0.01, 0.1,
1}; at 0.01 the pull moved no digits test prediction), SCAFFOLD, FedNova and
FedDyn (``drift.method``), 30 rounds evaluated every 2, 3 seeds, each seed its
own partition and train/test split. FedAvg and FedProx share a program
(``prox_mu`` is a numeric knob): 3 datasets x 4 programs.

    make frontier   # this sweep and compression_frontier.py from scratch, tables and figures
    python -m medfed_jax --config=utility_frontier --workdir=runs/frontier/utility_frontier
    python benchmarks/frontier.py --workdir=runs/frontier   # once both sweeps are there

An algorithm is one entry of `ALGORITHMS`: the fields that select it; a field
that another entry sets is at this config's value otherwise (the sweep fills
it, `benchmarks/frontier.py` names the rows the same way).
"""

from medfed_jax import config_files, sweep

ALGORITHMS = {  # name -> the fields that select it (every other field at this config's value)
    "fedavg": {},
    "fedprox": {"local.prox_mu": 1.0},
    "scaffold": {"drift.method": "scaffold"},
    "fednova": {"drift.method": "fednova"},
    "feddyn": {"drift.method": "feddyn"},
}


def get_config():
    heart, digits = (config_files.load_config(name) for name in ("heart_fedavg", "digits_dirichlet"))
    skewed = digits.copy_and_resolve_references()
    skewed.data.alpha = 0.1
    variants = [heart, skewed, digits]
    for v in variants:
        v.rounds, v.eval_every = 30, 2
        v.local.epochs = 3
        v.unreliable.min_local, v.unreliable.dropout = 1, 0.3
    cfg = heart.copy_and_resolve_references()
    cfg.name = "utility_frontier"
    cfg.baselines = ()
    cfg.sweep.cells = [{**cell, **fields} for cell in sweep.variant_cells(variants) for fields in ALGORITHMS.values()]
    cfg.sweep.grid = {"seed": (0, 1, 2)}
    return cfg

"""Collaboration: local-only vs federated (FedAvg) vs pooled training, 5 seeds, as one sweep.

On the four heart-disease hospitals (`heart_fedavg.py`) and on digits over 20
Dirichlet(0.5) clients (`digits_dirichlet.py`), with those configs' settings:
2 datasets x 3 methods = 6 compiled programs, the 5 seeds of each vmapped,
each seed its own partition and train/test split. The report scores each
method on the clients' own test splits and on all clients' test rows
(`medfed_jax.report.collaboration_table`).

    python -m medfed_jax --config=collaboration --workdir=runs/collaboration
    python -m medfed_jax.report --workdir=runs/collaboration
"""

from medfed_jax import config_files, sweep


def get_config():
    heart, digits = (config_files.load_config(name) for name in ("heart_fedavg", "digits_dirichlet"))
    cfg = heart.copy_and_resolve_references()
    cfg.name = "collaboration"
    cfg.sweep.cells = sweep.variant_cells([heart, digits])
    cfg.sweep.grid = {"method": ("local_only", "federated", "pooled"), "seed": (0, 1, 2, 3, 4)}
    return cfg

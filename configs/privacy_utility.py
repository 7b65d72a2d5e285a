"""Privacy-utility: accuracy vs epsilon under client-level central DP (DP-FedAvg), 5 seeds.

Each hospital / client is the privacy unit: every round its update is clipped
to L2 norm S and the server adds N(0, (sigma S)^2) to the sum before dividing
by the number of clients (`privacy.dp_fedavg`); epsilon at delta = 1e-5 comes
from the PLD accountant (every client in every round, 50 rounds), under
add-or-remove-one (``epsilon``) and replace-one (``epsilon_replace_one``: one
hospital's data swapped for another's). Each seed draws its own split. S is about
the median client update norm of the non-private run: 0.1 on the heart
hospitals, 0.3 on digits (20 Dirichlet(0.5) clients). Noise multipliers
sigma in {0.5, 1, 2, 4, 8}, plus the non-private reference (no clipping, no
noise), all with the unweighted mean that DP-FedAvg's estimator uses.
2 datasets x (DP, no DP) = 4 compiled programs; sigma and seeds are vmapped.

    python -m medfed_jax --config=privacy_utility --workdir=runs/privacy_utility
    python -m medfed_jax.report --workdir=runs/privacy_utility
"""

from medfed_jax import config_files, sweep

NOISE_MULTIPLIERS = (0.5, 1.0, 2.0, 4.0, 8.0)
CLIP_NORM = {"heart": 0.1, "digits": 0.3}


def get_config():
    heart, digits = (config_files.load_config(name) for name in ("heart_fedavg", "digits_dirichlet"))
    cfg = heart.copy_and_resolve_references()
    cfg.name = "privacy_utility"
    cfg.aggregator.name = "mean"
    cfg.privacy.delta = 1e-5
    settings = [{"privacy.mode": "none", "privacy.noise_multiplier": 0.0}]
    settings += [{"privacy.mode": "central", "privacy.noise_multiplier": s} for s in NOISE_MULTIPLIERS]
    cfg.sweep.cells = [
        {**data, "privacy.clip_norm": CLIP_NORM[data["data.name"]], **setting}
        for data in sweep.variant_cells([heart, digits])
        for setting in settings
    ]
    cfg.sweep.grid = {"seed": (0, 1, 2, 3, 4)}
    return cfg

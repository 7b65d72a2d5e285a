"""DP-FTRL with banded matrix factorisation vs DP-FedAvg at equal epsilon, heart and digits, 5 splits x seeds.

Every client in every round, client-level DP (`medfed_jax.privacy`): DP-FedAvg
(``privacy.mode='central'``) at noise multipliers sigma in {2, 4, 8}, and
banded MF (``'bandmf'``, the square-root Toeplitz strategy cut to b bands) with
b in {2, 8} at the noise multiplier giving the same epsilon
(`privacy.bandmf_noise_for`: both are one Gaussian of sigma / sensitivity).
The non-private run is the reference. Each of the 5 data splits (``data.seed``)
pairs with the run seed of the same number. Clip norms as `privacy_utility`.

    python benchmarks/privacy_mf.py --workdir=runs/privacy_mf   # runs this sweep, prints the table
"""

from medfed_jax import config_files, privacy, sweep

NOISE_MULTIPLIERS = (2.0, 4.0, 8.0)
BANDS = (2, 8)
SPLITS = (0, 1, 2, 3, 4)
CLIP_NORM = {"heart": 0.1, "digits": 0.3}


def get_config(rounds: int = 50, splits: tuple[int, ...] = SPLITS):
    heart, digits = (config_files.load_config(name) for name in ("heart_fedavg", "digits_dirichlet"))
    cfg = heart.copy_and_resolve_references()
    cfg.name = "privacy_mf"
    cfg.aggregator.name = "mean"
    cfg.privacy.delta = 1e-5
    cfg.rounds = cfg.eval_every = rounds  # the table reads the last round
    cfg.baselines = ()
    cells = []
    for data in sweep.variant_cells([heart, digits]):
        for split in splits:
            base = {**data, "data.seed": split, "seed": split, "privacy.clip_norm": CLIP_NORM[data["data.name"]]}
            cells.append({**base, "privacy.mode": "none", "privacy.bands": 1, "privacy.noise_multiplier": 0.0})
            for sigma in NOISE_MULTIPLIERS:
                cells.append({**base, "privacy.mode": "central", "privacy.bands": 1, "privacy.noise_multiplier": sigma})
                for bands in (b for b in BANDS if b <= rounds):
                    matched = privacy.bandmf_noise_for(sigma, bands, cfg.rounds)
                    cells.append(
                        {**base, "privacy.mode": "bandmf", "privacy.bands": bands, "privacy.noise_multiplier": matched}
                    )
    cfg.sweep.cells = cells
    return cfg

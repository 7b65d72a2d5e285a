"""Record-level DP inside each hospital: DP-SGD on heart, accuracy vs each hospital's epsilon, 5 seeds (splits).

Each patient is the privacy unit: every hospital trains with DP-SGD
(`privacy.dpsgd_gradient`: per-example gradients clipped to L2 norm C = 1,
Gaussian noise of std sigma C on their sum), ``local.steps = 4`` Poisson
batches of expected size 8 per round, 50 rounds of FedAvg over the four
hospitals. A hospital's epsilon (delta = 1e-5) depends on its own sampling
rate 8 / n, so the small hospitals (Switzerland: about 30 training patients)
get the weakest guarantee: the table gives every hospital's
(``epsilon[<hospital>]``; ``epsilon`` is the largest). Noise multipliers
sigma in {0.7, 1, 2, 4}, and the same training without DP as the reference.
2 compiled programs (DP-SGD, none); sigma and the seeds are vmapped.

    python -m medfed_jax --config=record_dp --workdir=runs/record_dp
    python -m medfed_jax.report --workdir=runs/record_dp
"""

from medfed_jax import config_files

NOISE_MULTIPLIERS = (0.7, 1.0, 2.0, 4.0)


def get_config():
    cfg = config_files.load_config("heart_fedavg")
    cfg.name = "record_dp"
    cfg.baselines = ()
    cfg.local.epochs, cfg.local.steps, cfg.local.sampling, cfg.local.batch_size = 0, 4, "poisson", 8
    cfg.privacy.clip_norm, cfg.privacy.delta = 1.0, 1e-5
    settings = [{"privacy.mode": "none", "privacy.noise_multiplier": 0.0}]
    settings += [{"privacy.mode": "dpsgd", "privacy.noise_multiplier": s} for s in NOISE_MULTIPLIERS]
    cfg.sweep.cells = settings
    cfg.sweep.grid = {"seed": (0, 1, 2, 3, 4)}
    return cfg

"""Digits (8x8, 10 classes) split over 20 clients with Dirichlet(0.5) label skew.

The plain Dirichlet split (``data.partition='dirichlet'``, about 5.5 effective
classes per client); NIID-Bench's capped variant is ``'dirichlet_capped'``
(about 4.6). Each seed draws its own split (``data.seed`` unset).

Beside FedAvg: local-only, pooled and the personalised methods (FedPer keeps
the output layer ``head`` local).

    python -m medfed_jax --config=digits_dirichlet --workdir=runs/digits --seeds=5
"""

from medfed_jax import config


def get_config():
    cfg = config.default_config()
    cfg.name = "digits_dirichlet"
    cfg.data.name = "digits"
    cfg.data.partition = "dirichlet"
    cfg.data.num_clients = 20
    cfg.data.alpha = 0.5
    cfg.data.test_fraction = 0.2
    cfg.model.name = "mlp"
    cfg.model.widths = (64,)
    cfg.rounds = 50
    cfg.eval_every = 10
    cfg.local.epochs = 1
    cfg.local.batch_size = 16
    cfg.local.lr = 0.05
    cfg.baselines = ("local_only", "pooled", "finetune", "ditto", "fedper", "apfl")
    return cfg

"""Headline: Fed-Heart-Disease, 4 real hospitals. Local-only vs FedAvg vs pooled vs personalised.

Logistic regression on the 13 FLamby features (FLamby's model for this task),
each hospital's data split 66/34 train/test as in FLamby. Personalised rows:
FedAvg + local fine-tuning, Ditto, FedPer and APFL (`medfed_jax.personalize`).
A logistic model has a single layer, so FedPer keeps each hospital's
intercept (``head/bias``: its own base rate) local and federates the weights.

    python -m medfed_jax --config=heart_fedavg --workdir=runs/heart --seeds=5
"""

from medfed_jax import config


def get_config():
    cfg = config.default_config()
    cfg.name = "heart_fedavg"
    cfg.data.name = "heart"
    cfg.data.partition = "natural"
    cfg.data.test_fraction = 0.34
    cfg.model.name = "logistic"
    cfg.rounds = 50
    cfg.eval_every = 10
    cfg.local.epochs = 1
    cfg.local.batch_size = 16
    cfg.local.lr = 0.05
    cfg.baselines = ("local_only", "pooled", "finetune", "ditto", "fedper", "apfl")
    cfg.personalization.local_paths = ("head/bias",)
    return cfg

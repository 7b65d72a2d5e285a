"""A tiny synthetic federation: runs anywhere in seconds (smoke test of the CLI)."""

from medfed_jax import config


def get_config():
    cfg = config.default_config()
    cfg.name = "quickstart"
    cfg.rounds = 20
    cfg.eval_every = 5
    cfg.model.widths = (32,)
    return cfg

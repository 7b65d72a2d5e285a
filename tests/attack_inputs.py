"""Fixed attack inputs shared by the attack tests: stacked updates with one absent client holding garbage."""

import numpy as np


def updates_with_absent(num_clients, width, absent, attackers, shift=0.0, seed=0):
    """``[C, P]`` normal updates (+ ``shift``), client ``absent`` not taking part and holding 1e30 (which must
    never enter an honest statistic), ``attackers`` malicious; returns ``(updates, malicious, mask)``."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(num_clients, width)) + shift
    u[absent] = 1e30
    malicious = np.zeros(num_clients, bool)
    malicious[list(attackers)] = True
    mask = np.ones(num_clients, bool)
    mask[absent] = False
    return u, malicious, mask

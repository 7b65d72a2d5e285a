"""Asynchronous rounds (issue 18): FedBuff's buffer size against synchronous FedAvg in virtual time, as one sweep.

Digits over 20 clients with Dirichlet(0.5) label skew (`digits_dirichlet.py`), 10 clients in flight
(``cohort_size``), per-client median latencies log-normal with sigma 1 (slow and fast hospitals) and each
dispatch's latency log-normal with sigma 0.5 around its client's median. Buffer sizes K = 10 (every client in
flight arrives at every server step: synchronous FedAvg, each round as long as its slowest client), 5 and 2,
each for 300 client updates (300 / K server steps), staleness weights (1 + tau)**-0.5 (Nguyen et al. 2022),
3 seeds (each its own split). One program per K.

    python -m medfed_jax --config=fedbuff_frontier --workdir=runs/fedbuff_frontier
"""

from medfed_jax import config_files

UPDATES = 300  # client updates each buffer size applies (server steps x K)
EVALUATIONS = 15  # evaluations per run
BUFFERS = {  # name -> the fields that select it
    f"K = {k}{' (synchronous)' if k == 10 else ''}": {
        "asynchronous.buffer_size": k,
        "rounds": UPDATES // k,
        "eval_every": UPDATES // k // EVALUATIONS,
    }
    for k in (10, 5, 2)
}


def get_config():
    cfg = config_files.load_config("digits_dirichlet")
    cfg.name = "fedbuff_frontier"
    cfg.baselines = ()
    cfg.cohort_size = 10
    cfg.asynchronous.mode = "fedbuff"
    cfg.asynchronous.latency_spread, cfg.asynchronous.client_latency_spread = 0.5, 1.0
    cfg.sweep.cells = list(BUFFERS.values())
    cfg.sweep.grid = {"seed": (0, 1, 2)}
    return cfg

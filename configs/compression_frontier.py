"""Compressed uploads (issue 18): accuracy vs bytes uploaded for the compressors, as one sweep.

Digits over 20 clients with Dirichlet(0.5) label skew (`digits_dirichlet.py`), FedAvg, every client
every round, 30 rounds evaluated every 2, 3 seeds (each its own split): float32, bfloat16, QSGD at 4
and 2 bits (L2 scale per tensor), and top-10% with error feedback (``compression.*``). 5 programs.

    make frontier   # this sweep and utility_frontier.py from scratch, tables and figures
    python -m medfed_jax --config=compression_frontier --workdir=runs/frontier/compression_frontier
    python benchmarks/frontier.py --workdir=runs/frontier   # once both sweeps are there
"""

from medfed_jax import config_files

COMPRESSORS = {  # name -> the fields that select it
    "float32": {"compression.method": "float32", "compression.bits": 4, "compression.error_feedback": False},
    "bfloat16": {"compression.method": "bfloat16", "compression.bits": 4, "compression.error_feedback": False},
    "qsgd 4-bit": {"compression.method": "qsgd", "compression.bits": 4, "compression.error_feedback": False},
    "qsgd 2-bit": {"compression.method": "qsgd", "compression.bits": 2, "compression.error_feedback": False},
    "top-10% + error feedback": {
        "compression.method": "top_k",
        "compression.bits": 4,
        "compression.error_feedback": True,
    },
}


def get_config():
    cfg = config_files.load_config("digits_dirichlet")
    cfg.name = "compression_frontier"
    cfg.rounds, cfg.eval_every = 30, 2
    cfg.baselines = ()
    cfg.compression.fraction = 0.1
    cfg.sweep.cells = list(COMPRESSORS.values())
    cfg.sweep.grid = {"seed": (0, 1, 2)}
    return cfg

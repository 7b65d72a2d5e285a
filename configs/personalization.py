"""Personalisation on the four heart hospitals over 5 seeds, each its own train/test split of every hospital.

Does a personalised method beat every hospital's own model (local-only
training) on its own patients? The headline's logistic model (`heart_fedavg.py`,
50 rounds) with local-only, FedAvg, fine-tuning, Ditto at lambda 0.01, 0.1 and
1 (a numeric knob: one program), FedPer (each hospital's intercept local) and
APFL; and a one-hidden-layer MLP (16 units) with local-only and FedPer keeping
the whole output layer local (a wider local part). The report counts, per
split, whether a method beats local-only on the mean of hospitals and on the
worst hospital (`medfed_jax.report.personalization_table`).

    python -m medfed_jax --config=personalization --workdir=runs/personalization
    python -m medfed_jax.report --workdir=runs/personalization
"""

from medfed_jax import config_files

LOGISTIC = ("local_only", "federated", "finetune", "ditto", "fedper", "apfl")
DITTO_LAMBDAS = (0.01, 0.1, 1.0)
MLP = {"model.name": "mlp", "model.widths": (16,), "personalization.local_paths": ("head",)}


def get_config():
    cfg = config_files.load_config("heart_fedavg")
    cfg.name = "personalization"
    cfg.baselines = ()
    logistic = {
        "model.name": "logistic",
        "model.widths": cfg.model.widths,
        "personalization.local_paths": ("head/bias",),
    }
    cells = [
        {**logistic, "method": m, "personalization.ditto_lambda": lam}
        for m in LOGISTIC
        for lam in (DITTO_LAMBDAS if m == "ditto" else (1.0,))
    ]
    cells += [{**MLP, "method": m, "personalization.ditto_lambda": 1.0} for m in ("local_only", "fedper")]
    cfg.sweep.cells = cells
    cfg.sweep.grid = {"seed": (0, 1, 2, 3, 4)}
    return cfg

"""Personalisation on the four heart hospitals over 5 seeds, each its own train/test split of every hospital.

Does a personalised method beat every hospital's own model (local-only
training) on its own patients, on the mean of hospitals and on the worst
hospital, split after split? The headline's logistic model (`heart_fedavg.py`,
50 rounds) with local-only, FedAvg, fine-tuning, Ditto at lambda 0.001 to 1
(a numeric knob: one program), FedPer (each hospital's intercept local) and
APFL; and a one-hidden-layer MLP (16 units) with local-only, FedPer keeping
the whole output layer local (a wider local part) or the hidden layer local
(shared head), Ditto at lambda 0.01 and 0.1, and APFL. The report counts the
splits on which each beats the logistic local-only models
(`medfed_jax.report.personalization_table`).

    python -m medfed_jax --config=personalization --workdir=runs/personalization
    python -m medfed_jax.report --workdir=runs/personalization
"""

from medfed_jax import config_files

LOGISTIC_METHODS = ("local_only", "federated", "finetune", "ditto", "fedper", "apfl")
DITTO_LAMBDAS = (0.001, 0.003, 0.01, 0.03, 0.1, 1.0)
MLP = {"model.name": "mlp", "model.widths": (16,)}
MLP_SETTINGS = (
    {"method": "local_only"},
    {"method": "fedper", "personalization.local_paths": ("head",)},
    {"method": "fedper", "personalization.local_paths": ("hidden0",)},
    {"method": "ditto", "personalization.ditto_lambda": 0.01},
    {"method": "ditto", "personalization.ditto_lambda": 0.1},
    {"method": "apfl"},
)


def get_config():
    cfg = config_files.load_config("heart_fedavg")
    cfg.name = "personalization"
    cfg.baselines = ()
    base = {
        "personalization.local_paths": cfg.personalization.local_paths,
        "personalization.ditto_lambda": cfg.personalization.ditto_lambda,
    }
    logistic = {"model.name": "logistic", "model.widths": cfg.model.widths}
    cells = [
        {**logistic, **base, "method": m, "personalization.ditto_lambda": lam}
        for m in LOGISTIC_METHODS
        for lam in (DITTO_LAMBDAS if m == "ditto" else (base["personalization.ditto_lambda"],))
    ]
    cells += [{**MLP, **base, **setting} for setting in MLP_SETTINGS]
    cfg.sweep.cells = cells
    cfg.sweep.grid = {"seed": (0, 1, 2, 3, 4)}
    return cfg

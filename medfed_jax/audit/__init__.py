"""Privacy audit: what differential privacy buys against two concrete attacks.

- **Gradient inversion** (Zhu et al. 2019 "Deep Leakage from Gradients",
  with the cosine matching loss of Geiping et al. 2020 and iDLG label
  inference, Zhao et al. 2020): an honest-but-curious server reconstructs a
  client's training images from its single-step update by optimising dummy
  images until their gradient points the same way. Reported as MSE and PSNR
  against the true images, without DP and under local-DP noise of growing
  multiplier.
- **Membership inference** (loss threshold, Yeom et al. 2018): a record with
  low loss under the final model is guessed to be a training member; the
  attack AUC over members vs held-out non-members is 0.5 for a model that
  leaks nothing.
- **Membership inference on the federated release** (`federated_audit`):
  the models the project releases, the federated global model and each
  hospital's personalised model, trained by the engine on a random half of
  every record pool (each record in with probability 1/2, independently),
  attacked by the loss threshold and by LiRA (Carlini et al. 2022, online,
  global variance) with ``shadows`` shadow federations on their own random
  halves, all trained in one vmapped program. AUC per hospital; an empirical
  epsilon lower bound from the LiRA scores by jax-privacy's one-run audit
  (Steinke et al. 2023, ``CanaryScoreAuditor.epsilon_one_run``), beside the
  accounted record-level epsilon (client-level DP under replace-one: a
  record changes one client's update, `record_epsilon`).

``python -m medfed_jax.audit --out=DIR`` runs the first two on scikit-learn's
8x8 digits and writes ``inversion.csv``, ``inversion.png`` and
``membership.csv``; ``--federated=heart_fedavg`` audits that config's
federated training instead (``federated_membership.csv``, ``summary.json``).

The package, by attack: `inversion`, `membership` (both on the digits of
`digits`), `federated` (the release of the engine's runs); `cli` is the
command line. The names below are re-exported here.
"""

from medfed_jax.audit.cli import federated_main, main
from medfed_jax.audit.digits import DIGITS_SHAPE, batch_gradient, example_losses, load_digits_images
from medfed_jax.audit.federated import (
    MAX_CLIENT_COLUMNS,
    audit_settings,
    check_audit_config,
    federated_audit,
    federated_table,
    included_block,
    lira_scores,
    logit_confidence,
    record_epsilon,
    record_pool,
    table_from_dir,
)
from medfed_jax.audit.inversion import (
    distinct_label_batch,
    engine_round,
    infer_labels,
    inversion_experiment,
    invert_gradients,
    reconstruction_error,
    save_inversion_figure,
    simulated_upload,
)
from medfed_jax.audit.membership import MEMBERSHIP_DELTA, accuracy, membership_auc, membership_experiment, train_dpsgd

__all__ = [
    "DIGITS_SHAPE",
    "MAX_CLIENT_COLUMNS",
    "MEMBERSHIP_DELTA",
    "accuracy",
    "audit_settings",
    "batch_gradient",
    "check_audit_config",
    "distinct_label_batch",
    "engine_round",
    "example_losses",
    "federated_audit",
    "federated_main",
    "federated_table",
    "included_block",
    "infer_labels",
    "inversion_experiment",
    "invert_gradients",
    "lira_scores",
    "load_digits_images",
    "logit_confidence",
    "main",
    "membership_auc",
    "membership_experiment",
    "reconstruction_error",
    "record_epsilon",
    "record_pool",
    "save_inversion_figure",
    "simulated_upload",
    "table_from_dir",
    "train_dpsgd",
]

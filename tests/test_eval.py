"""Evaluation: a diverged model (any non-finite parameter) is not scored; a finite one is scored by argmax.

References are numpy argmax accuracies on the real (unpadded) rows; before
the ``diverged`` check, a NaN model scored each client's class-0 share.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfed_jax import cli
from medfed_jax.eval import make_evaluate, make_evaluate_per_client_models, make_evaluate_personal, pooled_score
from medfed_jax.models import make_model
from medfed_jax.types import ClientData

NUM_CLASSES, COUNTS, FEATURES = 3, (6, 4, 5), 4
POOLED = ("global_pooled_accuracy", "global_pooled_loss", "global_pooled_auc", "worst_client_accuracy")


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(COUNTS), max(COUNTS), FEATURES)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=(len(COUNTS), max(COUNTS))).astype(np.int32)
    test = ClientData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(COUNTS, jnp.int32))
    model = make_model("logistic", NUM_CLASSES)
    params = model.init(jax.random.key(0), jnp.zeros((1, FEATURES)))
    # one distinct model per client (personalised / local-only evaluation)
    per_client = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=(len(COUNTS), *p.shape)), p.dtype), params)
    return model, params, per_client, test


def numpy_correct(params, x, y, n) -> np.ndarray:
    """Correct predictions (argmax of the logistic logits) on the ``n`` real rows."""
    head = params["params"]["head"]
    logits = np.asarray(x[:n]) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    return np.argmax(logits, 1) == np.asarray(y[:n])


def with_nan(params, client=None):
    """``params`` with one NaN weight (of ``client``'s model when they carry a client axis)."""
    kernel = np.array(params["params"]["head"]["kernel"])
    kernel[(client, 0, 0) if client is not None else (0, 0)] = np.nan
    return {"params": {"head": {**params["params"]["head"], "kernel": jnp.asarray(kernel)}}}


def test_finite_global_model_is_scored_by_argmax(setup):
    model, params, _, test = setup
    metrics = jax.jit(make_evaluate(model))(params, test)
    correct = [numpy_correct(params, test.x[c], test.y[c], n) for c, n in enumerate(COUNTS)]
    assert float(metrics["diverged"]) == 0.0
    np.testing.assert_allclose(metrics["client_accuracy"], [c.mean() for c in correct], rtol=1e-6)
    assert float(metrics["global_pooled_accuracy"]) == pytest.approx(np.concatenate(correct).mean(), rel=1e-6)
    assert float(metrics["worst_client_accuracy"]) == pytest.approx(min(c.mean() for c in correct), rel=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_global_model_is_diverged_not_scored(setup, bad):
    model, params, _, test = setup
    broken = jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(bad), params)
    metrics = jax.jit(make_evaluate(model))(broken, test)
    assert float(metrics["diverged"]) == 1.0
    for name in (*POOLED, "client_accuracy", "client_loss"):
        assert np.all(np.isnan(metrics[name])), name


@pytest.mark.parametrize(
    "evaluator,score", [(make_evaluate_personal, "own_client"), (make_evaluate_per_client_models, "mean_client_model")]
)
def test_one_diverged_client_model(setup, evaluator, score):
    model, _, per_client, test = setup
    metrics = jax.jit(evaluator(model))(with_nan(per_client, client=1), test)
    for c, n in enumerate(COUNTS):
        if c == 1:
            assert np.isnan(metrics["client_accuracy"][c]) and np.isnan(metrics["client_loss"][c])
        else:
            model_c = jax.tree.map(lambda p, c=c: p[c], per_client)
            want = numpy_correct(model_c, test.x[c], test.y[c], n).mean()
            assert float(metrics["client_accuracy"][c]) == pytest.approx(want, rel=1e-6)
            assert np.isfinite(metrics["client_loss"][c])
    assert float(metrics["diverged"]) == 1.0
    for name in (f"{score}_accuracy", f"{score}_loss", f"{score}_auc", "worst_client_accuracy"):
        assert np.isnan(metrics[name]), name
    if "client_model_pooled_accuracy" in metrics:  # local-only: each client model on the pooled test set
        model_0 = jax.tree.map(lambda p: p[0], per_client)
        pooled = np.concatenate([numpy_correct(model_0, test.x[c], test.y[c], n) for c, n in enumerate(COUNTS)])
        assert float(metrics["client_model_pooled_accuracy"][0]) == pytest.approx(pooled.mean(), rel=1e-6)
        assert np.isnan(metrics["client_model_pooled_accuracy"][1])


def test_final_table_and_summary_leave_diverged_seeds_out():
    nan = float("nan")
    finals = {
        "federated": {
            "global_pooled_accuracy": np.array([0.5, nan, 0.7]),
            "global_pooled_auc": np.array([0.6, nan, 0.8]),
            "client_accuracy": np.array([[0.4, 0.6], [nan, nan], [0.6, 0.8]]),
            "diverged": np.array([0.0, 1.0, 0.0]),
        },
        "pooled": {
            "global_pooled_accuracy": np.array([nan]),
            "global_pooled_auc": np.array([nan]),
            "client_accuracy": np.array([[nan, nan]]),
            "diverged": np.array([1.0]),
        },
    }
    lines = cli.final_accuracy_table(finals, ("a", "b")).splitlines()
    federated = [c.strip() for c in lines[2].strip("|").split("|")]
    # mean ± sample std (ddof 1: 0.1 * sqrt(2) for two values 0.2 apart) over the two finite seeds, computed
    # here: a (0.4, 0.6), b (0.6, 0.8), mean (0.5, 0.7), ...
    assert federated == [
        "federated (1/3 diverged)",
        "50.0 ± 14.1",
        "70.0 ± 14.1",
        "60.0 ± 14.1",
        "50.0 ± 14.1",
        "60.0 ± 14.1",
        "0.700 ± 0.141",
    ]
    pooled = [c.strip() for c in lines[3].strip("|").split("|")]
    assert pooled == ["pooled (1/1 diverged)"] + ["diverged"] * 6
    summary = cli.final_summary(finals["federated"], 2)
    assert summary["global_pooled_accuracy_mean"] == pytest.approx(0.6) and summary[
        "global_pooled_accuracy_std"
    ] == pytest.approx(0.1 * 2**0.5)
    assert summary["diverged_seeds"] == 1
    assert np.isnan(cli.final_summary(finals["pooled"], 2)["global_pooled_accuracy_mean"])


def test_pooled_score_is_what_each_method_reports_on_all_test_rows():
    assert pooled_score(["client_accuracy", "global_pooled_accuracy", "global_pooled_loss"]) == "global_pooled"
    local_only = ["own_client_accuracy", "mean_client_model_accuracy", "client_model_pooled_accuracy"]
    assert pooled_score(local_only) == "mean_client_model"  # the mean client model, as the tables show it
    assert pooled_score(["worst_client_accuracy_mean", "own_client_accuracy_mean"]) == "own_client"  # summary.csv
    with pytest.raises(ValueError, match="global_pooled_accuracy.*rerun"):
        pooled_score(["test_accuracy"])

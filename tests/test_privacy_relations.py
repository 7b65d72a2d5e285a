"""Epsilon under both neighbouring relations, and DP-SGD's per-client epsilon, against `dp_accounting` directly."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from medfed_jax import config as config_lib
from medfed_jax import privacy

Relation = dp_accounting.NeighboringRelation
DELTA = 1e-5
# The package computes a full-participation Gaussian's epsilon in closed form, dp_accounting's PLD accountant
# by discretising the privacy loss (interval 1e-4, pessimistic): they agree to ~1e-9 relative at these noise
# levels, so 1e-4 leaves room without letting a factor-2 sensitivity slip (that changes epsilon 2-3x).
RTOL = 1e-4


def central(noise: float, cohort: int = 0):
    cfg = config_lib.default_config()
    cfg.aggregator.name = "mean"
    cfg.privacy.mode, cfg.privacy.noise_multiplier, cfg.privacy.clip_norm = "central", noise, 0.1
    cfg.privacy.delta, cfg.cohort_size = DELTA, cohort
    return cfg


def pld_epsilon(relation, event, count: int) -> float:
    accountant = pld.PLDAccountant(neighboring_relation=relation)
    return accountant.compose(event, count).get_epsilon(DELTA)


@pytest.mark.parametrize("noise, rounds", [(0.5, 50), (2.0, 50), (8.0, 100)])
def test_every_client_every_round_gives_both_relations(noise, rounds):
    accounting = privacy.accounting_for_run(central(noise), num_clients=4)
    gaussian = dp_accounting.GaussianDpEvent(noise)
    add_remove = pld_epsilon(Relation.ADD_OR_REMOVE_ONE, gaussian, rounds)
    replace_one = pld_epsilon(Relation.REPLACE_ONE, gaussian, rounds)
    assert accounting.epsilon_after(rounds) == pytest.approx(add_remove, rel=RTOL)
    assert accounting.replace_one_epsilon_after(rounds) == pytest.approx(replace_one, rel=RTOL)
    assert replace_one > 1.5 * add_remove  # the relations differ by far more than the tolerance
    assert accounting.report(rounds)["epsilon_replace_one"] == accounting.replace_one_epsilon_after(rounds)


def test_a_sampled_cohort_is_replace_one_already():
    accounting = privacy.accounting_for_run(central(1.0, cohort=5), num_clients=20)
    gaussian = dp_accounting.GaussianDpEvent(1.0 / 2)  # replace-one: the clipped sum moves by 2x clip
    event = dp_accounting.SampledWithoutReplacementDpEvent(20, 5, gaussian)
    expected = rdp.RdpAccountant(neighboring_relation=Relation.REPLACE_ONE).compose(event, 30).get_epsilon(DELTA)
    assert accounting.replace_one_epsilon_after(30) == pytest.approx(expected, rel=1e-9)
    assert accounting.replace_one_epsilon_after(30) == accounting.epsilon_after(30)


def test_dpsgd_gives_each_client_its_own_epsilon_and_no_replace_one():
    cfg = config_lib.default_config()
    cfg.privacy.mode, cfg.privacy.noise_multiplier, cfg.privacy.clip_norm, cfg.privacy.delta = "dpsgd", 1.0, 1.0, DELTA
    cfg.local.epochs, cfg.local.steps, cfg.local.sampling, cfg.local.batch_size = 0, 4, "poisson", 8
    sizes, rounds = [200, 30, 85], 50
    got = privacy.client_record_epsilons(cfg, sizes, rounds)
    for n, eps in zip(sizes, got):
        event = dp_accounting.PoissonSampledDpEvent(8 / n, dp_accounting.GaussianDpEvent(1.0))
        assert eps == pytest.approx(pld_epsilon(Relation.ADD_OR_REMOVE_ONE, event, 4 * rounds), rel=1e-3)
    assert got[1] > got[2] > got[0]  # the smallest hospital samples its patients most often
    accounting = privacy.accounting_for_run(cfg, 3, sizes)
    assert accounting.epsilon_after(rounds) == pytest.approx(max(got), rel=1e-9)
    assert math.isnan(accounting.replace_one_epsilon_after(rounds))


def test_bandmf_replace_one_doubles_its_one_gaussians_sensitivity():
    cfg = central(3.0)
    cfg.privacy.mode, cfg.privacy.bands = "bandmf", 2
    accounting = privacy.accounting_for_run(cfg, num_clients=4)
    z = 3.0 / math.sqrt(privacy.bandmf_sensitivity_squared(2, 50))  # the T releases as one Gaussian
    gaussian = dp_accounting.GaussianDpEvent(z)
    assert accounting.epsilon_after(50) == pytest.approx(pld_epsilon(Relation.ADD_OR_REMOVE_ONE, gaussian, 1), rel=RTOL)
    assert accounting.replace_one_epsilon_after(50) == pytest.approx(
        pld_epsilon(Relation.REPLACE_ONE, gaussian, 1), rel=RTOL
    )

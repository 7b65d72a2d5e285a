"""The ``privacy`` config section: defaults, validation, the engine's builders and a run's accounting."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections

from medfed_jax.privacy.accounting import (
    ACCOUNTANTS,
    SAMPLINGS,
    _check,
    _uses_replace_one,
    bandmf_epsilon,
    describe_accounting,
    epsilon,
)
from medfed_jax.privacy.mechanisms import AdaptiveClip, dp_fedavg, dpsgd_gradient, local_privatizer
from medfed_jax.types import Aggregator, PRNGKey, hparams_of

MODES = ("none", "central", "bandmf", "local", "dpsgd")
SERVER_NOISE = ("central", "bandmf")  # client-level DP noised on the server's sum: the DP-FedAvg estimator
UNSOUND_WITH_SERVER_NOISE = {  # drift.method -> why the DP-FedAvg sum's sensitivity S fails with it
    "fednova": "FedNova rescales every update by tau_eff, a function of the whole cohort's sizes and steps, "
    "before the clip",
    "feddyn": "FedDyn's server state h adds the raw, unclipped sum of the updates to the model",
}


class PrivacyHParams(NamedTuple):
    """The ``privacy`` section's numeric settings (traced: sweeping them never recompiles)."""

    noise_multiplier: Any  # sigma: noise std / clip norm
    clip_norm: Any  # S (client level) or C (per example); the initial S when adaptive
    target_quantile: Any  # adaptive clipping: share of updates meant to fall under S
    clip_lr: Any  # geometric step of the adaptive clip norm
    clipped_count_stddev: Any  # noise std on the clipped count


def default_config() -> ml_collections.ConfigDict:
    """The ``privacy`` section of a run config."""
    return ml_collections.ConfigDict(
        {
            "mode": "none",  # 'none' | 'central' (DP-FedAvg) | 'local' | 'dpsgd' (example level)
            "noise_multiplier": 0.0,  # sigma: noise std / clip norm
            "clip_norm": float("inf"),  # S (client level) or C (per example); the initial S when adaptive
            "delta": 1e-5,  # the delta of (epsilon, delta)-DP; epsilon is reported at this delta
            "accountant": "pld",  # 'pld' or 'rdp'; fixed-size sampling always uses RDP (replace-one)
            "adaptive_clipping": False,  # central only: S tracks a quantile of update norms
            "target_quantile": 0.5,  # adaptive clipping: share of updates meant to fall under S
            "clip_lr": 0.2,  # geometric step of the adaptive clip norm
            "clipped_count_stddev": 1.0,  # noise std on the clipped count; Andrew et al. suggest cohort/20
            "bands": 1,  # mode='bandmf': bands b of the Toeplitz strategy C; 1 = DP-FedAvg's independent noise
        }
    )


# --------------------------------------------------------------------------- validation


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check_delta(delta: float, units: int, unit: str) -> None:
    """Refuse ``delta >= 1 / units``: such a delta allows publishing one unit's data outright."""
    _check(
        delta < 1.0 / units,
        f"privacy.delta={delta!r} must be < 1/{units} (the number of privacy units, {unit}s); "
        f"a delta that large permits releasing one {unit}'s data in the clear. Use e.g. delta={_suggest(units)}.",
    )


def _suggest(units: int) -> float:
    return float(f"{0.1 / units:.0e}")


def validate_config(cfg: Any, context: Any) -> None:
    """Raise a ValueError naming ``privacy.<field>`` and the fix for bad settings.

    ``context`` is a `medfed_jax.config.BuildContext`. For ``mode='dpsgd'`` the
    privacy unit is a record and the delta check needs the client sizes: it
    is in `validate_with_run` (and `accounting_for_run`).
    """
    _check(cfg.mode in MODES, f"privacy.mode={cfg.mode!r} is unknown; choose one of {MODES}.")
    _check(
        cfg.accountant in ACCOUNTANTS,
        f"privacy.accountant={cfg.accountant!r} is unknown; choose one of {ACCOUNTANTS}.",
    )
    sigma, clip = cfg.noise_multiplier, cfg.clip_norm
    _check(
        _is_number(sigma) and 0 <= sigma < math.inf,
        f"privacy.noise_multiplier={sigma!r} must be a finite number >= 0 (0 adds no noise; epsilon is then inf).",
    )
    _check(_is_number(clip) and clip > 0, f"privacy.clip_norm={clip!r} must be > 0.")
    _check(
        isinstance(cfg.bands, int) and cfg.bands >= 1,
        f"privacy.bands={cfg.bands!r} must be an integer >= 1 (1 = independent noise, as DP-FedAvg).",
    )
    if cfg.adaptive_clipping:
        _check(
            cfg.mode == "central",
            f"privacy.adaptive_clipping=True applies to mode='central' only (mode is {cfg.mode!r}); set it False.",
        )
        _check(
            _is_number(cfg.target_quantile) and 0 < cfg.target_quantile < 1,
            f"privacy.target_quantile={cfg.target_quantile!r} must lie in (0, 1); 0.5 clips at the median norm.",
        )
        _check(
            _is_number(cfg.clip_lr) and cfg.clip_lr > 0,
            f"privacy.clip_lr={cfg.clip_lr!r} must be > 0 (try 0.2).",
        )
        _check(
            _is_number(cfg.clipped_count_stddev) and cfg.clipped_count_stddev > sigma / 2,
            f"privacy.clipped_count_stddev={cfg.clipped_count_stddev!r} must exceed noise_multiplier/2 "
            f"= {sigma / 2:g} (Andrew et al. 2021 split the privacy budget between the update and the "
            "clipped count); try cohort_size/20 or more.",
        )
    if cfg.mode == "none":
        return
    _check(
        clip < math.inf,
        f"privacy.clip_norm=inf with privacy.mode={cfg.mode!r}: DP without clipping has unbounded "
        "sensitivity, so no epsilon holds. Set a finite clip_norm (e.g. 1.0).",
    )
    _check(_is_number(cfg.delta) and 0 < cfg.delta < 1, f"privacy.delta={cfg.delta!r} must lie in (0, 1).")
    if cfg.mode in ("central", "bandmf", "local"):
        check_delta(cfg.delta, context.num_clients, "client")


def validate_with_run(cfg: Any, client_sizes: Sequence[int] | None = None) -> None:
    """Checks across sections of a whole run config (``cfg.privacy`` with the others).

    - central DP needs ``aggregator.name='mean'``: DP-FedAvg replaces the
      aggregator with its own fixed-denominator mean, and the guarantee does
      not hold for any other rule (use ``mode='local'`` with robust rules);
    - central DP refuses ``drift.method`` 'fednova' and 'feddyn' (`UNSOUND_WITH_SERVER_NOISE`): the sum's
      sensitivity ``S`` needs each clipped term to depend on its own client only;
    - DP-SGD needs per-step batch sampling (``local.sampling`` 'fixed' or
      'poisson'; shuffled epochs have no matching accountant), and, given
      ``client_sizes``, ``delta < 1 / (smallest client size)``.
    """
    p = cfg.privacy
    if p.mode in SERVER_NOISE:
        _check(
            cfg.aggregator.name == "mean",
            f"privacy.mode={p.mode!r} with aggregator.name={cfg.aggregator.name!r}: DP-FedAvg's guarantee "
            "holds only for its own unweighted, fixed-denominator mean. Set aggregator.name='mean', or use "
            "privacy.mode='local' to combine DP with a robust aggregator.",
        )
        why = UNSOUND_WITH_SERVER_NOISE.get(cfg.drift.method)
        _check(
            why is None,
            f"privacy.mode={p.mode!r} with drift.method={cfg.drift.method!r}: {why}, so one client moves more "
            "than its own clipped term and the noise no longer covers it. Set drift.method='none', or use "
            "privacy.mode='local' (the server then only post-processes noised updates).",
        )
    if p.mode == "bandmf":
        _check(
            not cfg.cohort_size and cfg.cohort_sampling == "fixed",
            f"privacy.mode='bandmf' with cohort_size={cfg.cohort_size}, cohort_sampling={cfg.cohort_sampling!r}: "
            "its accounting assumes every client in every round; set cohort_size=0 and cohort_sampling='fixed'.",
        )
        _check(
            p.bands <= cfg.rounds,
            f"privacy.bands={p.bands} exceeds rounds={cfg.rounds}: a band beyond the last round is never "
            f"used; set privacy.bands <= {cfg.rounds}.",
        )
    if p.mode == "dpsgd":
        _check(
            cfg.local.sampling in SAMPLINGS,
            f"privacy.mode='dpsgd' with local.sampling={cfg.local.sampling!r}: the accountant needs a "
            "batch drawn per step. Set local.sampling='poisson' (or 'fixed') and local.steps > 0.",
        )
        if client_sizes is not None:
            check_delta(p.delta, min(client_sizes), "record")


# --------------------------------------------------------------------------- the engine's builders


def _hparams(cfg: Any, hparams: PrivacyHParams | None) -> PrivacyHParams:
    return hparams_of(PrivacyHParams, cfg) if hparams is None else hparams


def build_client_privatizer(cfg: Any, hparams: PrivacyHParams | None = None) -> Callable[[Any, PRNGKey], Any] | None:
    """``(update, key) -> update`` applied per client before upload (local DP), or None.

    ``hparams``: traced inside the engine; the config's values when None (as for every builder below).
    """
    if cfg.mode != "local":
        return None
    hp = _hparams(cfg, hparams)
    return local_privatizer(hp.noise_multiplier, hp.clip_norm)


def build_central_aggregator(cfg: Any, hparams: PrivacyHParams | None, context: Any) -> Aggregator | None:
    """The DP-FedAvg (or banded-MF) `Aggregator` replacing the configured one under central DP, or None.

    The fixed denominator is ``context.expected_senders``, the expected number
    of updates per round: ``q C (1 - d)`` under Poisson sampling (``m (1 - d)``
    for fixed cohorts of ``m``) with ``unreliable.dropout = d``. Any constant
    fixed in advance keeps the guarantee (McMahan et al. 2018: sensitivity
    ``S / D``, noise ``z S / D``); this one makes the mean, and adaptive
    clipping's fraction below ``S``, unbiased under dropout.
    """
    if cfg.mode not in SERVER_NOISE:
        return None
    if context.expected_senders <= 0:
        raise ValueError(f"central DP needs the expected number of senders; got {context.expected_senders}.")
    hp = _hparams(cfg, hparams)
    adaptive = AdaptiveClip(hp.target_quantile, hp.clip_lr, hp.clipped_count_stddev) if cfg.adaptive_clipping else None
    bands = cfg.bands if cfg.mode == "bandmf" else 1
    return dp_fedavg(hp.noise_multiplier, hp.clip_norm, context.expected_senders, adaptive, bands)


def build_gradient_fn(cfg: Any, hparams: PrivacyHParams | None = None) -> Callable[..., tuple[jax.Array, Any]] | None:
    """The per-batch DP-SGD gradient function (see `dpsgd_gradient`), or None."""
    if cfg.mode != "dpsgd":
        return None
    hp = _hparams(cfg, hparams)
    return dpsgd_gradient(hp.noise_multiplier, hp.clip_norm)


# --------------------------------------------------------------------------- a run's accounting


_DROPOUT_NOT_CREDITED = "not credited (conservative: a drop only removes a release)"
MECHANISMS = {
    "central": "Gaussian noise on the sum of clipped client updates (DP-FedAvg)",
    "bandmf": "banded matrix-factorisation noise on the sum of clipped client updates (DP-FTRL / BandMF)",
    "local": "Gaussian noise on each clipped client update before upload (local DP)",
    "dpsgd": "Gaussian noise on each step's sum of clipped per-example gradients (DP-SGD)",
    "none": "none",
}


@dataclasses.dataclass(frozen=True)
class Accounting:
    """The privacy accounting of a run: cheap `epsilon_after(rounds)` for eval lines."""

    mode: str
    unit: str  # 'client', 'record' or 'none'
    noise_multiplier: float
    sampling_rate: float
    steps_per_round: int
    delta: float
    accountant: str
    sampling: str
    description: str
    truncation: tuple[int, int] | None = None  # Poisson cohorts cut to slots: (clients, max_cohort)
    bands: int = 1  # mode='bandmf': the strategy's bands
    dropout: float = 0.0  # unreliable.dropout credited in sampling_rate (`sender_rate`); 0 where not credited

    @property
    def relation(self) -> str:
        """The neighbouring relation epsilon holds for."""
        if self.mode == "none":
            return "none"
        return f"{'replace' if self.sampling == 'fixed' else 'add-or-remove'}-one {self.unit}"

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon after ``rounds`` rounds (inf without DP; results are cached)."""
        if self.mode == "none":
            return math.inf
        if self.mode == "bandmf":
            return bandmf_epsilon(self.noise_multiplier, self.bands, rounds, self.delta)
        return epsilon(
            self.noise_multiplier,
            self.sampling_rate,
            rounds * self.steps_per_round,
            self.delta,
            self.accountant,
            self.sampling,
            self.truncation,
        )

    def replace_one_epsilon_after(self, rounds: int) -> float:
        """Epsilon after ``rounds`` rounds under the replace-one relation (one unit's data swapped for
        another's: the clipped sum moves by up to 2x clip).

        The run's own epsilon where its relation is replace-one already
        (``sampling='fixed'``); the same Gaussian at twice the sensitivity
        where every unit takes part in every step (rate 1; BandMF's one
        Gaussian likewise; with dropout a valid, conservative bound); nan
        under Poisson sampling (not accounted here); inf without DP.
        """
        if self.mode == "none":
            return math.inf
        if self.mode == "bandmf":
            return bandmf_epsilon(self.noise_multiplier / 2, self.bands, rounds, self.delta)
        if self.sampling == "fixed":
            return self.epsilon_after(rounds)
        if self.sampling_rate < sender_rate(1.0, self.dropout):
            return math.nan
        steps = rounds * self.steps_per_round
        return epsilon(self.noise_multiplier, 1.0, steps, self.delta, self.accountant, "fixed")

    def report(self, rounds: int) -> dict:
        """Plain dict for logs and ``summary.json``."""
        return {
            "epsilon": self.epsilon_after(rounds),
            "epsilon_replace_one": self.replace_one_epsilon_after(rounds),
            "delta": self.delta,
            "unit": self.unit,
            "mode": self.mode,
            "accountant": self.accountant,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "steps": rounds * self.steps_per_round,
            "sampling": self.sampling,
            "max_cohort": self.truncation[1] if self.truncation else 0,
            "neighbouring_relation": self.relation,
            "mechanism": MECHANISMS[self.mode] + (f", {self.bands} bands" if self.mode == "bandmf" else ""),
            "description": self.description,
        }


def accounting_for_run(
    cfg: Any, num_clients: int, client_sizes: Sequence[int] | None = None, cohort_sampling: str | None = None
) -> Accounting:
    """The `Accounting` of a whole run config (``cfg.privacy``, ``cfg.cohort_size``, ``cfg.local``).

    Refuses (ValueError) a Poisson ``max_cohort`` too small for the RDP
    truncation bound over ``cfg.rounds`` (`truncation_slack`).

    - central: unit client, one step per round at rate ``cohort_size /
      num_clients`` (``cohort_sampling='fixed'``, a fixed-size cohort without
      replacement) or ``sampling_rate`` (``'poisson'``, truncated to
      ``max_cohort`` when that is set). ``cohort_sampling`` ('fixed' or
      'poisson') overrides how a *fixed-size* config's cohort is accounted
      (e.g. Poisson at the same rate, for comparison); default: as drawn.
      With ``unreliable.dropout = d`` an untruncated Poisson cohort (or every
      client) is accounted at the senders' rate ``q (1 - d)`` (`sender_rate`).
    - bandmf: unit client, every client every round (`bandmf_epsilon`).
    - local: unit client, one release per round a client takes part in,
      counted for every round (the server sees who takes part, so cohort
      sampling does not amplify), replace-one relation.
    - dpsgd: unit record, ``local.steps`` steps per round at rate
      ``min(1, batch_size / n)`` for the smallest client ``n`` (the largest rate),
      counted for every round (no credit for cohort sampling).

    Dropout is credited only where the senders are exactly a Poisson sample;
    elsewhere (truncated or fixed-size cohorts, bandmf, local, dpsgd) the
    accounting ignores it, which is conservative: a drop is a coin per client
    and round, independent of the data, with the effect of swapping that
    client's data for data that sends nothing (it keeps its cohort slot), so
    for each outcome of the coins the run is the accounted mechanism on
    neighbouring inputs, and a mixture of ``(eps, delta)``-close pairs is
    ``(eps, delta)``-close. Stragglers and compute budgets likewise run fewer
    DP-SGD steps than accounted.
    """
    p = cfg.privacy
    accountant = p.accountant
    if p.mode == "none":
        return Accounting("none", "none", 0.0, 1.0, 1, 0.0, accountant, "none", "no differential privacy")
    truncation, dropout, credited_dropout = None, float(cfg.unreliable.dropout), 0.0
    dropout_note = _DROPOUT_NOT_CREDITED
    if p.mode == "bandmf":
        rate, sampling, steps, unit = 1.0, "poisson", 1, "client"
    elif p.mode == "central":
        if cfg.cohort_sampling == "poisson":
            rate, sampling, steps, unit = cfg.sampling_rate, "poisson", 1, "client"
            truncation = (num_clients, cfg.max_cohort) if cfg.max_cohort else None
        else:
            sampling = cohort_sampling or "fixed"
            _check(sampling in SAMPLINGS, f"cohort_sampling={sampling!r}: choose one of {SAMPLINGS}.")
            rate, steps, unit = (cfg.cohort_size or num_clients) / num_clients, 1, "client"
        if rate == 1 and truncation is None:
            sampling = "poisson"  # every client every round: add-or-remove-one, no sampling
        if sampling == "poisson" and truncation is None:  # senders of a Poisson cohort: Poisson at q (1 - d)
            dropout_note = f"credited: a client's update arrives with probability {rate:g} x (1 - {dropout:g})"
            rate, credited_dropout = sender_rate(rate, dropout), dropout
    elif p.mode == "local":
        rate, sampling, steps, unit = 1.0, "fixed", 1, "client"
    else:
        _check(client_sizes is not None, "privacy.mode='dpsgd' accounting needs the client sizes.")
        validate_with_run(cfg, client_sizes)
        rate, sampling, steps, unit = (
            min(1.0, cfg.local.batch_size / min(client_sizes)),
            cfg.local.sampling,
            cfg.local.steps,
            "record",
        )
    if p.mode == "bandmf":
        how = f"{p.bands}-banded MF, every client every round (min-sep 1): one Gaussian of sigma / sens(C)"
    else:
        how = describe_accounting(rate, accountant, sampling, truncation)
    if dropout:
        how += f"; unreliable.dropout={dropout:g} {dropout_note}"
    if _uses_replace_one(rate, sampling):
        accountant = "rdp"
    accounting = Accounting(
        p.mode,
        unit,
        float(p.noise_multiplier),
        rate,
        steps,
        float(p.delta),
        accountant,
        sampling,
        f"{p.mode} DP per {unit}; {how}",
        truncation,
        p.bands,
        credited_dropout,
    )
    if truncation is not None:
        accounting.epsilon_after(cfg.rounds)  # refuses max_cohort too small for the RDP truncation bound
    return accounting


def sender_rate(cohort_rate: float, dropout: float) -> float:
    """``q (1 - d)``: a client's probability per round of being sampled (``q``) and then sending (``1 - d``).

    Both coins are independent per client and round (`medfed_jax.unreliable.dropout_mask`), so under Poisson
    cohort sampling the senders are exactly a Poisson sample at this rate.
    """
    return cohort_rate * (1.0 - dropout)


def client_record_epsilons(cfg: Any, client_sizes: Sequence[int], rounds: int) -> tuple[float, ...]:
    """DP-SGD (``privacy.mode='dpsgd'``): each client's own epsilon after ``rounds`` rounds, one of its
    records the unit, at its own sampling rate ``min(1, batch_size / n_c)`` (`accounting_for_run` reports
    the largest: the smallest client's)."""
    return tuple(accounting_for_run(cfg, 1, [n]).epsilon_after(rounds) for n in client_sizes)


def run_privacy_report(
    cfg: Any,
    num_clients: int,
    client_sizes: Sequence[int] | None = None,
    rounds: int | None = None,
    cohort_sampling: str | None = None,
) -> dict:
    """Epsilon, delta, unit, accountant and sampling of a run after ``rounds`` (default ``cfg.rounds``)."""
    accounting = accounting_for_run(cfg, num_clients, client_sizes, cohort_sampling)
    return accounting.report(cfg.rounds if rounds is None else rounds)

"""The federated server loop, written once against a small :class:`Federation` interface.

Knows no modality, no file format and no torch: it sends :class:`~.messages.Request` objects,
receives :class:`~.messages.Reply` objects, checks and aggregates state dicts of numpy arrays.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from multimodal_fl.federated.aggregation import (
    ServerOptimizer,
    aggregate,
    check_evaluate_reply,
    check_fit_reply,
    server_step,
)
from multimodal_fl.federated.central_dp import SiteLevelDP, noisy_mean, private_mean
from multimodal_fl.federated.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from multimodal_fl.federated.pooling import secure_total
from multimodal_fl.federated.protocol import (
    ConfigValue,
    Doc,
    Federation,
    InvalidReply,
    Kind,
    Reply,
    Request,
    Site,
    SiteFailure,
    StateDict,
    carry_evaluation,
    detach_evaluation,
    unpack_document,
)
from multimodal_fl.federated.secure_sum import MIN_SITES
from multimodal_fl.federated.secure_update import (
    UPDATE_VECTOR,
    SecureAggregation,
    UpdateRejected,
    decode_clipped_sum,
    decode_update,
    update_summary,
)

__all__ = [
    "LATE_SITE",
    "FederatedResult",
    "Federation",
    "FixedSites",
    "RoundFailed",
    "RoundRecord",
    "RunConfig",
    "Site",
    "check_resumable",
    "run_federated",
    "select_sites",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class RunConfig:
    """One federated run's server-side settings.

    Parameters
    ----------
    rounds : int
        Number of federated rounds.
    optimizer : ServerOptimizer
        Server update (FedAvg / FedProx / FedAdam / FedYogi / FedAdagrad) and its
        hyper-parameters.
    proximal_mu : float
        FedProx ``mu``, sent to sites as ``config["proximal_mu"]`` (0: no proximal term).
    fedbn : bool
        Keep normalisation layers local (sent as ``config["fedbn"]``; sites list them in
        ``Reply.local_keys``). Off: buffers are averaged with the weights.
    min_sites : int
        A round completes only with at least this many valid fit replies.
    fraction : float
        Share of the reachable sites asked to fit each round, in (0, 1]: ``max(min_sites,
        ceil(fraction * n_sites))`` sites, drawn without replacement by
        ``numpy.random.default_rng([seed, round, attempt])``.
    timeout : float or None
        Seconds to wait for each site's reply (None: no limit).
    max_attempts : int
        Tries of a round (each with a fresh site draw) before :class:`RoundFailed` is raised.
    evaluate_every : int
        Send evaluation requests (the new global weights, to every reachable site) after every
        this-many rounds and after the last; 0: never.
    ask_sizes : bool
        Send an ``"info"`` request before round 1; each site's ``n_samples`` then caps its later
        fit replies' ``n_samples`` (plausibility check).
    seed : int
        Run seed: site draws per round, and sent to sites as ``config["seed"]``.
    fit_config : Mapping[str, int | float | str | bool]
        Extra config for fit requests (e.g. ``local_steps``, ``lr``).
    evaluate_config : Mapping[str, int | float | str | bool]
        Extra config for evaluation requests.
    secure : SecureAggregation or None
        Secure aggregation: every fit request asks the sites to keep their update at home as
        an integer vector (:mod:`~multimodal_fl.federated.secure_update`), and the server
        learns only the sum of the vectors (:func:`~multimodal_fl.federated.pooling.
        secure_total`). A secured round needs at least three sites (``min_sites`` below three
        counts as three): with two, each site would learn the other's update.
    site_dp : SiteLevelDP or None
        Site-level differential privacy of the aggregate (:mod:`~multimodal_fl.federated.
        central_dp`): each site's update clipped, Gaussian noise on their sum, the sites
        averaged with equal weight. None: plain aggregation. With ``secure`` too, each site
        clips its own update before masking (the fit request carries ``site_dp.clip_norm`` as
        ``secure.clip_norm``) and the noise goes on the unmasked sum: Flower's client-side
        fixed clipping.
    carry_evaluation : bool
        One message exchange per round: a round's evaluation rides with the next round's fit
        requests (:func:`~.protocol.carry_evaluation`: the site evaluates the weights it
        receives, then trains from them), reachable sites not asked to fit get their evaluate
        request in the same broadcast, and only the last round's evaluation is a broadcast of
        its own. The records, the checkpoints and the weights are those of the separate
        broadcasts; a round is checkpointed and reported (``on_round``) once its evaluation is
        in, i.e. after the next round's fit. The sites must answer carried evaluations
        (:class:`~multimodal_fl.federated.site.FusionSite` does).
    """

    rounds: int
    optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    proximal_mu: float = 0.0
    fedbn: bool = False
    min_sites: int = 1
    fraction: float = 1.0
    timeout: float | None = None
    max_attempts: int = 1
    evaluate_every: int = 1
    ask_sizes: bool = True
    seed: int = 0
    fit_config: Mapping[str, ConfigValue] = field(default_factory=dict)
    evaluate_config: Mapping[str, ConfigValue] = field(default_factory=dict)
    secure: SecureAggregation | None = None
    site_dp: SiteLevelDP | None = None
    carry_evaluation: bool = False

    def __post_init__(self) -> None:
        """Validate the settings."""
        problems = []
        if self.rounds < 0:
            problems.append(f"rounds={self.rounds} (expected >= 0)")
        if self.min_sites < 1:
            problems.append(f"min_sites={self.min_sites} (expected >= 1)")
        if not 0 < self.fraction <= 1:
            problems.append(f"fraction={self.fraction} (expected 0 < fraction <= 1)")
        if self.timeout is not None and not self.timeout > 0:
            problems.append(f"timeout={self.timeout} (expected > 0 seconds or None)")
        if self.max_attempts < 1:
            problems.append(f"max_attempts={self.max_attempts} (expected >= 1)")
        if self.evaluate_every < 0:
            problems.append(f"evaluate_every={self.evaluate_every} (expected >= 0)")
        if not (self.proximal_mu >= 0 and math.isfinite(self.proximal_mu)):
            problems.append(f"proximal_mu={self.proximal_mu} (expected a finite number >= 0)")
        norm = None if self.secure is None else self.secure.clip_norm
        if norm is not None and (self.site_dp is None or norm != self.site_dp.clip_norm):
            problems.append(f"secure.clip_norm={norm} without site_dp of that clip_norm (the "
                            "loop sets it from site_dp; leave it None)")
        if problems:
            raise ValueError("invalid federated run config: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        """Return the config as a JSON-able dict (stored in checkpoints).

        Returns
        -------
        dict[str, Any]
            Field name -> value.
        """
        out = asdict(self)
        out["fit_config"] = dict(self.fit_config)
        out["evaluate_config"] = dict(self.evaluate_config)
        if out["secure"] is not None and out["secure"]["clip_norm"] is None:
            del out["secure"]["clip_norm"]  # as checkpoints written before it existed
        return out


# Settings that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = ("rounds", "timeout", "max_attempts", "carry_evaluation")


@dataclass
class RoundRecord:
    """What happened in one round (one row of the history).

    Parameters
    ----------
    round : int
        The round number (1-based).
    attempts : int
        Tries it took (1 unless too few sites replied).
    selected : list[str]
        Sites asked to fit in the successful attempt.
    replied : list[str]
        Sites whose fit replies were valid and aggregated.
    failed : dict[str, str]
        Site -> reason, for sites that raised, timed out or were unreachable (last attempt).
    rejected : dict[str, str]
        Site -> reason, for replies that failed the checks (last attempt).
    n_samples : dict[str, int]
        Site -> the sample count it reported.
    train_loss : float or None
        Sample-weighted mean of the replies' ``"loss"`` metric.
    fit_metrics : dict[str, dict[str, float]]
        Site -> its fit metrics.
    eval_metrics : dict[str, dict[str, float]]
        Site -> its evaluation metrics (empty when not evaluated this round).
    eval_failed : dict[str, str]
        Site -> reason, for evaluation requests that failed or were rejected.
    eval_documents : dict[str, dict[str, Any]]
        Site -> the documents its evaluation reply carried, unpacked (e.g. the validation
        histograms the server pools).
    earlier_attempts : list[str]
        One line per failed earlier attempt of this round.
    secure : dict[str, Any]
        A secured round: the sites in the sum, the sites left out of it with the reason, the
        quantisation (``clip``, ``scale_bits``, ``bits``, ``error_bound``), the summed
        training count and the mean delta's L2 norm (empty in a plain round).
    site_dp : dict[str, Any]
        With site-level DP: the sites whose update was clipped, the noise's standard deviation
        on the mean and the number of sites averaged (empty otherwise).
    seconds : float
        Wall time of the round (not deterministic; left out of equality checks).
    server_seconds : float
        Time spent in checks, aggregation and the server step (the engine's own cost).
    """

    round: int
    attempts: int = 1
    selected: list[str] = field(default_factory=list)
    replied: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    n_samples: dict[str, int] = field(default_factory=dict)
    train_loss: float | None = None
    fit_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_failed: dict[str, str] = field(default_factory=dict)
    eval_documents: dict[str, dict[str, Any]] = field(default_factory=dict)
    earlier_attempts: list[str] = field(default_factory=list)
    secure: dict[str, Any] = field(default_factory=dict)
    site_dp: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    server_seconds: float = 0.0

    def deterministic(self) -> dict[str, Any]:
        """Return the record without its timings (equal across identical runs).

        Returns
        -------
        dict[str, Any]
            The record as a dict, ``seconds`` and ``server_seconds`` removed.
        """
        out = asdict(self)
        out.pop("seconds")
        out.pop("server_seconds")
        return out

    def disclosed_validation(self, exclude: tuple[str, ...] | list[str] = ()
                             ) -> dict[str, Any]:
        """The validation documents this round's sites disclosed with their evaluation.

        Parameters
        ----------
        exclude : sequence of str, optional
            Sites to leave out (e.g. those already counted in a secure sum).

        Returns
        -------
        dict[str, Any]
            Site -> its disclosed validation document (sites that disclosed none are absent).
        """
        return {site: docs[Doc.VALIDATION] for site, docs in self.eval_documents.items()
                if Doc.VALIDATION in docs and site not in exclude}


@dataclass
class FederatedResult:
    """What :func:`run_federated` returns.

    Parameters
    ----------
    weights : dict[str, numpy.ndarray]
        The final global state dict.
    history : list[RoundRecord]
        One record per completed round (resumed runs include the rounds before the crash).
    optimizer_state : dict[str, numpy.ndarray]
        The server optimiser's final state.
    completed_rounds : int
        The last completed round.
    site_sizes : dict[str, int]
        Training-set sizes the sites declared (``"info"``).
    """

    weights: StateDict
    history: list[RoundRecord]
    optimizer_state: StateDict
    completed_rounds: int
    site_sizes: dict[str, int] = field(default_factory=dict)


class RoundFailed(RuntimeError):
    """A round got fewer than ``min_sites`` valid replies in all its attempts.

    Parameters
    ----------
    round : int
        The round.
    message : str
        What happened, site by site.
    """

    def __init__(self, round: int, message: str) -> None:
        super().__init__(message)
        self.round = round


# --------------------------------------------------------------------------- the site list

#: Why a site that connected after a run's setup is not in that run (``missing_reasons``).
LATE_SITE = "joined after the run's setup: left out of this run"


class FixedSites:
    """A federation whose sites are fixed: those reachable when the run's setup began.

    A site that connects later (its SuperNode started late) had no part in the setup: it
    declared no training size (the cap on its fit replies' sample counts), and its data shaped
    neither the initial model nor the standardisation. It is never asked anything in this run:
    :meth:`sites` leaves it out and :meth:`broadcast` answers a request to it with a
    :class:`~.protocol.SiteFailure`. The server logs it once, and :attr:`late` keeps it for
    the run's ``missing_sites``. A site of the list that leaves and comes back is asked again.

    Parameters
    ----------
    federation : Federation
        How the sites are reached.
    sites : list of str
        The run's sites.
    """

    def __init__(self, federation: Federation, sites: list[str]) -> None:
        self.federation = federation
        self.roster = tuple(sorted(sites))
        #: Site -> why it is not in this run, for every site met outside :attr:`roster`.
        self.late: dict[str, str] = {}

    def _met(self, site: str) -> None:
        if site not in self.late:
            self.late[site] = LATE_SITE
            log.warning("site %s joined after the run's setup: left out of this run (start "
                        "every SuperNode before `mmfl flower run`)", site)

    def sites(self) -> list[str]:
        """Return the run's sites that are reachable now, sorted (newcomers logged once).

        Returns
        -------
        list[str]
            Site names.
        """
        reachable = self.federation.sites()
        for site in reachable:
            if site not in self.roster:
                self._met(site)
        return sorted(s for s in reachable if s in self.roster)

    def broadcast(
        self, requests: Mapping[str, Request], timeout: float | None = None
    ) -> dict[str, Reply | SiteFailure]:
        """Send the requests to the run's sites; a request to another site is not sent.

        Parameters
        ----------
        requests : Mapping[str, Request]
            Site name -> request.
        timeout : float or None
            Seconds to wait for each reply.

        Returns
        -------
        dict[str, Reply | SiteFailure]
            One answer per requested site.
        """
        inside = {s: r for s, r in requests.items() if s in self.roster}
        answers = self.federation.broadcast(inside, timeout) if inside else {}
        for site in sorted(set(requests) - set(inside)):
            self._met(site)
            answers[site] = SiteFailure(site, LATE_SITE)
        return answers


def fixed_sites(federation: Federation) -> FixedSites:
    """``federation`` with its site list fixed now (itself when it is fixed already)."""
    if isinstance(federation, FixedSites):
        return federation
    return FixedSites(federation, federation.sites())


# --------------------------------------------------------------------------- the loop


def select_sites(
    sites: list[str], *, fraction: float, min_sites: int, seed: int, round: int, attempt: int = 0
) -> list[str]:
    """Draw the sites asked to fit in one round, deterministically.

    Parameters
    ----------
    sites : list[str]
        Reachable sites (any order; sorted here).
    fraction : float
        Share of sites to ask.
    min_sites : int
        Never ask fewer than this (if that many are reachable).
    seed, round, attempt : int
        Seed the draw with ``numpy.random.default_rng([seed, round, attempt])``.

    Returns
    -------
    list[str]
        The chosen sites, sorted.
    """
    pool = sorted(sites)
    k = min(len(pool), max(min_sites, math.ceil(fraction * len(pool) - 1e-9)))
    if k >= len(pool):
        return pool
    rng = np.random.default_rng([seed, round, attempt])
    chosen = rng.choice(len(pool), size=k, replace=False)
    return sorted(pool[int(i)] for i in chosen)


def _reason(exc: InvalidReply) -> str:
    return f"InvalidReply: {exc.reason}"


def _check_compatible(
    initial: Mapping[str, np.ndarray], loaded: Mapping[str, np.ndarray], where: Path
) -> None:
    if set(initial) != set(loaded):
        diff = sorted(set(initial) ^ set(loaded))
        raise CheckpointError(
            f"{where}: checkpoint weights have different keys from the model "
            f"(e.g. {diff[:5]}); resume with the same model or use a new directory"
        )
    for key, value in initial.items():
        other = loaded[key]
        if value.shape != other.shape or value.dtype != other.dtype:
            raise CheckpointError(
                f"{where}: {key!r} is {other.dtype}{list(other.shape)} in the checkpoint, "
                f"{value.dtype}{list(value.shape)} in the model"
            )


def _history_from_json(rows: list[dict[str, Any]]) -> list[RoundRecord]:
    return [RoundRecord(**row) for row in rows]


def _without_unused_plan(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its fit config's DP planned steps dropped where no target epsilon uses
    them (checkpoints written before a fixed noise multiplier's runs sent 0 carry them)."""
    fit = config.get("fit_config")
    if isinstance(fit, dict) and not fit.get("dp_target_epsilon"):
        config["fit_config"] = {k: v for k, v in fit.items() if k != "dp_planned_steps"}
    return config


def check_resumable(found: Checkpoint, config: RunConfig, where: str | Path) -> None:
    """Refuse to continue ``found`` with a ``config`` it was not trained with.

    Only :data:`_RESUMABLE_CHANGES` may differ, and ``rounds`` may not fall below the rounds
    already done.

    Parameters
    ----------
    found : Checkpoint
        The checkpoint to continue.
    config : RunConfig
        The loop's settings now.
    where : str or Path
        The checkpoint folder (for the message).

    Raises
    ------
    CheckpointError
        Naming what differs.
    """
    saved = _without_unused_plan(dict(found.meta.get("config", {})))
    config_json = _without_unused_plan(config.to_json())
    changed = sorted(k for k in set(saved) | set(config_json)
                     if k not in _RESUMABLE_CHANGES and saved.get(k) != config_json.get(k))
    if changed:
        dp = (" (a DP run with a target epsilon spreads it over federated.rounds: resume it "
              "with its own rounds, or use privacy.dp.noise_multiplier, whose runs may be "
              "resumed for more)" if "fit_config" in changed
              and "dp_planned_steps" in (saved.get("fit_config") or {}) else "")
        raise CheckpointError(
            f"{where}: the run config differs from the checkpoint's in {changed} "
            f"(checkpoint: {[saved.get(k) for k in changed]}, now: "
            f"{[config_json.get(k) for k in changed]}); only {list(_RESUMABLE_CHANGES)} "
            f"may change on resume{dp}")
    if config.rounds < found.round:
        raise CheckpointError(
            f"{where}: {found.round} rounds are done already; federated.rounds "
            f"{config.rounds} would end before them (resume with at least {found.round})")


def run_federated(
    federation: Federation,
    initial_weights: Mapping[str, np.ndarray],
    config: RunConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    stop_after_round: int | None = None,
    on_round: Callable[[RoundRecord, StateDict], None] | None = None,
) -> FederatedResult:
    """Run federated training: the one server loop every engine uses.

    Per round: draw sites (:func:`select_sites`), send each a ``"fit"`` request with the global
    weights, check every reply (:func:`~.aggregation.check_fit_reply`; a bad one is logged,
    recorded under ``rejected`` and left out), aggregate the valid ones in sorted site order
    (:func:`~.aggregation.aggregate`), apply the server optimiser, evaluate if due, checkpoint,
    call ``on_round``. A site that fails is simply asked again when next drawn. The sites are
    those reachable when the loop starts (:class:`FixedSites`): one that connects later is
    logged once and never asked.

    Parameters
    ----------
    federation : Federation
        How to reach the sites.
    initial_weights : Mapping[str, numpy.ndarray]
        The initial global state dict (every site must reply with these keys, shapes, dtypes).
    config : RunConfig
        Server settings.
    checkpoint_dir : str or Path or None
        Where to checkpoint after every round (None: no checkpoints).
    resume : bool
        Continue from the checkpoint in ``checkpoint_dir`` (from round 1 if it holds none).
    stop_after_round : int or None
        Return after this round is completed and checkpointed (for tests and staged runs).
    on_round : callable or None
        Called as ``on_round(record, weights)`` after each completed round.

    Returns
    -------
    FederatedResult
        Final weights, per-round history, optimiser state.

    Raises
    ------
    RoundFailed
        If a round gets fewer than ``min_sites`` valid replies in ``max_attempts`` tries. The
        checkpoint of the last completed round stays, so the run can be resumed.
    CheckpointError
        If resuming from a checkpoint of another model or another config, or if
        ``checkpoint_dir`` already holds a checkpoint and ``resume`` is False.
    """
    weights: StateDict = {k: np.array(v, copy=True) for k, v in initial_weights.items()}
    opt_state: StateDict = {}
    history: list[RoundRecord] = []
    site_sizes: dict[str, int] = {}
    start = 1
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None

    if ckpt_root is not None:
        found = load_checkpoint(ckpt_root)
        if found is not None and not resume:
            raise CheckpointError(
                f"{ckpt_root} already holds a checkpoint (round {found.round}); pass resume=True "
                "to continue it, or use an empty directory"
            )
        if found is not None:
            _check_compatible(initial_weights, found.weights, ckpt_root)
            check_resumable(found, config, ckpt_root)
            weights = {k: found.weights[k] for k in initial_weights}
            opt_state = found.optimizer_state
            history = _history_from_json(found.meta.get("history", []))
            site_sizes = {k: int(v) for k, v in found.meta.get("site_sizes", {}).items()}
            start = found.round + 1
            log.info("resuming from %s after round %d", ckpt_root, found.round)
        elif resume:
            log.info("no completed round in %s; starting at round 1", ckpt_root)

    federation = fixed_sites(federation)  # a site that connects later is not in this run
    if config.ask_sizes and start == 1:
        site_sizes = _ask_sizes(federation, config)

    last = config.rounds if stop_after_round is None else min(config.rounds, stop_after_round)
    done = _Completion(history, config, site_sizes, ckpt_root, on_round)
    pending: _CarriedEvaluation | None = None  # a fit round whose evaluation rides the next fit
    for rnd in range(start, last + 1):
        try:
            record, weights, opt_state = _fit_round(
                pending or federation, weights, opt_state, config, rnd, site_sizes
            )
        except RoundFailed:  # the previous round is complete all the same: keep it
            if pending is not None:
                done.complete(*pending.finish())
            raise
        if pending is not None:  # its evaluation came with this round's fit replies
            done.complete(*pending.finish())
            pending = None
        due = config.evaluate_every > 0 and (
            rnd % config.evaluate_every == 0 or rnd == config.rounds
        )
        if due and config.carry_evaluation and rnd < last:
            pending = _CarriedEvaluation(federation, record, weights, opt_state, config)
            continue
        if due:
            _evaluate(federation, weights, config, record)
        done.complete(record, weights, opt_state)
    completed = history[-1].round if history else 0
    return FederatedResult(weights, history, opt_state, completed, site_sizes)


class _Completion:
    """What happens when a round is complete: history, checkpoint, log line, ``on_round``."""

    def __init__(self, history: list[RoundRecord], config: RunConfig,
                 site_sizes: Mapping[str, int], ckpt_root: Path | None,
                 on_round: Callable[[RoundRecord, StateDict], None] | None) -> None:
        self.history, self.config, self.site_sizes = history, config, site_sizes
        self.ckpt_root, self.on_round = ckpt_root, on_round

    def complete(self, record: RoundRecord, weights: StateDict, opt_state: StateDict) -> None:
        """Record one completed round (fit and, if due, evaluation)."""
        self.history.append(record)
        if self.ckpt_root is not None:
            meta = {
                "config": self.config.to_json(),
                "history": [asdict(r) for r in self.history],
                "site_sizes": dict(self.site_sizes),
                "rng": {
                    "seed": self.config.seed,
                    "scheme": "site draw: numpy.random.default_rng([seed, round, attempt]); "
                    "sites: messages.site_seed(seed, site, round); no other server randomness",
                },
            }
            save_checkpoint(self.ckpt_root, Checkpoint(record.round, weights, opt_state, meta))
        log.info(
            "round %d: %d/%d sites replied, train loss %s",
            record.round,
            len(record.replied),
            len(record.selected),
            "n/a" if record.train_loss is None else f"{record.train_loss:.4f}",
        )
        if self.on_round is not None:
            self.on_round(record, weights)


def _base_config(config: RunConfig) -> dict[str, ConfigValue]:
    return {"seed": int(config.seed)}


def _ask_sizes(federation: Federation, config: RunConfig) -> dict[str, int]:
    sites = sorted(federation.sites())
    requests = {s: Request(Kind.INFO, 0, {}, _base_config(config)) for s in sites}
    sizes: dict[str, int] = {}
    for site, reply in sorted(federation.broadcast(requests, config.timeout).items()):
        if isinstance(reply, SiteFailure):
            log.info("site %s gave no size (%s); no cap on its sample count", site, reply.reason)
            continue
        n = reply.n_samples
        if reply.site == site and isinstance(n, int) and not isinstance(n, bool) and n > 0:
            sizes[site] = n
        else:
            log.warning("site %s declared an implausible size %r; ignored", site, n)
    return sizes


def _secured(config: RunConfig) -> SecureAggregation | None:
    """The secure aggregation the fit requests carry (with site-level DP: its clipping norm)."""
    if config.secure is None or config.site_dp is None:
        return config.secure
    return replace(config.secure, clip_norm=config.site_dp.clip_norm)


def _needed_sites(config: RunConfig) -> int:
    """The fewest valid fit replies a round needs (three, at least, when secured)."""
    return max(config.min_sites, MIN_SITES) if config.secure is not None else config.min_sites


@dataclass
class _Combined:
    """One round's aggregate and what the record keeps of it."""

    averaged: StateDict
    replied: list[str]
    n_samples: dict[str, int]
    train_loss: float | None = None
    fit_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    secure: dict[str, Any] = field(default_factory=dict)
    site_dp: dict[str, Any] = field(default_factory=dict)


def _fit_round(
    federation: Federation,
    weights: StateDict,
    opt_state: StateDict,
    config: RunConfig,
    rnd: int,
    site_sizes: Mapping[str, int],
) -> tuple[RoundRecord, StateDict, StateDict]:
    t_round = time.perf_counter()
    record = RoundRecord(round=rnd)
    fit_config: dict[str, ConfigValue] = {
        **dict(config.fit_config),
        **_base_config(config),
        "proximal_mu": float(config.proximal_mu),
        "fedbn": bool(config.fedbn),
        **(secure.to_config() if (secure := _secured(config)) is not None else {}),
    }
    needed = _needed_sites(config)
    for attempt in range(config.max_attempts):
        reachable = federation.sites()
        selected = select_sites(reachable, fraction=config.fraction, min_sites=needed,
                                seed=config.seed, round=rnd, attempt=attempt)
        # a secured round with fewer than three sites is not started: no site trains
        enough = config.secure is None or len(selected) >= MIN_SITES
        requests = {s: Request(Kind.FIT, rnd, weights, dict(fit_config))
                    for s in (selected if enough else [])}
        answers = federation.broadcast(requests, config.timeout) if requests else {}
        valid = _checked_fits(answers, weights, config, record, selected, site_sizes)
        record.attempts = attempt + 1
        combined, why = _combine(federation, valid, weights, config, record, needed)
        if combined is not None:
            break
        line = (
            f"attempt {attempt + 1}: {why} ({len(reachable)} reachable), min_sites={needed}; "
            f"failed: {record.failed or 'none'}; rejected: {record.rejected or 'none'}"
        )
        record.earlier_attempts.append(line)
        log.warning("round %d %s", rnd, line)
    else:
        raise RoundFailed(
            rnd,
            f"round {rnd} did not complete: fewer than min_sites={needed} valid replies "
            f"in {config.max_attempts} attempt(s): " + " | ".join(record.earlier_attempts),
        )
    t_server = time.perf_counter()
    new_weights, new_state = server_step(weights, combined.averaged, opt_state, config.optimizer)
    record.server_seconds += time.perf_counter() - t_server
    record.replied, record.n_samples = combined.replied, combined.n_samples
    record.fit_metrics, record.train_loss = combined.fit_metrics, combined.train_loss
    record.secure, record.site_dp = combined.secure, combined.site_dp
    record.seconds = time.perf_counter() - t_round
    return record, new_weights, new_state


def _checked_fits(
    answers: Mapping[str, Reply | SiteFailure], weights: StateDict, config: RunConfig,
    record: RoundRecord, selected: list[str], site_sizes: Mapping[str, int],
) -> list[Reply]:
    """The fit replies that pass their checks, in sorted site order; the others recorded."""
    t_server = time.perf_counter()
    valid: list[Reply] = []
    record.selected, record.failed, record.rejected = selected, {}, {}
    for site in selected if answers else []:
        answer = answers.get(site, SiteFailure(site, "no answer from the federation"))
        if isinstance(answer, SiteFailure):
            record.failed[site] = answer.reason
            log.warning("round %d: site %s failed: %s", record.round, site, answer.reason)
            continue
        try:
            check_fit_reply(answer, site=site, round=record.round, reference=weights,
                            allow_local_keys=config.fedbn, max_samples=site_sizes.get(site),
                            masked=config.secure is not None)
        except InvalidReply as exc:
            record.rejected[site] = _reason(exc)
            log.warning("round %d: %s", record.round, exc)
            continue
        valid.append(answer)
    record.server_seconds += time.perf_counter() - t_server
    return sorted(valid, key=lambda r: r.site)


def _combine(
    federation: Federation, valid: list[Reply], weights: StateDict, config: RunConfig,
    record: RoundRecord, needed: int,
) -> tuple[_Combined | None, str]:
    """The round's aggregate of the valid replies, or why there is none."""
    if config.secure is not None and len(record.selected) < MIN_SITES:
        return None, (f"{len(record.selected)} site(s) to ask: secure aggregation needs at "
                      f"least {MIN_SITES} sites (with two, each would learn the other's update "
                      "from the sum); no fit request was sent")
    if len(valid) < needed:
        return None, f"{len(valid)} valid of {len(record.selected)} asked"
    secure = _secured(config)
    if secure is not None:
        return _secure_combine(federation, valid, weights, secure, config, record, needed)
    t_server = time.perf_counter()
    combined = _Combined(aggregate(valid, weights), [r.site for r in valid],
                         {r.site: int(r.n_samples) for r in valid})
    if config.site_dp is not None:  # clipped updates, noise on their sum, equal weights
        private, combined.site_dp = private_mean(valid, weights, config.site_dp)
        combined.averaged = {**combined.averaged, **private}
    combined.fit_metrics = {r.site: {k: float(v) for k, v in r.metrics.items()} for r in valid}
    with_loss = [r for r in valid if "loss" in r.metrics]
    if with_loss:
        total = sum(r.n_samples for r in with_loss)
        combined.train_loss = float(
            sum(r.n_samples * float(r.metrics["loss"]) for r in with_loss) / total
        )
    record.server_seconds += time.perf_counter() - t_server
    return combined, ""


def _secure_combine(
    federation: Federation, valid: list[Reply], weights: StateDict, settings: SecureAggregation,
    config: RunConfig, record: RoundRecord, needed: int,
) -> tuple[_Combined | None, str]:
    """The FedAvg of the valid sites' updates from their secure sum (the server sees no update).

    With site-level DP (``settings.clip_norm``) the sites clipped their updates before
    masking, and the new weights are the noised mean of the unmasked sum, equal weights
    (:func:`_private_from_sum`). A site that drops after sharing its keys is left out of the
    sum (``record.failed`` says so); the round still completes with at least ``needed`` sites
    in the sum. Each summed site's fit metrics (its DP-SGD epsilon and delta, when it trains
    with DP-SGD: the only metrics a secured fit reply carries) are kept as in a plain round.
    """
    declared = {r.site: int(r.n_samples) for r in valid}
    # with fewer than ``needed`` masked updates the sum stops before unmasking: no total the
    # round would reject is computed, so a retry of the same updates over more sites is the
    # first sum of them (the sites refuse a second sum of one content over another set)
    total = secure_total(federation, sorted(declared), UPDATE_VECTOR, round=record.round,
                         timeout=config.timeout, bits=settings.bits, minimum=needed)
    for site, reason in total.excluded.items():
        record.failed[site] = f"secure sum {reason}"
    if total.refused is not None:
        return None, f"secure sum of the updates: {total.refused}"
    if len(total.sites) < needed:
        return None, f"{len(total.sites)} site(s) in the secure sum of {len(valid)} valid"
    t_server = time.perf_counter()
    local = sorted({k for r in valid for k in r.local_keys})
    expected = sum(declared[s] for s in total.sites)
    try:
        if config.site_dp is not None:
            combined = _private_from_sum(total.parts, weights, settings, config.site_dp,
                                         expected=expected, sites=list(total.sites),
                                         local=local)
        else:
            decoded = decode_update(total.parts, weights, settings, max_count=expected,
                                    local_keys=local)
            combined = _Combined(decoded.averaged, [], {}, train_loss=decoded.train_loss,
                                 secure=update_summary(decoded, settings, [], {}))
        if combined.secure["n_samples"] != expected:
            raise UpdateRejected(f"secure sum: training count {combined.secure['n_samples']}, "
                                 f"the summed sites declared {expected}")
    except UpdateRejected as exc:
        record.rejected["secure sum"] = str(exc)
        return None, str(exc)
    record.server_seconds += time.perf_counter() - t_server
    combined.replied = list(total.sites)
    combined.n_samples = {s: declared[s] for s in total.sites}
    combined.secure.update(sites=list(total.sites), excluded=dict(total.excluded))
    combined.fit_metrics = {r.site: {k: float(v) for k, v in r.metrics.items()}
                            for r in valid if r.site in total.sites and r.metrics}
    return combined, ""


def _private_from_sum(
    parts: Mapping[str, np.ndarray], weights: StateDict, settings: SecureAggregation,
    dp: SiteLevelDP, *, expected: int, sites: list[str], local: list[str],
) -> _Combined:
    """Site-level DP on a secure sum: the sites' clipped updates summed, noise on the sum."""
    clipped = decode_clipped_sum(parts, weights, settings, max_count=expected,
                                 n_sites=len(sites), local_keys=local)
    private, info = noisy_mean(clipped.sums, weights, dp, len(sites))
    return _Combined(private, [], {}, train_loss=clipped.train_loss,
                     secure=update_summary(clipped, settings, [], {}),
                     site_dp={"clipped_count": clipped.clipped, "clipped_at": "site", **info})


def _evaluation_request(weights: StateDict, config: RunConfig, rnd: int) -> Request:
    eval_config = {**dict(config.evaluate_config), **_base_config(config), "fedbn": config.fedbn}
    return Request(Kind.EVALUATE, rnd, weights, dict(eval_config))


def _own_config(request: Request) -> Request:
    """The request with a config of its own (a site writes into it); the weights shared."""
    return replace(request, config=dict(request.config))


def _record_evaluation(record: RoundRecord, site: str, answer: Reply | SiteFailure) -> None:
    """Check one site's evaluate answer and record it (or why it is missing) in ``record``."""
    if isinstance(answer, SiteFailure):
        record.eval_failed[site] = answer.reason
        log.warning("round %d evaluation: site %s failed: %s", record.round, site, answer.reason)
        return
    try:
        check_evaluate_reply(answer, site=site, round=record.round)
    except InvalidReply as exc:
        record.eval_failed[site] = _reason(exc)
        log.warning("round %d evaluation: %s", record.round, exc)
        return
    record.eval_metrics[site] = {k: float(v) for k, v in answer.metrics.items()}
    if answer.documents:
        record.eval_documents[site] = {k: unpack_document(v)
                                       for k, v in sorted(answer.documents.items())}


def _evaluate(
    federation: Federation, weights: StateDict, config: RunConfig, record: RoundRecord
) -> None:
    t0 = time.perf_counter()
    sites = sorted(federation.sites())
    request = _evaluation_request(weights, config, record.round)
    requests = {s: _own_config(request) for s in sites}
    answers = federation.broadcast(requests, config.timeout)
    for site in sites:
        _record_evaluation(record, site,
                           answers.get(site, SiteFailure(site, "no answer from the federation")))
    record.seconds += time.perf_counter() - t0


class _CarriedEvaluation:
    """A federation that carries one round's evaluation with the next round's fit requests.

    :func:`run_federated` hands it to :func:`_fit_round` in place of the federation when
    ``RunConfig.carry_evaluation`` is on. A fit request that sends the evaluated weights
    carries the evaluate request (:func:`~.protocol.carry_evaluation`); a reachable site not
    asked to fit gets the evaluate request itself in the same broadcast; the fit replies go on
    to the fit round without the carried fields. :meth:`finish` asks the sites no broadcast
    evaluated (a fit message that failed took its evaluation with it) and records every answer
    in the evaluated round's record.
    """

    def __init__(self, federation: Federation, record: RoundRecord, weights: StateDict,
                 opt_state: StateDict, config: RunConfig) -> None:
        self.federation, self.record, self.config = federation, record, config
        self.weights, self.opt_state = weights, opt_state
        self.answers: dict[str, Reply | SiteFailure] = {}

    def sites(self) -> list[str]:
        """Return the inner federation's sites."""
        return self.federation.sites()

    def _keep(self, site: str, answer: Reply | SiteFailure) -> None:
        if isinstance(self.answers.get(site), Reply):
            return  # a later attempt of the fit round does not undo an evaluation
        self.answers[site] = answer

    def broadcast(
        self, requests: Mapping[str, Request], timeout: float | None = None
    ) -> dict[str, Reply | SiteFailure]:
        """Broadcast ``requests`` with the evaluation carried (see the class docstring)."""
        fits = [s for s, r in requests.items() if r.kind is Kind.FIT and r.weights is self.weights]
        if not fits:
            return self.federation.broadcast(requests, timeout)
        evaluation = _evaluation_request(self.weights, self.config, self.record.round)
        sent = dict(requests)
        sent.update({s: carry_evaluation(requests[s], evaluation) for s in fits})
        extra = [s for s in sorted(self.federation.sites())
                 if s not in sent and not isinstance(self.answers.get(s), Reply)]
        sent.update({s: _own_config(evaluation) for s in extra})
        answers = self.federation.broadcast(sent, timeout)  # timed as the fit round's
        out: dict[str, Reply | SiteFailure] = {}
        for site, answer in answers.items():
            if site in extra:
                self._keep(site, answer)
            elif site in fits and isinstance(answer, Reply):
                out[site], carried = detach_evaluation(answer, self.record.round)
                self._keep(site, answer=SiteFailure(site, carried) if isinstance(carried, str)
                           else carried or SiteFailure(site, "the fit reply carried no "
                                                       "evaluation"))
            else:  # a failed fit message: finish() asks for the evaluation on its own
                out[site] = answer
        return out

    def finish(self) -> tuple[RoundRecord, StateDict, StateDict]:
        """Evaluate where no broadcast did; record every answer; return the completed round."""
        missing = [s for s in sorted(self.federation.sites()) if s not in self.answers]
        if missing:
            t0 = time.perf_counter()
            evaluation = _evaluation_request(self.weights, self.config, self.record.round)
            answers = self.federation.broadcast({s: _own_config(evaluation) for s in missing},
                                                self.config.timeout)
            for site in missing:
                self.answers[site] = answers.get(site, SiteFailure(site, "no answer from the "
                                                                         "federation"))
            self.record.seconds += time.perf_counter() - t0
        for site in sorted(self.answers):
            _record_evaluation(self.record, site, self.answers[site])
        return self.record, self.weights, self.opt_state

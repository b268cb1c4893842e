"""The federated engine of an experiment: stages around the one server loop.

:func:`run_federated_experiment` runs one federated experiment over any
:class:`~multimodal_fl.federated.server.Federation` (in-process by default; Flower's
ServerApp calls the same function with its own federation):

1. ``pca`` (when ``federated.pca.enabled``): every site summarises its training split's
   frozen embeddings of ``federated.pca.modality``, the server merges the summaries into one
   exact PCA and broadcasts the projection; each site replaces those embeddings by their
   ``n_components`` scores and rebuilds its model (see :mod:`multimodal_fl.pca.stage`). The
   projection is saved as ``pca.safetensors`` (the model's inputs need it) and summarised in
   ``metrics.json`` under ``pca``. It runs first because it changes the model's input width.
2. ``init``: one site (the first in sorted order) sends freshly initialised weights, seeded
   by the experiment seed, so no server ever needs data to build the model.
3. ``moments``: every site sends per-feature counts, sums and sums of squares of its
   training split's tabular features; the server pools them into the standardisation of
   the global model (no one site's statistics are used alone).
4. :func:`~multimodal_fl.federated.server.run_federated`: rounds of fit / evaluate with
   checks, checkpoints and resume.
5. ``recalibrate`` (:mod:`~multimodal_fl.engines.recalibration`): every site scores its
   validation split with the final model and a secure sum of those scores' fine histograms
   (at least three sites) gives the server the pooled counts, on which it fits
   ``evaluation.recalibrate`` (Platt scaling by default); the parameters go with the predict
   request, ``metrics.json`` gets them (never the histogram), ``recalibration.json`` keeps
   them for ``mmfl predict``.
6. ``predict``: every site writes its own ``sites/<site>/predictions.csv`` and returns
   metrics per split under the small-cell rule and its disclosed report document; then a
   secure sum of the sites' fine test histograms (at least three sites) gives the pooled test
   figures, coarsened after the sum (:func:`pooled_test`). The server writes ``metrics.json``
   from those aggregates only, and each site's document to ``disclosed/<site>.json`` (the
   report is built from these).

Only weights, counts, metrics and aggregate summaries reach this module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from multimodal_fl.config import ExperimentConfig, SitePolicy
from multimodal_fl.data.tasks import feature_names
from multimodal_fl.engines.recalibration import (
    RECALIBRATION_FILE,
    predict_config,
    recalibration_stage,
)
from multimodal_fl.engines.tracking import RoundTracker
from multimodal_fl.evaluation.histograms import (
    OVERALL,
    pooled_auc,
    pooled_from_counts,
    refused_pooling,
)
from multimodal_fl.federated.aggregation import ServerOptimizer, standardizer_state
from multimodal_fl.federated.central_dp import SiteLevelDP
from multimodal_fl.federated.checkpoint import CHECKPOINT_JSON, load_checkpoint
from multimodal_fl.federated.gather import StageFailed, gather
from multimodal_fl.federated.inprocess import InProcessFederation
from multimodal_fl.federated.pooling import secure_total
from multimodal_fl.federated.protocol import (
    ConfigValue,
    Doc,
    FitSettings,
    Kind,
    Reply,
    Request,
    StateDict,
)
from multimodal_fl.federated.secure_sum import MIN_SITES
from multimodal_fl.federated.secure_update import SecureAggregation
from multimodal_fl.federated.server import (
    FederatedResult,
    Federation,
    FixedSites,
    RoundRecord,
    RunConfig,
    check_resumable,
    run_federated,
)
from multimodal_fl.federated.site import LOCAL_MODEL, POOLED_TEST, fusion_sites
from multimodal_fl.pca.site import projection_arrays
from multimodal_fl.pca.stage import run_pca_stage
from multimodal_fl.progress import ProgressCallback
from multimodal_fl.rundir import (
    RunDirError,
    RunOutcome,
    RunWriter,
    default_run_dir,
    jsonable,
)
from multimodal_fl.training import torch_threads
from multimodal_fl.training.privacy import (
    EPSILON_COVERS,
    SITE_LEVEL_COVERS,
    SITE_LEVEL_SECURED_COVERS,
    PrivacyLedger,
)

__all__ = [
    "MIN_VALIDATION_SITES",
    "RoundTracker",
    "StageFailed",
    "fit_settings",
    "gather",
    "inprocess_federation",
    "pooled_test",
    "pooled_validation",
    "predict_stage",
    "privacy_summary",
    "round_row",
    "run_config",
    "run_federated_experiment",
    "validation_score",
]

log = logging.getLogger(__name__)


def inprocess_federation(
    cfg: ExperimentConfig, run_dir: Path, *, cohorts: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None, progress: ProgressCallback | None = None,
) -> Federation:
    """Build every site of ``cfg`` in this process (the embedded default engine).

    Parameters
    ----------
    cfg : ExperimentConfig
    run_dir : Path
        The run directory; each site writes its patient-level files under
        ``run_dir/sites/<site>/``.
    cohorts : mapping or None
        Pre-built cohorts (default: read from the site directories).
    data : mapping or None
        Prepared :class:`~multimodal_fl.training.SiteData` per site.
    progress : callable or None
        Called with each :mod:`~multimodal_fl.progress` event: the sites' data preparation,
        then every site's answer to every broadcast.

    Returns
    -------
    Federation
    """
    sites = fusion_sites(cfg, run_dir, cohorts=cohorts, data=data, progress=progress)
    return InProcessFederation(sites, progress=progress)


#: ``federated`` fields :func:`run_config` maps onto the server loop (or the fit request).
LOOP_FIELDS = frozenset({
    "algorithm", "rounds", "local_steps", "fraction", "min_sites", "timeout_s", "mu",
    "server_lr", "beta1", "beta2", "tau", "fedbn", "secure_aggregation", "secure_clip",
})
#: ``federated`` fields the engine handles around the loop.
ENGINE_FIELDS = frozenset({"engine", "pca", "select", "tracker"})
#: ``federated`` fields each site reads from its own copy of the config (as it reads
#: ``training``): they govern what it keeps between requests, which no request carries.
SITE_FIELDS = frozenset({"keep_optimizer_state"})


def fit_settings(cfg: ExperimentConfig, *, local_steps: int | None = None) -> FitSettings:
    """The fit request's training settings from the typed config (DP-SGD's included).

    Parameters
    ----------
    cfg : ExperimentConfig
    local_steps : int or None
        Steps per fit (default ``federated.local_steps``).

    Returns
    -------
    FitSettings
        With ``privacy.dp``: its clipping norm, noise multiplier or target epsilon (spread
        over ``federated.rounds`` x ``federated.local_steps`` steps), delta and accountant.
    """
    fed = cfg.federated
    steps = fed.local_steps if local_steps is None else int(local_steps)
    dp = cfg.privacy.dp
    if dp is None:
        return FitSettings(seed=cfg.seed, local_steps=steps, lr=cfg.training.lr)
    return FitSettings(
        seed=cfg.seed, local_steps=steps, lr=cfg.training.lr,
        dp_max_grad_norm=dp.max_grad_norm, dp_noise_multiplier=dp.noise_multiplier or 0.0,
        dp_target_epsilon=dp.target_epsilon or 0.0,
        # planned steps matter only to a target epsilon (a fixed noise multiplier spends as it
        # goes), so a run with a fixed multiplier may be resumed for more rounds
        dp_planned_steps=fed.rounds * fed.local_steps if dp.target_epsilon else 0,
        dp_delta=dp.delta,
        dp_accountant=dp.accountant)


def run_config(cfg: ExperimentConfig) -> RunConfig:
    """The server loop's settings from the typed experiment config.

    The per-round training hyperparameters (:class:`~multimodal_fl.federated.protocol.
    FitSettings`: ``local_steps``, ``lr``, FedProx ``mu``, FedBN, the seed) reach the sites on
    one channel, the fit request; the server loop itself knows no config schema.

    Parameters
    ----------
    cfg : ExperimentConfig

    Returns
    -------
    RunConfig
    """
    fed = cfg.federated
    fit_config: dict[str, ConfigValue] = {
        k: v for k, v in fit_settings(cfg).to_config().items()
        if k in ("local_steps", "lr") or k.startswith("dp_")
    }
    site_level = cfg.privacy.site_level
    return RunConfig(
        site_dp=None if site_level is None else SiteLevelDP(site_level.clip_norm,
                                                            site_level.noise_multiplier),
        rounds=fed.rounds,
        optimizer=ServerOptimizer(fed.algorithm, eta=fed.server_lr, beta1=fed.beta1,
                                  beta2=fed.beta2, tau=fed.tau),
        proximal_mu=fed.mu if fed.algorithm == "fedprox" else 0.0,
        fedbn=fed.fedbn,
        min_sites=fed.min_sites,
        fraction=fed.fraction,
        timeout=fed.timeout_s,
        seed=cfg.seed,
        fit_config=fit_config,
        secure=SecureAggregation(clip=fed.secure_clip) if fed.secure_aggregation else None,
    )


def privacy_summary(cfg: ExperimentConfig, history: list[RoundRecord]) -> dict[str, Any] | None:
    """What ``metrics.json`` says of the run's differential privacy (None: none configured).

    Parameters
    ----------
    cfg : ExperimentConfig
    history : list of RoundRecord
        The completed rounds.

    Returns
    -------
    dict or None
        ``dp``: the settings, each site's epsilon and delta as its last fit reply disclosed them
        (``sites``), the round of that reply, and what epsilon covers (``covers``);
        ``site_level``: the settings, the rounds composed and the site-level epsilon (Opacus'
        RDP accountant, sampling rate 1), where the updates were clipped (``clipped_at``:
        ``"site"`` with secure aggregation, else ``"server"``) and what it covers.
    """
    p = cfg.privacy
    if p.dp is None and p.site_level is None:
        return None
    out: dict[str, Any] = {}
    if p.dp is not None:
        sites: dict[str, dict[str, Any]] = {}
        for record in history:
            for site, m in sorted(record.fit_metrics.items()):
                if "epsilon" in m:
                    sites[site] = {"epsilon": m["epsilon"], "delta": m.get("delta"),
                                   "round": record.round}
        out["dp"] = {**p.dp.model_dump(), "sites": sites, "covers": EPSILON_COVERS}
    if p.site_level is not None:
        rounds = len(history)
        ledger = PrivacyLedger("rdp", [(p.site_level.noise_multiplier, 1.0, rounds)])
        secured = cfg.federated.secure_aggregation
        out["site_level"] = {**p.site_level.model_dump(), "rounds": rounds,
                             "epsilon": ledger.epsilon(p.site_level.delta) if rounds else 0.0,
                             "clipped_at": "site" if secured else "server",
                             "covers": SITE_LEVEL_SECURED_COVERS if secured
                             else SITE_LEVEL_COVERS}
    return out


def _standardise(
    federation: Federation, weights: StateDict, targets: Mapping[str, str], sites: list[str],
    cfg: ExperimentConfig,
) -> dict[str, Any]:
    """Fill the model's standardiser from pooled moments (no-op when it has none)."""
    if not targets:
        return {}
    replies = gather(
        federation, {s: Request(Kind.MOMENTS, 0) for s in sites}, cfg.federated.timeout_s,
        stage=Kind.MOMENTS, minimum=cfg.federated.min_sites,
    )
    for site, reply in replies.items():
        if reply.document(Doc.STANDARDIZER) != dict(targets):
            raise StageFailed(f"stage 'moments': site {site} names standardiser keys "
                              f"{reply.document(Doc.STANDARDIZER)}, the model has {dict(targets)}")
    moments = [(r.arrays["n"], r.arrays["sum"], r.arrays["sumsq"]) for r in replies.values()]
    for key, value in standardizer_state(moments, targets).items():
        weights[key] = value.astype(weights[key].dtype)
    out: dict[str, Any] = {"sites": sorted(replies),
                           "n_rows": {s: r.n_samples for s, r in replies.items()}}
    unseen = features_without_value(cfg, replies)
    for name, where in unseen.items():
        log.warning("task '%s': feature '%s' has no value at site(s) %s (none, fewer than "
                    "the site's min_cell patients, or a 0/1 feature with fewer than min_cell "
                    "patients of a value): its codes may match nothing there",
                    cfg.task.name, name, ", ".join(repr(s) for s in where))
    if unseen:
        out["features_without_value"] = unseen
    return out


def features_without_value(cfg: ExperimentConfig, replies: Mapping[str, Reply]
                           ) -> dict[str, list[str]]:
    """The task's features that a site's moments reply shows without a value, and those sites.

    Read from what the sites sent, through their disclosure gates, and nothing more: an
    observation feature of count 0 (none, or fewer than the site's ``min_cell`` patients,
    which the gate sends as unseen), a comorbidity or medication of sum 0 (recorded for no
    patient).

    Parameters
    ----------
    cfg
        The experiment (its task names the features, in the moments' column order).
    replies
        The sites' ``moments`` replies.

    Returns
    -------
    dict
        Feature name -> the sites without a value, sorted; only features with such a site.
    """
    columns = feature_names(cfg.task)
    feats = cfg.task.features
    flags = {c.name for c in (*feats.conditions, *feats.medications)}
    checked = [o.name for o in feats.observations] + [n for n in columns if n in flags]
    out: dict[str, list[str]] = {}
    for site, reply in sorted(replies.items()):
        n, total = np.asarray(reply.arrays["n"]), np.asarray(reply.arrays["sum"])
        if n.shape != (len(columns),):
            continue  # not the task's columns (a model without them): nothing to say
        for name in checked:
            j = columns.index(name)
            if n[j] == 0 or (name in flags and total[j] == 0):
                out.setdefault(name, []).append(site)
    return out


#: Sites whose disclosed validation a round's pooled validation AUC needs (fewer in a smaller
#: federation: every site that evaluated).
MIN_VALIDATION_SITES = 3


def validation_score(record: RoundRecord) -> float | None:
    """A round's pooled validation AUC: the sites' disclosed histograms added, one AUC.

    Each site's evaluation reply carries its validation scores' histograms per label (bins of
    0 or at least ``min_cell`` patients, :attr:`~multimodal_fl.federated.protocol.Doc.
    VALIDATION`); a site whose validation was suppressed sends none and is left out. ``None``
    when the histograms come from fewer sites than :data:`MIN_VALIDATION_SITES` (or, in a
    smaller federation, from fewer than every site that evaluated), or the pool has one class
    only. Only what the sites disclosed is used: no site's own AUC, no site's validation size.

    A round chosen on one site's validation is chosen for that site: on the sample COVID-19
    cohort under ``min_cell`` 10 only ``site_b`` disclosed its validation scores, its best
    round (10 of 15) gave a pooled test AUC of 0.573 against 0.688 for the last round
    (``mmfl train configs/covid_oxygen.yaml`` with ``federated.select`` ``best_val`` and
    ``last``), so a round is chosen only on validation pooled over several sites.

    Parameters
    ----------
    record : RoundRecord

    Returns
    -------
    float or None
    """
    return pooled_validation(record)[0]


def pooled_validation(record: RoundRecord) -> tuple[float | None, str]:
    """:func:`validation_score` and what it is pooled from (or why there is none).

    Parameters
    ----------
    record : RoundRecord

    Returns
    -------
    auc : float or None
    why : str
    """
    docs = record.disclosed_validation()
    if not docs:
        return None, ("no site disclosed its validation scores (each had fewer than "
                      "min_cell patients, or positives or negatives)")
    evaluated = set(record.eval_metrics) | set(record.eval_documents)
    needed = min(MIN_VALIDATION_SITES, len(evaluated))
    if len(docs) < needed:
        return None, (f"only {len(docs)} site(s) ({', '.join(sorted(docs))}) disclosed their "
                      f"validation scores, fewer than {needed}: a round chosen on them would "
                      "be chosen for them (the others had fewer than min_cell patients, or "
                      "positives or negatives)")
    return pooled_auc(docs)


class _BestRound:
    """Server-side model selection: keeps the global weights of the best-validated round.

    The weights go to ``best.safetensors`` beside the checkpoints (atomically), so a resumed
    run selects the same round as an uninterrupted one. Ties keep the earlier round.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "best.safetensors"
        self.round: int | None = None
        self.score = -np.inf
        if self.path.exists():
            with safe_open(str(self.path), framework="numpy") as f:
                meta = f.metadata() or {}
            saved = json.loads(meta["mmfl"])
            self.round = int(saved["round"])
            self.score = float(saved["score"])

    def offer(self, record: RoundRecord, weights: StateDict) -> None:
        score = validation_score(record)
        if score is None or score <= self.score:
            return
        self.round, self.score = record.round, score
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        save_file({k: np.asarray(v, order="C") for k, v in sorted(weights.items())}, str(tmp),
                  metadata={"mmfl": json.dumps({"round": record.round, "score": score})})
        os.replace(tmp, self.path)

    def catch_up(self) -> None:
        """Offer the last checkpointed round if a kill came between its checkpoint and us."""
        ckpt = load_checkpoint(self.folder)
        if ckpt is None or (self.round is not None and self.round >= ckpt.round):
            return
        rows = ckpt.meta.get("history", [])
        last = [RoundRecord(**row) for row in rows if row.get("round") == ckpt.round]
        if last:
            self.offer(last[0], ckpt.weights)

    def weights(self) -> StateDict:
        return dict(load_file(str(self.path)))


def round_row(record: RoundRecord, sites: list[str]) -> list[str]:
    """One line of the per-round table: round, replied, train loss, validation AUC per site
    (``-`` where the site disclosed none) and pooled (:func:`validation_score`).

    Parameters
    ----------
    record : RoundRecord
    sites : list of str

    Returns
    -------
    list of str
    """
    loss = "-" if record.train_loss is None else f"{record.train_loss:.4f}"
    cells = [str(record.round), f"{len(record.replied)}/{len(record.selected)}", loss]
    for site in sites:
        auc = record.eval_metrics.get(site, {}).get("val_auc")
        cells.append("-" if auc is None else f"{auc:.3f}")
    pooled = validation_score(record)
    cells.append("-" if pooled is None else f"{pooled:.3f}")
    return cells


def run_federated_experiment(
    cfg: ExperimentConfig,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    federation: Federation | None = None,
    engine: str = "inprocess",
    resume: bool = False,
    stop_after_round: int | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    cohorts: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    carry_evaluation: bool = False,
) -> RunOutcome:
    """Train ``cfg`` federated and write the run directory.

    Parameters
    ----------
    cfg : ExperimentConfig
    out_dir : path-like or None
        Run directory (default ``runs/<config-name>-<timestamp>``).
    federation : Federation or None
        How sites are reached (default: :func:`inprocess_federation`).
    engine : str
        Name recorded in ``metrics.json`` (``inprocess`` or ``flower``).
    resume : bool
        Continue from the checkpoint in ``RUN_DIR/checkpoint``.
    stop_after_round : int or None
        Stop after this round (checkpointed), without the final predict stage.
    on_round : callable or None
        Called with each completed round's record (the CLI prints the table row).
    cohorts, data : mapping or None
        Pre-built cohorts or prepared site data for the in-process federation.
    progress : callable or None
        Called with the in-process federation's :mod:`~multimodal_fl.progress` events (data
        preparation, each site's answer); unused with a given ``federation``.
    carry_evaluation : bool
        One message exchange per round (``RunConfig.carry_evaluation``: a round's evaluation
        rides with the next fit), for a transport whose messages are dear (Flower). The same
        records and weights.

    Returns
    -------
    multimodal_fl.rundir.RunOutcome
        The run directory and the metrics document.
    """
    for line in cfg.advisories():
        log.warning("config: %s", line)
    # The same torch thread count in every engine: results then agree bit for bit.
    with torch_threads(cfg.training.num_threads):
        return _run_experiment(
            cfg, out_dir, federation=federation, engine=engine, resume=resume,
            stop_after_round=stop_after_round, on_round=on_round, cohorts=cohorts, data=data,
            progress=progress, carry_evaluation=carry_evaluation,
        )


def _setup_stages(
    federation: Federation, cfg: ExperimentConfig, sites: list[str], run_dir: Path
) -> tuple[StateDict, dict[str, Any], dict[str, Any] | None]:
    """The stages before the rounds: ``pca`` (optional), ``init``, ``moments``.

    Returns the initial global weights, the standardisation summary and the PCA document.
    """
    fed = cfg.federated
    pca_doc: dict[str, Any] | None = None
    if fed.pca.enabled:
        pca, pca_doc = run_pca_stage(federation, cfg, sites)
        save_file(projection_arrays(pca), str(run_dir / "pca.safetensors"),
                  metadata={"modality": pca_doc["modality"]})
    init = _initial_model(federation, sites, fed.timeout_s)
    weights = dict(init.weights)
    standardisation = _standardise(federation, weights, init.document(Doc.STANDARDIZER), sites,
                                   cfg)
    return weights, standardisation, pca_doc


def _initial_model(federation: Federation, sites: list[str], timeout: float | None) -> Reply:
    """The ``init`` reply of the first site, in sorted order, that gives one.

    A site may decline (fewer than ``min_cell`` training patients) or fail; the next one is
    asked. The weights do not depend on which site answers (seeded by the experiment seed).

    Raises
    ------
    StageFailed
        When no site gives one; the message names every site's reason.
    """
    reasons: list[str] = []
    for site in sites:
        try:
            return gather(federation, {site: Request(Kind.INIT, 0)}, timeout,
                          stage=Kind.INIT, minimum=1)[site]
        except StageFailed as exc:
            reasons.append(str(exc))
            log.warning("init: %s; asking the next site", exc)
    raise StageFailed("stage 'init': no site sent initial weights: " + " | ".join(reasons))


def _train_rounds(
    federation: Federation, cfg: ExperimentConfig, weights: StateDict, run_dir: Path, *,
    resume: bool, stop_after_round: int | None,
    on_round: Callable[[RoundRecord], None] | None, carry_evaluation: bool = False,
) -> tuple[FederatedResult, int, StateDict, dict[str, Any]]:
    """The server loop with model selection and tracking.

    Returns the loop's result, the chosen round, its weights (``federated.select``) and what
    the choice rests on (``metrics.json``'s ``selection_detail``).
    """
    best = _BestRound(run_dir / "checkpoint")
    if resume:
        best.catch_up()
    tracker = RoundTracker(cfg.federated.tracker, run_dir)

    def _on_round(record: RoundRecord, round_weights: StateDict) -> None:
        best.offer(record, round_weights)
        tracker.log(record)
        if on_round is not None:
            on_round(record)

    try:
        result: FederatedResult = run_federated(
            federation, weights,
            dataclasses.replace(run_config(cfg), carry_evaluation=carry_evaluation),
            checkpoint_dir=run_dir / "checkpoint",
            resume=resume, stop_after_round=stop_after_round, on_round=_on_round,
        )
    finally:
        tracker.close()
    last = result.completed_rounds
    if cfg.federated.select != "best_val":
        return result, last, result.weights, {"rule": "the last round (federated.select: last)"}
    if best.round is not None:
        return result, best.round, best.weights(), {
            "rule": "the round with the best pooled validation AUC (the sites' disclosed "
                    "validation histograms added)", "pooled_val_auc": best.score}
    why = (pooled_validation(result.history[-1])[1] if result.history
           else "no round completed")
    note = f"no round had a pooled validation AUC ({why}): the last round, {last}, is kept"
    log.info("model selection: %s", note)
    return result, last, result.weights, {"rule": "the last round", "note": note}


def _save_model(weights: StateDict, path: Path, engine: str, chosen_round: int) -> None:
    """Write the chosen global weights (deterministic bytes: one metadata key)."""
    save_file({k: np.asarray(v, order="C") for k, v in sorted(weights.items())}, str(path),
              # one key: safetensors writes metadata in hash-map order, so several keys
              # would make the file bytes differ between identical runs
              metadata={"mmfl": json.dumps({"engine": engine, "round": chosen_round},
                                           sort_keys=True)})


def predict_stage(
    federation: Federation, cfg: ExperimentConfig, sites: list[str], weights: StateDict | None,
    round: int, engine: str, recalibration: Mapping[str, ConfigValue] | None = None,
    left_out: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Every site scores its patients at home; the server keeps the disclosed documents and
    the pooled test figures of a secure sum of the sites' histograms (:func:`pooled_test`).

    Parameters
    ----------
    federation : Federation
    cfg : ExperimentConfig
    sites : list of str
    weights : dict or None
        The model to score; ``None``: each site scores its own local-only model, kept at home
        (the local engine).
    round : int
    engine : str
        Recorded by the sites with their predictions.
    recalibration : mapping or None
        The request's recalibration settings
        (:func:`~multimodal_fl.engines.recalibration.predict_config`): the server's fit, or
        the method each site fits at home for its local-only model, or the reason for none.
    left_out : mapping or None
        Sites not in ``sites`` that the run met and left out, with the reason (a site that
        joined after the setup: :attr:`~multimodal_fl.federated.server.FixedSites.late`).

    Returns
    -------
    dict
        ``sites`` (each site's metrics document), ``pooled_from_histograms``,
        ``missing_sites`` (every site of ``sites`` with no predict reply, and every site of
        ``left_out``), ``missing_reasons`` (why, site by site) and ``disclosed`` (each site's
        report document, for ``disclosed/<site>.json``).
    """
    failed: dict[str, str] = {}
    own = {"model": LOCAL_MODEL} if weights is None else {}
    final = gather(
        federation,
        {s: Request(Kind.PREDICT, round, weights={} if weights is None else weights,
                    config={"engine": engine, "fedbn": cfg.federated.fedbn,
                            "pooled": len(sites) >= MIN_SITES, **own,
                            **(recalibration or {})})
         for s in sites},
        cfg.federated.timeout_s, stage=Kind.PREDICT, minimum=1, failed=failed,
    )
    missing = {s: f"no predictions: {failed.get(s, 'no reply')}" for s in sites
               if s not in final}
    missing.update({s: why for s, why in (left_out or {}).items() if s not in final})
    docs = {site: r.document(Doc.SITE_METRICS) for site, r in final.items()}
    return {
        "sites": docs,
        "pooled_from_histograms": pooled_test(federation, cfg, docs, round),
        "missing_sites": sorted(missing),
        "missing_reasons": dict(sorted(missing.items())),
        "disclosed": {site: r.document(Doc.DISCLOSED) for site, r in final.items()},
    }


def pooled_test(federation: Federation, cfg: ExperimentConfig, docs: Mapping[str, Any],
                round: int) -> dict[str, Any]:
    """The pooled test figures: a secure sum of the sites' test histograms, coarsened after it.

    Each site that answered ``predict`` holds its fine test histograms
    (:data:`~multimodal_fl.federated.site.POOLED_TEST`); the server learns only their total
    (:func:`~multimodal_fl.federated.pooling.secure_total`, at least three sites) and shows
    what :func:`~multimodal_fl.evaluation.histograms.pooled_from_counts` lets it show.

    Parameters
    ----------
    federation : Federation
    cfg : ExperimentConfig
    docs : mapping of site to its ``site_metrics`` document
        The sites that answered ``predict``.
    round : int

    Returns
    -------
    dict
        :class:`~multimodal_fl.evaluation.histograms.PooledEvaluation` as JSON; its
        ``overall.reason`` says why there are no figures (e.g. ``"refused: a secure sum needs
        at least 3 sites, 2 asked"``).
    """
    ev = cfg.evaluation
    total = secure_total(federation, sorted(docs), POOLED_TEST, round=round,
                         timeout=cfg.federated.timeout_s)
    rows = [_site_row(site, docs[site]) for site in sorted(docs)]
    min_cell = max(total.min_cell, SitePolicy().effective_min_cell(ev.min_cell))
    if total.refused is not None or OVERALL not in total.parts:
        reason = total.refused or f"no site sent its {OVERALL!r} histogram"
        return refused_pooling(reason, excluded=total.excluded, sites=rows,
                               min_cell=min_cell).to_dict()
    return pooled_from_counts(
        total.parts, min_cell=min_cell, contributors=total.contributors,
        excluded=total.excluded, left_out=total.left_out, sites=rows, n_boot=ev.n_boot,
        seed=cfg.seed,
    ).to_dict()


def _site_row(site: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    """One site's test figures as it disclosed them (``metrics.json``'s pooled section)."""
    test = (doc.get("metrics") or {}).get("test") or {}
    auc = test.get("auc") or {}
    return {"site": site, "n": auc.get("n"), "reason": auc.get("reason"), "metrics": test}


def _refuse_a_run_there(run_dir: Path) -> None:
    """A new run's directory must not hold another run's rounds or results: refused before any
    site is asked anything or any file is written (a deployed ServerApp, whose directory the
    CLI cannot check from another machine, used to fail only after the first stages)."""
    found = [name for name in (f"checkpoint/{CHECKPOINT_JSON}", "metrics.json",
                               "model.safetensors") if (run_dir / name).is_file()]
    if found:
        raise RunDirError(f"{run_dir}: another run is already there ({', '.join(found)}); give "
                          "a new or empty run directory")


def _run_experiment(
    cfg: ExperimentConfig,
    out_dir: str | os.PathLike[str] | None,
    *,
    federation: Federation | None,
    engine: str,
    resume: bool,
    stop_after_round: int | None,
    on_round: Callable[[RoundRecord], None] | None,
    cohorts: Mapping[str, Any] | None,
    data: Mapping[str, Any] | None,
    progress: ProgressCallback | None,
    carry_evaluation: bool = False,
) -> RunOutcome:
    t0 = time.perf_counter()
    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(cfg)
    if not resume:
        _refuse_a_run_there(run_dir)
    else:  # before config.yaml is rewritten: a refused resume must leave the run as it was
        found = load_checkpoint(run_dir / "checkpoint")
        if found is not None:
            check_resumable(found, dataclasses.replace(run_config(cfg),
                                                       carry_evaluation=carry_evaluation),
                            run_dir / "checkpoint")
    writer = RunWriter(run_dir, cfg, engine)
    writer.write_config()
    if federation is None:
        federation = inprocess_federation(cfg, run_dir, cohorts=cohorts, data=data,
                                          progress=progress)
    t_prep = time.perf_counter() - t0
    sites = sorted(federation.sites())
    if not sites:
        raise StageFailed("no sites in the federation")
    # the run's sites are fixed now: one that connects later is never asked (logged once)
    fixed = FixedSites(federation, sites)
    federation = fixed
    weights, standardisation, pca_doc = _setup_stages(federation, cfg, sites, run_dir)
    result, chosen_round, final_weights, selection = _train_rounds(
        federation, cfg, weights, run_dir, resume=resume, stop_after_round=stop_after_round,
        on_round=on_round, carry_evaluation=carry_evaluation,
    )
    t_train = time.perf_counter() - t0 - t_prep
    _save_model(final_weights, run_dir / "model.safetensors", engine, chosen_round)
    doc: dict[str, Any] = {
        "seed": cfg.seed,
        "rounds": [asdict(r) for r in result.history],
        "completed_rounds": result.completed_rounds,
        "selected_round": chosen_round,
        "selection": cfg.federated.select,
        "selection_detail": selection,
        "standardisation": standardisation,
    }
    if pca_doc is not None:
        doc["pca"] = pca_doc
    privacy = privacy_summary(cfg, result.history)
    if privacy is not None:
        doc["privacy"] = privacy
    if result.completed_rounds < cfg.federated.rounds:
        doc["stopped_after_round"] = result.completed_rounds
    else:
        chosen = [r for r in result.history if r.round == chosen_round]
        fitted, doc["recalibration"] = recalibration_stage(
            federation, cfg, sites, final_weights, result.completed_rounds,
            record=chosen[-1] if chosen else None)
        if fitted is not None:  # mmfl predict applies it
            (run_dir / RECALIBRATION_FILE).write_text(json.dumps(fitted.to_dict(), indent=2))
        federation.sites()  # meets any site that connected since the last round
        stage = predict_stage(federation, cfg, sites, final_weights, result.completed_rounds,
                              engine, predict_config(cfg, fitted, doc["recalibration"]),
                              left_out=fixed.late)
        for site, disclosed in stage.pop("disclosed").items():  # the report's documents
            writer.write_disclosed(site, disclosed)
        doc.update(stage)
        doc["timing_s"] = {"prepare": t_prep, "train": t_train,
                           "total": time.perf_counter() - t0}
    writer.write_metrics(doc)
    return RunOutcome(run_dir, jsonable({"engine": engine, **doc}))

"""The site side of a federation: the one adapter between training and messages.

A :class:`FusionSite` owns one hospital's prepared data (:class:`~multimodal_fl.training.
SiteData`) and a fusion model, and answers the server's requests
(:class:`~multimodal_fl.federated.protocol.Request`) with replies that carry only weights,
counts, metrics and aggregate summaries. Patient-level rows (splits, predictions) are
written into the site's own output folder, never into a reply.

Request kinds it answers:

``init``
    A freshly initialised model's weights (seeded by the experiment seed; no data in them
    beyond input widths). The server asks one site, so no engine builds a model on its own.
``info``
    ``n_samples`` = training patients (the server's plausibility cap).
``moments``
    Per-feature observed count, sum and sum of squares of the training split's tabular
    features (federated standardisation), and the state-dict keys of the model's
    standardiser they fill (the ``standardizer`` document).
``pca``
    A :func:`~multimodal_fl.federated.pca.site_pca_reply` of one modality's rows
    (``config``: ``modality``, ``site_rank`` (0: exact), ``svd_solver`` (default ``auto``),
    ``split`` (default ``train``); for ``tabular`` the request's ``arrays`` carry the pooled
    standardisation), see :func:`multimodal_fl.pca.site.site_matrix`. Always from the data
    as loaded.
``pca_apply``
    Replace the modality's embeddings by their projection (request arrays ``mean``,
    ``components``, ``scale``) and rebuild the model (its input width is now ``k``): the
    federated PCA stage, before ``init``.
``pca_scores``
    Aggregates of the projected rows (mean, covariance; quantiles and coarsened histograms
    under the small-cell rule), see :func:`multimodal_fl.pca.site.score_summary`.
``fit``
    Load the global weights, run the request's ``local_steps`` optimisation steps at its ``lr``
    (:class:`~multimodal_fl.federated.protocol.FitSettings`: the site's config copy only
    shapes the model) with a fresh AdamW
    (optimiser state is reset every round by design), and return the new weights with a
    sample count per parameter group (a site without notes does not train the text
    encoder and says so with a count of 0). A fit request that carries an evaluation
    (Flower: one message per round) evaluates the weights it received first, as an
    ``evaluate`` request would, then trains (the gate's ``release_carried``). With the
    request's DP-SGD settings the site trains with DP-SGD, counts the steps in its privacy
    accountant (``sites/<site>/privacy.json``) and adds its ``epsilon`` and ``delta`` to the
    reply's metrics; a policy with a privacy budget (``max_epsilon``) refuses a fit that would
    exceed it, and any fit without DP-SGD. In a secured round (``secure_aggregation`` in the
    request) the update, after the fit rule, stays at the site as the parts of
    :data:`~multimodal_fl.federated.secure_update.UPDATE_VECTOR`
    (:func:`~multimodal_fl.federated.secure_update.hold_update`) and the reply carries only
    ``n_samples``; the ``secure_sum`` steps that follow sum it.
``evaluate``
    Validation metrics of the global weights and the validation scores' counts per label on
    the fine histogram grid; the gate turns the counts into the merged, counts-only
    ``validation`` document, or sends nothing below ``min_cell``.
``predict``
    Final evaluation: write ``splits.json`` and ``predictions.csv`` into the site folder and
    return metrics per split under the small-cell rule (a split of fewer than ``min_cell``
    patients shows no figure; see :func:`~multimodal_fl.training.metrics_by_split`) and the
    site's disclosed report document (``disclosed``, :func:`~multimodal_fl.evaluation.
    disclosed.site_disclosure` at the gate's ``min_cell``; the request's ``threshold``, when it
    carries one, else ``evaluation.threshold``), from which the report is built. With
    ``config["model"] == "local"`` (the local-only job) the site scores its own local-only
    model, kept at home, instead of request weights.
    The test split's fine score histograms (overall, and per subgroup when the site policy
    allows subgroup summaries) are held for the secure sum that follows, never sent in the
    clear.
``secure_sum``
    One step of a secure sum of a vector the site holds (:data:`POOLED_TEST` after
    ``predict``, its update after a secured ``fit``), answered by its
    :class:`~multimodal_fl.federated.secure_sum.SecureSumParty`;
    a site with fewer than ``min_cell`` test patients does not take part and says so.
``local_train``
    The local-only job: train the site's own model to completion
    (:func:`~multimodal_fl.training.train_local_model`: the experiment's training settings,
    early stopping on the site's validation split), keep it at home
    (``sites/<site>/model.safetensors``), and reply with its weights only where the policy's
    ``share_local_model`` allows. A site with fewer than ``min_cell`` training patients trains
    no model and says so.
``cross_evaluate``
    Score a local-only model (another site's, from the request's weights; or its own, from
    home) on this site's test split: the cross-site matrix cell of
    :func:`~multimodal_fl.evaluation.disclosed.released_metric` under the effective
    ``min_cell``, the rule of the site's own disclosed cells (a suppressed cell carries no
    value and says why).

Every reply passes the site's :class:`~multimodal_fl.federated.disclosure.DisclosureGate`;
handlers compute with the effective threshold the gate writes into
``request.config["min_cell"]``, and a site with fewer than that many training patients
declines ``init``, ``info``, ``moments`` and ``fit`` (``SiteRefused``) without training.

Randomness: every training generator is seeded from ``site_seed(seed, site, round)``; every
bootstrap interval from :func:`~multimodal_fl.evaluation.metrics.bootstrap_seed` (the seed
and the scores resampled).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from torch import nn

from multimodal_fl.config import ExperimentConfig, SitePolicy, load_policy
from multimodal_fl.data.tasks import declared_levels
from multimodal_fl.encoders.tabular import Standardizer
from multimodal_fl.evaluation.disclosed import (
    RANK_METRICS,
    coarse_rank,
    recalibration_summary,
    released_metric,
    site_disclosure,
    split_suppression,
)
from multimodal_fl.evaluation.histograms import (
    OVERALL,
    fine_counts,
    histogram_parts,
    label_counts,
    level_census,
)
from multimodal_fl.evaluation.metrics import MetricValue, binary_metrics
from multimodal_fl.evaluation.recalibration import (
    CONFIG_KEYS,
    Recalibration,
    RecalibrationError,
    fit_on_scores,
    recalibrated_frame,
)
from multimodal_fl.federated.aggregation import STANDARDIZER_STATE
from multimodal_fl.federated.disclosure import (
    EGRESS_LOG,
    VALIDATION_COUNTS,
    DisclosureGate,
    pca_rank_cap,
)
from multimodal_fl.federated.pca import site_pca_reply
from multimodal_fl.federated.protocol import (
    Doc,
    FitSettings,
    Kind,
    Reply,
    Request,
    SiteRefused,
    pack_document,
    site_seed,
    split_carried,
)
from multimodal_fl.federated.proximal import proximal_term
from multimodal_fl.federated.secure_sum import SecureSumError, SecureSumParty
from multimodal_fl.federated.secure_update import SecureAggregation, UpdateRejected, hold_update
from multimodal_fl.federated.site_state import SiteState
from multimodal_fl.fusion import FusionModel
from multimodal_fl.moments import column_moments
from multimodal_fl.pca.site import (
    PROJECTION_KEYS,
    STANDARDIZE_MEAN,
    STANDARDIZE_SCALE,
    project,
    project_site_data,
    score_summary,
    site_matrix,
    withheld_pca_columns,
)
from multimodal_fl.progress import ProgressCallback
from multimodal_fl.rundir import RunWriter, jsonable, site_summary
from multimodal_fl.training import (
    EVAL_METRICS,
    SiteData,
    TrainResult,
    batch_augmenter,
    build_model,
    load_site_data,
    load_weights,
    local_update,
    metrics_by_split,
    predict,
    predictions_frame,
    train_local_model,
    warmup_fit,
    warmup_steps,
)
from multimodal_fl.training.privacy import (
    DPSGD,
    PrivacyLedger,
    noise_multiplier_for,
    poisson_sample_rate,
)

__all__ = [
    "CENSUS_KEY",
    "LOCAL_MODEL",
    "POOLED_TEST",
    "POOLED_VALIDATION",
    "PRIVACY_LEDGER",
    "RECALIBRATION_FILE",
    "FusionSite",
    "as_disclosed",
    "fusion_sites",
    "local_training_document",
    "norm_layer_keys",
    "predict_metrics",
    "state_to_numpy",
]

#: ``Request.config["model"]`` of a predict request that scores the site's local-only model.
LOCAL_MODEL = "local"
#: The site's privacy accountant's file inside its folder (:class:`~multimodal_fl.training.
#: privacy.PrivacyLedger`): the epsilon spent survives ``--resume`` and a rebuilt site.
PRIVACY_LEDGER = "privacy.json"

log = logging.getLogger(__name__)
#: Prefix of the AdamW moments in :meth:`FusionSite.export_state`.
OPTIMIZER_PREFIX = "optimizer/"
#: The key of the site's level census in :meth:`FusionSite.export_state` (JSON, as bytes).
CENSUS_KEY = "census"
#: The columns of a predictions frame that are not attributes of the patient.
_NOT_ATTRIBUTES = frozenset({"patient_id", "split", "label", "score", "score_raw"})

#: The secure-summed vector a site holds after ``predict``: its test split's fine score
#: histograms (:func:`~multimodal_fl.evaluation.histograms.histogram_parts`).
POOLED_TEST = "test_histograms"
#: The secure-summed vector a site holds after ``calibrate``: its validation split's fine score
#: counts per label under the model to recalibrate (one part, ``overall``).
POOLED_VALIDATION = "validation_histograms"
#: A model's recalibration: the global model's in the run directory, a local-only model's kept
#: at home beside it (``sites/<site>/``); ``mmfl predict`` applies it.
RECALIBRATION_FILE = "recalibration.json"

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's ``state_dict`` as contiguous numpy arrays (copies).

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    dict of str to ndarray
    """
    return {k: v.detach().cpu().contiguous().numpy().copy() for k, v in model.state_dict().items()}


def norm_layer_keys(model: nn.Module) -> list[str]:
    """State-dict keys of normalisation layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm).

    These are the keys FedBN keeps local.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    list of str
        Sorted keys.
    """
    keys: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            prefix = f"{name}." if name else ""
            keys += [prefix + k for k in module.state_dict()]
    return sorted(keys)


class FusionSite:
    """One site's answers to the server: trains and evaluates the fusion model locally.

    Parameters
    ----------
    name : str
        The site's name (replies carry it).
    cfg : ExperimentConfig
        The experiment.
    data : SiteData
        The site's prepared data (split per patient).
    run_dir : path-like or None
        Root of the site's own output: ``predict`` writes patient-level files only into
        ``run_dir/sites/<site>/`` (the run directory in-process; a folder at the hospital
        in a deployment). ``None``: nothing is written.
    policy : SitePolicy or None
        The hospital's disclosure policy (default: ``policy.yaml`` in the site's directory, or
        the default policy). Every reply passes it (:class:`~multimodal_fl.federated.
        disclosure.DisclosureGate`) and is logged in ``run_dir/sites/<site>/egress.jsonl``.
    progress : callable or None
        Called with the local-only model's training steps
        (:class:`~multimodal_fl.progress.StepEvent`, ``local_train``).
    keep_state : bool
        ``False``: the policy's ``state_dir`` is read, never written (``mmfl site check``:
        a fit meets the budget spent so far and spends none of it).
    run : mapping or None
        Which run this is, in every egress-log line (default: ``{"dir": run_dir}``; a
        SuperNode's site names the server's run directory and Flower's run id).
    """

    def __init__(
        self, name: str, cfg: ExperimentConfig, data: SiteData, *, run_dir: Path | None = None,
        policy: SitePolicy | None = None, progress: ProgressCallback | None = None,
        keep_state: bool = True, run: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.data = data
        self._loaded = data  # as loaded: PCA summaries and projections start from it
        self._pca_state: dict[str, np.ndarray] = {}
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.model = build_model(cfg, data)
        self._augment = batch_augmenter(cfg, self.model)
        self._local_state: dict[str, torch.Tensor] = {}
        self._optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
        self._local_model: FusionModel | None = None
        self.progress = progress
        self._ledger: PrivacyLedger | None = None
        self._noise: dict[tuple[float, float, float, int, str], float] = {}
        if policy is None:
            paths = {s.name: s.path for s in cfg.sites}
            policy = load_policy(paths[name]) if name in paths else SitePolicy()
        #: the policy's state_dir: what the site keeps across runs (None: per run)
        self.state = None if policy.state_dir is None else SiteState(
            policy.state_dir, name, timeout=max(600.0, float(cfg.federated.timeout_s or 0)),
            writable=keep_state)
        self.secure = SecureSumParty(name, self.state)
        #: the test split's patients per level of each attribute, counted at predict from the
        #: frame the site's documents are built from: the gate backs level names with it
        self.census: dict[str, dict[str, int]] = {}
        self.gate = DisclosureGate(
            name, policy, config_min_cell=cfg.evaluation.min_cell,
            egress_log=None if self.run_dir is None else
            self.run_dir / "sites" / name / EGRESS_LOG,
            run=run if run is not None or self.run_dir is None else {"dir": str(self.run_dir)},
            census=lambda: self.census, withheld=self._pca_withheld,
            declared=declared_levels(cfg.task, cfg.evaluation.sensitive))

    # ------------------------------------------------------------------ state

    def export_state(self) -> dict[str, np.ndarray]:
        """Arrays this site must keep between requests: the PCA projection it applied.

        Flower builds a fresh site for every message and hands these back through
        :meth:`restore_state` (``multimodal_fl.federated.flower``); in-process sites keep
        their objects and never need it.

        Returns
        -------
        dict of str to ndarray
            ``pca/mean``, ``pca/components``, ``pca/scale``, ``pca/modality`` (UTF-8 bytes)
            after ``pca_apply``; ``secure_sum/...``: the vectors held for secure sums and the
            secrets of a sum under way (:meth:`SecureSumParty.export_state`);
            ``optimizer/<index>/<name>``: the AdamW moments of the last ``fit``
            (``federated.keep_optimizer_state``); ``census``: the level counts of the test
            split the gate checks the names of a later ``secure_sum`` against (:attr:`census`).
        """
        moments = {f"{OPTIMIZER_PREFIX}{i}/{k}": v.detach().cpu().numpy()
                   for i, s in self._optimizer_state.items() for k, v in s.items()}
        census = {CENSUS_KEY: np.frombuffer(json.dumps(self.census).encode(), np.uint8).copy()
                  } if self.census else {}
        return {**self._pca_state, **self.secure.export_state(), **moments, **census}

    def restore_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Re-apply a projection and take back the secure-sum state kept by :meth:`export_state`.

        Parameters
        ----------
        arrays : dict of str to ndarray
        """
        self.secure.restore_state(arrays)
        if CENSUS_KEY in arrays:
            self.census = json.loads(np.asarray(arrays[CENSUS_KEY], dtype=np.uint8).tobytes())
        if "pca/modality" in arrays:
            modality = bytes(np.asarray(arrays["pca/modality"], dtype=np.uint8)).decode()
            proj = {k[4:]: v for k, v in arrays.items() if k.startswith("pca/") and
                    k != "pca/modality"}
            self._apply_projection(modality, proj)
        moments: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in arrays.items():
            if key.startswith(OPTIMIZER_PREFIX):
                index, name = key[len(OPTIMIZER_PREFIX):].split("/", 1)
                moments.setdefault(int(index), {})[name] = torch.from_numpy(
                    np.array(value, copy=True))
        self._optimizer_state = moments

    def _apply_projection(self, modality: str, arrays: dict[str, np.ndarray]) -> None:
        self.data = project_site_data(self._loaded, modality, arrays)
        self.model = build_model(self.cfg, self.data)
        self._augment = batch_augmenter(self.cfg, self.model)
        self._local_state = {}
        self._optimizer_state = {}
        self._pca_state = {f"pca/{k}": np.asarray(v) for k, v in arrays.items()}
        self._pca_state["pca/modality"] = np.frombuffer(modality.encode(), dtype=np.uint8).copy()

    # ------------------------------------------------------------------ protocol

    def handle(self, request: Request) -> Reply:
        """Answer one request (see the module docstring for the kinds).

        Parameters
        ----------
        request : Request

        Returns
        -------
        Reply
            What the disclosure gate lets leave the site.

        Raises
        ------
        ValueError
            For an unknown request kind.
        multimodal_fl.federated.disclosure.SiteRefused
            The site's policy declines the request.
        multimodal_fl.federated.disclosure.SiteError
            A handler failed (the message names the exception type only).
        """
        handlers = self._handlers()
        handler = handlers.get(request.kind)
        if handler is None:
            raise ValueError(f"site {self.name}: does not answer {request.kind.value!r} requests")
        fit, evaluation = split_carried(request)
        if evaluation is not None:  # evaluate the weights received, then train from them
            return self.gate.release_carried(fit, evaluation, handlers)
        return self.gate.release(request, handler)

    def _handlers(self) -> dict[Kind, Callable[[Request], Reply]]:
        """The request kinds this site answers, each with its handler."""
        return {
            Kind.INIT: self._on_init, Kind.INFO: self._on_info, Kind.MOMENTS: self._on_moments,
            Kind.PCA: self._on_pca, Kind.PCA_APPLY: self._on_pca_apply,
            Kind.PCA_SCORES: self._on_pca_scores, Kind.FIT: self._on_fit,
            Kind.EVALUATE: self._on_evaluate, Kind.PREDICT: self._on_predict,
            Kind.CALIBRATE: self._on_calibrate,
            Kind.LOCAL_TRAIN: self._on_local_train, Kind.CROSS_EVALUATE: self._on_cross_evaluate,
            Kind.SECURE_SUM: self._on_secure_sum,
        }

    def _reply(self, request: Request, **fields: Any) -> Reply:
        return Reply(site=self.name, kind=request.kind, round=request.round, **fields)

    def _standardizer_targets(self) -> dict[str, str]:
        """State-dict keys of the model's tabular standardiser (empty without one)."""
        for name, module in self.model.named_modules():
            if isinstance(module, Standardizer):
                return {k: f"{name}.{k}" for k in STANDARDIZER_STATE}
        return {}

    def _min_cell(self, request: Request) -> int:
        """The effective small-cell threshold the gate wrote into the request."""
        return int(request.config.get("min_cell", self.gate.min_cell(request)))

    def _enough(self, request: Request, n: int, what: str) -> None:
        """Refuse the request when fewer than ``min_cell`` patients would be summarised.

        The refusal crosses the boundary: it names the threshold and the policy, not ``n``.
        """
        m = self._min_cell(request)
        if n < m:
            raise SiteRefused(f"site {self.name}: fewer than {m} {what} (site policy "
                              f"min_cell={self.gate.policy.min_cell})")

    def _on_init(self, request: Request) -> Reply:
        self._enough(request, len(self.data.train), "training patients")
        return self._reply(request, weights=state_to_numpy(build_model(self.cfg, self.data)),
                           n_samples=len(self.data.train),
                           documents={Doc.STANDARDIZER: pack_document(
                               self._standardizer_targets())})

    def _on_info(self, request: Request) -> Reply:
        self._enough(request, len(self.data.train), "training patients")
        return self._reply(request, n_samples=len(self.data.train))

    def _on_moments(self, request: Request) -> Reply:
        split = str(request.config.get("split", "train"))
        train = self.data.part(split)
        if "tabular" not in train.modalities:
            raise ValueError(f"site {self.name}: no tabular modality for federated moments")
        j = train.modalities.index("tabular")
        rows = train.inputs["tabular"][train.mask[:, j]].numpy()
        self._enough(request, int(rows.shape[0]),
                     "training patients with tabular features" if split == "train" else
                     "patients with tabular features")
        n, s, ss = column_moments(rows, where=f"site {self.name} moments")
        return self._reply(request, n_samples=int(rows.shape[0]),
                           arrays={"n": n, "sum": s, "sumsq": ss},
                           documents={Doc.STANDARDIZER: pack_document(
                               self._standardizer_targets())})

    def _pca_rows(self, request: Request, what: str) -> tuple[str, np.ndarray]:
        """The rows a PCA request summarises; declines below ``min_cell`` of them."""
        modality = str(request.config.get("modality", "image"))
        split = str(request.config.get("split", "train"))
        part = self._loaded.part(split)
        if modality in part.modalities:
            present = int(part.mask[:, part.modalities.index(modality)].sum())
            self._enough(request, present, f"patients with {modality} {what}")
        a = request.arrays
        std = (a[STANDARDIZE_MEAN], a[STANDARDIZE_SCALE]) if STANDARDIZE_MEAN in a else None
        x = site_matrix(self._loaded, modality, split=split, standardize=std,
                        min_cell=self._min_cell(request))
        return modality, x

    def _pca_withheld(self, request: Request) -> np.ndarray:
        """The columns a ``pca`` reply must carry nothing of (the gate checks them)."""
        return withheld_pca_columns(self._loaded, str(request.config.get("modality", "image")),
                                    split=str(request.config.get("split", "train")),
                                    min_cell=self._min_cell(request))

    def _on_pca(self, request: Request) -> Reply:
        """The PCA summary with at most ``floor(n / min_cell)`` rows (none below ``min_cell``)."""
        _, x = self._pca_rows(request, "for a PCA summary")
        n = int(x.shape[0])
        cap = pca_rank_cap(n, self._min_cell(request))
        asked = request.config.get("site_rank")
        rank = cap if asked in (None, 0) else min(int(asked), cap)
        solver = str(request.config.get("svd_solver", "auto"))
        return self._reply(request, n_samples=n,
                           arrays=site_pca_reply(x, rank, svd_solver=solver))

    def _on_pca_apply(self, request: Request) -> Reply:
        proj = {k: request.arrays[k] for k in PROJECTION_KEYS if k in request.arrays}
        self._apply_projection(str(request.config.get("modality", "image")), proj)
        return self._reply(request)

    def _on_pca_scores(self, request: Request) -> Reply:
        _, x = self._pca_rows(request, "for a score summary")
        missing = [k for k in ("edges", "levels") if k not in request.arrays]
        if missing:
            raise ValueError(f"site {self.name}: pca_scores request lacks arrays {missing}")
        z = project(x, request.arrays, where=f"site {self.name}")
        doc = score_summary(z, request.arrays["edges"], request.arrays["levels"],
                            min_cell=self._min_cell(request))
        return self._reply(request, n_samples=int(x.shape[0]),
                           documents={Doc.PCA_SCORES: pack_document(doc)})

    def _load_global(self, request: Request) -> None:
        weights = dict(request.weights)
        fedbn = bool(request.config.get("fedbn", False))
        if fedbn and self._local_state:
            weights.update({k: v.numpy() for k, v in self._local_state.items()})
        load_weights(self.model, weights, strict=not fedbn)

    def _on_fit(self, request: Request) -> Reply:
        self._enough(request, len(self.data.train), "training patients")
        settings = FitSettings.from_request(request)
        if self.state is None or not settings.private:
            return self._fit(request, settings)
        # a budget across runs: from the check to the saved spending no other run's private
        # fit at this site can spend, and the ledger is read afresh (another run's steps)
        with self.state.locked():
            self._ledger = None
            return self._fit(request, settings)

    def _fit(self, request: Request, settings: FitSettings) -> Reply:
        """A fit request's training and reply (:meth:`_on_fit` checked it)."""
        self._load_global(request)
        gen = torch.Generator().manual_seed(site_seed(settings.seed, self.name, request.round))
        mu = settings.proximal_mu
        proximal = None
        if mu > 0:
            start = {k: v.detach().clone() for k, v in self.model.named_parameters()}

            def proximal(model: nn.Module) -> torch.Tensor:
                return proximal_term(model.named_parameters(), start, mu)

        dp, delta = self._private_training(settings)
        training = self.cfg.training.model_copy(update={"lr": settings.lr})
        keep = self.cfg.federated.keep_optimizer_state and dp is None
        result = local_update(self.model, None, self.data.train, training,
                              steps=settings.local_steps, generator=gen, proximal=proximal,
                              augment=self._augment, dp=dp,
                              # the moments stay here; export_state carries them on Flower
                              optimizer_state=self._optimizer_state if keep else None,
                              # the path fitted alone once, before the site's first steps
                              warmup_steps=(warmup_steps(self.cfg, self.model)
                                            if request.round == 1 and dp is None else 0),
                              warmup_fit=(warmup_fit(self.cfg, self.model)
                                          and request.round == 1 and dp is None))
        metrics = {"loss": float(result.loss)} if np.isfinite(result.loss) else {}
        if request.round == 1:  # once: the same lines every round would drown the log
            for note in result.notes:
                log.info("site %s training: %s", self.name, note)
        if dp is not None:
            metrics.update(self._count_spending(dp, delta, request.round, settings.local_steps))
        weights = state_to_numpy(self.model)
        local_keys: list[str] = []
        if settings.fedbn:
            local_keys = norm_layer_keys(self.model)
            state = self.model.state_dict()
            self._local_state = {k: state[k].detach().clone() for k in local_keys}
            for k in local_keys:
                weights.pop(k, None)
        reply = self._reply(
            request,
            weights=weights,
            n_samples=int(result.n_samples),
            group_counts=self.model.group_counts(result.modality_counts, int(result.n_samples)),
            metrics=metrics,
            local_keys=local_keys,
        )
        secure = SecureAggregation.from_request(request)
        return reply if secure is None else self._hold_update(request, reply, secure)

    def _hold_update(self, request: Request, reply: Reply, secure: SecureAggregation) -> Reply:
        """A secured fit: the update (after the fit rule) stays here for the secure sum."""
        min_cell = self._min_cell(request)
        released = self.gate.rules[Kind.FIT](reply, min_cell, self.gate.policy).reply
        try:
            return hold_update(self.secure, released, request, secure, min_cell=min_cell)
        except UpdateRejected as exc:  # names keys and settings only: it may cross
            raise SiteRefused(str(exc)) from None

    # ------------------------------------------------------------------ privacy budget

    def _ledger_path(self) -> Path | None:
        """The policy's ``state_dir/privacy.json`` (across runs), else ``sites/<site>/
        privacy.json`` below the site's own output (None: neither)."""
        if self.state is not None:
            return self.state.privacy_path
        return None if self.run_dir is None else self.run_dir / "sites" / self.name / \
            PRIVACY_LEDGER

    def privacy_ledger(self, accountant: str = "rdp") -> PrivacyLedger:
        """The site's privacy accountant: in memory, else read from ``sites/<site>/``.

        Parameters
        ----------
        accountant : {"rdp", "prv"}
            The accountant a new ledger uses.

        Returns
        -------
        PrivacyLedger
        """
        if self._ledger is None:
            path = self._ledger_path()
            self._ledger = (PrivacyLedger(accountant) if path is None else
                            PrivacyLedger.load(path, mechanism=accountant))
        return self._ledger

    def _private_training(self, settings: FitSettings) -> tuple[DPSGD | None, float]:
        """This fit's DP-SGD settings once the site's budget admits it (None: no DP-SGD).

        Raises
        ------
        SiteRefused
            When the policy sets a budget (``max_epsilon``) and the fit has no DP-SGD, or its
            steps would take the site's epsilon above the budget.
        """
        budget = self.gate.policy.max_epsilon
        if not settings.private:
            if budget is not None:
                raise SiteRefused(f"site {self.name}: its policy's privacy budget "
                                  f"max_epsilon={budget:g} admits only DP-SGD training and this "
                                  "fit has none (privacy.dp)")
            return None, 0.0
        if not self.model.dense:
            raise ValueError(f"site {self.name}: the fit asks for DP-SGD but the site's model "
                             "was built without privacy.dp")
        delta = self.gate.policy.effective_delta(settings.dp_delta)
        ledger = self.privacy_ledger(settings.dp_accountant)
        q = poisson_sample_rate(len(self.data.train), self.cfg.training.batch_size)
        sigma = settings.dp_noise_multiplier or self._calibrated_noise(settings, delta, q)
        after = ledger.epsilon_after(noise_multiplier=sigma, sample_rate=q,
                                     steps=settings.local_steps, delta=delta)
        if budget is not None and after > budget:
            raise SiteRefused(f"site {self.name}: this fit would take its epsilon to "
                              f"{after:.3g} at delta={delta:g}, over the privacy budget "
                              f"max_epsilon={budget:g} its policy sets" + (
                                  " (counted over every run: state_dir)"
                                  if self.state is not None else ""))
        return DPSGD(sigma, settings.dp_max_grad_norm, ledger), delta

    def _calibrated_noise(self, settings: FitSettings, delta: float, q: float) -> float:
        """The noise multiplier that spends ``dp_target_epsilon`` in the planned steps."""
        key = (settings.dp_target_epsilon, delta, q, settings.dp_planned_steps,
               settings.dp_accountant)
        if key not in self._noise:
            self._noise[key] = noise_multiplier_for(
                settings.dp_target_epsilon, delta=delta, sample_rate=q,
                steps=max(settings.dp_planned_steps, settings.local_steps),
                accountant=settings.dp_accountant)
        return self._noise[key]

    def _count_spending(self, dp: DPSGD, delta: float, round: int, steps: int
                        ) -> dict[str, float]:
        """Record a private fit in the ledger (saved at home); its epsilon and delta."""
        epsilon = dp.ledger.epsilon(delta)
        dp.ledger.fits.append({
            # when and in which run: a ledger kept across runs (state_dir) holds many
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "run": None if self.run_dir is None else self.run_dir.name,
            "round": int(round), "steps": int(steps), "noise_multiplier": dp.noise_multiplier,
            "max_grad_norm": dp.max_grad_norm,
            "sample_rate": poisson_sample_rate(len(self.data.train),
                                               self.cfg.training.batch_size),
            "epsilon": epsilon, "delta": delta})
        path = self._ledger_path()
        if path is not None and (self.state is None or self.state.writable):
            dp.ledger.save(path)
        return {"epsilon": epsilon, "delta": delta}

    def _on_evaluate(self, request: Request) -> Reply:
        """Validation metrics and the scores' counts per label (the gate decides what leaves)."""
        self._load_global(request)
        val = self.data.val
        y = val.labels.numpy().astype(np.int64)
        scores = predict(self.model, val)
        metrics: dict[str, float] = {}
        for key, value in binary_metrics(y, scores, metrics=list(EVAL_METRICS)).items():
            if value.value is not None and np.isfinite(value.value):
                metrics[f"val_{key}"] = float(value.value)
        pos, neg = label_counts(y, scores, n_bins=self.cfg.evaluation.histogram_bins)
        return self._reply(request, n_samples=len(val), metrics=metrics,
                           arrays=dict(zip(VALIDATION_COUNTS, (pos, neg), strict=True)))

    def _on_predict(self, request: Request) -> Reply:
        """Write this site's splits and predictions; reply with the disclosed metrics per split
        and the site's report document."""
        self._load_for_predict(request)
        ev = self.cfg.evaluation
        min_cell = int(request.config.get("min_cell", self.gate.min_cell(request)))
        frame = predictions_frame(self.model, self.data, sensitive=ev.sensitive)
        self.census = level_census(frame[frame["split"] == "test"],
                                   [c for c in frame.columns if c not in _NOT_ATTRIBUTES])
        frame, recalibration = self._recalibrate(frame, request, min_cell)
        if self.run_dir is not None:
            writer = RunWriter(self.run_dir, self.cfg, str(request.config.get("engine", "")))
            writer.write_splits(self.name, self.data)
            writer.write_predictions(self.name, frame)
        pooled = self._joins_pooling(request)
        disclosed = site_disclosure(
            frame, site=self.name, sensitive=ev.sensitive, min_cell=min_cell,
            n_boot=ev.n_boot, seed=self.cfg.seed, n_bins=ev.histogram_bins,
            threshold_rule=str(request.config.get("threshold", ev.threshold)),
            subgroup_summaries=self.gate.policy.subgroup_summaries, pooled=pooled)
        disclosed["recalibration"] = recalibration_summary(frame, disclosed, **recalibration)
        by_split, site_doc = predict_metrics(frame, self.data, disclosed, min_cell=min_cell,
                                             n_boot=ev.n_boot, seed=self.cfg.seed)
        self._hold_test_histograms(frame, min_cell, pooled=pooled)
        flat: dict[str, float] = {}
        for split, values in by_split.items():
            for metric, v in values.items():
                for part, number in (("", v.value), ("/lo", v.lo), ("/hi", v.hi)):
                    if number is not None and np.isfinite(number):
                        flat[f"{split}/{metric}{part}"] = float(number)
        documents = {
            Doc.SITE_METRICS: pack_document(jsonable(site_doc)),
            Doc.DISCLOSED: pack_document(disclosed),
        }
        # the total only where the splits' counts that leave give no small cell from it
        total = len(frame) if site_doc["n_patients"] is not None else 0
        return self._reply(request, n_samples=total, metrics=flat, documents=documents)

    def _joins_pooling(self, request: Request) -> bool:
        """The server asks for pooled test figures and this site's policy answers ``secure_sum``.

        Decided once, at ``predict``: a site that joins releases its document in the pooled
        form (:func:`~multimodal_fl.evaluation.disclosed.pooled_form`), and a site that released
        its test class counts never joins a secure sum of the same patients.
        """
        return bool(request.config.get("pooled", False)) and \
            self.gate.policy.answers_kind(Kind.SECURE_SUM.value)

    def _hold_test_histograms(self, frame: Any, min_cell: int, *, pooled: bool) -> None:
        """Keep the test split's fine histograms for the secure sum (:data:`POOLED_TEST`)."""
        test = frame[frame["split"] == "test"]
        if not pooled:
            self.secure.hold(POOLED_TEST, {}, min_cell=min_cell, refusal=(
                "this site released its test class counts (the predict request did not ask "
                "for pooled figures, or its policy does not answer secure_sum)"))
            return
        if len(test) < min_cell:
            self.secure.hold(POOLED_TEST, {}, refusal=f"fewer than {min_cell} test patients",
                             min_cell=min_cell)
            return
        sensitive = [c for c in self.cfg.evaluation.sensitive if c in test]
        groups = ({c: test[c].to_numpy() for c in sensitive}
                  if sensitive and self.gate.policy.subgroup_summaries else None)
        parts = histogram_parts(test["label"].to_numpy(), test["score"].to_numpy(),
                                groups=groups, n_bins=self.cfg.evaluation.histogram_bins,
                                min_cell=min_cell,
                                declared=declared_levels(self.cfg.task, sensitive))
        self.secure.hold(POOLED_TEST, parts, min_cell=min_cell,
                         grid=self.cfg.evaluation.histogram_bins)

    def _on_calibrate(self, request: Request) -> Reply:
        """Hold the validation split's fine counts per label under the model to recalibrate
        (:data:`POOLED_VALIDATION`) for the secure sum that follows; nothing leaves here."""
        self._load_for_predict(request)
        min_cell = self._min_cell(request)
        val = self.data.val
        refusal = self._validation_sum_refusal(min_cell)
        if refusal is not None:
            self.secure.hold(POOLED_VALIDATION, {}, refusal=refusal, min_cell=min_cell)
            return self._reply(request)
        counts = fine_counts(val.labels.numpy().astype(np.int64), predict(self.model, val),
                             self.cfg.evaluation.histogram_bins)
        self.secure.hold(POOLED_VALIDATION, {OVERALL: counts}, min_cell=min_cell,
                         grid=self.cfg.evaluation.histogram_bins)
        return self._reply(request)

    def _validation_sum_refusal(self, min_cell: int) -> str | None:
        """Why this site's validation histogram does not join the secure sum, or ``None``.

        Only a site that releases nothing of its validation split's class counts joins: one
        whose classes are each 0 or at least ``min_cell`` discloses its validation histogram
        at ``evaluate`` and its positives at ``predict`` (the server fits on those as
        disclosed), and the sum's total minus them would be the other sites' hidden counts.
        A site whose validation size is withheld (below ``min_cell``) does not join either:
        the total would give it. (A validation split of ``min_cell`` or more is never withheld
        to protect another split: :func:`~multimodal_fl.evaluation.disclosed.
        split_suppression`.)
        """
        val = self.data.val
        n, pos = len(val), int((val.labels > 0.5).sum())
        if n < min_cell:
            return f"fewer than {min_cell} validation patients"
        if (pos == 0 or pos >= min_cell) and (n - pos == 0 or n - pos >= min_cell):
            return ("this site's validation class counts are released (at evaluate and "
                    "predict): the server fits on its disclosed histogram, not on a sum")
        return None

    def _recalibrate(self, frame: pd.DataFrame, request: Request, min_cell: int
                     ) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The predictions with the recalibrated ``score`` and ``score_raw`` beside it, and
        what :func:`~multimodal_fl.evaluation.disclosed.recalibration_summary` says of it.

        The request carries the server's recalibration (:data:`~multimodal_fl.evaluation.
        recalibration.CONFIG_KEYS`), or the reason there is none (``recalibrate_reason``); the
        local-only model is recalibrated here, on the site's own validation split
        (:meth:`_local_recalibration`).
        """
        c = request.config
        method = str(c.get(CONFIG_KEYS[0], "none"))
        reason = c.get("recalibrate_reason")
        if c.get("model") == LOCAL_MODEL and method != "none":
            fitted, reason = self._local_recalibration(frame, method, min_cell)
            source = None if fitted is None else fitted.source
        else:
            fitted = Recalibration.from_config(c)
            source = None if fitted is None else str(c.get("recalibrate_source") or "the server")
        if fitted is None and not reason:
            reason = "no recalibration was asked for (evaluation.recalibrate: none)"
        status = {"method": method, "applied": fitted is not None, "source": source,
                  "reason": None if fitted is not None else str(reason)}
        return recalibrated_frame(frame, fitted), status

    def _local_recalibration(self, frame: pd.DataFrame, method: str, min_cell: int
                             ) -> tuple[Recalibration | None, str | None]:
        """The local-only model's recalibration, fitted at home on its own validation split.

        It needs ``min_cell`` patients of each class there; it is kept in
        ``sites/<site>/`` (:data:`RECALIBRATION_FILE`, for ``mmfl predict``) and never sent.
        """
        val = frame[frame["split"] == "val"]
        y = val["label"].to_numpy(dtype=np.int64)
        n_pos = int(y.sum())
        if min(n_pos, y.size - n_pos) < min_cell:
            return None, (f"the site's validation split has fewer than {min_cell} patients of "
                          "a class: its local-only model is not recalibrated")
        try:
            fitted = fit_on_scores(y, val["score"].to_numpy(dtype=np.float64), method=method,
                                   n_bins=self.cfg.evaluation.histogram_bins,
                                   source="the site's own validation split")
        except RecalibrationError as exc:
            return None, str(exc)
        home = self._home_model_path()
        if home is not None:
            (home.parent / RECALIBRATION_FILE).write_text(json.dumps(fitted.to_dict()))
        return fitted, None

    def _on_secure_sum(self, request: Request) -> Reply:
        try:
            return self.secure.answer(request)
        except SecureSumError as exc:  # built from names and counts: it may cross
            raise SiteRefused(str(exc)) from None


    # ------------------------------------------------------------ local-only job

    def _load_for_predict(self, request: Request) -> None:
        """The model to score: the local-only one kept at home, or the request's weights."""
        if request.config.get("model") == LOCAL_MODEL:
            load_weights(self.model, self._home_model().state_dict())
        else:
            self._load_global(request)

    def _home_model_path(self) -> Path | None:
        """``sites/<site>/model.safetensors`` below the site's own output (None: no output)."""
        return None if self.run_dir is None else self.run_dir / "sites" / self.name / \
            "model.safetensors"

    def _home_model(self) -> FusionModel:
        """The local-only model this site trained (in memory, else read back from home)."""
        if self._local_model is None:
            path = self._home_model_path()
            if path is None or not path.is_file():
                raise SiteRefused(f"site {self.name}: no local-only model at this site (it "
                                  "trains one when asked local_train)")
            model = build_model(self.cfg, self.data)
            load_weights(model, load_file(str(path)))
            self._local_model = model
        return self._local_model

    def _on_local_train(self, request: Request) -> Reply:
        """Train the local-only model at home; its weights leave only if the policy shares it."""
        min_cell = int(request.config["min_cell"])
        if len(self.data.train) < min_cell:
            raise SiteRefused(f"site {self.name}: fewer than min_cell={min_cell} training "
                              "patients: no local-only model")
        # its standardiser under the moments rule: the weights may leave (the egress audit)
        model, result = train_local_model(self.cfg, self.data, seed_key=self.name,
                                          min_cell=min_cell, progress=self.progress,
                                          label=f"local {self.name}")
        self._local_model = model
        if self.run_dir is not None:
            engine = str(request.config.get("engine", "local"))
            RunWriter(self.run_dir, self.cfg, engine).save_model(model, site=self.name)
        for note in result.notes:
            log.info("site %s local-only model: %s", self.name, note)
        shared = self.gate.policy.share_local_model
        n_val_pos = int((self.data.val.labels > 0.5).sum())
        doc = local_training_document(result, n_val=len(self.data.val), n_val_pos=n_val_pos,
                                      min_cell=min_cell)
        return self._reply(request, weights=state_to_numpy(model) if shared else {},
                           n_samples=len(self.data.train),
                           documents={Doc.LOCAL_TRAINING: pack_document(jsonable(doc))})

    def _on_cross_evaluate(self, request: Request) -> Reply:
        """Score a local-only model on this site's test split: one disclosed matrix cell."""
        c = request.config
        min_cell = int(c["min_cell"])
        model_site = str(c["model_site"])
        name = str(c.get("model", f"local:{model_site}"))
        metric = str(c.get("metric", "auc"))
        if model_site == self.name:
            model = self._home_model()
        elif not request.weights:
            raise ValueError(f"site {self.name}: cross_evaluate of {name} carries no weights")
        else:
            model = build_model(self.cfg, self.data)
            load_weights(model, request.weights)
        frame = predictions_frame(model, self.data, sensitive=self.cfg.evaluation.sensitive)
        test = frame[frame["split"] == "test"]
        # the rule of the site's own disclosed cells: a class metric needs min_cell of each class
        row = released_metric(
            test["label"].to_numpy(), test["score"].to_numpy(), metric=metric,
            min_cell=min_cell, n_boot=int(c.get("n_boot", self.cfg.evaluation.n_boot)),
            seed=int(c.get("seed", self.cfg.seed)))
        values = {metric: row["value"], f"{metric}/lo": row["lo"], f"{metric}/hi": row["hi"]}
        if metric in RANK_METRICS:  # no class counts beside it: two decimals (coarse_rank)
            values = {k: v if pd.isna(v) else coarse_rank(v) for k, v in values.items()}
        metrics = {k: float(v) for k, v in values.items() if pd.notna(v) and np.isfinite(v)}
        doc = {"model": name, "test_site": self.name, "metric": metric,
               "suppressed": bool(row["suppressed"]),
               "reason": None if pd.isna(row["reason"]) else str(row["reason"])}
        return self._reply(request, n_samples=0 if pd.isna(row["n"]) else int(row["n"]),
                           metrics=metrics,
                           documents={Doc.CROSS_SITE: pack_document(doc)})


def predict_metrics(frame: pd.DataFrame, data: SiteData, disclosed: Mapping[str, Any], *,
                    min_cell: int, n_boot: int, seed: int
                    ) -> tuple[dict[str, dict[str, MetricValue]], dict[str, Any]]:
    """A site's metrics per split and its ``site_metrics`` document (``metrics.json``'s
    ``sites`` entry), withholding what its report document withholds.

    The cells suppressed are those of ``disclosed`` (:func:`as_disclosed`: its class rule, and
    the pooled form's withheld threshold metrics); a site whose document is in the pooled form
    (``disclosed["pooled"]``) releases no ``n_positive`` either: with the training and
    validation positives it would give the test split's. The site's total (``n_patients`` and
    its ``modality_counts``; its ``n_positive``) is withheld where the split counts the site
    sends anyway in a run would give a small split from it
    (:func:`~multimodal_fl.evaluation.disclosed.split_suppression`: the training count leaves
    with every fit). The federated site's ``predict`` reply and the in-process centralized
    engine both use it.

    Parameters
    ----------
    frame : pandas.DataFrame
        The site's predictions (:func:`~multimodal_fl.training.predictions_frame`).
    data : SiteData
        The site's cohort (:func:`~multimodal_fl.rundir.site_summary`'s counts).
    disclosed : mapping
        The site's report document.
    min_cell : int
        The effective small-cell threshold.
    n_boot, seed : int
        The intervals' bootstrap (``seed``: the base seed; each split's is derived from its
        scores, as in ``disclosed``).

    Returns
    -------
    by_split : dict
        ``{split: {metric: MetricValue}}``.
    site_doc : dict
        The cohort's counts and ``metrics`` (``by_split``).
    """
    # the same cells suppressed as in the site's report document (its class rule too)
    by_split = as_disclosed(metrics_by_split(frame, n_boot=n_boot, seed=seed,
                                             min_cell=min_cell), disclosed)
    site_doc = {**site_summary(data, min_cell=min_cell), "metrics": by_split}
    sup = split_suppression(frame, min_cell=min_cell)
    if sup.total is not None:  # the splits' sizes leave anyway: the total gives the small ones
        site_doc["n_patients"] = None
        site_doc["modality_counts"] = dict.fromkeys(site_doc["modality_counts"])
    elif min_cell > 0:
        site_doc["modality_counts"] = _beside_training(site_doc["modality_counts"], data,
                                                       min_cell)
    if disclosed.get("pooled") or sup.total_classes is not None:
        # with the released positives of the splits: a hidden split's (or the test split's)
        site_doc["n_positive"] = None
    return by_split, site_doc


def _beside_training(counts: Mapping[str, int | None], data: SiteData, min_cell: int
                     ) -> dict[str, int | None]:
    """The site's patients per modality, each withheld where its training count gives a small
    cell.

    Every ``fit`` sends the training patients of each modality (its group counts, as
    ``moments`` and ``pca`` send theirs), so a modality's count over the site minus it is the
    patients outside training with the modality, and the patients outside training (whose
    number the splits' sizes give) minus that, those without it: either in ``(0, min_cell)``
    withholds the count.
    """
    train = data.train.modality_counts()
    n_rest = len(data.dataset) - len(data.train)
    out: dict[str, int | None] = {}
    for m, k in counts.items():
        rest = None if k is None else k - train.get(m, 0)
        small = rest is not None and (0 < rest < min_cell or 0 < n_rest - rest < min_cell)
        out[m] = None if small else k
    return out


def as_disclosed(by_split: dict[str, dict[str, MetricValue]], disclosed: Mapping[str, Any]
                 ) -> dict[str, dict[str, MetricValue]]:
    """Metrics per split with every figure the site's report document withholds withheld.

    The document (:func:`~multimodal_fl.evaluation.disclosed.site_disclosure`) applies the
    class rule (a class metric needs ``min_cell`` patients of each class) and hides class counts
    that follow from the other splits; the ``predict`` reply's metrics and ``site_metrics``
    document show the same cells, so ``metrics.json`` and the report agree.

    Parameters
    ----------
    by_split : dict
        :func:`~multimodal_fl.training.metrics_by_split` (the split-size rule applied).
    disclosed : mapping
        The site's report document.

    Returns
    -------
    dict
        ``by_split`` with a metric the document withholds made undefined, its reason kept.
    """
    splits = disclosed.get("splits") or {}
    out: dict[str, dict[str, MetricValue]] = {}
    for split, values in by_split.items():
        doc = splits.get(split) or {}
        shown = doc.get("metrics") or {}
        out[split] = {}
        for metric, value in values.items():
            kept = shown.get(metric) or {}
            if value.value is not None and kept.get("value") is None:
                reason = kept.get("reason") or doc.get("reason") or "withheld by the site"
                value = MetricValue.undefined(str(reason), n=doc.get("n"))
            elif value.value is not None and metric in RANK_METRICS and \
                    kept.get("value") != value.value:  # coarsened by the pooled form
                value = replace(value, value=kept.get("value"), lo=kept.get("lo"),
                                hi=kept.get("hi"))
            out[split][metric] = value
    return out


def local_training_document(result: TrainResult, *, n_val: int, min_cell: int,
                            n_val_pos: int | None = None) -> dict[str, Any]:
    """What a site discloses of its local-only training (the ``local_training`` document).

    Steps, early stopping and the training-loss curve (means over training patients, of whom a
    training site has at least ``min_cell``); validation AUCs only when the validation split
    has at least ``min_cell`` patients of each class (the rule of every class metric that
    leaves a site). The positive-class weight and the notes (they name class counts) stay at
    the site.

    Parameters
    ----------
    result : TrainResult
    n_val : int
        Validation patients.
    min_cell : int
        The effective small-cell threshold.
    n_val_pos : int or None
        Validation positives (``None``: the class rule is not applied, only the split size).

    Returns
    -------
    dict
        ``steps``, ``last_step``, ``loss``, ``best_step``, ``best_val_auc``,
        ``stopped_early``, ``n_samples``, ``history`` (``step``, ``train_loss``, ``val_auc``,
        ``val_auc_reason``).
    """
    classes = (n_val,) if n_val_pos is None else (n_val_pos, n_val - n_val_pos)
    shown = n_val >= min_cell and min(classes) >= min_cell
    hidden = (f"validation split of fewer than {min_cell} patients: not disclosed"
              if n_val < min_cell else
              f"validation split of fewer than {min_cell} of a class: not disclosed")
    history = [{"step": h["step"], "train_loss": h["train_loss"],
                "val_auc": h["val_auc"] if shown else None,
                "val_auc_reason": h["val_auc_reason"] if shown else hidden}
               for h in result.history]
    return {"steps": result.steps, "last_step": result.last_step, "loss": result.loss,
            "best_step": result.best_step,
            "best_val_auc": result.best_val_auc if shown else None,
            "stopped_early": result.stopped_early, "n_samples": result.n_samples,
            "history": history}


def fusion_sites(
    cfg: ExperimentConfig, run_dir: Path, *, cohorts: Mapping[str, Any] | None = None,
    data: Mapping[str, SiteData] | None = None, progress: ProgressCallback | None = None,
) -> dict[str, FusionSite]:
    """Every site of ``cfg`` as a :class:`FusionSite` in this process (in-process engines).

    Parameters
    ----------
    cfg : ExperimentConfig
    run_dir : Path
        Each site writes its patient-level files under ``run_dir/sites/<site>/``.
    cohorts : mapping or None
        Pre-built cohorts (default: read from the site directories).
    data : mapping or None
        Prepared :class:`~multimodal_fl.training.SiteData` per site (default: prepared here).
    progress : callable or None
        Called with the preparation's :class:`~multimodal_fl.progress.PrepareEvent` and, when
        a site trains its local-only model, its :class:`~multimodal_fl.progress.StepEvent`.

    Returns
    -------
    dict of str to FusionSite
    """
    prepared = dict(data) if data is not None else load_site_data(cfg, run_dir, cohorts=cohorts,
                                                                  progress=progress)
    return {name: FusionSite(name, cfg, sd, run_dir=run_dir, progress=progress)
            for name, sd in prepared.items()}

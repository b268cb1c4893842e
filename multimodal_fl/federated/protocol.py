"""The wire, in one place: request kinds, requests, replies, named documents, failures.

Nothing in this module knows a modality, a file, a config schema or torch. A :class:`Request`
goes from the server to one site; a :class:`Reply` comes back; a :class:`SiteFailure` stands in
for a reply that never came (the site raised, timed out or could not be reached).

The shapes map one to one onto Flower's records (see :meth:`Request.to_records` and
:meth:`Reply.to_records`): every array goes into an ``ArrayRecord``, every number into a
``MetricRecord``, every setting and every named document into a ``ConfigRecord``.

Request kinds (:class:`Kind`), in the order an experiment sends them:

``describe``
    Flower only: which site a SuperNode serves.
``pca``, ``pca_apply``, ``pca_scores``
    The federated PCA stage and analysis (:mod:`multimodal_fl.federated.pca` summaries, the
    projection to apply in ``arrays``, a summary of the projected scores as the
    :attr:`Doc.PCA_SCORES` document).
``init``
    One site sends freshly initialised model ``weights``; its :attr:`Doc.STANDARDIZER`
    document names the weights federated moments fill, if the model has any.
``moments``
    Per-feature count, sum and sum of squares (``arrays`` ``n``, ``sum``, ``sumsq``; a feature
    seen in fewer than ``min_cell`` patients as 0, 0, 0) and the :attr:`Doc.STANDARDIZER`
    target keys.
``info``
    ``n_samples`` = the training-set size (the plausibility cap for later fit replies).
``fit``
    Train locally from ``weights`` with the request's :class:`FitSettings`; reply with the new
    ``weights`` (a full state dict, buffers included, minus any FedBN ``local_keys`` and the
    keys of a group counted 0), ``n_samples``, ``group_counts`` and ``metrics`` (``"loss"``).
``evaluate``
    Evaluate ``weights`` on the validation split; reply with ``n_samples`` (its size),
    ``metrics`` (``"val_auc"``, ``"val_average_precision"``, ``"val_brier"``, ``"val_ece"``)
    and the :attr:`Doc.VALIDATION` histograms, or, on fewer than ``min_cell`` patients (or
    a class with fewer), with nothing (``n_samples`` 0).
``calibrate``
    Score the validation split with ``weights`` (or, with ``config["model"] == "local"``, the
    site's own local-only model) and hold its fine score counts per label at the site for the
    ``secure_sum`` that follows (the server fits the recalibration on the total); the reply
    carries nothing.
``predict``
    Final evaluation: the site writes its patient-level files at home and replies with the
    :attr:`Doc.SITE_METRICS` document (metrics per split under the small-cell rule); its test
    histograms stay at the site for the ``secure_sum`` that follows.
``secure_sum``
    One step of a secure sum (:mod:`multimodal_fl.federated.secure_sum`): the server learns
    only the total of the sites' integer vectors (pooled histogram counts). ``config``:
    ``step`` (``advertise``, ``share``, ``masked``, ``unmask``) and ``vector`` (which of the
    site's vectors); keys, encrypted shares and the masked vector travel as ``uint8`` /
    ``int64`` arrays (:class:`~multimodal_fl.federated.secure_sum.SecureSumParty`).
``local_train``
    The local-only job (cross-site validation): train the site's own model to completion with
    the experiment's training settings and early stopping on its own validation split, keep it
    at home, and reply with its ``weights`` only where the site's policy shares local models
    (``share_local_model``), with ``n_samples`` and the :attr:`Doc.LOCAL_TRAINING` document.
    The server aggregates nothing.
``cross_evaluate``
    Cross-site validation: score a local-only model on this site's test split and reply with
    the disclosed cell (``metrics`` ``value``, ``lo``, ``hi``; ``n_samples``; the
    :attr:`Doc.CROSS_SITE` document). ``config``: ``model`` (its name, ``local:<site>``),
    ``model_site`` (whose model), ``metric``, ``n_boot``, ``seed``; ``weights`` carry another
    site's shared model, and are empty when ``model_site`` is the site itself (it scores the
    model it keeps at home).

A ``fit`` request may also carry an ``evaluate`` request of the weights it sends (the previous
round's global model: :func:`carry_evaluation`, config keys under :data:`CARRIED_PREFIX`), so
that a deployment exchanges one message per round; the site answers the evaluation first, then
trains, and its fit reply carries the released evaluation under the same prefix
(:func:`attach_evaluation`, :func:`detach_evaluation`).

Every reply leaves a site through its disclosure gate
(:mod:`multimodal_fl.federated.disclosure`, whose ``DECLARED`` table lists what each kind's
reply may carry); ``config["min_cell"]`` carries the effective small-cell threshold to the
handlers. A site that declines a request raises :class:`SiteRefused`; any other failure
crosses the boundary as :func:`boundary_reason` words it.

``Request.weights`` holds model weights only; other arrays (a projection, histogram edges)
travel in ``Request.arrays``. Per-round training hyperparameters travel on one channel, the
fit request's config (:class:`FitSettings`); a site uses its own config copy only for the
model's shape.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

T = TypeVar("T")

__all__ = [
    "ARRAY_PREFIX",
    "CARRIED_PREFIX",
    "CONFIG_PREFIX",
    "DOC_PREFIX",
    "GROUP_PREFIX",
    "METRIC_PREFIX",
    "WEIGHT_PREFIX",
    "ConfigValue",
    "Doc",
    "Federation",
    "FitSettings",
    "InvalidReply",
    "Kind",
    "Reply",
    "Request",
    "Site",
    "SiteError",
    "SiteFailure",
    "SiteRefused",
    "StateDict",
    "attach_evaluation",
    "boundary_reason",
    "carry_evaluation",
    "detach_evaluation",
    "pack_document",
    "site_seed",
    "split_carried",
    "unpack_document",
]

#: A model state dict as numpy arrays, keyed by parameter / buffer name.
StateDict = dict[str, np.ndarray]
#: A value allowed in a request config (maps onto Flower's ConfigRecord).
ConfigValue = int | float | str | bool



class Kind(StrEnum):
    """Every request kind a site may be asked (see the module docstring)."""

    DESCRIBE = "describe"
    RELEASE = "release"
    PCA = "pca"
    PCA_APPLY = "pca_apply"
    PCA_SCORES = "pca_scores"
    INIT = "init"
    MOMENTS = "moments"
    INFO = "info"
    FIT = "fit"
    EVALUATE = "evaluate"
    CALIBRATE = "calibrate"
    PREDICT = "predict"
    SECURE_SUM = "secure_sum"
    LOCAL_TRAIN = "local_train"
    CROSS_EVALUATE = "cross_evaluate"


class Doc(StrEnum):
    """Every named document a reply may carry (small JSON documents of aggregates)."""

    #: A site's federated-evaluation summary (counts, metrics, coarsened histograms): no longer
    #: sent at ``predict``, where pooled figures come from a ``secure_sum``.
    EVALUATION = "evaluation"
    #: ``predict``: the site's metrics per split and its cohort summary.
    SITE_METRICS = "site_metrics"
    #: ``predict``: the site's disclosed report document (fairness cells, ROC and calibration
    #: summaries under the small-cell rules), from which the report is built.
    DISCLOSED = "disclosed"
    #: ``pca_scores``: aggregates of the projected rows.
    PCA_SCORES = "pca_scores"
    #: ``evaluate``: the validation scores' histograms per label, bins merged at the site until
    #: each holds 0 or at least ``min_cell`` patients, counts only (the server pools them).
    VALIDATION = "validation"
    #: ``secure_sum`` (step ``advertise``): the parts of the vector a site holds, their width
    #: and the site's small-cell threshold (names and sizes only, no number about patients).
    SECURE_SUM = "secure_sum"
    #: ``init`` / ``moments``: the state-dict keys pooled moments fill (``mean``, ``scale``,
    #: ``count``); absent or empty when the model standardises nothing.
    STANDARDIZER = "standardizer"
    #: ``local_train``: how the local-only model trained (steps, early stopping, loss curve;
    #: validation AUCs only of a validation split of at least ``min_cell`` patients).
    LOCAL_TRAINING = "local_training"
    #: ``cross_evaluate``: the cell's model, test site, metric and, when it shows no value,
    #: why (``suppressed``, ``reason``).
    CROSS_SITE = "cross_site"


WEIGHT_PREFIX = "weights/"
ARRAY_PREFIX = "arrays/"
METRIC_PREFIX = "metric/"
GROUP_PREFIX = "group/"
CONFIG_PREFIX = "config/"
DOC_PREFIX = "doc/"


def _kind(value: str) -> Kind:
    try:
        return Kind(value)
    except ValueError:
        raise ValueError(
            f"unknown request kind {value!r}; expected one of {[k.value for k in Kind]}"
        ) from None


def pack_document(doc: Any) -> str:
    """A document of aggregates as JSON text (how it travels in a ``ConfigRecord``).

    Parameters
    ----------
    doc : Any
        JSON-able: dicts, lists, strings, numbers (NaN allowed), ``None``.

    Returns
    -------
    str
    """
    return json.dumps(doc)


def unpack_document(text: str) -> Any:
    """The inverse of :func:`pack_document`.

    Parameters
    ----------
    text : str

    Returns
    -------
    Any
    """
    return json.loads(text)


@dataclass(frozen=True)
class FitSettings:
    """The per-round training hyperparameters a fit request carries (its only channel).

    Parameters
    ----------
    seed : int
        The run seed; the site draws its randomness from :func:`site_seed` of (seed, site,
        round).
    local_steps : int
        Optimisation steps this round.
    lr : float
        The site optimiser's learning rate.
    proximal_mu : float
        FedProx ``mu`` (0: no proximal term).
    fedbn : bool
        Keep normalisation layers local and list them in ``Reply.local_keys``.
    dp_max_grad_norm : float
        DP-SGD's per-patient clipping norm; 0: no DP-SGD (the ``dp_`` settings below are then
        not sent).
    dp_noise_multiplier : float
        DP-SGD's noise multiplier; 0: the site derives it from ``dp_target_epsilon``.
    dp_target_epsilon : float
        The epsilon the site spends in ``dp_planned_steps`` steps (with no noise multiplier).
    dp_planned_steps : int
        The steps ``dp_target_epsilon`` is spread over (rounds x local steps); 0 with a fixed
        noise multiplier, which spends as it goes (so such a run may be resumed for more rounds).
    dp_delta : float
        The delta the site states epsilon at (its policy may lower it).
    dp_accountant : str
        Opacus' accountant (``rdp`` or ``prv``).
    """

    seed: int
    local_steps: int
    lr: float
    proximal_mu: float = 0.0
    fedbn: bool = False
    dp_max_grad_norm: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_target_epsilon: float = 0.0
    dp_planned_steps: int = 0
    dp_delta: float = 0.0
    dp_accountant: str = "rdp"

    @property
    def private(self) -> bool:
        """Whether the fit trains with DP-SGD."""
        return self.dp_max_grad_norm > 0

    def to_config(self) -> dict[str, ConfigValue]:
        """The request config entries (the ``dp_`` entries only with DP-SGD).

        Returns
        -------
        dict of str to int, float, str or bool
        """
        out: dict[str, ConfigValue] = {
            "seed": int(self.seed), "local_steps": int(self.local_steps),
            "lr": float(self.lr), "proximal_mu": float(self.proximal_mu),
            "fedbn": bool(self.fedbn)}
        if self.private:
            out.update({"dp_max_grad_norm": float(self.dp_max_grad_norm),
                        "dp_noise_multiplier": float(self.dp_noise_multiplier),
                        "dp_target_epsilon": float(self.dp_target_epsilon),
                        "dp_planned_steps": int(self.dp_planned_steps),
                        "dp_delta": float(self.dp_delta),
                        "dp_accountant": str(self.dp_accountant)})
        return out

    @classmethod
    def from_request(cls, request: Request) -> FitSettings:
        """Read the settings from a fit request.

        Parameters
        ----------
        request : Request

        Returns
        -------
        FitSettings

        Raises
        ------
        ValueError
            If the request lacks ``seed``, ``local_steps`` or ``lr`` (named).
        """
        c = request.config
        missing = [k for k in ("seed", "local_steps", "lr") if k not in c]
        if missing:
            raise ValueError(
                f"{request.kind} request of round {request.round} lacks {missing}; a fit request "
                f"carries {sorted(cls(0, 0, 0.0).to_config())}"
            )
        return cls(seed=int(c["seed"]), local_steps=int(c["local_steps"]), lr=float(c["lr"]),
                   proximal_mu=float(c.get("proximal_mu", 0.0)),
                   fedbn=bool(c.get("fedbn", False)),
                   dp_max_grad_norm=float(c.get("dp_max_grad_norm", 0.0)),
                   dp_noise_multiplier=float(c.get("dp_noise_multiplier", 0.0)),
                   dp_target_epsilon=float(c.get("dp_target_epsilon", 0.0)),
                   dp_planned_steps=int(c.get("dp_planned_steps", 0)),
                   dp_delta=float(c.get("dp_delta", 0.0)),
                   dp_accountant=str(c.get("dp_accountant", "rdp")))


@dataclass
class Request:
    """A message from the server to one site.

    Parameters
    ----------
    kind : Kind or str
        What the site should do (a :class:`Kind`; its string value is accepted).
    round : int
        The federated round (1-based; 0 before training).
    weights : dict[str, numpy.ndarray]
        Model weights only: the global state dict (may be empty for kinds that need none).
    config : dict[str, int | float | str | bool]
        Scalar settings for this request (see the module docstring for the keys).
    arrays : dict[str, numpy.ndarray]
        Arrays that are not model weights (a PCA projection, histogram edges, a pooled
        standardisation).

    Raises
    ------
    ValueError
        For a kind that is not a :class:`Kind`.
    """

    kind: Kind
    round: int
    weights: StateDict = field(default_factory=dict)
    config: dict[str, ConfigValue] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check the kind."""
        self.kind = _kind(self.kind)

    def copy(self) -> Request:
        """A copy that shares no array or dict with this request (what a site receives in
        process, as it would over the wire)."""
        return replace(self, weights=_copy_arrays(self.weights), config=dict(self.config),
                       arrays=_copy_arrays(self.arrays))

    def to_records(self) -> tuple[dict[str, np.ndarray], dict[str, ConfigValue]]:
        """Flatten into one array dict and one config dict (Flower's ArrayRecord / ConfigRecord).

        Returns
        -------
        arrays : dict[str, numpy.ndarray]
            ``weights`` with keys prefixed by ``"weights/"``, ``arrays`` by ``"arrays/"``.
        config : dict[str, int | float | str | bool]
            ``kind``, ``round`` and ``config`` entries prefixed by ``"config/"``.
        """
        arrays = {WEIGHT_PREFIX + k: v for k, v in self.weights.items()}
        arrays.update({ARRAY_PREFIX + k: v for k, v in self.arrays.items()})
        config: dict[str, ConfigValue] = {"kind": self.kind.value, "round": int(self.round)}
        config.update({CONFIG_PREFIX + k: v for k, v in self.config.items()})
        return arrays, config

    @classmethod
    def from_records(
        cls, arrays: Mapping[str, np.ndarray], config: Mapping[str, ConfigValue]
    ) -> Request:
        """Rebuild a request from :meth:`to_records` output.

        Parameters
        ----------
        arrays : Mapping[str, numpy.ndarray]
            The flattened arrays.
        config : Mapping[str, int | float | str | bool]
            The flattened config.

        Returns
        -------
        Request
            The request.

        Raises
        ------
        ValueError
            If ``kind`` or ``round`` is missing, or the kind is unknown.
        """
        for key in ("kind", "round"):
            if key not in config:
                raise ValueError(
                    f"request config lacks {key!r}; it has {sorted(config)}; expected keys 'kind', "
                    f"'round' and '{CONFIG_PREFIX}<name>' entries"
                )
        return cls(
            kind=_kind(str(config["kind"])),
            round=int(config["round"]),
            weights=_strip(arrays, WEIGHT_PREFIX),
            config=_strip(config, CONFIG_PREFIX),
            arrays=_strip(arrays, ARRAY_PREFIX),
        )


@dataclass
class Reply:
    """A site's answer to one :class:`Request`.

    Parameters
    ----------
    site : str
        The replying site's name (must equal the name the request was sent to).
    kind : str
        The request kind this answers.
    round : int
        The request round this answers.
    weights : dict[str, numpy.ndarray]
        The site's state dict after local training (fit), minus ``local_keys`` if it likes.
    group_counts : dict[str, int]
        Samples that trained each parameter group, keyed by key prefix (e.g. ``"encoders.text."``).
        A key takes the count of the longest prefix listed here that it starts with; a key in
        none of these groups counts ``n_samples``. A count of 0 means "did not train it".
    n_samples : int
        The site's training-set size (fit) or evaluation-set size (evaluate); the FedAvg weight.
    metrics : dict[str, float]
        Scalar metrics (``"loss"`` for fit; anything for evaluate).
    arrays : dict[str, numpy.ndarray]
        Other array payloads (summaries), not aggregated by the FedAvg loop.
    local_keys : list[str]
        FedBN: state-dict keys the site keeps local; the server never averages them.
    documents : dict[str, str]
        Named documents of aggregates (a :class:`Doc` name -> JSON text from
        :func:`pack_document`); read them with :meth:`document`.
    """

    site: str
    kind: str
    round: int
    weights: StateDict = field(default_factory=dict)
    group_counts: dict[str, int] = field(default_factory=dict)
    n_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    local_keys: list[str] = field(default_factory=list)
    documents: dict[str, str] = field(default_factory=dict)

    def copy(self) -> Reply:
        """A copy that shares no array, list or dict with this reply."""
        return replace(self, weights=_copy_arrays(self.weights),
                       group_counts=dict(self.group_counts), metrics=dict(self.metrics),
                       arrays=_copy_arrays(self.arrays), local_keys=list(self.local_keys),
                       documents=dict(self.documents))

    def document(self, name: Doc) -> Any:
        """One named document, unpacked.

        Parameters
        ----------
        name : Doc

        Returns
        -------
        Any

        Raises
        ------
        InvalidReply
            If the reply does not carry it.
        """
        if name not in self.documents:
            raise InvalidReply(self.site, f"{self.kind} reply lacks the {name.value!r} document "
                                          f"(it has {sorted(self.documents)})")
        return unpack_document(self.documents[name])

    def to_records(
        self,
    ) -> tuple[dict[str, np.ndarray], dict[str, int | float], dict[str, str | int | list[str]]]:
        """Flatten into Flower-shaped records.

        Returns
        -------
        arrays : dict[str, numpy.ndarray]
            ``weights`` under ``"weights/"`` and ``arrays`` under ``"arrays/"``.
        metrics : dict[str, int | float]
            ``n_samples``, ``metrics`` under ``"metric/"`` and ``group_counts`` under ``"group/"``.
        config : dict[str, str | int | list[str]]
            ``site``, ``kind``, ``round``, ``local_keys`` and the documents under ``"doc/"``.
        """
        arrays = {WEIGHT_PREFIX + k: v for k, v in self.weights.items()}
        arrays.update({ARRAY_PREFIX + k: v for k, v in self.arrays.items()})
        metrics: dict[str, int | float] = {"n_samples": int(self.n_samples)}
        metrics.update({METRIC_PREFIX + k: float(v) for k, v in self.metrics.items()})
        metrics.update({GROUP_PREFIX + k: int(v) for k, v in self.group_counts.items()})
        config: dict[str, str | int | list[str]] = {
            "site": self.site,
            "kind": self.kind,
            "round": int(self.round),
            "local_keys": list(self.local_keys),
        }
        config.update({DOC_PREFIX + k: str(v) for k, v in self.documents.items()})
        return arrays, metrics, config

    @classmethod
    def from_records(
        cls,
        arrays: Mapping[str, np.ndarray],
        metrics: Mapping[str, int | float],
        config: Mapping[str, object],
    ) -> Reply:
        """Rebuild a reply from :meth:`to_records` output.

        Parameters
        ----------
        arrays, metrics, config
            The three flattened records.

        Returns
        -------
        Reply
            The reply.

        Raises
        ------
        ValueError
            If ``site``, ``kind``, ``round`` or ``n_samples`` is missing.
        """
        for key in ("site", "kind", "round"):
            if key not in config:
                raise ValueError(
                    f"reply config lacks {key!r}; it has {sorted(config)}; expected 'site', "
                    "'kind', 'round' and 'local_keys'"
                )
        if "n_samples" not in metrics:
            raise ValueError(f"reply metrics lack 'n_samples'; they have {sorted(metrics)}")
        local = config.get("local_keys", [])
        local_keys = [str(k) for k in local] if isinstance(local, list | tuple) else []
        round_value = config["round"]
        return cls(
            site=str(config["site"]),
            kind=str(config["kind"]),
            round=int(round_value) if isinstance(round_value, int | float | str) else -1,
            weights=_strip(arrays, WEIGHT_PREFIX),
            arrays=_strip(arrays, ARRAY_PREFIX),
            n_samples=int(metrics["n_samples"]),
            metrics={k: float(v) for k, v in _strip(metrics, METRIC_PREFIX).items()},
            group_counts={k: int(v) for k, v in _strip(metrics, GROUP_PREFIX).items()},
            local_keys=local_keys,
            documents={k: str(v) for k, v in _strip(config, DOC_PREFIX).items()},
        )


@dataclass(frozen=True)
class SiteFailure:
    """A reply that never came: the site raised, timed out, was unreachable or was rejected.

    Parameters
    ----------
    site : str
        The site's name.
    reason : str
        What went wrong, in words (exception type and message, or "timed out after 3.0 s").
    """

    site: str
    reason: str


class SiteRefused(RuntimeError):
    """A site declines a request under its policy (too few patients, a kind it does not answer).

    The message crosses the site boundary: build it from counts, thresholds and policy names
    only, never from patient data, file content or a log line.
    """


class SiteError(RuntimeError):
    """A site failed; what crosses the boundary names the exception type only."""


def boundary_reason(exc: BaseException) -> str:
    """What may cross the site boundary about a site's exception.

    A :class:`SiteRefused` or :class:`SiteError` message is made to cross (counts, thresholds,
    policy names, an exception type); any other exception may carry a patient id, a file's
    content or a log line, so only its type crosses and the rest stays in the site's log.

    Parameters
    ----------
    exc : BaseException

    Returns
    -------
    str
    """
    if isinstance(exc, SiteRefused | SiteError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__} at the site (details in the site's own log)"


class InvalidReply(ValueError):
    """A site's reply failed a check before aggregation.

    Parameters
    ----------
    site : str
        The offending site.
    reason : str
        What was wrong and what would have been accepted.
    """

    def __init__(self, site: str, reason: str) -> None:
        super().__init__(f"invalid reply from site {site!r}: {reason}")
        self.site = site
        self.reason = reason


def site_seed(seed: int, site: str, round: int) -> int:
    """Derive the seed a site uses in one round, the same in every process and engine.

    Uses SHA-256 (not Python's salted ``hash``), so an in-process site and a Flower SuperNode
    draw the same random numbers for the same (seed, site, round).

    Parameters
    ----------
    seed : int
        The run seed (``Request.config["seed"]``).
    site : str
        The site's name.
    round : int
        The request's round.

    Returns
    -------
    int
        A seed in ``[0, 2**63)``, e.g. for ``torch.Generator().manual_seed``.
    """
    digest = hashlib.sha256(f"{int(seed)}\x1f{site}\x1f{int(round)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _copy_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in arrays.items()}


def _strip(mapping: Mapping[str, T], prefix: str) -> dict[str, T]:
    """Return the entries whose key starts with ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in mapping.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- the two ends


@runtime_checkable
class Site(Protocol):
    """The site side: answers one request at a time.

    A site owns its data and its model code; the server sees it only through this method.
    It must set ``Reply.site`` to its own name, ``Reply.kind`` / ``Reply.round`` to the
    request's, and draw all randomness from
    ``messages.site_seed(request.config["seed"], site, request.round)``.
    """

    def handle(self, request: Request) -> Reply:
        """Answer ``request`` (train, evaluate, describe, ...).

        Parameters
        ----------
        request : Request
            What to do.

        Returns
        -------
        Reply
            The answer. Raising is allowed: the federation turns it into a SiteFailure.
        """
        ...


@runtime_checkable
class Federation(Protocol):
    """How the server reaches sites: in this process, over Flower's Grid, ..."""

    def sites(self) -> list[str]:
        """Return the names of the sites currently reachable, in any order.

        Returns
        -------
        list[str]
            Site names.
        """
        ...

    def broadcast(
        self, requests: Mapping[str, Request], timeout: float | None = None
    ) -> dict[str, Reply | SiteFailure]:
        """Send one request per site and gather the replies.

        Parameters
        ----------
        requests : Mapping[str, Request]
            Site name -> the request for that site.
        timeout : float or None
            Seconds to wait for each reply (None: wait as long as it takes).

        Returns
        -------
        dict[str, Reply | SiteFailure]
            One entry per requested site: its reply, or a SiteFailure naming why there is none
            (the site raised, timed out or is unknown). Never raises for a site's fault.
        """
        ...
#: Prefix of the evaluation a ``fit`` request carries (its config) and its reply carries back
#: (metrics, arrays, documents; ``n_samples`` as the metric ``evaluate.n_samples``).
CARRIED_PREFIX = "evaluate."
#: The carried evaluation's round, in the fit request's config.
_CARRIED_ROUND = CARRIED_PREFIX + "round"
#: The carried evaluation's sample count, in the fit reply's metrics.
_CARRIED_N = CARRIED_PREFIX + "n_samples"
#: Why the carried evaluation gave nothing (the site declined or failed), a fit reply document.
_CARRIED_FAILURE = CARRIED_PREFIX + "failure"


def carry_evaluation(fit: Request, evaluation: Request) -> Request:
    """A ``fit`` request that also asks the site to evaluate the weights it sends.

    Parameters
    ----------
    fit : Request
        The fit request.
    evaluation : Request
        An ``evaluate`` request of the same weights (its round may differ: the round whose
        global model they are).

    Returns
    -------
    Request
        ``fit`` with the evaluation's round and config under :data:`CARRIED_PREFIX`.

    Raises
    ------
    ValueError
        If the kinds are not fit and evaluate, or the evaluation carries other arrays.
    """
    if fit.kind is not Kind.FIT or evaluation.kind is not Kind.EVALUATE or evaluation.arrays:
        raise ValueError(f"carry_evaluation: expected a fit and an evaluate request without "
                         f"arrays, got {fit.kind.value} and {evaluation.kind.value}")
    config = {k: v for k, v in fit.config.items() if not k.startswith(CARRIED_PREFIX)}
    config.update({CARRIED_PREFIX + k: v for k, v in evaluation.config.items()})
    config[_CARRIED_ROUND] = int(evaluation.round)
    return replace(fit, config=config)


def split_carried(request: Request) -> tuple[Request, Request | None]:
    """Split a request into itself and the evaluation it carries (site side).

    Parameters
    ----------
    request : Request
        Any request.

    Returns
    -------
    tuple[Request, Request or None]
        The fit request without the carried keys and the ``evaluate`` request of its weights;
        ``(request, None)`` when it carries none.
    """
    if request.kind is not Kind.FIT or _CARRIED_ROUND not in request.config:
        return request, None
    own = {k: v for k, v in request.config.items() if not k.startswith(CARRIED_PREFIX)}
    carried = _strip(request.config, CARRIED_PREFIX)
    rnd = int(carried.pop("round"))
    return (replace(request, config=own),
            Request(Kind.EVALUATE, rnd, request.weights, dict(carried)))


def attach_evaluation(fit: Reply, evaluation: Reply | str) -> Reply:
    """The fit reply with the carried evaluation's reply (or why there is none) added.

    Parameters
    ----------
    fit : Reply
        The fit reply, as released.
    evaluation : Reply or str
        The evaluate reply, as released, or the reason it was declined or failed (words that
        may cross the site boundary).

    Returns
    -------
    Reply
        ``fit`` with ``evaluate.<name>`` metrics, arrays and documents and the metric
        ``evaluate.n_samples``, or the document ``evaluate.failure``.
    """
    if isinstance(evaluation, str):
        return replace(fit, documents={**fit.documents,
                                       _CARRIED_FAILURE: pack_document(evaluation)})
    p = CARRIED_PREFIX
    return replace(
        fit,
        metrics={**fit.metrics, _CARRIED_N: float(evaluation.n_samples),
                 **{p + k: v for k, v in evaluation.metrics.items()}},
        arrays={**fit.arrays, **{p + k: v for k, v in evaluation.arrays.items()}},
        documents={**fit.documents, **{p + k: v for k, v in evaluation.documents.items()}},
    )


def detach_evaluation(reply: Reply, round: int) -> tuple[Reply, Reply | str | None]:
    """Split a fit reply into itself and the evaluation it carries (server side).

    Parameters
    ----------
    reply : Reply
        A reply.
    round : int
        The round of the carried evaluation (the evaluate reply's round).

    Returns
    -------
    tuple[Reply, Reply or str or None]
        The fit reply without the carried fields, and the ``evaluate`` reply, the site's reason
        for giving none, or ``None`` when the reply carries no evaluation.
    """
    p = CARRIED_PREFIX
    fit = replace(reply,
                  metrics={k: v for k, v in reply.metrics.items() if not k.startswith(p)},
                  arrays={k: v for k, v in reply.arrays.items() if not k.startswith(p)},
                  documents={k: v for k, v in reply.documents.items() if not k.startswith(p)})
    if _CARRIED_FAILURE in reply.documents:
        try:
            reason = str(unpack_document(reply.documents[_CARRIED_FAILURE]))
        except ValueError:
            reason = "the carried evaluation failed (its reason is not a JSON document)"
        return fit, reason
    if _CARRIED_N not in reply.metrics:
        return fit, None
    metrics = _strip(reply.metrics, p)
    n = metrics.pop("n_samples")
    evaluation = Reply(site=reply.site, kind=Kind.EVALUATE, round=int(round),
                       n_samples=int(n) if float(n).is_integer() else -1, metrics=metrics,
                       arrays=_strip(reply.arrays, p), documents=_strip(reply.documents, p))
    return fit, evaluation

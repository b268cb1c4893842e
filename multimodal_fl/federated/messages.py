"""What crosses a site boundary: requests, replies, failures — plain numpy arrays and scalars.

Nothing in this module knows a modality, a file or torch. A :class:`Request` goes from the
server to one site; a :class:`Reply` comes back; a :class:`SiteFailure` stands in for a reply
that never came (the site raised, timed out or could not be reached).

The shapes map one to one onto Flower's records (see :meth:`Request.to_records` and
:meth:`Reply.to_records`): every array goes into an ``ArrayRecord``, every number into a
``MetricRecord``, every string / flag into a ``ConfigRecord``.

Request kinds used by :func:`multimodal_fl.federated.server.run_federated`:

``"info"``
    Before round 1. The site replies with ``n_samples`` = the size of its training set (the
    plausibility cap for later fit replies). A site that does not support it may raise; the
    server then applies no cap to it.
``"fit"``
    Train locally starting from ``weights``; reply with the new ``weights`` (a full state dict,
    buffers included, minus any FedBN ``local_keys``), ``n_samples``, ``group_counts`` and
    ``metrics`` (``"loss"`` is the training loss the server tabulates).
``"evaluate"``
    Evaluate ``weights``; reply with ``metrics`` (e.g. ``"val_auc"``) and ``n_samples``.

Other kinds (e.g. a PCA summary) may be used by other server loops; they carry their payload
in ``arrays`` / ``metrics``.

Config keys a fit request carries (all scalars): ``seed`` (int, the run seed: the site draws its
randomness from :func:`site_seed` of (seed, site, round)), ``proximal_mu`` (float, 0 unless
FedProx), ``fedbn`` (bool: keep normalisation layers local and list them in ``local_keys``),
plus whatever ``fit_config`` the run adds (e.g. ``local_steps``, ``lr``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

T = TypeVar("T")

__all__ = [
    "ARRAY_PREFIX",
    "CONFIG_PREFIX",
    "EVALUATE",
    "FIT",
    "GROUP_PREFIX",
    "INFO",
    "METRIC_PREFIX",
    "WEIGHT_PREFIX",
    "ConfigValue",
    "InvalidReply",
    "Reply",
    "Request",
    "SiteFailure",
    "StateDict",
    "site_seed",
]

#: A model state dict as numpy arrays, keyed by parameter / buffer name.
StateDict = dict[str, np.ndarray]
#: A value allowed in a request config (maps onto Flower's ConfigRecord).
ConfigValue = int | float | str | bool

FIT = "fit"
EVALUATE = "evaluate"
INFO = "info"

WEIGHT_PREFIX = "weights/"
ARRAY_PREFIX = "arrays/"
METRIC_PREFIX = "metric/"
GROUP_PREFIX = "group/"
CONFIG_PREFIX = "config/"


@dataclass
class Request:
    """A message from the server to one site.

    Parameters
    ----------
    kind : str
        What the site should do: ``"fit"``, ``"evaluate"``, ``"info"`` or another kind.
    round : int
        The federated round (1-based; 0 for ``"info"``).
    weights : dict[str, numpy.ndarray]
        The global state dict (may be empty for kinds that need none).
    config : dict[str, int | float | str | bool]
        Scalar settings for this request (see the module docstring for the keys).
    """

    kind: str
    round: int
    weights: StateDict = field(default_factory=dict)
    config: dict[str, ConfigValue] = field(default_factory=dict)

    def to_records(self) -> tuple[dict[str, np.ndarray], dict[str, ConfigValue]]:
        """Flatten into one array dict and one config dict (Flower's ArrayRecord / ConfigRecord).

        Returns
        -------
        arrays : dict[str, numpy.ndarray]
            ``weights`` with keys prefixed by ``"weights/"``.
        config : dict[str, int | float | str | bool]
            ``kind``, ``round`` and ``config`` entries prefixed by ``"config/"``.
        """
        arrays = {WEIGHT_PREFIX + k: v for k, v in self.weights.items()}
        config: dict[str, ConfigValue] = {"kind": self.kind, "round": int(self.round)}
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
            If ``kind`` or ``round`` is missing.
        """
        for key in ("kind", "round"):
            if key not in config:
                raise ValueError(
                    f"request config lacks {key!r}; it has {sorted(config)}; expected keys 'kind', "
                    f"'round' and '{CONFIG_PREFIX}<name>' entries"
                )
        return cls(
            kind=str(config["kind"]),
            round=int(config["round"]),
            weights=_strip(arrays, WEIGHT_PREFIX),
            config=_strip(config, CONFIG_PREFIX),
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
            ``site``, ``kind``, ``round`` and ``local_keys``.
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


def _strip(mapping: Mapping[str, T], prefix: str) -> dict[str, T]:
    """Return the entries whose key starts with ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in mapping.items() if k.startswith(prefix)}

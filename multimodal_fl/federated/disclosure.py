"""The egress gate: every reply passes the site's disclosure policy before it leaves the site.

A :class:`DisclosureGate` stands between a site's request handlers and the wire. The site's one
dispatch method (:meth:`multimodal_fl.federated.site.FusionSite.handle`) calls
:meth:`DisclosureGate.release` with the handler for the request's kind, so no handler can
forget the gate, on either engine. The gate:

1. refuses request kinds the hospital's :class:`~multimodal_fl.config.SitePolicy` does not
   answer;
2. writes the effective small-cell threshold into ``request.config["min_cell"]`` (the largest of
   the package floor, the site policy, the experiment config and the request: stricter, never
   looser), so every handler computes its aggregates with it;
3. runs the handler; a failure leaves the site as :class:`SiteRefused` (its message is made
   from counts and policy names only) or as a scrubbed :class:`SiteError` that names the
   exception type and nothing else (the traceback stays in the site's log);
4. applies the rule of the reply's kind (:data:`RULES`) and records the released message in the
   site's egress log (``sites/<site>/egress.jsonl``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multimodal_fl.config import SitePolicy
from multimodal_fl.federated.protocol import Doc, Kind, Reply, Request, unpack_document

__all__ = [
    "COUNT_KEYS",
    "COUNT_MAPS",
    "EGRESS_LOG",
    "RULES",
    "DisclosureGate",
    "Released",
    "SiteError",
    "SiteRefused",
    "small_cells",
]

log = logging.getLogger(__name__)

#: The egress log's file name inside the site's folder.
EGRESS_LOG = "egress.jsonl"


class SiteRefused(RuntimeError):
    """A site declines a request under its policy (too few patients, a kind it does not answer).

    The message crosses the site boundary: build it from counts, thresholds and policy names
    only, never from patient data, file content or a log line.
    """


class SiteError(RuntimeError):
    """A site's handler failed; what crosses the boundary names the exception type only."""


@dataclass
class Released:
    """What a rule lets leave: the reply and what it suppressed.

    Parameters
    ----------
    reply : Reply
        The reply as it leaves the site.
    suppressed : list of str
        One entry per suppressed figure or group, in words (for the egress log).
    """

    reply: Reply
    suppressed: list[str] = field(default_factory=list)


#: A kind's rule: (reply, effective min_cell, policy) -> what leaves.
Rule = Callable[[Reply, int, SitePolicy], Released]


def _pass(reply: Reply, min_cell: int, policy: SitePolicy) -> Released:
    return Released(reply)


#: Document keys whose integer values count patients (``n_boot``, ``n_bins``... do not).
COUNT_KEYS = frozenset({"n", "n_pos", "n_neg", "n_patients", "n_positive", "n_test", "count",
                        "dropped", "image_errors"})
#: Document keys whose values are mappings of counts (``{"image": 58, ...}``).
COUNT_MAPS = frozenset({"modality_counts"})


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def small_cells(doc: Any, min_cell: int, path: str = "") -> list[str]:
    """Where a document counts patients in ``(0, min_cell)``: one path per such count.

    Parameters
    ----------
    doc : Any
        An unpacked JSON document.
    min_cell : int
    path : str
        The document's own path (prefixes the result).

    Returns
    -------
    list of str
        Paths such as ``"site_metrics/metrics/val/auc/n"`` (names only, no number).
    """
    found: list[str] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            where = f"{path}/{key}"
            if key in COUNT_KEYS and _count(value) and 0 < value < min_cell:
                found.append(where)
            elif key in COUNT_MAPS and isinstance(value, dict):
                found += [f"{where}/{k}" for k, v in value.items()
                          if _count(v) and 0 < v < min_cell]
            else:
                found += small_cells(value, min_cell, where)
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += small_cells(value, min_cell, f"{path}/{i}")
    return found


def _predict_rule(reply: Reply, min_cell: int, policy: SitePolicy) -> Released:
    """The backstop of ``predict`` replies: no count, and no figure, on fewer than min_cell.

    Walks every document for patient counts in ``(0, min_cell)`` and checks that every per-split
    number in ``metrics`` (``"<split>/<metric>[/lo|/hi]"``) belongs to a split whose
    ``site_metrics`` document shows at least ``min_cell`` patients; any breach withholds the
    whole reply (the handler should have suppressed it: this only catches a forgotten path).
    """
    breaches: list[str] = []
    docs: dict[str, Any] = {}
    for name, text in reply.documents.items():
        docs[name] = unpack_document(text)
        breaches += small_cells(docs[name], min_cell, name)
    splits = (docs.get(Doc.SITE_METRICS) or {}).get("metrics") or {}
    for key in reply.metrics:
        split, _, rest = key.partition("/")
        n = ((splits.get(split) or {}).get(rest.split("/")[0]) or {}).get("n")
        if not (isinstance(n, int) and n >= min_cell):
            breaches.append(f"metrics/{key}")
    if breaches:
        raise SiteRefused(f"site {reply.site}: predict reply withheld: a figure on fewer than "
                          f"{min_cell} patients at {', '.join(sorted(breaches)[:5])}")
    return Released(reply)


#: The rule applied to each kind's reply before it leaves the site.
RULES: dict[Kind, Rule] = {kind: _pass for kind in Kind}
RULES[Kind.PREDICT] = _predict_rule


def _size(reply: Reply) -> int:
    """Bytes of numbers and documents the reply carries (weights and arrays at their size)."""
    arrays = sum(int(a.nbytes) for a in (*reply.weights.values(), *reply.arrays.values()))
    return arrays + 8 * (len(reply.metrics) + len(reply.group_counts) + 1) + sum(
        len(d) for d in reply.documents.values())


class DisclosureGate:
    """The one egress path of a site (see the module docstring).

    Parameters
    ----------
    site : str
        The site's name.
    policy : SitePolicy
        The hospital's policy.
    config_min_cell : int or None
        The experiment config's ``evaluation.min_cell``.
    egress_log : path-like or None
        The site's egress log file (``None``: nothing is written).
    rules : mapping of Kind to rule, optional
        The rule per kind (default :data:`RULES`).
    """

    def __init__(self, site: str, policy: SitePolicy, *, config_min_cell: int | None = None,
                 egress_log: str | Path | None = None,
                 rules: Mapping[Kind, Rule] | None = None) -> None:
        self.site = site
        self.policy = policy
        self.config_min_cell = config_min_cell
        self.egress_log = Path(egress_log) if egress_log is not None else None
        self.rules = dict(RULES if rules is None else rules)

    def min_cell(self, request: Request) -> int:
        """The effective small-cell threshold for one request.

        Parameters
        ----------
        request : Request

        Returns
        -------
        int
        """
        asked = request.config.get("min_cell")
        return self.policy.effective_min_cell(
            self.config_min_cell, int(asked) if asked is not None else None)

    def release(self, request: Request, handler: Callable[[Request], Reply]) -> Reply:
        """Answer ``request`` with ``handler`` and let out only what the policy allows.

        Parameters
        ----------
        request : Request
        handler : callable
            The site's handler for the request's kind.

        Returns
        -------
        Reply
            The reply as it leaves the site.

        Raises
        ------
        SiteRefused
            The policy declines the request (the message is safe to send).
        SiteError
            The handler failed (the message names the exception type only).
        """
        allowed = self.policy.answers
        if allowed is not None and request.kind.value not in allowed:
            self._refuse(request, f"site policy does not answer {request.kind.value!r} requests")
        min_cell = self.min_cell(request)
        request.config["min_cell"] = min_cell
        try:
            reply = handler(request)
        except SiteRefused as exc:
            self._record(request, min_cell, refused=str(exc))
            raise
        except Exception as exc:
            log.exception("site %s: %s request of round %d failed", self.site,
                          request.kind.value, request.round)
            self._record(request, min_cell, failed=type(exc).__name__)
            raise SiteError(f"{type(exc).__name__} while answering {request.kind.value!r} "
                            "(details in the site's own log)") from None
        try:
            released = self.rules.get(request.kind, _pass)(reply, min_cell, self.policy)
        except SiteRefused as exc:  # a rule's backstop withholds the whole reply
            self._record(request, min_cell, refused=str(exc))
            raise
        self._record(request, min_cell, released=released)
        return released.reply

    def _refuse(self, request: Request, reason: str) -> None:
        self._record(request, self.min_cell(request), refused=reason)
        raise SiteRefused(f"site {self.site}: {reason}")

    def _record(self, request: Request, min_cell: int, *, released: Released | None = None,
                refused: str | None = None, failed: str | None = None) -> None:
        """Append one line to the egress log."""
        if self.egress_log is None:
            return
        entry: dict[str, Any] = {
            "time": time.time(), "site": self.site, "kind": request.kind.value,
            "round": request.round, "min_cell": min_cell,
            "policy": self.policy.model_dump(),
        }
        if released is not None:
            r = released.reply
            entry.update(released=True, bytes=_size(r), n_samples=r.n_samples,
                         weights=len(r.weights), arrays=sorted(r.arrays),
                         metrics=sorted(r.metrics), documents=sorted(r.documents),
                         suppressed=released.suppressed)
        else:
            entry.update(released=False, refused=refused, failed=failed)
        self.egress_log.parent.mkdir(parents=True, exist_ok=True)
        with self.egress_log.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")

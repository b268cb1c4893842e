"""The wire of the Flower engine: requests and replies <-> Flower records.

A :class:`~multimodal_fl.federated.protocol.Request` travels as a Flower ``RecordDict`` with an
``ArrayRecord`` ``"arrays"`` (the weights) and a ``ConfigRecord`` ``"config"`` (kind, round,
config); a :class:`~multimodal_fl.federated.protocol.Reply` adds a ``MetricRecord``
``"metrics"``. The layout inside the records is ``Request.to_records`` / ``Reply.to_records``
(:mod:`multimodal_fl.federated.protocol`); this module only puts them into Flower's types and
back, and picks the Flower message type of a request kind (:func:`message_type`).

:data:`DESCRIBE` and :data:`RELEASE` are the request kinds the Flower engine adds: the discovery
query that asks a SuperNode for its site name (see :class:`~.federation.FlowerFederation`), and
the end of a run, when a SuperNode stops the run's site worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.app import MessageType as _MessageType

from multimodal_fl.federated.protocol import ConfigValue, Kind, Reply, Request

__all__ = [
    "DESCRIBE",
    "RELEASE",
    "array_record",
    "content_to_reply",
    "content_to_request",
    "message_type",
    "record_arrays",
    "reply_to_content",
    "request_to_content",
]

#: Request kind of the discovery query: the ClientApp answers with its site name, no site built.
DESCRIBE = Kind.DESCRIBE
#: Request kind sent to every node when a run ends: its ClientApp stops the run's site worker
#: (``site-worker``), which would otherwise idle for ``site-worker-idle`` seconds.
RELEASE = Kind.RELEASE

_ARRAYS = "arrays"
_CONFIG = "config"
_METRICS = "metrics"


def array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Put named arrays into a Flower ``ArrayRecord``, exactly.

    Parameters
    ----------
    arrays : Mapping[str, numpy.ndarray]
        Name -> array.

    Returns
    -------
    ArrayRecord
        One ``Array`` per name; ``Array(ndarray)`` serialises with ``np.save``, so dtype, shape
        (0-d included) and bytes are kept exactly.
    """
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Take the named arrays back out of an ``ArrayRecord`` (the inverse of :func:`array_record`).

    Parameters
    ----------
    record : ArrayRecord
        The record.

    Returns
    -------
    dict[str, numpy.ndarray]
        Name -> array.
    """
    return {k: v.numpy() for k, v in record.items()}


def request_to_content(request: Request) -> RecordDict:
    """Put a request into a Flower ``RecordDict``.

    Parameters
    ----------
    request : Request
        The request.

    Returns
    -------
    RecordDict
        ``"arrays"``: an ``ArrayRecord`` of the weights; ``"config"``: a ``ConfigRecord`` of
        kind, round and config (see ``Request.to_records``).
    """
    arrays, config = request.to_records()
    return RecordDict({_ARRAYS: array_record(arrays), _CONFIG: ConfigRecord(dict(config))})


def content_to_request(content: RecordDict) -> Request:
    """Rebuild a request from :func:`request_to_content` output.

    Parameters
    ----------
    content : RecordDict
        A message's content.

    Returns
    -------
    Request
        The request.

    Raises
    ------
    ValueError
        If the content lacks the ``"config"`` record or the request keys.
    """
    if _CONFIG not in content.config_records:
        raise ValueError(
            f"message content has no {_CONFIG!r} ConfigRecord (it has "
            f"{sorted(content.keys())}); expected one written by request_to_content"
        )
    arrays = content.array_records.get(_ARRAYS)
    config = cast(Mapping[str, ConfigValue], dict(content.config_records[_CONFIG]))
    return Request.from_records(record_arrays(arrays) if arrays is not None else {}, config)


def reply_to_content(reply: Reply) -> RecordDict:
    """Put a reply into a Flower ``RecordDict``.

    Parameters
    ----------
    reply : Reply
        The reply.

    Returns
    -------
    RecordDict
        ``"arrays"`` (``ArrayRecord``), ``"metrics"`` (``MetricRecord``) and ``"config"``
        (``ConfigRecord``), as ``Reply.to_records`` lays them out.
    """
    arrays, metrics, config = reply.to_records()
    return RecordDict(
        {
            _ARRAYS: array_record(arrays),
            _METRICS: MetricRecord(dict(metrics)),
            _CONFIG: ConfigRecord(cast(dict[str, Any], dict(config))),
        }
    )


def content_to_reply(content: RecordDict) -> Reply:
    """Rebuild a reply from :func:`reply_to_content` output.

    Parameters
    ----------
    content : RecordDict
        A reply message's content.

    Returns
    -------
    Reply
        The reply.

    Raises
    ------
    ValueError
        If a record or a required key is missing.
    """
    missing = [
        name
        for name, records in (
            (_METRICS, content.metric_records),
            (_CONFIG, content.config_records),
        )
        if name not in records
    ]
    if missing:
        raise ValueError(
            f"reply content lacks record(s) {missing} (it has {sorted(content.keys())}); "
            "expected 'arrays', 'metrics' and 'config' as reply_to_content writes them"
        )
    arrays = content.array_records.get(_ARRAYS)
    return Reply.from_records(
        record_arrays(arrays) if arrays is not None else {},
        cast(Mapping[str, int | float], dict(content.metric_records[_METRICS])),
        dict(content.config_records[_CONFIG]),
    )


def message_type(kind: str) -> str:
    """The Flower message type a request of ``kind`` travels as.

    Parameters
    ----------
    kind : str
        The request kind.

    Returns
    -------
    str
        ``train`` for fit and local_train requests, ``evaluate`` for evaluate and
        cross_evaluate requests, ``query`` for every other kind (info, describe, summaries...:
        the kind itself travels in the config).
    """
    if kind in (Kind.FIT, Kind.LOCAL_TRAIN):
        return _MessageType.TRAIN
    if kind in (Kind.EVALUATE, Kind.CROSS_EVALUATE):
        return _MessageType.EVALUATE
    return _MessageType.QUERY  # info, describe, summaries...: the kind travels in the config

"""Federated learning that knows no modality: the wire, the server loop, aggregation, PCA math.

``protocol`` (the wire), ``server`` (the one server loop against the ``Federation``
protocol), ``aggregation`` (pure functions on state dicts), ``pca`` (:class:`FederatedPCA`),
``gather`` (one stage's replies), ``checkpoint``, ``proximal``; the transports ``inprocess``
and ``flower/``; and ``site`` (the one adapter between training and the wire).
"""

__all__: list[str] = []

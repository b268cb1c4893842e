"""Federated PCA as a pipeline stage and as an analysis (``mmfl pca``).

``site`` (a site's rows, projecting them, the score summary; below the federated site),
``stage`` (the experiment's PCA stage, shared by every engine) and ``analysis``
(``mmfl pca``). The math of the summaries and their merge is
:mod:`multimodal_fl.federated.pca` (:class:`~multimodal_fl.federated.pca.FederatedPCA`).
"""

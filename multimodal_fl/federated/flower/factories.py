"""``"module:callable"`` references: how a run config names its server job and its site.

The run config of a Flower run names two factories as strings (``server-factory``,
``site-factory``); the ServerApp, the ClientApp and the site worker import them by name with
:func:`load_object`. Names that moved keep working: :data:`LEGACY_FACTORIES` maps each old
reference onto its new one, as strings (this module imports no factory).

This module imports neither Flower nor the rest of :mod:`multimodal_fl.federated.flower`, so
that the site worker (:mod:`.worker`) and the apps (:mod:`.apps`) share it without importing
each other.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the server loop is no part of a ClientApp process (one per message)
    from multimodal_fl.federated.server import Site

__all__ = ["LEGACY_FACTORIES", "SiteFactory", "load_object"]

log = logging.getLogger(__name__)

#: A site factory: ``f(site_name, site_dir, run_config) -> Site``.
SiteFactory = Callable[[str, Path, Mapping[str, Any]], "Site"]

#: Old factory reference -> the reference it moved to. The experiment's and the PCA analysis's
#: factories lived in ``multimodal_fl.federated.flower_app`` until they moved to
#: ``multimodal_fl.engines.flower_jobs`` (a transport imports no engine); run configs, scripts
#: and Flower App directories written with the old names still run. Strings only: a key is
#: replaced by its value before anything is imported.
LEGACY_FACTORIES: Mapping[str, str] = {
    f"multimodal_fl.federated.flower_app:{name}": f"multimodal_fl.engines.flower_jobs:{name}"
    for name in ("experiment_job", "experiment_site", "pca_analysis_job", "pca_analysis_site")
}


def load_object(ref: str, what: str) -> Any:
    """Import the object a ``"module:attribute"`` reference names.

    Parameters
    ----------
    ref : str
        E.g. ``"multimodal_fl.engines.flower_jobs:experiment_site"``; an old name in
        :data:`LEGACY_FACTORIES` stands for its new one.
    what : str
        The run-config key it came from (for the error message).

    Returns
    -------
    Any
        The object.

    Raises
    ------
    ValueError
        If ``ref`` is malformed, the module cannot be imported or has no such attribute.
    """
    target = LEGACY_FACTORIES.get(str(ref), str(ref))
    if target != str(ref):
        log.info("%s %r is the old name of %r", what, ref, target)
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(
            f"run config {what}={ref!r}: expected 'package.module:callable', e.g. "
            "'multimodal_fl.engines.flower_jobs:experiment_site'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"run config {what}={ref!r}: cannot import {module_name!r} ({exc}); the module must "
            "be importable in the SuperLink's / SuperNode's Python environment"
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"run config {what}={ref!r}: {module_name!r} has no attribute {attr!r}"
            )
        obj = getattr(obj, part)
    return obj

"""The Flower engine: the package's one server loop over Flower 1.42's ``Grid`` (Message API).

A transport, no FL logic of its own and no engine: it carries
:class:`~multimodal_fl.federated.protocol.Request` and
:class:`~multimodal_fl.federated.protocol.Reply` between
:func:`~multimodal_fl.federated.server.run_federated` (or any other server program) and the
sites. Modules, each importing only those above it:

* :mod:`.codec`: requests and replies <-> Flower ``RecordDict`` (arrays in an ``ArrayRecord``,
  numbers in a ``MetricRecord``, the rest in a ``ConfigRecord``); Flower message types;
  the discovery kind :data:`DESCRIBE`.
* :mod:`.federation`: :class:`FlowerFederation`, a ``Federation`` over a Flower ``Grid``, one
  site per SuperNode, sites named by their nodes' answers.
* :mod:`.factories`: :func:`load_object` for the run config's ``"module:callable"`` factories,
  with the old names that still resolve (:data:`LEGACY_FACTORIES`).
* :mod:`.worker`: the optional long-lived site process per (run, SuperNode).
* :mod:`.client`: :data:`client_app`, the forwarding ClientApp (lean: imported per message),
  its run-config keys and the per-message timing lines.
* :mod:`.apps`: :data:`server_app` (``multimodal_fl.federated.flower:server_app``; with
  ``multimodal_fl.federated.flower.client:client_app`` the components of every app
  :func:`write_app_dir` writes), :class:`ServerJob`, :class:`FlowerResult`.
* :mod:`.credentials`: TLS certificates for the SuperLink and SuperNode key pairs
  (:func:`make_certificates`, :func:`make_site_keys`), made with ``cryptography``.
* :mod:`.deploy`: Flower's command lines, :class:`LoopbackDeployment` and :func:`run_loopback`
  (a SuperLink and SuperNodes as local processes on 127.0.0.1, optionally with TLS and
  registered SuperNodes).

The names below load their module on first use (:func:`__getattr__`): Flower starts a
``flwr-clientapp`` process for every message, and the ClientApp (:mod:`.client`) must not pay
for the server side, the credentials or the deployment helpers.

The server jobs and sites of an experiment and of the PCA analysis are engines, not transport:
:mod:`multimodal_fl.engines.flower_jobs`. ``docs/deployment.md`` gives the commands.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names, for type checkers; at run time they load on first use
    from multimodal_fl.federated.flower.apps import (
        DEFAULT_RUN_CONFIG,
        NODE_CONFIG_PREFIX,
        NODE_SITE_DIR,
        NODE_SITE_NAME,
        SITE_STATE_KEY,
        FlowerResult,
        ServerJob,
        client_app,
        client_evaluate,
        client_query,
        client_train,
        load_result,
        server_app,
        server_main,
        write_app_dir,
    )
    from multimodal_fl.federated.flower.client import FLOWER_RUN_ID
    from multimodal_fl.federated.flower.codec import (
        DESCRIBE,
        content_to_reply,
        content_to_request,
        reply_to_content,
        request_to_content,
    )
    from multimodal_fl.federated.flower.credentials import (
        CredentialsError,
        SiteKeys,
        TlsFiles,
        is_loopback,
        make_certificates,
        make_site_keys,
        registration_steps,
        split_address,
    )
    from multimodal_fl.federated.flower.deploy import (
        QUIET_ENV,
        FlowerRunError,
        LoopbackDeployment,
        flower_env,
        flower_exe,
        flwr_run_command,
        free_port,
        run_loopback,
        run_status,
        submit_run,
        superlink_command,
        supernode_command,
    )
    from multimodal_fl.federated.flower.factories import LEGACY_FACTORIES, SiteFactory, load_object
    from multimodal_fl.federated.flower.federation import FlowerFederation

#: Public name -> the module that defines it.
_WHERE: dict[str, str] = {
    "CredentialsError": "multimodal_fl.federated.flower.credentials",
    "DEFAULT_RUN_CONFIG": "multimodal_fl.federated.flower.client",
    "FLOWER_RUN_ID": "multimodal_fl.federated.flower.client",
    "DESCRIBE": "multimodal_fl.federated.flower.codec",
    "FlowerFederation": "multimodal_fl.federated.flower.federation",
    "FlowerResult": "multimodal_fl.federated.flower.apps",
    "FlowerRunError": "multimodal_fl.federated.flower.deploy",
    "LEGACY_FACTORIES": "multimodal_fl.federated.flower.factories",
    "LoopbackDeployment": "multimodal_fl.federated.flower.deploy",
    "NODE_CONFIG_PREFIX": "multimodal_fl.federated.flower.client",
    "NODE_SITE_DIR": "multimodal_fl.federated.flower.client",
    "NODE_SITE_NAME": "multimodal_fl.federated.flower.client",
    "QUIET_ENV": "multimodal_fl.federated.flower.deploy",
    "SITE_STATE_KEY": "multimodal_fl.federated.flower.client",
    "ServerJob": "multimodal_fl.federated.flower.apps",
    "SiteFactory": "multimodal_fl.federated.flower.factories",
    "SiteKeys": "multimodal_fl.federated.flower.credentials",
    "TlsFiles": "multimodal_fl.federated.flower.credentials",
    "client_app": "multimodal_fl.federated.flower.client",
    "client_evaluate": "multimodal_fl.federated.flower.client",
    "client_query": "multimodal_fl.federated.flower.client",
    "client_train": "multimodal_fl.federated.flower.client",
    "content_to_reply": "multimodal_fl.federated.flower.codec",
    "content_to_request": "multimodal_fl.federated.flower.codec",
    "flower_env": "multimodal_fl.federated.flower.deploy",
    "flower_exe": "multimodal_fl.federated.flower.deploy",
    "flwr_run_command": "multimodal_fl.federated.flower.deploy",
    "free_port": "multimodal_fl.federated.flower.deploy",
    "is_loopback": "multimodal_fl.federated.flower.credentials",
    "load_object": "multimodal_fl.federated.flower.factories",
    "load_result": "multimodal_fl.federated.flower.apps",
    "make_certificates": "multimodal_fl.federated.flower.credentials",
    "make_site_keys": "multimodal_fl.federated.flower.credentials",
    "registration_steps": "multimodal_fl.federated.flower.credentials",
    "reply_to_content": "multimodal_fl.federated.flower.codec",
    "request_to_content": "multimodal_fl.federated.flower.codec",
    "run_loopback": "multimodal_fl.federated.flower.deploy",
    "run_status": "multimodal_fl.federated.flower.deploy",
    "submit_run": "multimodal_fl.federated.flower.deploy",
    "server_app": "multimodal_fl.federated.flower.apps",
    "server_main": "multimodal_fl.federated.flower.apps",
    "split_address": "multimodal_fl.federated.flower.credentials",
    "superlink_command": "multimodal_fl.federated.flower.deploy",
    "supernode_command": "multimodal_fl.federated.flower.deploy",
    "write_app_dir": "multimodal_fl.federated.flower.apps",
}


def __getattr__(name: str) -> Any:
    """Load the module of a public name on first use (PEP 562).

    Parameters
    ----------
    name : str
        An attribute of this package.

    Returns
    -------
    Any
        The object.

    Raises
    ------
    AttributeError
        For a name this package does not export.
    """
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_RUN_CONFIG",
    "DESCRIBE",
    "FLOWER_RUN_ID",
    "LEGACY_FACTORIES",
    "NODE_CONFIG_PREFIX",
    "NODE_SITE_DIR",
    "NODE_SITE_NAME",
    "QUIET_ENV",
    "SITE_STATE_KEY",
    "CredentialsError",
    "FlowerFederation",
    "FlowerResult",
    "FlowerRunError",
    "LoopbackDeployment",
    "ServerJob",
    "SiteFactory",
    "SiteKeys",
    "TlsFiles",
    "client_app",
    "client_evaluate",
    "client_query",
    "client_train",
    "content_to_reply",
    "content_to_request",
    "flower_env",
    "flower_exe",
    "flwr_run_command",
    "free_port",
    "is_loopback",
    "load_object",
    "load_result",
    "make_certificates",
    "make_site_keys",
    "registration_steps",
    "reply_to_content",
    "request_to_content",
    "run_loopback",
    "run_status",
    "server_app",
    "server_main",
    "split_address",
    "submit_run",
    "superlink_command",
    "supernode_command",
    "write_app_dir",
]

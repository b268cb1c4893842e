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
* :mod:`.apps`: :data:`server_app` and :data:`client_app` (this package's
  ``multimodal_fl.federated.flower:server_app`` / ``:client_app``, the components of every app
  :func:`write_app_dir` writes), :class:`ServerJob`, :class:`FlowerResult`.
* :mod:`.credentials`: TLS certificates for the SuperLink and SuperNode key pairs
  (:func:`make_certificates`, :func:`make_site_keys`), made with ``cryptography``.
* :mod:`.deploy`: Flower's command lines, :class:`LoopbackDeployment` and :func:`run_loopback`
  (a SuperLink and SuperNodes as local processes on 127.0.0.1, optionally with TLS and
  registered SuperNodes).

The server jobs and sites of an experiment and of the PCA analysis are engines, not transport:
:mod:`multimodal_fl.engines.flower_jobs`. ``docs/deployment.md`` gives the commands.
"""

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
    superlink_command,
    supernode_command,
)
from multimodal_fl.federated.flower.factories import LEGACY_FACTORIES, SiteFactory, load_object
from multimodal_fl.federated.flower.federation import FlowerFederation

__all__ = [
    "DEFAULT_RUN_CONFIG",
    "DESCRIBE",
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
    "server_app",
    "server_main",
    "split_address",
    "superlink_command",
    "supernode_command",
    "write_app_dir",
]

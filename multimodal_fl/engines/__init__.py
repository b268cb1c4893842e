"""Engines: how an experiment is run (federated in-process or on Flower, local-only,
centralized).

:func:`run` is the one entry point, for the CLI and for Python alike; :data:`ENGINES` lists the
engines (``federated`` the in-process federated experiment, ``baselines`` local-only and
centralized, ``flower_jobs`` the Flower job and site factories, ``tracking`` per-round logging).
"""

from multimodal_fl.engines.registry import ENGINES, Engine, EngineOptionError, RunOptions, run

__all__ = ["ENGINES", "Engine", "EngineOptionError", "RunOptions", "run"]

"""Engines: how an experiment is run (federated in-process or on Flower, local-only,
centralized)."""

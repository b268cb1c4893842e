"""Session fixtures shared across test folders: the tiny generated cohort and a tiny BERT."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# Site workers of this test session listen in a folder of its own (short: a Unix socket path):
# two sessions on one machine (fake run ids alike) never answer each other's requests.
os.environ.setdefault("MMFL_WORKER_DIR", tempfile.mkdtemp(prefix="mmfl-w-"))


@pytest.fixture(scope="session")
def tiny_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generator's ``tiny`` profile (2-3 sites of ~20 patients per task), made once."""
    from multimodal_fl.sample_data import generate

    root = tmp_path_factory.mktemp("tiny_sample")
    generate(root, seed=0, profile="tiny")
    return root


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT + tokenizer folder (never the network)."""
    from tests.encoders.conftest import make_tiny_text_model

    return make_tiny_text_model(tmp_path_factory.mktemp("tiny_bert_shared"))


def write_tiny_config(
    folder: Path, tiny_sample: Path, tiny_bert: Path, task: str = "covid_oxygen",
    **updates: object,
) -> Path:
    """Write an experiment YAML over the tiny cohort of one task into ``folder``.

    Keyword arguments update sections (``federated={"rounds": 3}``) or set top-level keys.
    """
    sites = sorted(p.name for p in (tiny_sample / task).iterdir() if p.is_dir())
    image = (
        {"encoder": "smallcnn", "spatial_dims": 2, "size": 32, "embed_dim": 8}
        if task == "covid_oxygen"
        else {"encoder": "tinycnn", "spatial_dims": 3, "size": 16, "embed_dim": 8}
    )
    data: dict[str, object] = {
        "task": "covid_oxygen_24h" if task == "covid_oxygen" else "alzheimers",
        "sites": [{"name": s, "path": str(tiny_sample / task / s)} for s in sites],
        "data": {"cache_dir": str(folder / "cache")},
        "modalities": {
            "image": image,
            "tabular": {"hidden": [8], "embed_dim": 8},
            "text": {"encoder": "local", "model_path": str(tiny_bert)},
        },
        "fusion": {"kind": "concat", "dim": 8},
        "training": {"steps": 6, "batch_size": 8, "eval_every": 3, "num_threads": 1},
        "federated": {"rounds": 2, "local_steps": 3, "min_sites": 1},
        "evaluation": {"n_boot": 20},
        "seed": 0,
    }
    for key, value in updates.items():
        section = data.setdefault(key, {})
        if isinstance(section, dict) and isinstance(value, dict):
            section.update(value)
        else:
            data[key] = value
    path = folder / f"{task}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def tiny_config(
    tiny_sample: Path, tiny_bert: Path, tmp_path: Path
) -> Callable[..., Path]:
    """Write an experiment YAML over the tiny cohort of one task; keyword args update it."""

    def make(task: str = "covid_oxygen", **updates: object) -> Path:
        return write_tiny_config(tmp_path, tiny_sample, tiny_bert, task, **updates)

    return make

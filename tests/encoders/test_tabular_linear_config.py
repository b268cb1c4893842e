"""modalities.tabular.linear_path: config round trip, the model it builds, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from multimodal_fl.config import ExperimentConfig, load_config
from multimodal_fl.training import CohortDataset, build_model, load_weights


def _yaml(tmp: Path, **tabular: object) -> Path:
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(
        {"task": "alzheimers", "sites": [{"name": "a", "path": "site_a"}],
         "modalities": {"image": {"enabled": False}, "text": {"enabled": False},
                        "tabular": {"hidden": [8], "embed_dim": 4, **tabular}},
         "fusion": {"dim": 8}}))
    return path


def _cfg(tmp: Path, **tabular: object) -> ExperimentConfig:
    return load_config(_yaml(tmp, **tabular))


def _data() -> CohortDataset:
    x = torch.randn(6, 3)
    return CohortDataset([f"p{i}" for i in range(6)], [0, 1] * 3, {"tabular": x},
                         torch.ones(6, 1, dtype=torch.bool), ("tabular",))


def test_config_round_trip_and_default(tmp_path: Path) -> None:
    # the default, chosen on the sample cohorts and Mexico (docs/benchmarks.md)
    assert _cfg(tmp_path).modalities.tabular.linear_path is True
    cfg = load_config(_yaml(tmp_path, linear_path=False))
    assert cfg.modalities.tabular.linear_path is False
    again = ExperimentConfig.model_validate(cfg.model_dump(mode="json"))
    assert again.modalities.tabular.linear_path is False
    assert load_config(_yaml(tmp_path), ["modalities.tabular.linear_path=false"]
                       ).modalities.tabular.linear_path is False


def test_an_old_checkpoint_loads_as_a_zero_path_and_a_new_one_says_what_to_set(
        tmp_path: Path) -> None:
    old = build_model(_cfg(tmp_path, linear_path=False), _data())
    wide = build_model(_cfg(tmp_path, linear_path=True), _data())
    assert {"encoders.tabular.linear.weight", "encoders.tabular.linear.bias"} <= set(
        wide.state_dict()) and not any("linear." in k for k in old.state_dict()
                                       if k.startswith("encoders.tabular."))
    load_weights(build_model(_cfg(tmp_path, linear_path=False), _data()), old.state_dict())
    with torch.no_grad():
        wide.encoders.tabular.linear.weight.fill_(1.0)  # type: ignore[union-attr]
    load_weights(wide, old.state_dict())  # an old checkpoint: the path at zero
    assert not wide.encoders.tabular.linear.weight.any()  # type: ignore[union-attr]
    data = _data()
    old.eval()
    wide.eval()
    with torch.no_grad():
        assert torch.equal(old(data.inputs, data.mask), wide(data.inputs, data.mask))
    with pytest.raises(ValueError, match="linear_path to true"):
        load_weights(old, wide.state_dict())

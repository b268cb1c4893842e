"""modalities.tabular.linear_path and linear_lr_scale: config, model, optimiser, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from multimodal_fl.config import ConfigError, ExperimentConfig, load_config
from multimodal_fl.training import (
    CohortDataset,
    build_model,
    fit_tabular_standardizer,
    load_weights,
    local_update,
    train,
)
from multimodal_fl.training.privacy import DPSGD, make_private_compatible


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


def test_linear_lr_scale_round_trip_default_and_bad_values(tmp_path: Path) -> None:
    # 10 by default (docs/benchmarks.md, "Tabular linear path"); 1 is the path as first built
    assert _cfg(tmp_path).modalities.tabular.linear_lr_scale == 10.0
    cfg = load_config(_yaml(tmp_path, linear_lr_scale=3))
    assert cfg.modalities.tabular.linear_lr_scale == 3.0
    again = ExperimentConfig.model_validate(cfg.model_dump(mode="json"))
    assert again.modalities.tabular.linear_lr_scale == 3.0
    assert load_config(_yaml(tmp_path), ["modalities.tabular.linear_lr_scale=30"]
                       ).modalities.tabular.linear_lr_scale == 30.0
    assert build_model(cfg, _data()).encoders.tabular.linear_lr_scale == 3.0
    with pytest.raises(ConfigError, match="linear_lr_scale"):
        load_config(_yaml(tmp_path, linear_lr_scale=0))


def _first_step(tmp_path: Path, how: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """|change| of the path's weight and of the MLP's first layer after one AdamW step."""
    cfg = _cfg(tmp_path, linear_lr_scale=scale, dropout=0.0)
    tcfg = cfg.training.model_copy(update={"lr": 1e-3, "weight_decay": 0.0, "batch_size": 6,
                                           "device": "cpu"})
    model = build_model(cfg, _data())
    fit_tabular_standardizer(model, [_data()])
    dp = None
    if how == "dp-sgd":
        model, _ = make_private_compatible(model)
        dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)
    enc = model.encoders.tabular
    before = [enc.linear.weight.detach().clone(),  # type: ignore[union-attr]
              enc.mlp[0].weight.detach().clone()]  # type: ignore[index]
    gen = torch.Generator().manual_seed(0)
    if how == "site":
        local_update(model, None, _data(), tcfg, steps=1, generator=gen)
    else:
        train(model, _data(), None, tcfg, steps=1, generator=gen, dp=dp)
    return ((enc.linear.weight.detach() - before[0]).abs(),  # type: ignore[union-attr]
            (enc.mlp[0].weight.detach() - before[1]).abs())  # type: ignore[index]


@pytest.mark.parametrize("how", ["centralized", "site", "dp-sgd"])
def test_the_path_steps_at_its_own_lr_on_every_training_path(tmp_path: Path, how: str) -> None:
    # AdamW's first step moves every weight with a gradient by its group's lr (weight decay 0)
    path, mlp = _first_step(tmp_path, how, 10.0)
    moved = path[path > 0]
    assert moved.numel() > 0
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-2), rtol=1e-3, atol=0)
    assert float(mlp.max()) == pytest.approx(1e-3, rel=1e-3)
    path1, _ = _first_step(tmp_path, how, 1.0)
    assert float(path1.max()) == pytest.approx(1e-3, rel=1e-3)


def test_optimizer_param_groups_cover_every_trainable_parameter_once(tmp_path: Path) -> None:
    model = build_model(_cfg(tmp_path, linear_lr_scale=3), _data())
    groups = model.optimizer_param_groups(0.01)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.03)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert {id(p) for p in groups[1]["params"]} == {
        id(p) for p in model.encoders.tabular.linear.parameters()}  # type: ignore[union-attr]
    plain = build_model(_cfg(tmp_path, linear_path=False, linear_lr_scale=3), _data())
    assert [g["lr"] for g in plain.optimizer_param_groups(0.01)] == [0.01]

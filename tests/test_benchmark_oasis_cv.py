"""benchmarks/oasis_cv.py: without the OASIS-1 data it says why and exits 0; its fold plan."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    return load_script(REPO / "benchmarks" / "oasis_cv.py")


def test_skips_cleanly_without_the_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _load().main(["--data", str(tmp_path / "absent")]) == 0
    err = capsys.readouterr().err
    assert "skipped: no OASIS-1 data" in err and "absent" in err


def test_folds_are_stratified_and_the_inner_split_stays_in_the_training_folds() -> None:
    y = np.array([0, 1] * 25)
    plan = _load().fold_plan(y, 5, 2, 0)
    assert len(plan) == 10
    for repeat in (0, 1):
        tests = np.concatenate([f.test for f in plan if f.repeat == repeat])
        assert sorted(tests) == list(range(50))  # every subject tested once per repeat
    for f in plan:
        inner = np.concatenate([f.train, f.val])
        assert not set(inner) & set(f.test) and len(inner) + len(f.test) == 50
        assert y[f.test].sum() == 5 and y[f.val].sum() == 4  # stratified


def _cohort(n: int = 40, seed: int = 0) -> tuple[object, np.ndarray]:
    import torch

    from multimodal_fl.training import CohortDataset

    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * (n // 2))
    tab = rng.normal(size=(n, 3)) + y[:, None]
    img = rng.normal(size=(n, 1, 16, 16)) + 0.5 * y[:, None, None, None]
    ds = CohortDataset([f"s{i:03d}" for i in range(n)], y,
                       {"image": torch.tensor(img, dtype=torch.float32),
                        "tabular": torch.tensor(tab, dtype=torch.float32)},
                       torch.ones(n, 2, dtype=torch.bool), ("image", "tabular"))
    return ds, y


def _cfg(tmp_path: Path, steps: int = 6) -> object:
    from multimodal_fl.config import load_config

    cfg = (REPO / "configs" / "oasis1.yaml").read_text().replace(
        "task: tasks/oasis1_dementia.yaml",
        f"task: {REPO / 'configs' / 'tasks' / 'oasis1_dementia.yaml'}").replace(
        "steps: 300", f"steps: {steps}, eval_every: 2").replace("size: 64", "size: 16")
    path = tmp_path / "exp.yaml"
    path.write_text(cfg)
    return load_config(path)


def test_crossfit_image_inputs_are_out_of_fold_for_training_subjects(tmp_path: Path) -> None:
    import torch

    m = _load()
    ds, y = _cohort()
    cfg = _cfg(tmp_path)
    fold = m.fold_plan(y, 5, 1, 0)[0]
    image, _ = m.train_centralized(cfg, ds, fold, ["image"], 0)
    full_logit, full_emb = m.image_logits(ds, image), m.image_embeddings(ds, image)
    logit, emb = m.crossfit_image(cfg, ds, fold, y, image, 0, 3)
    assert logit.shape == (40, 1) and emb.shape == full_emb.shape
    outside = torch.from_numpy(np.concatenate([fold.val, fold.test]))
    inside = torch.from_numpy(fold.train)
    assert torch.equal(logit[outside], full_logit[outside])  # already out of sample
    assert torch.equal(emb[outside], full_emb[outside])
    # every training subject's input comes from a model that did not train on it
    assert not torch.isclose(logit[inside], full_logit[inside]).any()
    assert not torch.isclose(emb[inside], full_emb[inside]).all(dim=1).any()


def test_tabular_choice_follows_the_inner_validation(tmp_path: Path) -> None:
    m = _load()
    ds, y = _cohort()
    cfg = _cfg(tmp_path, steps=20)
    fold = m.fold_plan(y, 5, 1, 0)[0]
    res = m.Scores(1, len(y))
    chosen = m.tabular_models(cfg, ds, fold, res, y, 0)
    val = {on: m.train_centralized(m.with_linear_path(cfg, on), ds, fold, ["tabular"], 0)[1]
           for on in (False, True)}
    assert chosen == (val[True] > val[False]) and res.choices == [chosen]
    picked = res.table[m.WIDE if chosen else m.MLP][0, fold.test]
    np.testing.assert_array_equal(res.table[m.TAB][0, fold.test], picked)
    before = cfg.modalities.tabular.linear_path
    for on in (False, True):
        assert m.with_linear_path(cfg, on).modalities.tabular.linear_path is on
    assert cfg.modalities.tabular.linear_path is before  # a copy, the config is unchanged


def test_report_targets_read_the_configs_tabular_model(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    m = _load()
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 30)
    res = m.Scores(1, 60)
    good = y + rng.normal(scale=0.5, size=60)
    weak = y + rng.normal(scale=3.0, size=60)
    names = [m.MLP, m.WIDE, m.TAB, m.LR, m.XEMB, m.INSAMPLE, m.FED] + [
        f"fusion {k}" for k in m.FUSIONS]
    for name in names:
        res.table[name] = (weak if name == m.MLP else good)[None, :].copy()
        res.fold_auc[name] = [0.8, 0.9]
    res.choices = [True, False]
    fails = m.report("v", res, y, 50, 0)
    out = capsys.readouterr().out
    assert "Linear path chosen by the inner validation in 1 of 2 folds" in out
    assert f"| {m.MLP} - {m.LR} |" in out  # shown, but not a target
    assert not any(m.MLP + " -" in f for f in fails)
    assert f"| {m.FED} / {m.INSAMPLE}, ratio |" in out
    assert f"| fusion concat - {m.WIDE} |" in out and f"| {m.TAB} - {m.WIDE} |" in out
    assert fails == []  # the config's tabular = LR = fusion: every target met
    res.table[m.TAB] = weak[None, :].copy()  # the per-fold choice is an ablation
    assert m.report("v", res, y, 50, 0) == []
    res.table[m.WIDE] = weak[None, :].copy()
    fails = m.report("v", res, y, 50, 0)
    assert any(f.startswith(f"v: {m.WIDE} - {m.LR}") for f in fails)


def test_crossfit_of_one_fold_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _load().parse_args(["--crossfit", "1"])
    assert "--crossfit 1: give 0" in capsys.readouterr().err


def test_federated_fusion_trains_and_reloads_with_the_linear_path(tmp_path: Path) -> None:
    m = _load()
    ds, y = _cohort()
    cfg = _cfg(tmp_path)
    cfg = m.with_linear_path(cfg, True)
    cfg = cfg.model_copy(update={"federated": cfg.federated.model_copy(
        update={"rounds": 2, "local_steps": 2})})
    fold = m.fold_plan(y, 5, 1, 0)[0]
    emb = m.with_image_input(ds, m.image_embeddings(ds, m.train_centralized(
        cfg, ds, fold, ["image"], 0)[0]))
    model = m.train_federated(cfg, emb, ["a", "b", "c"], fold, ["image", "tabular"], 0, tmp_path)
    assert model.encoders["tabular"].linear is not None
    scores = m.score(model, emb, fold, ["image", "tabular"])
    assert scores.shape == fold.test.shape and np.isfinite(scores).all()

"""training: splits, datasets, train/evaluate/predict, determinism, undefined AUC, proximal hook."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save

from multimodal_fl.config import SplitConfig, TrainingConfig
from multimodal_fl.encoders.tabular import TabularEncoder
from multimodal_fl.fusion import FusionModel, NoModalityError
from multimodal_fl.training import (
    CohortDataset,
    SiteData,
    batch_size_for,
    evaluate,
    fit_tabular_standardizer,
    local_update,
    predict,
    split_patients,
    train,
)

torch.set_num_threads(1)

N_FEATURES = 4
TEXT_DIM = 6


def make_table(n: int = 120, *, seed: int = 0, site: str = "site_a",
               signal: float = 1.5, pos_rate: float = 0.4) -> tuple[pd.DataFrame, list[str]]:
    """A synthetic cohort table shaped like ``SiteCohort.table`` (no images)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < pos_rate).astype(int)
    x = rng.normal(size=(n, N_FEATURES)) + signal * y[:, None]
    x[rng.random((n, N_FEATURES)) < 0.2] = np.nan
    names = [f"f{i}" for i in range(N_FEATURES)]
    table = pd.DataFrame(x, columns=names)
    for c in names:
        table[f"missing_{c}"] = table[c].isna().astype(float)
    has_text = rng.random(n) < 0.7
    has_tab = np.asarray(~np.isnan(x).all(1))
    has_text[~has_tab] = True
    cols: dict[str, Any] = {
        "patient_id": [f"{site}-p{i:03d}" for i in range(n)],
        "site": site,
        "label": y,
        "has_tabular": has_tab,
        "has_text": has_text,
        "has_image": False,
        "image_path": None,
        "notes": pd.Series([["note"] if t else [] for t in has_text], dtype=object),
        "sex": rng.choice(["female", "male"], n),
        "age": rng.integers(20, 90, n).astype(float),
    }
    for key, value in cols.items():
        table[key] = value
    table["age_band"] = pd.cut(table["age"], [0, 40, 60, 75, 200], right=False).astype(str)
    return table, names + [f"missing_{c}" for c in names]


def text_embeddings(table: pd.DataFrame, seed: int = 0, signal: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed + 100)
    emb = rng.normal(size=(len(table), TEXT_DIM)) + signal * table["label"].to_numpy()[:, None]
    emb[~table["has_text"].to_numpy()] = 0.0
    return emb.astype(np.float32)


def make_site(n: int = 120, *, seed: int = 0, site: str = "site_a", **kw: float) -> SiteData:
    table, names = make_table(n, seed=seed, site=site, **kw)
    ds = CohortDataset.from_table(
        table, modalities=["tabular", "text"], feature_names=names,
        embeddings={"text": text_embeddings(table, seed)},
    )
    splits = split_patients(ds.patient_ids, ds.labels.numpy().astype(int), seed=0, site=site,
                            fractions=SplitConfig())
    return SiteData(site, ds, splits, names)


def make_model(
    kind: str = "concat", *, seed: int = 0, modality_dropout: float = 0.2
) -> FusionModel:
    torch.manual_seed(seed)
    return FusionModel(
        {"tabular": TabularEncoder(2 * N_FEATURES, hidden=[8]), "text": TEXT_DIM},
        kind=kind, dim=8, heads=2, modality_dropout=modality_dropout, dropout=0.1,
    )


def tcfg(**kw: object) -> TrainingConfig:
    base: dict[str, object] = dict(steps=40, batch_size=16, lr=3e-3, eval_every=10, patience=0,
                                   device="cpu")
    base.update(kw)
    return TrainingConfig(**base)  # type: ignore[arg-type]


def state_bytes(model: torch.nn.Module) -> bytes:
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


# ----------------------------------------------------------------------------- splits


def test_split_is_deterministic_stratified_and_order_independent() -> None:
    rng = np.random.default_rng(1)
    ids = [f"p{i}" for i in range(200)]
    y = (rng.random(200) < 0.3).astype(int)
    a = split_patients(ids, y, seed=0, site="s", fractions=SplitConfig())
    assert a == split_patients(ids, y, seed=0, site="s", fractions=(0.6, 0.2, 0.2))
    perm = rng.permutation(200)
    shuffled = split_patients([ids[i] for i in perm], y[perm], seed=0, site="s",
                              fractions={"train": 0.6, "val": 0.2, "test": 0.2})
    assert shuffled == a
    for cls in (0, 1):
        members = [p for p, lab in zip(ids, y, strict=True) if lab == cls]
        counts = Counter(a[p] for p in members)
        for split, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
            assert abs(counts[split] - frac * len(members)) <= 1, (cls, split, counts)
    assert split_patients(ids, y, seed=1, site="s", fractions=SplitConfig()) != a
    assert split_patients(ids, y, seed=0, site="t", fractions=SplitConfig()) != a


def test_split_puts_a_positive_in_each_split_when_there_are_three() -> None:
    ids = [f"p{i}" for i in range(30)]
    y = np.zeros(30, dtype=int)
    y[[3, 11, 27]] = 1
    out = split_patients(ids, y, seed=5, site="s", fractions=SplitConfig())
    assert sorted(out[ids[i]] for i in (3, 11, 27)) == ["test", "train", "val"]


def test_split_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unique"):
        split_patients(["a", "a"], [0, 1], seed=0, site="s", fractions=SplitConfig())
    with pytest.raises(ValueError, match="0 or 1"):
        split_patients(["a", "b"], [0, 2], seed=0, site="s", fractions=SplitConfig())
    with pytest.raises(ValueError, match="sum to 1"):
        split_patients(["a", "b"], [0, 1], seed=0, site="s", fractions=(0.5, 0.2, 0.2))


# ----------------------------------------------------------------------------- datasets


def test_dataset_from_table_masks_and_batches() -> None:
    table, names = make_table(20)
    ds = CohortDataset.from_table(table, modalities=["text", "tabular"], feature_names=names,
                                  embeddings={"text": text_embeddings(table)})
    assert ds.modalities == ("tabular", "text")
    assert ds.precomputed == ("text",)
    assert torch.equal(ds.mask[:, 1], torch.tensor(table["has_text"].to_numpy(dtype=bool)))
    assert torch.isnan(ds.inputs["tabular"]).any()  # missing values stay NaN for the encoder
    b = ds.batch([3, 1])
    assert b.patient_ids == [ds.patient_ids[3], ds.patient_ids[1]]
    assert b.inputs["text"].shape == (2, TEXT_DIM) and b.mask.shape == (2, 2)
    pooled = CohortDataset.concat([ds.subset([0, 1]), ds.subset([2])])
    assert pooled.patient_ids == ds.patient_ids[:3] and len(pooled.meta) == 3
    assert set(ds.meta.columns) >= {"patient_id", "sex", "age", "age_band"}


def test_dataset_names_patients_without_any_modality() -> None:
    table, names = make_table(10)
    table.loc[[2, 7], "has_tabular"] = False
    table.loc[[2, 7], "has_text"] = False
    with pytest.raises(NoModalityError, match="site_a-p002, site_a-p007"):
        CohortDataset.from_table(table, modalities=["tabular", "text"], feature_names=names,
                                 embeddings={"text": text_embeddings(table)})


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["concat", "attention", "late"])
def test_same_seed_gives_identical_weights_bit_for_bit(kind: str) -> None:
    site = make_site()
    outs = []
    for _ in range(2):
        model = make_model(kind)
        fit_tabular_standardizer(model, [site.train])
        train(model, site.train, site.val, tcfg(), generator=torch.Generator().manual_seed(7))
        outs.append(state_bytes(model))
    assert outs[0] == outs[1]
    other = make_model(kind)
    fit_tabular_standardizer(other, [site.train])
    train(other, site.train, site.val, tcfg(), generator=torch.Generator().manual_seed(8))
    assert state_bytes(other) != outs[0]  # the generator really drives training


def test_train_leaves_the_global_rng_alone() -> None:
    site = make_site(60)
    model = make_model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(model, site.train, None, tcfg(steps=5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), expected)


def test_train_learns_an_easy_task() -> None:
    site = make_site(240, signal=2.0)
    model = make_model("attention")
    fit_tabular_standardizer(model, [site.train])
    loss_fn = torch.nn.BCELoss()
    y = site.test.labels.double()
    before = float(loss_fn(torch.from_numpy(predict(model, site.test)), y))
    result = train(model, site.train, site.val, tcfg(steps=150),
                   generator=torch.Generator().manual_seed(0))
    after = float(loss_fn(torch.from_numpy(predict(model, site.test)), y))
    assert after < 0.7 * before
    auc = evaluate(model, site.test)["auc"]
    assert auc.value is not None and auc.value > 0.9
    assert result.history and result.history[0]["val_auc"] is not None
    assert result.n_samples == len(site.train)
    assert result.pos_weight == pytest.approx(
        float((1 - site.train.labels).sum() / site.train.labels.sum()))


def test_undefined_auc_is_reported_and_does_not_stop_training() -> None:
    site = make_site(120)
    val = site.val
    no_pos = val.subset([i for i in range(len(val)) if val.labels[i] == 0])
    metrics = evaluate(make_model(), no_pos)
    assert metrics["auc"].value is None and metrics["auc"].reason == "no positives"
    assert metrics["average_precision"].value is None
    assert metrics["brier"].value is not None  # defined without positives
    model = make_model()
    result = train(model, site.train, no_pos, tcfg(steps=30, eval_every=5, patience=1),
                   generator=torch.Generator().manual_seed(0))
    assert result.steps == 30 and not result.stopped_early
    assert all(h["val_auc"] is None and h["val_auc_reason"] == "no positives"
               for h in result.history)
    assert any("undefined" in n for n in result.notes)
    assert result.best_step is None


def test_early_stopping_restores_the_best_weights() -> None:
    site = make_site(120)
    model = make_model()
    fit_tabular_standardizer(model, [site.train])
    result = train(model, site.train, site.val, tcfg(steps=400, eval_every=5, patience=2,
                                                      lr=5e-2),
                   generator=torch.Generator().manual_seed(0))
    assert result.stopped_early and result.steps < 400
    assert result.best_step is not None and result.best_val_auc is not None
    val_auc = evaluate(model, site.val)["auc"].value
    assert val_auc == pytest.approx(result.best_val_auc)


def test_local_update_fresh_optimiser_and_untouched_absent_modality() -> None:
    table, names = make_table(60)
    table["has_text"] = False  # this site has no notes
    table["has_tabular"] = True
    table[names[0]] = table[names[0]].fillna(0.0)
    ds = CohortDataset.from_table(table, modalities=["tabular", "text"], feature_names=names,
                                  embeddings={"text": np.zeros((60, TEXT_DIM), np.float32)})
    start = {k: v.clone() for k, v in make_model().state_dict().items()}
    mu = 10.0

    def proximal(model: torch.nn.Module) -> torch.Tensor:
        terms = [((p - start[n]) ** 2).sum() for n, p in model.named_parameters()]
        return 0.5 * mu * torch.stack(terms).sum()

    runs = []
    for _ in range(2):
        model = make_model(seed=99)  # different init: weights come from `start`
        res = local_update(model, start, ds, tcfg(steps=20, weight_decay=0.1), steps=20,
                           generator=torch.Generator().manual_seed(3), proximal=proximal)
        runs.append(model.state_dict())
        assert res.modality_counts == {"tabular": 60, "text": 0}
        assert model.group_counts(res.modality_counts, res.n_samples)["proj.text."] == 0
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k])  # fresh optimiser + same generator
        if k.startswith("proj.text."):
            assert torch.equal(runs[0][k], start[k]), f"{k} moved without any text"
    moved = [k for k in start if k.startswith("proj.tabular.") and
             not torch.equal(runs[0][k], start[k])]
    assert moved


def test_proximal_term_pulls_towards_the_start() -> None:
    site = make_site(80)
    start = make_model().state_dict()

    def dist(model: torch.nn.Module) -> float:
        return sum(float(((p.detach() - start[n]) ** 2).sum()) for n, p in model.named_parameters())

    def proximal(model: torch.nn.Module) -> torch.Tensor:
        return 50.0 * sum(((p - start[n]) ** 2).sum() for n, p in model.named_parameters())

    free, prox = make_model(), make_model()
    local_update(free, start, site.train, tcfg(), steps=30,
                 generator=torch.Generator().manual_seed(0))
    local_update(prox, start, site.train, tcfg(), steps=30,
                 generator=torch.Generator().manual_seed(0), proximal=proximal)
    assert dist(prox) < 0.5 * dist(free)


def test_predict_restores_mode_and_gives_probabilities() -> None:
    site = make_site(30)
    model = make_model().train()
    s = predict(model, site.dataset, batch_size=7)
    assert model.training
    assert s.shape == (30,) and ((s >= 0) & (s <= 1)).all()
    # batch 7 vs 256: float32 sums depend on the batch, so the same scores only to rounding
    np.testing.assert_allclose(predict(model, site.dataset), s, rtol=0, atol=1e-6)
    assert np.array_equal(predict(model, site.dataset, batch_size=7), s)  # same path repeated


def test_select_modalities_drops_patients_left_without_any() -> None:
    site = make_site(40)
    ds = site.dataset
    text_only = ds.select_modalities(["text"])
    assert text_only.modalities == ("text",) and text_only.precomputed == ("text",)
    assert len(text_only) == int(ds.mask[:, 1].sum())
    assert bool(text_only.mask.all())
    with pytest.raises(ValueError, match="subset"):
        ds.select_modalities(["image"])


def test_site_parts_are_reused_until_the_split_is_replaced() -> None:
    site = make_site(30)
    assert site.part("train") is site.train
    assert len(site.train) + len(site.val) + len(site.test) == 30
    before = site.train
    site.splits = dict.fromkeys(site.splits, "train")
    assert site.train is not before and len(site.train) == 30
    with pytest.raises(ValueError, match="unknown split"):
        site.part("holdout")


def test_batch_size_for_enlarges_only_for_a_scarce_class() -> None:
    """``min_rare_per_batch`` rare-class patients per batch on average, never fewer than
    ``batch_size`` rows nor more than the training set; off at 0 or without a rare class."""
    def labels(n: int, n_pos: int) -> torch.Tensor:
        return torch.cat([torch.ones(n_pos), torch.zeros(n - n_pos)])

    size, notes = batch_size_for(labels(1000, 10), 32, 0.0)  # off: said, not done
    assert size == 32 and len(notes) == 1 and "0.32 of the rarer class" in notes[0]
    assert batch_size_for(labels(1000, 40), 32, 0.0) == (32, [])  # 1.28 per batch: silent
    size, notes = batch_size_for(labels(1000, 10), 32, 4.0)
    assert size == 400 and len(notes) == 1 and "400 instead of 32" in notes[0]
    assert batch_size_for(labels(1000, 990), 32, 4.0)[0] == 400  # rare negatives alike
    assert batch_size_for(labels(1000, 300), 32, 4.0) == (32, [])  # 4 * 1000 / 300 < 32
    assert batch_size_for(labels(100, 1), 32, 4.0)[0] == 100  # at most the training set
    assert batch_size_for(labels(20, 1), 32, 4.0) == (32, [])  # a set under one batch: as is
    assert batch_size_for(labels(100, 0), 32, 4.0) == (32, [])  # no class to count


def test_train_draws_the_enlarged_batches() -> None:
    """With ``min_rare_per_batch`` every training batch has the enlarged size (the note says
    so); without it the batches are ``batch_size`` rows, as before."""
    site = make_site(240, pos_rate=0.1)
    n, n_pos = len(site.train), int(site.train.labels.sum())
    n_rare = min(n_pos, n - n_pos)
    expected = min(n, max(16, -(-4 * n // n_rare)))
    assert expected > 16

    def sizes(cfg: TrainingConfig) -> tuple[set[int], list[str]]:
        seen: list[int] = []

        def record(batch: Any) -> Any:
            seen.append(len(batch.labels))
            return batch

        model = make_model()
        fit_tabular_standardizer(model, [site.train])
        result = train(model, site.train, site.val, cfg, augment=record,
                       generator=torch.Generator().manual_seed(0))
        return set(seen), result.notes

    enlarged, notes = sizes(tcfg(steps=5, min_rare_per_batch=4.0))
    assert enlarged == {expected} and any("min_rare_per_batch" in x for x in notes)
    plain, notes = sizes(tcfg(steps=5))
    assert plain == {16} and not any("min_rare_per_batch" in x for x in notes)


def test_train_carries_the_optimiser_state_it_is_given() -> None:
    """A call given the previous call's AdamW state continues it (its step count goes on and
    the weights differ from a fresh optimiser's); a state for another model is refused."""
    site = make_site(120)

    def run(keep: bool = False) -> tuple[Any, dict[int, Any], bytes]:
        model = make_model(modality_dropout=0.0)
        fit_tabular_standardizer(model, [site.train])
        state: dict[int, Any] = {}
        train(model, site.train, None, tcfg(steps=5), generator=torch.Generator().manual_seed(0),
              optimizer_state=state if keep else None)
        second = train(model, site.train, None, tcfg(steps=5),
                       generator=torch.Generator().manual_seed(1), optimizer_state=state)
        return second, state, state_bytes(model)

    kept, kept_state, kept_weights = run(keep=True)
    _, fresh_state, fresh_weights = run()
    assert kept_state and fresh_state
    steps = {float(s["step"]) for s in kept_state.values()}
    assert steps == {10.0} and {float(s["step"]) for s in fresh_state.values()} == {5.0}
    assert kept_weights != fresh_weights
    assert "optimizer_state" not in kept.to_dict()
    model = make_model()
    with pytest.raises(ValueError, match="does not fit"):
        train(model, site.train, None, tcfg(steps=1), generator=torch.Generator(),
              optimizer_state={10_000: {"step": torch.tensor(1.0)}})


# ----------------------------------------------------------------------- linear warm-up


def path_model(seed: int = 0) -> FusionModel:
    """A tabular-only model with a linear path and its fused head's weights at zero."""
    torch.manual_seed(seed)
    model = FusionModel({"tabular": TabularEncoder(2 * N_FEATURES, hidden=[8], linear_path=True,
                                                   linear_lr_scale=10.0)},
                        kind="concat", dim=8, modality_dropout=0.0, dropout=0.1)
    model.zero_head_weights()
    return model


def test_linear_warmup_fits_the_path_alone_to_a_logistic_regression() -> None:
    """``warmup_steps`` move the linear path and nothing else, and the path alone reaches the
    training log-loss of a logistic regression on the same prepared features (the point of
    the warm-up: the deep part then learns only what a converged linear model misses)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    data = make_site(200, signal=0.8).train.select_modalities(["tabular"])
    model = path_model()
    fit_tabular_standardizer(model, [data])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, data, None, tcfg(lr=1e-3), steps=0, warmup_steps=1500,
                   generator=torch.Generator().manual_seed(0))
    assert result.warmup_steps == 1500 and result.steps == 0
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {"encoders.tabular.linear.weight", "encoders.tabular.linear.bias"}
    enc = model.encoders["tabular"]
    assert isinstance(enc, TabularEncoder)
    x = enc.prepare(data.inputs["tabular"]).numpy()
    y = data.labels.numpy()
    # the loss weighs positives by pos_weight (negatives / positives): so does the reference
    weight = np.where(y == 1, result.pos_weight, 1.0)
    lr = LogisticRegression(C=1e4, max_iter=5000).fit(x, y, sample_weight=weight)
    optimum = log_loss(y, lr.predict_proba(x)[:, 1], sample_weight=weight)
    reached = log_loss(y, predict(model, data), sample_weight=weight)
    assert reached - optimum < 0.01, (reached, optimum)
    # without the warm-up the same model is far from it: the test can fail
    cold = path_model()
    fit_tabular_standardizer(cold, [data])
    assert log_loss(y, predict(cold, data), sample_weight=weight) - optimum > 0.1


def test_linear_warmup_is_evaluated_before_the_steps_and_can_be_kept() -> None:
    """With validation, the warmed-up model is scored at ``start_step`` (step 0), so early
    stopping can keep it; the steps after it train every weight."""
    site = make_site(200, signal=0.8)
    tr, va = (d.select_modalities(["tabular"]) for d in (site.train, site.val))
    model = path_model()
    fit_tabular_standardizer(model, [tr])
    result = train(model, tr, va, tcfg(patience=2), warmup_steps=200,
                   generator=torch.Generator().manual_seed(0))
    assert result.history[0]["step"] == 0 and result.history[0]["val_auc"] is not None
    assert result.history[1]["step"] == 10
    assert np.isfinite(result.warmup_loss)
    assert float(model.head.weight.detach().abs().sum()) > 0 or result.best_step == 0


def test_linear_warmup_is_refused_without_a_path_or_with_dp() -> None:
    data = make_site(60).train
    with pytest.raises(ValueError, match="linear path"):
        train(make_model(), data, None, tcfg(), warmup_steps=5,
              generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="warmup_steps must be non-negative"):
        train(path_model(), data.select_modalities(["tabular"]), None, tcfg(), warmup_steps=-1,
              generator=torch.Generator().manual_seed(0))


def test_fitted_warmup_is_the_cross_validated_logistic_regression() -> None:
    """``warmup_fit`` makes the model, on patients with tabular data, scikit-learn's
    logistic regression of the same prepared features at the C its cross-validation chose,
    moving only the path and the head's bias; with steps, validated at step 0 first."""
    from sklearn.linear_model import LogisticRegression

    from multimodal_fl.training.warmup import C_GRID

    site = make_site(200, signal=0.8)
    tr, va = (d.select_modalities(["tabular"]) for d in (site.train, site.val))
    model = path_model()
    fit_tabular_standardizer(model, [tr])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    result = train(model, tr, va, tcfg(patience=2), steps=0, warmup_fit=True, generator=gen)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {"encoders.tabular.linear.weight", "encoders.tabular.linear.bias",
                     "head.bias"}
    head = model.head
    assert isinstance(head, torch.nn.Linear) and float(head.bias.detach()) == 0.0
    assert result.warmup_fit_C in set(C_GRID.tolist())
    enc = model.encoders["tabular"]
    assert isinstance(enc, TabularEncoder)
    x = enc.prepare(tr.inputs["tabular"]).numpy().astype(np.float64)
    y = tr.labels.numpy().astype(int)
    # the reference: scikit-learn's logistic regression at the chosen C on the same rows
    # (LogisticRegressionCV refits it on all of them; solver paths differ: a tolerance)
    ref = LogisticRegression(C=result.warmup_fit_C, class_weight="balanced",
                             max_iter=5000).fit(x, y)
    np.testing.assert_allclose(predict(model, tr), ref.predict_proba(x)[:, 1], atol=2e-3)
    # with steps, the fitted model is scored first (step 0), so early stopping can keep it
    again = path_model()
    fit_tabular_standardizer(again, [tr])
    with_steps = train(again, tr, va, tcfg(patience=2), warmup_fit=True,
                       generator=torch.Generator().manual_seed(3))
    assert with_steps.history[0]["step"] == 0
    assert with_steps.history[0]["train_loss"] == pytest.approx(result.warmup_loss)


def test_fitted_warmup_makes_any_model_the_regression() -> None:
    """A model whose head was not zeroed (built by hand, not by ``build_model``) is the
    fitted regression after the fit all the same: its head's weights are zeroed too."""
    from multimodal_fl.training.warmup import fit_linear_path

    data = make_site(120, signal=0.8).train.select_modalities(["tabular"])
    torch.manual_seed(0)
    model = FusionModel({"tabular": TabularEncoder(2 * N_FEATURES, hidden=[8], linear_path=True)},
                        kind="concat", dim=8, modality_dropout=0.0, dropout=0.1)
    fit_tabular_standardizer(model, [data])
    fit_linear_path(model, data, torch.nn.BCEWithLogitsLoss(), seed=0)
    model.eval()
    with torch.no_grad():
        logit = model(data.inputs, data.mask)
        path = model.linear_logits(data.inputs, data.mask)
    assert path is not None and torch.allclose(logit, path, atol=1e-6)


def test_fitted_warmup_leaves_the_batch_stream_as_it_was() -> None:
    """The folds' seed comes from a copy of the generator: after the fit the generator is
    where a run without it leaves it, so the steps draw the same batches."""
    data = make_site(120, signal=0.8).train.select_modalities(["tabular"])
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    model = path_model()
    fit_tabular_standardizer(model, [data])
    train(model, data, None, tcfg(steps=3), warmup_fit=True, generator=gen_a)
    train(path_model(), data, None, tcfg(steps=3), generator=gen_b)
    assert torch.equal(gen_a.get_state(), gen_b.get_state())


def test_fitted_warmup_shrinks_on_a_small_noisy_cohort() -> None:
    """The penalty is chosen on the rows: pure noise gets a strong one (small coefficients),
    a clear signal a weak one; the warm-up by steps has no such brake."""
    from multimodal_fl.training.warmup import fit_linear_path

    loss = torch.nn.BCEWithLogitsLoss()
    norms = {}
    for signal in (0.0, 2.0):
        data = make_site(120, signal=signal).train.select_modalities(["tabular"])
        model = path_model()
        fit_tabular_standardizer(model, [data])
        fit = fit_linear_path(model, data, loss, seed=0)
        assert fit.C is not None and fit.folds == 5
        enc = model.encoders["tabular"]
        assert isinstance(enc, TabularEncoder) and enc.linear is not None
        norms[signal] = float(enc.linear.weight.norm())
    assert norms[0.0] < 0.5 * norms[2.0], norms


def test_fitted_warmup_leaves_a_training_set_with_one_negative_alone() -> None:
    site = make_site(60)
    data = site.train.select_modalities(["tabular"])
    one = data.subset((data.labels == 0).nonzero().flatten().tolist()[:1] +
                      (data.labels == 1).nonzero().flatten().tolist())
    model = path_model()
    fit_tabular_standardizer(model, [one])
    result = train(model, one, None, tcfg(), steps=1, warmup_fit=True,
                   generator=torch.Generator().manual_seed(0))
    assert result.warmup_fit_C is None
    assert any("not fitted" in n and "rarer class" in n for n in result.notes)


def test_fitted_warmup_is_refused_beside_steps_with_dp_or_without_a_path() -> None:
    from multimodal_fl.training.privacy import DPSGD

    data = make_site(60).train
    with pytest.raises(ValueError, match="DP-SGD accounts for every use"):
        train(path_model(), data.select_modalities(["tabular"]), None, tcfg(), warmup_fit=True,
              dp=DPSGD(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="linear path"):
        train(make_model(), data, None, tcfg(), warmup_fit=True,
              generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="give one"):
        train(path_model(), data.select_modalities(["tabular"]), None, tcfg(), warmup_steps=5,
              warmup_fit=True, generator=torch.Generator().manual_seed(0))


def test_zero_head_weights_makes_the_model_its_linear_path() -> None:
    """With the head's weights at zero the deep part adds a constant: the logit is the path's
    logit plus the head's bias, whatever the encoder's weights are."""
    data = make_site(60).train.select_modalities(["tabular"])
    model = path_model()
    fit_tabular_standardizer(model, [data])
    with torch.no_grad():
        model.encoders["tabular"].linear.weight.normal_()  # type: ignore[union-attr]
    model.eval()
    with torch.no_grad():
        logit = model(data.inputs, data.mask)
        path = model.linear_logits(data.inputs, data.mask)
    assert path is not None
    assert torch.allclose(logit - path, model.head.bias.expand_as(logit), atol=1e-6)
    late = FusionModel({"tabular": TabularEncoder(2 * N_FEATURES, linear_path=True), "text": 6},
                       kind="late", dim=8)
    late.zero_head_weights()
    assert all(float(h.weight.detach().abs().sum()) == 0 for h in late.head.values())  # type: ignore[operator]

"""TabularEncoder and Standardizer: pooled vs federated statistics, missing values, state dict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multimodal_fl.encoders import Standardizer, TabularEncoder, combine_moments


def _data(seed: int = 0, n: int = 60, f: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.normal(loc=[0, 10, -5, 100], scale=[1, 2, 0.5, 30], size=(n, f))
    X[rng.random((n, f)) < 0.25] = np.nan
    X[:, 2][: n // 2] = np.nan  # a feature one site never observes
    return X


def test_federated_moments_equal_pooled_fit() -> None:
    X = _data()
    sites = [X[:30], X[30:45], X[45:]]
    pooled = Standardizer(4).fit(X)
    fed = Standardizer.from_moments(*combine_moments(Standardizer.site_moments(s) for s in sites))
    np.testing.assert_allclose(fed.mean.numpy(), np.nanmean(X, axis=0), rtol=1e-10)
    np.testing.assert_allclose(fed.scale.numpy(), np.nanstd(X, axis=0), rtol=1e-8)
    np.testing.assert_allclose(fed.mean.numpy(), pooled.mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(fed.scale.numpy(), pooled.scale.numpy(), rtol=1e-12)
    np.testing.assert_array_equal(fed.count.numpy(), (~np.isnan(X)).sum(0))


def test_unobserved_and_constant_features() -> None:
    X = np.array([[1.0, np.nan, 3.0], [1.0, np.nan, 5.0]])
    s = Standardizer(3).fit(X)
    assert s.mean.tolist()[:2] == [1.0, 0.0] and s.scale.tolist()[:2] == [1.0, 1.0]
    out = s(torch.tensor(X))
    assert torch.isnan(out[:, 1]).all() and torch.isfinite(out[:, [0, 2]]).all()
    with pytest.raises(ValueError, match="3 entries"):
        s.set_moments([1.0], [1.0], [1.0])
    with pytest.raises(ValueError, match="infinite"):
        Standardizer.site_moments(np.array([[np.inf]]))
    with pytest.raises(ValueError, match="different feature counts"):
        combine_moments([Standardizer.site_moments(X), Standardizer.site_moments(X[:, :2])])


def test_statistics_travel_in_state_dict() -> None:
    enc = TabularEncoder(4, hidden=[8])
    enc.standardizer.fit(_data())
    state = enc.state_dict()
    assert {"standardizer.mean", "standardizer.scale", "standardizer.count"} <= set(state)
    other = TabularEncoder(4, hidden=[8])
    other.load_state_dict(state)
    assert torch.equal(other.standardizer.mean, enc.standardizer.mean)


def test_missing_values_are_imputed_with_indicators() -> None:
    torch.manual_seed(0)
    enc = TabularEncoder(4, hidden=[16, 8], dropout=0.0).eval()
    enc.standardizer.fit(_data())
    x = torch.tensor(_data(1, n=5), dtype=torch.float32)
    out = enc(x)
    assert out.shape == (5, 8) and enc.output_dim == 8 and torch.isfinite(out).all()
    prepared = enc.prepare(x)
    assert prepared.shape == (5, 8)
    np.testing.assert_array_equal(prepared[:, 4:].numpy(), np.isnan(x.numpy()).astype(np.float32))
    # "missing" differs from "observed at the mean" only through the indicator
    mean_row = enc.standardizer.mean.to(torch.float32).unsqueeze(0)
    missing_row = torch.full((1, 4), float("nan"))
    assert not torch.allclose(enc(mean_row), enc(missing_row))
    no_ind = TabularEncoder(4, hidden=[8], missing_indicators=False).eval()
    no_ind.load_state_dict(no_ind.state_dict())
    assert no_ind.prepare(missing_row).shape == (1, 4)


def test_embed_dim_config_and_errors() -> None:
    enc = TabularEncoder.from_config(
        {"encoder": "mlp", "hidden": [8], "embed_dim": 3}, n_features=2
    )
    assert enc.output_dim == 3 and enc(torch.zeros(2, 2)).shape == (2, 3)
    with pytest.raises(ValueError, match="accepted: \\['mlp'\\]"):
        TabularEncoder.from_config({"encoder": "xgb"}, n_features=2)
    with pytest.raises(ValueError, match="did you mean 'hidden'"):
        TabularEncoder.from_config({"hiden": [3]}, n_features=2)
    with pytest.raises(ValueError, match=r"Tensor\[B, 2\]"):
        enc(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="infinite"):
        enc(torch.tensor([[float("inf"), 0.0]]))
    with pytest.raises(ValueError, match="feature_names"):
        TabularEncoder(2, feature_names=["a"])


def test_trains_to_fit_a_signal() -> None:
    """The MLP learns a rule that depends on missingness (sanity check of the wiring)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 3))
    X[rng.random(400) < 0.5, 1] = np.nan
    y = torch.tensor((np.isnan(X[:, 1]) ^ (X[:, 0] > 0)).astype(np.float32))
    enc = TabularEncoder(3, hidden=[16], embed_dim=1, dropout=0.0)
    enc.standardizer.fit(X)
    xt = torch.tensor(X, dtype=torch.float32)
    opt = torch.optim.Adam(enc.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(enc(xt)[:, 0], y)
        loss.backward()
        opt.step()
    acc = float(((enc(xt)[:, 0] > 0).float() == y).float().mean())
    assert acc > 0.95


def _logistic(seed: int = 3) -> tuple[np.ndarray, object, object]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    X = rng.normal(loc=[0, 10, -5, 100], scale=[1, 2, 0.5, 30], size=(80, 4))
    y = (X[:, 0] + 0.5 * (X[:, 1] - 10) + rng.normal(size=80) > 0).astype(int)
    scaler = StandardScaler().fit(X)  # population SD, as the Standardizer
    return X, scaler, LogisticRegression(C=0.5).fit(scaler.transform(X), y)


def _set_logistic(enc: TabularEncoder, lr: object) -> None:
    with torch.no_grad():
        assert enc.linear is not None
        enc.linear.weight.zero_()
        enc.linear.weight[0, :4] = torch.from_numpy(lr.coef_[0])  # type: ignore[attr-defined]
        enc.linear.bias[0] = float(lr.intercept_[0])  # type: ignore[attr-defined]


def test_linear_path_represents_a_logistic_regression_exactly() -> None:
    from multimodal_fl.fusion import FusionModel

    X, scaler, lr = _logistic()
    want = lr.decision_function(scaler.transform(X))  # type: ignore[attr-defined]
    for kind in ("concat", "attention", "late"):
        enc = TabularEncoder(4, hidden=[8], embed_dim=3, linear_path=True)
        enc.standardizer.fit(X)
        _set_logistic(enc, lr)  # indicators get weight 0
        x = torch.tensor(X, dtype=torch.float32)
        got = enc.linear_logit(x)
        assert got is not None
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-4)
        # the whole model: the fused part at a constant 0, the logit is the regression's
        model = FusionModel({"tabular": enc}, kind=kind, dim=4, heads=2).eval()
        with torch.no_grad():
            for p in model.head.parameters():
                p.zero_()
            logit = model({"tabular": x}, torch.ones(80, 1, dtype=torch.bool))
        np.testing.assert_allclose(logit.numpy(), want, rtol=1e-4, atol=1e-4)


def test_linear_logit_counts_only_where_the_modality_is_present() -> None:
    from multimodal_fl.fusion import FusionModel

    X, _, lr = _logistic()
    x = torch.tensor(X[:6], dtype=torch.float32)
    mask = torch.tensor([[True, True], [True, False]] * 3)
    for dense in (False, True):
        enc = TabularEncoder(4, hidden=[8], linear_path=True)
        enc.standardizer.fit(X)
        _set_logistic(enc, lr)
        model = FusionModel({"tabular": enc, "image": 5}, dim=4, dense=dense).eval()
        with torch.no_grad():
            wide = model.linear_logits({"tabular": x, "image": torch.zeros(6, 5)}, mask)
            assert wide is not None
            full = enc.linear_logit(x)
            assert full is not None
            want = torch.where(mask[:, 1], full, torch.zeros(6))
        assert torch.allclose(wide, want)
    plain = FusionModel({"tabular": TabularEncoder(4, hidden=[8])}, dim=4)
    assert plain.linear_logits({"tabular": x}, torch.ones(6, 1, dtype=torch.bool)) is None


def test_linear_path_is_off_by_default_and_starts_at_zero() -> None:
    torch.manual_seed(0)
    plain = TabularEncoder(4, hidden=[8])
    torch.manual_seed(0)
    wide = TabularEncoder(4, hidden=[8], linear_path=True)
    after = torch.rand(1)  # the path draws nothing from the RNG
    torch.manual_seed(0)
    TabularEncoder(4, hidden=[8])
    assert torch.equal(after, torch.rand(1))
    assert plain.linear is None and wide.linear is not None
    assert plain.linear_logit(torch.zeros(2, 4)) is None
    assert not any(k.startswith("linear.") for k in plain.state_dict())
    assert wide.linear.weight.shape == (1, 8)  # 4 features + 4 indicators -> one logit
    assert not wide.linear.weight.any() and not wide.linear.bias.any()
    for k, v in plain.state_dict().items():
        assert torch.equal(v, wide.state_dict()[k])
    x = torch.tensor(_data(2, n=6), dtype=torch.float32)
    for enc in (plain, wide):
        enc.standardizer.fit(_data())
        enc.eval()
    assert torch.equal(plain(x), wide(x))  # the embedding is the MLP's either way
    with pytest.raises(ValueError, match="expects Tensor"):
        wide.linear_logit(torch.zeros(2, 3))


def test_linear_path_from_config() -> None:
    enc = TabularEncoder.from_config({"encoder": "mlp", "hidden": [8], "linear_path": True},
                                     n_features=3)
    assert enc.linear is not None and enc.linear.out_features == 1
    assert TabularEncoder.from_config({"hidden": [8]}, n_features=3).linear is None


def _fitted(n_features: int = 4, *, linear_path: bool = True) -> TabularEncoder:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    enc = TabularEncoder(n_features, hidden=[8], linear_path=linear_path).eval()
    data = rng.normal(1e3, 5.0, size=(50, n_features))
    data[rng.random(data.shape) < 0.2] = np.nan
    enc.standardizer.fit(data)
    if enc.linear is not None:
        with torch.no_grad():
            enc.linear.weight.normal_()
    return enc


def test_float32_input_is_standardised_in_float32() -> None:
    """Pins the float32 arithmetic the reference weights were trained with."""
    enc = _fitted()
    x = torch.randn(16, 4) * 5 + 1e3
    x[::3, 1] = float("nan")
    s = enc.standardizer
    z = (x - s.mean.to(torch.float32)) / s.scale.to(torch.float32)
    missing = torch.isnan(z)
    z = torch.cat([torch.where(missing, torch.zeros_like(z), z), missing.float()], 1)
    with torch.no_grad():
        assert torch.equal(enc.prepare(x), z)
        assert torch.equal(enc(x), enc.mlp(z))


def test_double_module_and_float64_default_dtype_run_in_float64() -> None:
    enc = _fitted()
    x = torch.randn(6, 4, dtype=torch.float64) * 5 + 1e3
    x[0, 2] = float("nan")
    with torch.no_grad():
        ref = enc(x.float())
        dbl = enc.double()
        out, logit = dbl(x), dbl.linear_logit(x)
    assert out.dtype == logit.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        enc64 = TabularEncoder(4, hidden=[8], linear_path=True)
        out64 = enc64(torch.zeros(2, 4))  # float32 input, float64 model
        logit64 = enc64.linear_logit(torch.zeros(2, 4))
    finally:
        torch.set_default_dtype(before)
    assert out64.dtype == torch.float64 and logit64 is not None
    assert logit64.dtype == torch.float64


def test_float64_input_is_standardised_in_float64() -> None:
    enc = TabularEncoder(1, hidden=[4])
    big = np.random.default_rng(0).normal(1e6, 1.0, size=(1000, 1))
    enc.standardizer.fit(big)
    z = enc.prepare(torch.tensor(big[:5]))
    assert z.dtype == torch.float32  # the parameters' dtype
    s = enc.standardizer
    expected = ((torch.tensor(big[:5]) - s.mean) / s.scale)[:, 0].numpy()
    np.testing.assert_allclose(z[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_linear_path_is_built_on_the_default_device() -> None:
    with torch.device("meta"):
        enc = TabularEncoder(3, hidden=[4], linear_path=True)
    assert enc.linear is not None
    assert enc.linear.weight.device.type == enc.mlp[0].weight.device.type == "meta"
    torch.set_default_device("meta")
    try:
        enc = TabularEncoder(3, hidden=[4], linear_path=True)
    finally:
        torch.set_default_device(None)
    assert enc.linear is not None and enc.linear.bias.device.type == "meta"

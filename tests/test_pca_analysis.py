"""``mmfl pca`` (multimodal_fl.pca.analysis) on the tiny generated cohort."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from multimodal_fl.cli import app
from multimodal_fl.config import load_config
from multimodal_fl.data.cohort import build_cohorts
from multimodal_fl.encoders.tabular import Standardizer
from multimodal_fl.federated.pca import FederatedPCA, subspace_error

torch.set_num_threads(1)
runner = CliRunner()


def _tabular_rows(cfg_path: Path) -> dict[str, np.ndarray]:
    """Each site's raw tabular rows of patients with tabular data, from the cohort tables.

    Rounded to float32 as the prepared site data holds them (the arrays the sites summarise).
    """
    cfg = load_config(cfg_path)
    out = {}
    for name, cohort in build_cohorts(cfg).items():
        t = cohort.table
        x = t[list(cohort.feature_names)].to_numpy(dtype=np.float64, na_value=np.nan)
        present = (t["has_tabular"].fillna(False).to_numpy(dtype=bool) if "has_tabular" in t
                   else ~np.isnan(x).all(1))
        out[name] = x[present].astype(np.float32).astype(np.float64)  # sites hold float32
    return out


def test_mmfl_pca_tabular_equals_fit_sites_on_the_same_arrays(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg_path = tiny_config("covid_oxygen")
    out = tmp_path / "pca"
    res = runner.invoke(app, ["pca", str(cfg_path), "--features", "tabular", "--out", str(out),
                              "--n-components", "3"])
    assert res.exit_code == 0, res.output
    for name in ("pca.json", "pca_sites.png", "pca_variance.png"):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "pca.json").read_text())
    assert "bytes sent" in res.output and "raw bytes" in res.output

    raw = _tabular_rows(cfg_path)
    names = sorted(raw)
    std = Standardizer(next(iter(raw.values())).shape[1]).fit(np.vstack([raw[s] for s in names]))
    mean, scale = std.mean.numpy(), std.scale.numpy()
    arrays = [np.nan_to_num((raw[s] - mean) / scale, nan=0.0) for s in names]
    ref = FederatedPCA(3).fit_sites(arrays)
    comps = np.asarray(doc["components"])
    assert subspace_error(comps, ref.components_) < 1e-8
    np.testing.assert_allclose(np.abs(comps), np.abs(ref.components_), atol=1e-8)
    np.testing.assert_allclose(doc["explained_variance_ratio"], ref.explained_variance_ratio_,
                               rtol=1e-8)
    np.testing.assert_allclose(doc["standardisation"]["mean"], mean, rtol=1e-10)

    d = doc["n_features"]
    assert d == arrays[0].shape[1] and len(doc["feature_names"]) == d
    for s, x in zip(names, arrays, strict=True):
        site = doc["sites"][s]
        n = x.shape[0]
        assert site["n"] == n
        assert site["raw_bytes"] == 8 * n * d
        assert site["bytes_sent"] == 8 * (min(n, d) * d + d + 3)
        if n > d + 1:
            assert site["bytes_sent"] < site["raw_bytes"]
        # per-site score means are those of the site's own rows on the pooled components
        expected = ((x - np.asarray(doc["mean"])) @ comps.T).mean(0)
        np.testing.assert_allclose(site["scores"]["mean"], expected, atol=1e-9)
        for h in site["scores"]["histograms"]:
            if isinstance(h, dict):
                assert sum(h["count"]) == n
                assert all(c >= load_config(cfg_path).evaluation.min_cell for c in h["count"])


@pytest.mark.parametrize("features", ["image", "text"])
def test_mmfl_pca_on_frozen_embeddings(
    features: str, tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    out = tmp_path / features
    res = runner.invoke(app, ["pca", str(tiny_config("covid_oxygen")), "--features", features,
                              "--out", str(out), "--n-components", "2"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "pca.json").read_text())
    assert doc["n_components"] == 2 and len(doc["components"]) == 2
    assert (out / "pca_sites.png").is_file() and (out / "pca_variance.png").is_file()
    random_note = any("randomly initialised" in n for n in doc["notes"])
    assert random_note == (features == "image")
    if features == "image":
        assert "randomly initialised" in res.output


def test_mmfl_pca_rejects_bad_requests(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = str(tiny_config("covid_oxygen"))
    bad = runner.invoke(app, ["pca", cfg, "--features", "genome", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "image, tabular, text" in bad.output
    big = runner.invoke(app, ["pca", cfg, "--features", "tabular", "--out", str(tmp_path),
                              "--n-components", "100000"])
    assert big.exit_code == 2 and "at most" in big.output


def test_mmfl_pca_site_rank_sends_fewer_rows_and_reports_the_error(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = str(tiny_config("covid_oxygen"))
    exact_out, trunc_out = tmp_path / "exact", tmp_path / "trunc"
    args = ["pca", cfg, "--features", "tabular", "--n-components", "2"]
    exact = runner.invoke(app, [*args, "--out", str(exact_out), "--svd-solver", "full"])
    assert exact.exit_code == 0, exact.output
    trunc = runner.invoke(app, [*args, "--out", str(trunc_out), "--site-rank", "3"])
    assert trunc.exit_code == 0, trunc.output
    ex = json.loads((exact_out / "pca.json").read_text())
    tr = json.loads((trunc_out / "pca.json").read_text())
    assert ex["svd_solver"] == "full" and not ex["truncation"]["truncated"]
    assert ex["truncation"]["subspace_error_bound"] == 0.0
    d = tr["n_features"]
    assert d > 3
    for s, row in tr["sites"].items():
        n = row["n"]
        assert row["bytes_sent"] == 8 * (min(n, d, 3) * d + d + 3)
        assert row["bytes_sent"] < ex["sites"][s]["bytes_sent"]
    t = tr["truncation"]
    assert t["site_rank"] == 3 and t["truncated"] and t["discarded_variance"] > 0
    # the reported bound holds against the exact components
    err = subspace_error(np.asarray(tr["components"]), np.asarray(ex["components"]))
    assert err <= t["subspace_error_bound"] == t["subspace_error_bounds"][-1]
    for j, bound in enumerate(t["subspace_error_bounds"], start=1):
        assert subspace_error(np.asarray(tr["components"][:j]),
                              np.asarray(ex["components"][:j])) <= bound
    assert "site_rank=3: the sites dropped" in trunc.output
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--svd-solver", "eig"])
    assert bad.exit_code == 2 and "auto, full, covariance_eigh" in bad.output
    zero = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--site-rank", "0"])
    assert zero.exit_code == 2

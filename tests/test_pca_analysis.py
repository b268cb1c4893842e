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
from multimodal_fl.federated.pca import FederatedPCA, local_summary, subspace_error
from multimodal_fl.moments import (
    column_moments,
    pool_moments,
    standardization,
    withheld_columns,
)

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


def disclosed_standardisation(rows: list[np.ndarray], min_cell: int
                              ) -> tuple[np.ndarray, np.ndarray]:
    """The pooled standardisation from what each site's gate lets leave: per-feature moments,
    a feature seen in fewer than ``min_cell`` of a site's patients, or a 0/1 feature with fewer
    than ``min_cell`` of either value, sent as unseen."""
    parts = []
    for x in rows:
        n, s1, s2 = column_moments(x)
        small = withheld_columns(n, s1, s2, min_cell)
        parts.append((np.where(small, 0, n), np.where(small, 0.0, s1), np.where(small, 0.0, s2)))
    return standardization(*pool_moments(parts))


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
    m = load_config(cfg_path).evaluation.min_cell
    mean, scale = disclosed_standardisation([raw[s] for s in names], m)
    # each site leaves out of its PCA rows the columns its moments reply hides
    arrays = [np.where(withheld_columns(*column_moments(raw[s]), m), 0.0,
                       np.nan_to_num((raw[s] - mean) / scale, nan=0.0)) for s in names]
    ref = FederatedPCA(3).fit_from_summaries([local_summary(a, len(a) // m) for a in arrays])
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
        # at most floor(n / min_cell) rows of S·Vᵀ leave a site: never as many as its rows
        assert site["rows_sent"] == min(n, d, n // m)
        assert site["bytes_sent"] == 8 * (min(n, d, n // m) * d + d + 3)
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
    big = runner.invoke(app, ["pca", cfg, "--features", "tabular", "--out",
                              str(tmp_path / "out"), "--n-components", "100000"])
    assert big.exit_code == 2 and "at most" in big.output
    # a folder holding anything but an earlier analysis (here: the config itself) is refused
    mine = runner.invoke(app, ["pca", cfg, "--features", "tabular", "--out", str(tmp_path)])
    assert mine.exit_code == 2 and "'covid_oxygen.yaml'" in mine.output
    assert "which no PCA analysis writes" in mine.output


def test_mmfl_pca_site_rank_sends_fewer_rows_and_reports_the_error(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg_path = tiny_config("covid_oxygen", evaluation={"min_cell": 5})  # caps of 3 or 4 rows
    cfg = str(cfg_path)
    exact_out, trunc_out = tmp_path / "exact", tmp_path / "trunc"
    args = ["pca", cfg, "--features", "tabular", "--n-components", "2"]
    exact = runner.invoke(app, [*args, "--out", str(exact_out), "--svd-solver", "full"])
    assert exact.exit_code == 0, exact.output
    trunc = runner.invoke(app, [*args, "--out", str(trunc_out), "--site-rank", "2"])
    assert trunc.exit_code == 0, trunc.output
    ex = json.loads((exact_out / "pca.json").read_text())
    tr = json.loads((trunc_out / "pca.json").read_text())
    # without --site-rank each site still sends only its disclosure cap, floor(n / 5) rows
    assert ex["svd_solver"] == "full" and ex["truncation"]["truncated"]
    d = tr["n_features"]
    assert d > 4
    for s, row in tr["sites"].items():
        n = row["n"]
        assert ex["sites"][s]["rows_sent"] == n // 5 > 2
        assert row["bytes_sent"] == 8 * (min(n, d, 2) * d + d + 3)
        assert row["bytes_sent"] < ex["sites"][s]["bytes_sent"]
    t = tr["truncation"]
    assert t["site_rank"] == 2 and t["truncated"] and t["discarded_variance"] > 0
    assert t["discarded_variance"] > ex["truncation"]["discarded_variance"]
    # each reported bound holds against the components of the pooled (standardised) rows
    raw = _tabular_rows(cfg_path)
    mean, scale = disclosed_standardisation([raw[s] for s in sorted(raw)], 5)
    np.testing.assert_allclose(tr["standardisation"]["mean"], mean, rtol=1e-10)
    pooled = FederatedPCA(2).fit(np.vstack(
        [np.nan_to_num((raw[s] - mean) / scale, nan=0.0) for s in sorted(raw)]))
    for run in (ex, tr):
        b = run["truncation"]
        err = subspace_error(np.asarray(run["components"]), pooled.components_)
        assert err <= b["subspace_error_bound"] == b["subspace_error_bounds"][-1]
        for j, bound in enumerate(b["subspace_error_bounds"], start=1):
            assert subspace_error(np.asarray(run["components"][:j]),
                                  pooled.components_[:j]) <= bound
    assert "site_rank=2 and the sites' rank caps" in trunc.output
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--svd-solver", "eig"])
    assert bad.exit_code == 2 and "auto, full, covariance_eigh" in bad.output
    zero = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--site-rank", "0"])
    assert zero.exit_code == 2


def test_a_configured_site_that_was_never_asked_is_named_with_its_reason(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    """A configured site left out before the analysis (0 patients once its data were
    prepared, so no in-process site was made for it) is in ``missing_sites`` and the notes."""
    from multimodal_fl.pca.analysis import _analysis_federation, run_pca_analysis

    cfg = load_config(tiny_config("covid_oxygen"))
    federation = _analysis_federation(cfg, "tabular", tmp_path / "pca", None, None)
    empty = cfg.sites[0].model_copy(update={"name": "site_empty"})
    more = cfg.model_copy(update={"sites": [*cfg.sites, empty]})
    doc = run_pca_analysis(more, "tabular", tmp_path / "pca", n_components=2,
                           federation=federation).document
    assert doc["missing_sites"] == ["site_empty"]
    assert "never asked" in doc["missing_reasons"]["site_empty"]
    assert any("site_empty" in n and "never asked" in n for n in doc["notes"])
    assert "site_empty" not in doc["sites"]

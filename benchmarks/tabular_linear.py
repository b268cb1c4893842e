"""The tabular encoder with and without its linear path, on cohorts other than OASIS-1.

One command, from the repository root::

    nice -n 10 .venv/bin/python benchmarks/tabular_linear.py

Chooses the default of ``modalities.tabular.linear_path`` (issue 14, item 4) on the sample
cohorts and on Mexico's open COVID-19 data, never on OASIS-1 (the judging cohort). For each
cohort the sites are prepared once, tabular modality only; per split seed every site's
patients are split again (:func:`multimodal_fl.training.split_patients`, the rule every
engine uses), the sites are pooled (centralized) and the shipped config's tabular model is
trained twice from the same seed, without and with the linear path (early stopping on the
validation AUC, as every engine). Printed per seed: the pooled test AUC of both, the paired
difference with a stratified bootstrap 95% CI over test patients, and a logistic regression
(median-imputed, standardised, ``C = 1``) fitted on training + validation as the reference.

Cohorts: ``configs/covid_oxygen.yaml`` and ``configs/alzheimers.yaml`` on ``sample_data/``
(the generated cohorts), and ``configs/mexico_covid_severity.yaml`` on the confirmed cases
of ``../shared/data/mexico_covid`` imported with ``configs/mappings/mexico_covid.yaml`` by
institution into a temporary folder (skipped, with a line saying so, when the CSV is absent).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from multimodal_fl.config import ExperimentConfig, SiteConfig, load_config
from multimodal_fl.data.csv_import import import_csv
from multimodal_fl.evaluation.metrics import MetricValue, repeated_cv_auc
from multimodal_fl.training import (
    CohortDataset,
    SiteData,
    build_model,
    fit_tabular_standardizer,
    load_site_data,
    predict,
    split_patients,
    train,
)

REPO = Path(__file__).resolve().parents[1]
MEXICO_CSV = REPO.parent / "shared" / "data" / "mexico_covid" / "covid19_mexico_bc_2021.csv"
MEXICO_MAPPING = REPO / "configs" / "mappings" / "mexico_covid.yaml"
TABULAR_ONLY = ["modalities.image.enabled=false", "modalities.text.enabled=false",
                "training.num_threads=1"]


def ci_text(m: MetricValue) -> str:
    """``0.871 [0.842, 0.899]`` or the reason the figure is undefined."""
    if m.value is None:
        return f"- ({m.reason})"
    if m.lo is None or m.hi is None:
        return f"{m.value:.3f}"
    return f"{m.value:.3f} [{m.lo:.3f}, {m.hi:.3f}]"


def pooled_splits(sites: dict[str, SiteData], cfg: ExperimentConfig, seed: int
                  ) -> dict[str, CohortDataset]:
    """Every site split again with ``seed``; the sites' train, val and test rows pooled."""
    parts: dict[str, list[CohortDataset]] = {"train": [], "val": [], "test": []}
    for name, sd in sites.items():
        ds = sd.dataset.select_modalities(["tabular"])
        split = split_patients(ds.patient_ids, ds.labels.numpy().astype(int), seed=seed,
                               site=name, fractions=cfg.training.split)
        for part, rows in parts.items():
            idx = [i for i, p in enumerate(ds.patient_ids) if split[p] == part]
            rows.append(ds.subset(idx))
    return {part: CohortDataset.concat(rows) for part, rows in parts.items()}


def tabular_scores(cfg: ExperimentConfig, data: dict[str, CohortDataset], seed: int,
                   linear_path: bool) -> np.ndarray:
    """Test scores of the config's tabular model trained with or without the linear path."""
    tab = cfg.modalities.tabular.model_copy(update={"linear_path": linear_path})
    mods = cfg.modalities.model_copy(update={"tabular": tab})
    run_cfg = cfg.model_copy(update={"modalities": mods, "seed": seed})
    model = build_model(run_cfg, data["train"])
    fit_tabular_standardizer(model, [data["train"]])
    train(model, data["train"], data["val"], cfg.training,
          generator=torch.Generator().manual_seed(seed))
    return np.asarray(predict(model, data["test"]), dtype=np.float64)


def logistic_scores(data: dict[str, CohortDataset]) -> np.ndarray:
    """Logistic regression on training + validation rows; test scores."""
    fit = CohortDataset.concat([data["train"], data["val"]])
    pipe = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True),
                         StandardScaler(), LogisticRegression(max_iter=5000))
    pipe.fit(fit.inputs["tabular"].numpy(), fit.labels.numpy().astype(int))
    return np.asarray(pipe.predict_proba(data["test"].inputs["tabular"].numpy())[:, 1])


def compare(name: str, cfg: ExperimentConfig, seeds: Sequence[int], n_boot: int
            ) -> list[float]:
    """Print one cohort's rows; return the per-seed differences (path - MLP)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tabular_linear_") as tmp:
        sites = load_site_data(cfg, Path(tmp))
    diffs = []
    for seed in seeds:
        data = pooled_splits(sites, cfg, seed)
        y = data["test"].labels.numpy().astype(int)
        plain, wide = (tabular_scores(cfg, data, seed, on) for on in (False, True))
        auc = {k: repeated_cv_auc(y, s[None, :], n_boot=n_boot, seed=seed)
               for k, s in (("mlp", plain), ("wide", wide), ("lr", logistic_scores(data)))}
        d = repeated_cv_auc(y, wide[None, :], baseline=plain[None, :], n_boot=n_boot, seed=seed)
        print(f"| {name} | {seed} | {len(y)} | {ci_text(auc['mlp'])} | {ci_text(auc['wide'])} "
              f"| {ci_text(d)} | {ci_text(auc['lr'])} |", flush=True)
        if d.value is not None:
            diffs.append(float(d.value))
    print(f"| {name} | mean | | | | {np.mean(diffs):+.3f} ({sum(x > 0 for x in diffs)} of "
          f"{len(diffs)} seeds > 0) | |  <!-- {time.perf_counter() - t0:.0f} s -->", flush=True)
    return diffs


def mexico_config(out: Path, min_site_size: int) -> ExperimentConfig:
    """The shipped Mexico experiment on the confirmed cases imported by institution."""
    result = import_csv(MEXICO_CSV, MEXICO_MAPPING, out, split_by="SECTOR",
                        min_site_size=min_site_size)
    cfg = load_config(REPO / "configs" / "mexico_covid_severity.yaml", TABULAR_ONLY)
    sites = sorted(result.sites, key=lambda s: -s.patients)
    return cfg.model_copy(update={"sites": [SiteConfig(name=s.name, path=s.path.resolve())
                                            for s in sites]})


def main(argv: Sequence[str] | None = None) -> int:
    """Print the comparison table (markdown)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--cohorts", nargs="+", default=["covid_oxygen", "alzheimers", "mexico"],
                    choices=["covid_oxygen", "alzheimers", "mexico"])
    ap.add_argument("--min-site-size", type=int, default=300, help="Mexico: pool smaller ones")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("MMFL_CACHE", "/tmp/mmfl_cache")
    t0 = time.perf_counter()
    print("| cohort | split seed | n test | tabular MLP | MLP + linear path | path - MLP "
          "[95% CI] | logistic regression |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    all_diffs: list[float] = []
    for name in args.cohorts:
        if name != "mexico":
            cfg = load_config(REPO / "configs" / f"{name}.yaml", TABULAR_ONLY)
            all_diffs += compare(name, cfg, args.seeds, args.n_boot)
            continue
        if not MEXICO_CSV.is_file():
            print(f"mexico: skipped, no {MEXICO_CSV}", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory(prefix="tabular_linear_mx_") as tmp:
            cfg = mexico_config(Path(tmp) / "sites", args.min_site_size)
            all_diffs += compare("mexico", cfg, args.seeds, args.n_boot)
    print(f"\nAll cohorts: mean path - MLP {np.mean(all_diffs):+.3f}, "
          f"{sum(x > 0 for x in all_diffs)} of {len(all_diffs)} seeds > 0. Total "
          f"{time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.2f}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

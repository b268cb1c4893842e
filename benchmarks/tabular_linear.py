"""The tabular encoder with and without its linear path, on cohorts other than OASIS-1.

One command, from the repository root::

    nice -n 10 .venv/bin/python benchmarks/tabular_linear.py --lr-scales 1 3 10 30

Chooses the defaults of ``modalities.tabular.linear_path`` and ``linear_lr_scale`` (issue 14,
item 4) on the sample cohorts and on Mexico's open COVID-19 data, never on OASIS-1 (the
judging cohort). For each cohort the sites are prepared once, tabular modality only; per split
seed every site's patients are split again (:func:`multimodal_fl.training.split_patients`, the
rule every engine uses), the sites are pooled (centralized) and the shipped config's tabular
model is trained from the same seed without the linear path and with it at every multiplier of
``--lr-scales`` (``modalities.tabular.linear_lr_scale``; early stopping on the validation AUC,
as every engine). Printed per seed: the pooled test AUCs, each path's paired difference to the
plain MLP with a stratified bootstrap 95% CI over test patients, and a logistic regression
(median-imputed, standardised, ``C = 1``) fitted on training + validation as the reference;
per cohort, the mean |coef| of the logistic regression and the mean |weight| of each trained
path; at the end, each multiplier's mean paired change against x1. With ``--warmups 0 N`` every
multiplier is trained twice, without and with ``training.linear_warmup_steps`` N (the path fitted
alone first, the deep part from a zero head), each a column of its own; ``fit`` in
``--warmups`` is ``training.linear_warmup_fit`` (the path started as a logistic regression
fitted on the training rows, its penalty chosen by cross-validation on them).

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
from sklearn.metrics import roc_auc_score
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
    warmup_fit,
    warmup_steps,
)

REPO = Path(__file__).resolve().parents[1]
MEXICO_CSV = REPO.parent / "shared" / "data" / "mexico_covid" / "covid19_mexico_bc_2021.csv"
MEXICO_MAPPING = REPO / "configs" / "mappings" / "mexico_covid.yaml"
TABULAR_ONLY = ["modalities.image.enabled=false", "modalities.text.enabled=false",
                "training.num_threads=1"]


def ci_text(m: MetricValue) -> str:
    """``0.871 [0.842, 0.899]`` or the reason the figure is undefined."""
    return m.text()


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
                   linear_path: bool, lr_scale: float = 1.0, warmup: int | str = 0
                   ) -> tuple[np.ndarray, float]:
    """Test scores of the config's tabular model, with or without the linear path.

    ``lr_scale`` is ``modalities.tabular.linear_lr_scale``, ``warmup``
    ``training.linear_warmup_steps`` or ``"fit"``: ``training.linear_warmup_fit`` (path
    only). Also returns the trained path's mean
    ``|weight|`` (``nan`` without the path).
    """
    tab = cfg.modalities.tabular.model_copy(update={"linear_path": linear_path,
                                                    "linear_lr_scale": lr_scale})
    mods = cfg.modalities.model_copy(update={"tabular": tab})
    fitted = warmup == "fit"
    training = cfg.training.model_copy(update={
        "linear_warmup_steps": 0 if fitted else int(warmup), "linear_warmup_fit": fitted})
    run_cfg = cfg.model_copy(update={"modalities": mods, "seed": seed, "training": training})
    model = build_model(run_cfg, data["train"])
    fit_tabular_standardizer(model, [data["train"]])
    train(model, data["train"], data["val"], cfg.training,
          generator=torch.Generator().manual_seed(seed),
          warmup_steps=warmup_steps(run_cfg, model), warmup_fit=warmup_fit(run_cfg, model))
    linear = getattr(model.encoders["tabular"], "linear", None)
    size = float(linear.weight.detach().abs().mean()) if linear is not None else float("nan")
    return np.asarray(predict(model, data["test"]), dtype=np.float64), size


def logistic_scores(data: dict[str, CohortDataset]) -> tuple[np.ndarray, float]:
    """Logistic regression on training + validation rows; test scores and mean ``|coef|``."""
    fit = CohortDataset.concat([data["train"], data["val"]])
    pipe = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True),
                         StandardScaler(), LogisticRegression(max_iter=5000))
    pipe.fit(fit.inputs["tabular"].numpy(), fit.labels.numpy().astype(int))
    size = float(np.abs(pipe[-1].coef_).mean())
    return np.asarray(pipe.predict_proba(data["test"].inputs["tabular"].numpy())[:, 1]), size


def column(scale: float, warmup: int | str) -> str:
    """A path column's name: ``x10``, ``x10 warm-up 3000`` or ``x10 warm-up fit``."""
    return f"x{scale:g}" + (f" warm-up {warmup}" if warmup else "")


def seed_row(cfg: ExperimentConfig, data: dict[str, CohortDataset], seed: int,
             scales: Sequence[float], n_boot: int, warmups: Sequence[int | str] = (0,)
             ) -> tuple[str, dict[str, float], list[float]]:
    """One seed: the table row, path - MLP per column, and the sizes (LR, then each column)."""
    y = data["test"].labels.numpy().astype(int)
    plain, _ = tabular_scores(cfg, data, seed, False)
    fits = {column(s, w): tabular_scores(cfg, data, seed, True, s, w)
            for s in scales for w in warmups}
    lr_scores, lr_size = logistic_scores(data)
    cells = [ci_text(repeated_cv_auc(y, plain[None, :], n_boot=n_boot, seed=seed))]
    diffs = {}
    for s, (wide, _) in fits.items():
        d = repeated_cv_auc(y, wide[None, :], baseline=plain[None, :], n_boot=n_boot, seed=seed)
        cells.append(f"{roc_auc_score(y, wide):.3f}; {ci_text(d)}")
        if d.value is not None:
            diffs[s] = float(d.value)
    cells.append(ci_text(repeated_cv_auc(y, lr_scores[None, :], n_boot=n_boot, seed=seed)))
    return (f"| {seed} | {len(y)} | " + " | ".join(cells) + " |", diffs,
            [lr_size] + [size for _, size in fits.values()])


def compare(name: str, cfg: ExperimentConfig, seeds: Sequence[int], n_boot: int,
            scales: Sequence[float], warmups: Sequence[int | str] = (0,)
            ) -> dict[str, list[float]]:
    """Print one cohort's rows; return the per-seed differences (path - MLP) per column."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tabular_linear_") as tmp:
        sites = load_site_data(cfg, Path(tmp))
    cols = [column(s, w) for s in scales for w in warmups]
    diffs: dict[str, list[float]] = {c: [] for c in cols}
    sizes = []
    for seed in seeds:
        row, d, size = seed_row(cfg, pooled_splits(sites, cfg, seed), seed, scales, n_boot,
                                warmups)
        print(f"| {name} {row}", flush=True)
        for s, v in d.items():
            diffs[s].append(v)
        sizes.append(size)
    means = " | ".join(f"{np.mean(v):+.3f} ({sum(x > 0 for x in v)}/{len(v)} > 0)"
                       for v in diffs.values())
    print(f"| {name} | mean | | | {means} | |  <!-- {time.perf_counter() - t0:.0f} s -->",
          flush=True)
    size = np.mean(sizes, axis=0)
    print(f"<!-- {name}: mean |coef| logistic regression {size[0]:.3f}; trained path mean "
          f"|weight| " + ", ".join(f"{c} {v:.3f}" for c, v in zip(cols, size[1:], strict=True))
          + " -->", flush=True)
    return diffs


def mexico_config(out: Path, min_site_size: int) -> ExperimentConfig:
    """The shipped Mexico experiment on the confirmed cases imported by institution."""
    result = import_csv(MEXICO_CSV, MEXICO_MAPPING, out, split_by="SECTOR",
                        min_site_size=min_site_size)
    cfg = load_config(REPO / "configs" / "mexico_covid_severity.yaml", TABULAR_ONLY)
    sites = sorted(result.sites, key=lambda s: -s.patients)
    return cfg.model_copy(update={"sites": [SiteConfig(name=s.name, path=s.path.resolve())
                                            for s in sites]})


def summary(all_diffs: dict[str, list[float]]) -> str:
    """Per column: the mean path - MLP and, against x1, the mean paired change."""
    lines = []
    base = all_diffs.get("x1")
    for s, v in all_diffs.items():
        line = (f"{s}: mean path - MLP {np.mean(v):+.3f}, {sum(x > 0 for x in v)} of "
                f"{len(v)} seeds > 0")
        if base is not None and s != "x1" and len(base) == len(v):
            gain = np.asarray(v) - np.asarray(base)
            line += (f"; against x1 {np.mean(gain):+.3f}, {int((gain > 0).sum())} of "
                     f"{len(gain)} seeds better")
        lines.append(line)
    return "\n".join(lines)


def warmup_arg(text: str) -> int | str:
    """A ``--warmups`` value: a step count, or ``fit``."""
    if text == "fit":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a step count or 'fit'") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Print the comparison table (markdown)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--cohorts", nargs="+", default=["covid_oxygen", "alzheimers", "mexico"],
                    choices=["covid_oxygen", "alzheimers", "mexico"])
    ap.add_argument("--lr-scales", nargs="+", type=float, default=[1.0, 10.0, 30.0],
                    help="modalities.tabular.linear_lr_scale values to compare")
    ap.add_argument("--warmups", nargs="+", type=warmup_arg, default=[0],
                    help="training.linear_warmup_steps values to train every path with; "
                         "'fit': training.linear_warmup_fit")
    ap.add_argument("--min-site-size", type=int, default=300, help="Mexico: pool smaller ones")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("MMFL_CACHE", "/tmp/mmfl_cache")
    t0 = time.perf_counter()
    scales = [float(s) for s in args.lr_scales]
    cols = [column(s, w) for s in scales for w in args.warmups]
    print("| cohort | split seed | n test | tabular MLP | "
          + " | ".join(f"path {c}: AUC; path - MLP [95% CI]" for c in cols)
          + " | logistic regression |")
    print("| --- " * (5 + len(cols)) + "|")
    all_diffs: dict[str, list[float]] = {c: [] for c in cols}
    for name in args.cohorts:
        if name != "mexico":
            cfg = load_config(REPO / "configs" / f"{name}.yaml", TABULAR_ONLY)
            got = compare(name, cfg, args.seeds, args.n_boot, scales, args.warmups)
        elif not MEXICO_CSV.is_file():
            print(f"mexico: skipped, no {MEXICO_CSV}", file=sys.stderr)
            continue
        else:
            with tempfile.TemporaryDirectory(prefix="tabular_linear_mx_") as tmp:
                cfg = mexico_config(Path(tmp) / "sites", args.min_site_size)
                got = compare("mexico", cfg, args.seeds, args.n_boot, scales, args.warmups)
        for s, v in got.items():
            all_diffs[s] += v
    print(f"\nAll cohorts:\n{summary(all_diffs)}\nTotal {time.perf_counter() - t0:.0f} s, "
          f"load average {os.getloadavg()[0]:.2f}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

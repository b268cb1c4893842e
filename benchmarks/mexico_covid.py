"""COVID-19 severity on Mexico's open data: a task from YAML alone, federated across institutions.

One command, from the repository root::

    .venv/bin/python benchmarks/mexico_covid.py

1. **Import.** ``import_csv`` (what ``mmfl data import-csv`` runs) with the shipped mapping
   ``configs/mappings/mexico_covid.yaml``: the confirmed cases, one site per institution
   (``SECTOR``), institutions under ``--min-site-size`` patients pooled into ``other``; each
   site's size is printed. Into ``--out`` (default: a temporary folder, removed after; never
   inside the repository: the rows are real patients).
2. **Train.** The shipped experiment ``configs/mexico_covid_severity.yaml`` (task
   ``configs/tasks/covid_severity.yaml``: hospitalised, from age, sex and comorbidities known
   at presentation; ``--task`` runs a variant) on those sites with three engines, each into a
   run directory of its own: ``inprocess`` (federated), ``local`` (one model per site) and
   ``centralized`` (pooled). They share each site's split (``sha256(seed, site, patient)``).
3. **Test AUC** with stratified percentile bootstrap 95% CIs
   (:func:`multimodal_fl.evaluation.metrics.bootstrap_ci`), pooled over the sites' test
   patients and per site, for the three engines and for the **external reference**: a
   logistic regression on the same inputs (age, sex, comorbidities; median-imputed,
   standardised), fitted on the pooled training + validation patients of the same splits.
4. **Leave one site out.** For each site: the federated experiment on the other sites only,
   then the held-out site scored with that model (``predict_site``, what ``mmfl predict``
   runs) on all its patients; the same for the logistic regression. Beside it, the site's test
   AUC when it took part.
5. **Fairness.** ``mmfl report`` on the three run directories; from its ``report.json``, the
   federated model's test AUC per site by sex and by age band (cells under ``min_cell``
   patients suppressed, as the report does), and the equalized-odds difference.

The full confirmed cohort (18,605 cases) took 411 s on the project's two shared cores
(load average 5): import 14 s, training 19-54 s per run, ``mmfl report`` about 2 minutes;
``--sample-fraction F`` keeps a seeded random share of the CSV's rows (``--sample-seed``) and
says the n it used. When the CSV is absent the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from multimodal_fl.config import ExperimentConfig, SiteConfig, load_config
from multimodal_fl.data import build_cohorts
from multimodal_fl.data.csv_import import ImportResult, import_csv
from multimodal_fl.engines import run
from multimodal_fl.engines.predict import predict_site
from multimodal_fl.evaluation.metrics import MetricValue, bootstrap_ci, bootstrap_seed

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CSV = REPO.parent / "shared" / "data" / "mexico_covid" / "covid19_mexico_bc_2021.csv"
MAPPING = REPO / "configs" / "mappings" / "mexico_covid.yaml"
CONFIG = REPO / "configs" / "mexico_covid_severity.yaml"
ENGINES = {"federated": "inprocess", "local": "local", "centralized": "centralized"}
LR = "logistic regression"
#: The external reference given for this data (``../shared/data/README.md``): a logistic
#: regression on age, sex and comorbidities, hospitalisation.
EXTERNAL_REFERENCE = 0.80


def ci_text(m: MetricValue) -> str:
    """``0.871 [0.842, 0.899]`` or the reason the figure is undefined."""
    return m.text()


def auc(y: Any, score: Any, *, n_boot: int, seed: int) -> MetricValue:
    """Test AUC with a stratified percentile bootstrap 95% CI, seeded as the engines seed a
    site's (:func:`~multimodal_fl.evaluation.metrics.bootstrap_seed`), so a site's interval
    here is the one in its run's ``metrics.json``."""
    s = np.asarray(score, dtype=float)
    return bootstrap_ci("auc", np.asarray(y, dtype=int), s, n_boot=n_boot,
                        seed=bootstrap_seed(seed, s))


def sample_rows(src: Path, dest: Path, fraction: float, seed: int) -> int:
    """Write a seeded random share of ``src``'s rows (header kept) to ``dest``; return n."""
    rng = random.Random(seed)
    kept = 0
    with src.open(newline="", encoding="utf-8-sig") as fh, \
            dest.open("w", newline="", encoding="utf-8") as out:
        reader, writer = csv.reader(fh), csv.writer(out)
        writer.writerow(next(reader))
        for row in reader:
            if rng.random() < fraction:
                writer.writerow(row)
                kept += 1
    return kept


def import_sites(src: Path, out: Path, min_site_size: int) -> ImportResult:
    """Import the confirmed cases by institution and print each site's size."""
    t0 = time.perf_counter()
    result = import_csv(src, MAPPING, out, split_by="SECTOR", min_site_size=min_site_size)
    c = result.counts
    print(f"\nimport: {c['rows_read']} rows read, {c.get('rows_not_kept', 0)} not confirmed, "
          f"{c.get('rows_skipped', 0)} skipped, {c['rows_imported']} imported in "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| site | SECTOR values | patients | hospitalised | rate |")
    print("| --- | --- | ---: | ---: | ---: |")
    for s in result.sites:
        rate = s.positives / s.labelled if s.labelled else float("nan")
        print(f"| {s.name} | {','.join(s.split_values)} | {s.patients} | {s.positives} | "
              f"{rate:.3f} |")
    return result


def experiment(config: Path, task: Path, result: ImportResult,
               overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The shipped experiment on the imported sites (the largest first), the chosen task and
    the ``--set`` overrides."""
    cfg = load_config(config, [f"task={task.resolve()}", *overrides])
    sites = sorted(result.sites, key=lambda s: -s.patients)
    return cfg.model_copy(update={"sites": [SiteConfig(name=s.name, path=s.path.resolve())
                                            for s in sites]})


def predictions(run_dir: Path, split: str | None = "test") -> pd.DataFrame:
    """Every site's ``predictions.csv`` of a run (one split, or all rows)."""
    pred = pd.concat([pd.read_csv(p, dtype={"patient_id": str}).assign(site=p.parent.name)
                      for p in sorted((run_dir / "sites").glob("*/predictions.csv"))],
                     ignore_index=True)
    return pred if split is None else pred[pred["split"] == split]


@dataclass
class Cohort:
    """The pooled cohort table (features, label) with each patient's split."""

    table: pd.DataFrame
    features: list[str]


def cohort_with_splits(cfg: ExperimentConfig, run_dir: Path) -> Cohort:
    """Every site's cohort table with the run's split of each patient."""
    cohorts = build_cohorts(cfg)
    features = next(iter(cohorts.values())).feature_names
    table = pd.concat([c.table for c in cohorts.values()], ignore_index=True)
    splits = predictions(run_dir, None)[["site", "patient_id", "split"]]
    table = table.merge(splits, on=["site", "patient_id"], how="left")
    return Cohort(table, features)


def logistic_scores(train: pd.DataFrame, test: pd.DataFrame, features: list[str]) -> Any:
    """Logistic regression on ``features`` (median-imputed, standardised); test scores."""
    model = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                          LogisticRegression(max_iter=2000))
    model.fit(train[features].to_numpy(float), train["label"].to_numpy(int))
    return model.predict_proba(test[features].to_numpy(float))[:, 1]


def train_engines(cfg: ExperimentConfig, runs: Path) -> dict[str, Path]:
    """Train the experiment with each engine into ``runs/<name>``; print the times."""
    out: dict[str, Path] = {}
    for name, engine in ENGINES.items():
        t0 = time.perf_counter()
        run(cfg, engine=engine, out_dir=runs / name, report=False)
        print(f"trained {name} ({engine}) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        out[name] = runs / name
    return out


def auc_tables(run_dirs: dict[str, Path], cohort: Cohort, sites: list[str], *, n_boot: int,
               seed: int, reference: bool) -> dict[str, dict[str, MetricValue]]:
    """Test AUC [95% CI] per model: pooled (key ``all``) and per site; prints the table."""
    test = cohort.table[cohort.table["split"] == "test"]
    fit = cohort.table[cohort.table["split"].isin(["train", "val"])]
    frames = {name: predictions(path) for name, path in run_dirs.items()}
    frames[LR] = test.assign(score=logistic_scores(fit, test, cohort.features))
    res: dict[str, dict[str, MetricValue]] = {}
    for name, f in frames.items():
        res[name] = {"all": auc(f["label"], f["score"], n_boot=n_boot, seed=seed)}
        for site in sites:
            part = f[f["site"] == site]
            res[name][site] = auc(part["label"], part["score"], n_boot=n_boot, seed=seed)
    n, pos = len(test), int(test["label"].sum())
    print(f"\n### Test AUC [95% CI], {n} test patients ({pos} positive)\n")
    print("| model | pooled | " + " | ".join(sites) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in sites) + " |")
    for name, row in res.items():
        print(f"| {name} | {ci_text(row['all'])} | "
              + " | ".join(ci_text(row[s]) for s in sites) + " |")
    if reference:
        print(f"| external reference ({LR}, this data, shared/data README) | about "
              f"{EXTERNAL_REFERENCE:.2f} | " + " | ".join("" for _ in sites) + " |")
    return res


def leave_one_site_out(cfg: ExperimentConfig, cohort: Cohort, runs: Path,
                       inside: dict[str, MetricValue], *, n_boot: int, seed: int) -> None:
    """Train on the other sites, score the held-out one (all its patients); print the table."""
    print("\n### Leave one site out: trained on the other sites, tested on all patients of "
          "the held-out one\n")
    print(f"| held-out site | n (positive) | federated | {LR} | federated, site "
          "inside (its test split) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for held in cfg.sites:
        others = [s for s in cfg.sites if s.name != held.name]
        run_dir = runs / f"loso-{held.name}"
        t0 = time.perf_counter()
        run(cfg.model_copy(update={"sites": others}), engine="inprocess", out_dir=run_dir,
            report=False)
        scored = predict_site(run_dir, held.path, site_name=held.name).frame
        print(f"leave out {held.name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        table = cohort.table
        lr = logistic_scores(table[table["site"] != held.name],
                             table[table["site"] == held.name], cohort.features)
        held_rows = table[table["site"] == held.name]
        fed = auc(scored["label"], scored["score"], n_boot=n_boot, seed=seed)
        ref = auc(held_rows["label"], lr, n_boot=n_boot, seed=seed)
        print(f"| {held.name} | {len(scored)} ({int(scored['label'].sum())}) | "
              f"{ci_text(fed)} | {ci_text(ref)} | {ci_text(inside[held.name])} |")


def write_report(run_dirs: dict[str, Path], out: Path) -> dict[str, Any]:
    """``mmfl report`` on the run directories; its report.json."""
    cmd = [sys.executable, "-m", "multimodal_fl", "report", *map(str, run_dirs.values()),
           "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    doc: dict[str, Any] = json.loads((out / "report.json").read_text())
    return doc


def _cell_text(cell: dict[str, Any]) -> str:
    if cell.get("suppressed"):
        return f"suppressed ({cell.get('reason')})"
    if cell.get("value") is None:
        return f"- ({cell.get('reason')})"
    counts = [f"n {cell['n']}" if cell.get("n") is not None else None,
              f"{cell['n_pos']} pos" if cell.get("n_pos") is not None else None]
    shown = ", ".join(c for c in counts if c) or "counts not released: the pooled form"
    return f"{cell['value']:.3f} [{cell['lo']:.3f}, {cell['hi']:.3f}] ({shown})"


def fairness_table(report: dict[str, Any], run_label: str) -> None:
    """Print the federated model's test AUC by sex and age band, per site, from report.json."""
    section = report["fairness"][run_label]
    cells = [c for c in section["cells"] if c["metric"] == "auc"
             and c["scope"] in ("subgroup", "site_subgroup")]
    print(f"\n### Fairness of the {run_label} model (mmfl report, test split): AUC by sex "
          "and age band\n")
    print("| site | attribute | group | AUC [95% CI] (n, positives) |")
    print("| --- | --- | --- | --- |")
    for c in sorted(cells, key=lambda c: (c["scope"] != "subgroup", c["site"],
                                          c["attribute"], c["group"])):
        print(f"| {c['site']} | {c['attribute']} | {c['group']} | {_cell_text(c)} |")
    print("\n| site | attribute | equalized-odds difference | demographic-parity difference |")
    print("| --- | --- | ---: | ---: |")
    for d in section["disparities"]:
        if d.get("suppressed"):
            print(f"| {d['site']} | {d['attribute']} | suppressed ({d['reason']}) | |")
            continue
        print(f"| {d['site']} | {d['attribute']} | {d['equalized_odds_difference']:.3f} | "
              f"{d['demographic_parity_difference']:.3f} |")


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_CSV, help="the open-data CSV")
    ap.add_argument("--out", type=Path, default=None,
                    help="sites and runs go here (default: a temporary folder, removed after)")
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--task", type=Path, default=REPO / "configs" / "tasks" /
                    "covid_severity.yaml", help="a task file (a variant: covid_severity_icu...)")
    ap.add_argument("--min-site-size", type=int, default=300)
    ap.add_argument("--sample-fraction", type=float, default=1.0,
                    help="keep this seeded random share of the CSV rows (default: all)")
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--no-loso", action="store_true", help="skip leave-one-site-out")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override a.b=c for every engine (repeatable)")
    return ap.parse_args(argv)


def benchmark(args: argparse.Namespace, out: Path) -> None:
    """Import, train, and print every table (see the module docstring)."""
    src = args.data
    if args.sample_fraction < 1.0:
        src = out / "sample.csv"
        n = sample_rows(args.data, src, args.sample_fraction, args.sample_seed)
        print(f"sample: {n} of the CSV's rows (fraction {args.sample_fraction}, seed "
              f"{args.sample_seed})")
    result = import_sites(src, out / "sites", args.min_site_size)
    cfg = experiment(args.config, args.task, result, args.overrides)
    print(f"\ntask {cfg.task.name}; engines on {len(cfg.sites)} sites; seed {cfg.seed}; "
          f"training {cfg.training.steps} steps, federated {cfg.federated.rounds} rounds x "
          f"{cfg.federated.local_steps} local steps; overrides {args.overrides or 'none'}",
          flush=True)
    run_dirs = train_engines(cfg, out / "runs")
    cohort = cohort_with_splits(cfg, run_dirs["federated"])
    t = cohort.table
    print(f"cohort: {len(t)} patients, {int(t['label'].sum())} positive; inputs: "
          f"{', '.join(cohort.features)}")
    sites = [s.name for s in cfg.sites]
    res = auc_tables(run_dirs, cohort, sites, n_boot=args.n_boot, seed=cfg.seed,
                     reference=cfg.task.name == "covid_severity")
    if not args.no_loso:
        leave_one_site_out(cfg, cohort, out / "runs", res["federated"], n_boot=args.n_boot,
                           seed=cfg.seed)
    report = write_report(run_dirs, out / "report")
    label = next(r["label"] for r in report["runs"] if r["engine"] == "inprocess")
    fairness_table(report, label)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    args = _args(argv)
    if not args.data.is_file():
        print(f"skipped: no Mexico open-data CSV at {args.data}; pass --data", file=sys.stderr)
        return 0
    if not 0 < args.sample_fraction <= 1:
        print(f"--sample-fraction {args.sample_fraction}: give a share in (0, 1]",
              file=sys.stderr)
        return 2
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="mexico_covid_")
        out = Path(tmp.name)
    else:
        out = args.out.resolve()
        if out.is_relative_to(REPO):
            print(f"--out {out} is inside the repository; these are real patients' rows: "
                  f"choose a folder outside {REPO}", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        benchmark(args, out)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"\nTotal {time.perf_counter() - t0:.0f} s, load average "
          f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

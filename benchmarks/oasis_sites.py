"""OASIS-1 in the site contract, then the modality ablation on it (tabular vs image vs fusion).

Reads the shared OASIS-1 cross-sectional subjects (``--data``, default
``/work/shared/data/oasis1``: ``oasis_cross-sectional.csv`` and ``images/<ID>_{a,c,s}.jpg``,
axial / coronal / sagittal slices) and writes, for the subjects that have images (196),
site directories in the project's data contract under ``--out`` (default: a temporary
folder, deleted afterwards):

* ``fhir/<ID>.json``: a collection Bundle with a Patient (gender from ``M/F``, birthDate
  from ``Age`` relative to the reference date 2020-01-01) and one Observation per measured
  value: MMSE (LOINC 72106-8), education level, SES, eTIV, nWBV and ASF (local codes in
  ``http://oasis-brains.org/fhir``). CDR is NEVER written as an Observation: it is the label.
* ``images.csv``: the three slices (``view`` axial, coronal, sagittal); the pipeline uses
  one image per patient, the first undated one by path, i.e. the axial slice (``_a``).
* ``labels.csv``: ``CDR > 0``.

Subjects go to ``--sites`` sites by a hash of their id. A task YAML (``oasis1_dementia``,
label from ``labels.csv``) and an experiment YAML (image: smallcnn 2D at 64 px; tabular: MLP;
no text; training as the shipped configs) are written beside the sites. Then the centralized
ablation of ``benchmarks/ablation.py`` runs: tabular, image and fusion, test AUC pooled over
sites with bootstrap 95% CIs, repeated over seeds (each seed re-splits the patients).

No OASIS data is written inside the repository: ``--out`` must lie outside it. When the
shared data folder is absent the script prints why and exits 0.

Usage::

    MMFL_CACHE=/tmp/mmfl_cache .venv/bin/python benchmarks/oasis_sites.py
    .venv/bin/python benchmarks/oasis_sites.py --out /tmp/oasis_sites --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import torch
import yaml
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from multimodal_fl.config import load_config
from multimodal_fl.evaluation.metrics import binary_metrics
from multimodal_fl.training import CohortDataset, SiteData

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import (
    ConfigResult,
    SeedResult,
    ablate,
    markdown_table,
    prepare,
    resplit,
    verdict,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path("/work/shared/data/oasis1")
REFERENCE_DATE = date(2020, 1, 1)
OBSERVED = "2019-12-01T10:00:00Z"
LOCAL = "http://oasis-brains.org/fhir"
LOINC = "http://loinc.org"
VIEWS = {"a": "axial", "c": "coronal", "s": "sagittal"}

#: CSV column -> (feature name, code system, code, UCUM unit). CDR is deliberately absent.
#: The unit table has no volume unit, so eTIV (cm3) travels as a dimensionless {score}.
FEATURES: dict[str, tuple[str, str, str, str]] = {
    "MMSE": ("mmse", LOINC, "72106-8", "{score}"),
    "Educ": ("education_level", LOCAL, "educ", "{score}"),
    "SES": ("ses", LOCAL, "ses", "{score}"),
    "eTIV": ("etiv", LOCAL, "etiv", "{score}"),
    "nWBV": ("nwbv", LOCAL, "nwbv", "1"),
    "ASF": ("asf", LOCAL, "asf", "1"),
}

#: Context measured on the same 196 subjects (5x5-fold CV), quoted beside the results.
CONTEXT = [
    ("logistic regression, tabular features (5x5-fold CV)", "0.88 [0.83, 0.93]"),
    ("pixel PCA or small CNN on the slices (5x5-fold CV)", "0.68-0.72"),
]


def _number(raw: str | None) -> float | None:
    if raw is None or raw.strip() in ("", "N/A", "NA", "nan"):
        return None
    return float(raw)


def site_of(subject: str, sites: Sequence[str]) -> str:
    """Site of a subject: sha256 of its id modulo the number of sites."""
    h = int.from_bytes(hashlib.sha256(subject.encode()).digest()[:8], "big")
    return sites[h % len(sites)]


def fhir_id(subject: str) -> str:
    """FHIR-valid id of a subject (``[A-Za-z0-9.-]``): ``OAS1_0001_MR1`` -> ``OAS1-0001-MR1``."""
    return subject.replace("_", "-")


def subject_bundle(row: dict[str, str]) -> dict[str, Any]:
    """One subject's FHIR collection Bundle: a Patient and its Observations (never CDR).

    Parameters
    ----------
    row : dict of str to str
        A row of ``oasis_cross-sectional.csv``.

    Returns
    -------
    dict
        The Bundle as JSON-ready dict.
    """
    pid = fhir_id(row["ID"])
    sex = row["M/F"].strip().upper()
    if sex not in ("M", "F"):
        raise ValueError(f"subject {pid}: M/F is {row['M/F']!r}; accepted: M or F")
    age = _number(row.get("Age"))
    if age is None:
        raise ValueError(f"subject {pid}: no Age")
    # Half a year before the birthday: age at the reference date is Age + 0.5 years.
    birth = REFERENCE_DATE - timedelta(days=round((age + 0.5) * 365.25))
    patient = {"resourceType": "Patient", "id": pid,
               "gender": "male" if sex == "M" else "female", "birthDate": birth.isoformat()}
    entries: list[dict[str, Any]] = [{"fullUrl": f"urn:uuid:{pid}", "resource": patient}]
    for column, (_name, system, code, unit) in FEATURES.items():
        value = _number(row.get(column))
        if value is None:
            continue
        obs = {
            "resourceType": "Observation", "id": f"{pid}-{code}", "status": "final",
            "code": {"coding": [{"system": system, "code": code, "display": column}]},
            "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": OBSERVED,
            "valueQuantity": {"value": value, "unit": unit,
                              "system": "http://unitsofmeasure.org", "code": unit},
        }
        entries.append({"fullUrl": f"urn:uuid:{pid}-{code}", "resource": obs})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def task_spec() -> dict[str, Any]:
    """The task YAML (as a dict): label from labels.csv, features from :data:`FEATURES`."""
    return {
        "name": "oasis1_dementia",
        "description": "OASIS-1: CDR > 0 (very mild dementia or worse), from labels.csv.",
        "image_modality": "mri",
        "cohort": {"conditions": []},
        "index": {"kind": "reference_date", "reference_date": REFERENCE_DATE.isoformat()},
        "features": {
            "demographics": ["age", "sex"],
            "lookback_days": 365,
            "missing_indicators": True,
            "observations": [
                {"name": name, "codes": [code], "unit": unit, "agg": "last"}
                for name, _system, code, unit in FEATURES.values()
            ],
        },
        "label": {"kind": "labels_csv", "labels_csv": "prefer"},
    }


def write_sites(data: Path, out: Path, n_sites: int) -> dict[str, int]:
    """Write the OASIS-1 subjects with images into site directories under ``out``.

    Parameters
    ----------
    data : Path
        Folder with ``oasis_cross-sectional.csv`` and ``images/``.
    out : Path
        Output folder (created); gets ``site_a``, ``site_b`` ...
    n_sites : int
        Number of sites (2-26).

    Returns
    -------
    dict of str to int
        Subjects per site.
    """
    if not 2 <= n_sites <= 26:
        raise ValueError(f"--sites must be between 2 and 26, got {n_sites}")
    sites = [f"site_{chr(ord('a') + i)}" for i in range(n_sites)]
    with open(data / "oasis_cross-sectional.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    counts = dict.fromkeys(sites, 0)
    tables: dict[str, dict[str, list[list[str]]]] = {
        s: {"images": [], "labels": []} for s in sites}
    for row in rows:
        pid = row["ID"]
        slices = {v: data / "images" / f"{pid}_{v}.jpg" for v in VIEWS}
        if not all(p.exists() for p in slices.values()):
            continue
        cdr = _number(row.get("CDR"))
        if cdr is None:
            raise ValueError(f"subject {pid} has images but no CDR (the label)")
        site = site_of(pid, sites)
        root = out / site
        (root / "fhir").mkdir(parents=True, exist_ok=True)
        (root / "images").mkdir(exist_ok=True)
        (root / "fhir" / f"{pid}.json").write_text(json.dumps(subject_bundle(row)))
        for v, src in slices.items():
            shutil.copyfile(src, root / "images" / src.name)
            tables[site]["images"].append([fhir_id(pid), f"images/{src.name}", "MR", VIEWS[v]])
        tables[site]["labels"].append([fhir_id(pid), str(int(cdr > 0))])
        counts[site] += 1
    for site, t in tables.items():
        for name, header in (("images", ["patient_id", "path", "modality", "view"]),
                             ("labels", ["patient_id", "label"])):
            with open(out / site / f"{name}.csv", "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(header)
                w.writerows(t[name])
    return counts


def experiment_config(out: Path, sites: Sequence[str], task_path: Path, fusion: str) -> Path:
    """Write the experiment YAML (shipped training settings, smallcnn 2D at 64 px, no text)."""
    cfg = {
        "task": str(task_path),
        "sites": [{"name": s, "path": str(out / s)} for s in sites],
        "data": {"on_error": "skip"},
        "modalities": {
            "image": {"encoder": "smallcnn", "spatial_dims": 2, "size": 64, "embed_dim": 32},
            "tabular": {"encoder": "mlp", "hidden": [64], "embed_dim": 32},
            "text": {"enabled": False},
        },
        "fusion": {"kind": fusion, "dim": 16, "modality_dropout": 0.2},
        "training": {"steps": 300, "batch_size": 32, "lr": 0.0003, "num_threads": 1},
        "seed": 0,
    }
    path = out / "oasis1.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def logistic_baseline(cfg_path: Path, sites: dict[str, SiteData], seeds: Sequence[int], *,
                      n_boot: int) -> ConfigResult:
    """Logistic regression on the pipeline's tabular inputs, on the ablation's own splits.

    Fitted on train + validation patients (no early stopping needed), median-imputed and
    standardised, tested on the same pooled test patients as the neural models of each seed:
    it separates the model from the data pipeline when the tabular MLP trails the context.

    Parameters
    ----------
    cfg_path : Path
        Experiment YAML (split fractions).
    sites : dict of str to SiteData
        Prepared sites.
    seeds : sequence of int
        Split seeds (as in :func:`ablation.ablate`).
    n_boot : int
        Bootstrap resamples for the first seed's CI.

    Returns
    -------
    ConfigResult
    """
    res = ConfigResult("logistic regression, tabular (same splits)", ("tabular",))
    for k, seed in enumerate(seeds):
        cfg = load_config(cfg_path, [f"seed={seed}"])
        split = resplit(sites, cfg, seed)
        fit = CohortDataset.concat([p for s in split.values() for p in (s.train, s.val)])
        te = CohortDataset.concat([s.test for s in split.values()])
        model = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                              LogisticRegression(max_iter=2000))
        model.fit(fit.inputs["tabular"].numpy(), fit.labels.numpy().astype(int))
        score = model.predict_proba(te.inputs["tabular"].numpy())[:, 1]
        y = te.labels.numpy().astype(int)
        m = binary_metrics(y, score, metrics=["auc"], n_boot=n_boot if k == 0 else 0,
                           seed=seed)["auc"]
        res.seeds.append(SeedResult(seed, m.value, m.value, len(te), len(te), (m.lo, m.hi),
                                    (m.lo, m.hi)))
    return res


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: write the sites, run the ablation, print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=None,
                    help="where the sites go (default: a temporary folder, removed after)")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--fusion", default="concat", choices=["concat", "attention", "late"])
    ap.add_argument("--write-only", action="store_true", help="write the sites and stop")
    args = ap.parse_args(argv)
    table = args.data / "oasis_cross-sectional.csv"
    if not table.exists() or not (args.data / "images").is_dir():
        print(f"skipped: no OASIS-1 data at {args.data} (needs oasis_cross-sectional.csv and "
              f"images/); pass --data", file=sys.stderr)
        return 0
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="oasis_sites_")
        out = Path(tmp.name)
    else:
        out = args.out.resolve()
        if out.is_relative_to(REPO):
            print(f"--out {out} is inside the repository; OASIS data may not be committed, "
                  f"choose a folder outside {REPO}", file=sys.stderr)
            return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
        counts = write_sites(args.data, out, args.sites)
        task_path = out / "oasis1_dementia.yaml"
        task_path.write_text(yaml.safe_dump(task_spec(), sort_keys=False))
        cfg_path = experiment_config(out, list(counts), task_path, args.fusion)
        print(f"wrote {sum(counts.values())} subjects to {out}: {counts}", file=sys.stderr)
        if args.write_only:
            return 0
        os.environ.setdefault("MMFL_CACHE", "/tmp/mmfl_cache")
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        sites = prepare(cfg_path)
        sd0 = next(iter(sites.values()))
        n = sum(len(s.dataset) for s in sites.values())
        pos = sum(int(s.dataset.labels.sum()) for s in sites.values())
        print(f"\n### OASIS-1 (CDR > 0), {n} subjects ({pos} positive) in {len(sites)} sites, "
              f"centralized, {args.fusion} fusion, seeds {args.seeds}\n")
        print(f"tabular inputs: {', '.join(sd0.feature_names)}\n")
        configs: dict[str, Sequence[str]] = {"tabular": ["tabular"], "image": ["image"],
                                             "fusion": ["image", "tabular"]}
        res = ablate(cfg_path, sites, configs, args.seeds, n_boot=args.n_boot)
        print(markdown_table(res))
        lr = logistic_baseline(cfg_path, sites, args.seeds, n_boot=args.n_boot)
        print("\nSame splits, logistic regression on the same tabular inputs:\n")
        print(markdown_table([lr]))
        print("\nContext on the same 196 subjects (measured outside this pipeline):\n")
        print("| model | AUC |\n| --- | --- |")
        for name, auc in CONTEXT:
            print(f"| {name} | {auc} |")
        ok, text = verdict(res)
        print(f"\nOASIS-1: {text}")
        fm = next(r for r in res if r.name == "fusion").mean("all")
        if fm is not None and fm > 0.95:
            print("WARNING: fusion AUC above 0.95 is far above the tabular context (0.88): "
                  "look for a label leak (CDR among the features?)")
        print(f"\nTotal {time.perf_counter() - t0:.0f}s, load average {os.getloadavg()[0]:.2f}.")
        return 0 if ok else 1
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())

"""Check the signal of the generated sample cohorts with simple models, read back from the files.

For each sample task this script reads every site directory written by
``mmfl sample-data`` with its own small reader (independent of ``multimodal_fl.data``):
FHIR Bundles / NDJSON / single resources, images via ``images.csv``, ImagingStudy or
DICOM PatientID, notes via DocumentReference (base64 or url), DiagnosticReport and
``notes.csv``, and ``labels.csv``. It applies the shipped task's index, feature window
and label rule (codes from the task YAML), then prints cross-validated AUCs:

* tabular: logistic regression on the task's features (median-imputed, missing flags);
* image: logistic regression on a PCA of downsampled pixels (16x16 or 8x8x8);
* text: TF-IDF (1-2 grams) + logistic regression;
* fusion: late fusion, the mean of the modality logits over the modalities present;
* per site: fusion trained on the site alone (local) vs on all sites (pooled), AUC on
  the same held-out patients of that site.

Usage::

    mmfl sample-data /tmp/sample && python benchmarks/sample_signal.py /tmp/sample
    python benchmarks/sample_signal.py sample_data --repeats 3
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import zoom
from sklearn.decomposition import PCA
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from multimodal_fl.config import TaskSpec, load_task

UNIT_FACTORS = {("[degF]", "Cel"): lambda v: (v - 32.0) * 5.0 / 9.0,
                ("mg/dL", "mg/L"): lambda v: v * 10.0,
                ("10*9/L", "10*3/uL"): lambda v: v}


@dataclass
class Patient:
    """What the check needs of one patient."""

    pid: str
    gender: str = ""
    birth: datetime | None = None
    deceased: datetime | None = None
    obs: list[tuple[str, datetime, float, str]] = field(default_factory=list)
    conditions: list[tuple[str, datetime, str | None]] = field(default_factory=list)
    events: list[tuple[str, datetime]] = field(default_factory=list)
    encounters: dict[str, datetime] = field(default_factory=dict)
    notes: list[tuple[str, datetime | None]] = field(default_factory=list)
    images: list[tuple[Path, datetime | None]] = field(default_factory=list)
    label_csv: int | None = None


def _dt(text: str | None) -> datetime | None:
    if not text:
        return None
    if len(text) == 10:
        return datetime.combine(datetime.fromisoformat(text).date(), time(), tzinfo=UTC)
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _pid(ref: dict[str, str] | None) -> str:
    r = (ref or {}).get("reference", "")
    return r.split(":")[-1] if r.startswith("urn:uuid:") else r.split("/")[-1]


def _codes(cc: dict[str, Any] | None) -> list[str]:
    return [c.get("code", "") for c in (cc or {}).get("coding", [])]


def _resources(site: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in sorted((site / "fhir").rglob("*")):
        if p.suffix == ".ndjson":
            out += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        elif p.suffix == ".json":
            obj = json.loads(p.read_text())
            if obj.get("resourceType") == "Bundle":
                out += [e["resource"] for e in obj.get("entry", [])]
            else:
                out.append(obj)
    return out


def read_site(site: Path) -> dict[str, Patient]:
    """Read one site directory into patients (all routes of the site contract)."""
    pts: dict[str, Patient] = defaultdict(lambda: Patient(""))
    for r in _resources(site):
        t = r["resourceType"]
        if t == "Patient":
            p = pts[r["id"]]
            p.pid, p.gender = r["id"], r.get("gender", "")
            p.birth, p.deceased = _dt(r.get("birthDate")), _dt(r.get("deceasedDateTime"))
            continue
        pid = _pid(r.get("subject") or r.get("patient"))
        p = pts[pid]
        if t == "Observation":
            when = _dt(r.get("effectiveDateTime"))
            parts = [r, *r.get("component", [])]
            for part in parts:
                q = part.get("valueQuantity")
                for code in _codes(part.get("code")):
                    if q is not None and when is not None:
                        p.obs.append((code, when, float(q["value"]), q.get("code", q.get("unit"))))
        elif t == "Condition":
            enc = _pid(r["encounter"]) if "encounter" in r else None
            for code in _codes(r.get("code")):
                p.conditions.append((code, _dt(r.get("onsetDateTime")), enc))  # type: ignore[arg-type]
        elif t == "Procedure":
            for code in _codes(r.get("code")):
                p.events.append((code, _dt(r["performedPeriod"]["start"])))  # type: ignore[arg-type]
        elif t == "Device":
            for code in _codes(r.get("type")):
                p.events.append((code, _dt(r.get("manufactureDate"))))  # type: ignore[arg-type]
        elif t == "Encounter":
            p.encounters[r["id"]] = _dt(r["period"]["start"])  # type: ignore[assignment]
        elif t == "DocumentReference":
            att = r["content"][0]["attachment"]
            text = (base64.b64decode(att["data"]).decode() if "data" in att
                    else (site / att["url"]).read_text())
            p.notes.append((text, _dt(r.get("date"))))
        elif t == "DiagnosticReport":
            when = _dt(r.get("effectiveDateTime"))
            for form in r.get("presentedForm", []):
                p.notes.append((base64.b64decode(form["data"]).decode(), when))
            if r.get("conclusion"):
                p.notes.append((r["conclusion"], when))
        elif t == "ImagingStudy":
            for ident in r.get("identifier", []):
                if ident.get("system") == "urn:mmfl:image-path":
                    p.images.append((site / ident["value"], _dt(r.get("started"))))
    for name, kind in (("images.csv", "img"), ("notes.csv", "note"), ("labels.csv", "label")):
        path = site / name
        if not path.is_file():
            continue
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                p = pts[row["patient_id"]]
                if kind == "img":
                    p.images.append((site / row["path"], _dt(row.get("acquired"))))
                elif kind == "note":
                    p.notes.append((row["text"], _dt(row.get("date"))))
                else:
                    p.label_csv = int(row["label"])
    linked = {img for p in pts.values() for img, _ in p.images}
    for dcm in sorted((site / "images").rglob("*.dcm")) if (site / "images").is_dir() else []:
        if dcm not in linked:
            import pydicom

            ds = pydicom.dcmread(dcm, stop_before_pixels=True)
            pts[str(ds.PatientID)].images.append(
                (dcm, _dt(datetime.strptime(ds.StudyDate, "%Y%m%d").date().isoformat())))
    return {k: v for k, v in pts.items() if v.pid}


def _load_image(path: Path, size: int) -> np.ndarray:
    name = path.name.lower()
    if name.endswith(".dcm"):
        import pydicom

        arr = pydicom.dcmread(path).pixel_array
    elif name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        arr = np.asanyarray(nib.load(str(path)).dataobj)  # type: ignore[attr-defined]
    else:
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im)
    arr = zoom(arr.astype(np.float64), [size / s for s in arr.shape], order=1).ravel()
    return (arr - arr.mean()) / (arr.std() + 1e-6)  # per-image standardisation


def _aggregate(vals: list[float], agg: str) -> float:
    if not vals:
        return float("nan")
    if agg == "last":
        return vals[-1]
    if agg == "first":
        return vals[0]
    if agg == "min":
        return min(vals)
    if agg == "max":
        return max(vals)
    return float(np.mean(vals))


@dataclass
class Row:
    """One cohort patient: label, features and modality inputs."""

    site: str
    pid: str
    label: int
    tab: np.ndarray
    image: np.ndarray | None
    text: str | None


def cohort(site_dir: Path, task: TaskSpec) -> list[Row]:
    """Apply the task's index, feature window and label rule to one site."""
    rows: list[Row] = []
    feats = task.features
    for pid, p in sorted(read_site(site_dir).items()):
        # index
        if task.index.kind == "reference_date":
            assert task.index.reference_date is not None
            index = datetime.combine(task.index.reference_date, time(), tzinfo=UTC)
        else:
            cohort_codes = {c for s in task.cohort.conditions for c in s.codes}
            hits = [(on, enc) for code, on, enc in p.conditions if code in cohort_codes]
            if not hits:
                continue
            onset, enc = min(hits, key=lambda h: h[0])
            if enc is not None and enc in p.encounters:
                index = p.encounters[enc]
            else:
                later = sorted(s for s in p.encounters.values() if s >= onset)
                index = later[0] if later else onset
        cutoff = index + timedelta(hours=task.index.allowance_hours)
        assert p.birth is not None
        age = (index - p.birth).days / 365.25
        if task.cohort.min_age is not None and age < task.cohort.min_age:
            continue
        # label
        lab = task.label
        if lab.kind == "events_after_index":
            codes = {c for s in (*lab.procedures, *lab.devices) for c in s.codes}
            assert lab.window_hours is not None
            end = cutoff + timedelta(hours=lab.window_hours)
            times = [t for c, t in p.events if c in codes]
            if lab.exclude_prior_events and any(t <= cutoff for t in times):
                continue
            label = int(any(cutoff < t <= end for t in times)
                        or (lab.death_is_positive and p.deceased is not None
                            and cutoff < p.deceased <= end))
        else:
            codes = {c for s in lab.conditions for c in s.codes}
            label = int(any(c in codes and on <= cutoff for c, on, _ in p.conditions))
        if p.label_csv is not None and lab.labels_csv == "prefer":
            label = p.label_csv
        # tabular features (only data recorded up to the cut-off, inside the lookback)
        x: list[float] = [age, float(p.gender == "male")]
        for f in feats.observations:
            start = cutoff - timedelta(days=f.lookback_days or feats.lookback_days)
            vals = []
            for code, when, value, unit in sorted(p.obs, key=lambda o: o[1]):
                if code in f.codes and start <= when <= cutoff:
                    vals.append(value if unit == f.unit else UNIT_FACTORS[(unit, f.unit)](value))
            x.append(_aggregate(vals, f.agg))
        for cs in feats.conditions:
            x.append(float(any(c in cs.codes and on <= cutoff for c, on, _ in p.conditions)))
        imgs = [(path, t) for path, t in p.images if t is None or t <= cutoff]
        size = 8 if task.image_modality == "mri" else 16
        image = _load_image(sorted(imgs, key=lambda i: str(i[0]))[-1][0], size) if imgs else None
        notes = [txt for txt, when in p.notes if when is not None and when <= cutoff]
        rows.append(Row(site_dir.name, pid, label, np.asarray(x), image, " ".join(notes) or None))
    return rows


def cohort_via_package(site_dir: Path, task: TaskSpec) -> list[Row]:
    """The same rows, built by the package's data layer (``multimodal_fl.data.cohort``)."""
    from multimodal_fl.data.cohort import build_cohort

    built = build_cohort(site_dir, task)
    table = built.table
    cols = list(built.feature_names)
    size = 8 if task.image_modality == "mri" else 16
    rows: list[Row] = []
    for rec in table.to_dict("records"):
        path = rec.get("image_path")
        image = _load_image(Path(path), size) if isinstance(path, str) and path else None
        notes = rec.get("notes") or []
        rows.append(Row(site_dir.name, str(rec["patient_id"]), int(rec["label"]),
                        np.asarray([float(rec[c]) for c in cols], dtype=float), image,
                        " ".join(notes) or None))
    return rows


# --------------------------------------------------------------------------- models


def _tab_model() -> Pipeline:
    from sklearn.impute import SimpleImputer

    return make_pipeline(SimpleImputer(strategy="median", add_indicator=True), StandardScaler(),
                         LogisticRegression(C=0.3, max_iter=2000))


def _img_model(n: int) -> Pipeline:
    return make_pipeline(StandardScaler(), PCA(n_components=min(20, n - 1), random_state=0),
                         LogisticRegression(C=0.3, max_iter=2000))


def _txt_model() -> Pipeline:
    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                         LogisticRegression(C=3.0, max_iter=2000))


MODALITIES = ("tabular", "image", "text")


def _inputs(rows: list[Row], modality: str) -> tuple[Any, np.ndarray]:
    keep = np.array([_has(r, modality) for r in rows])
    picked = [r for r, k in zip(rows, keep, strict=True) if k]
    if modality == "tabular":
        return np.vstack([r.tab for r in picked]) if picked else np.empty((0, 0)), keep
    if modality == "image":
        arrays = [r.image for r in picked if r.image is not None]
        return np.vstack(arrays) if arrays else np.empty((0, 0)), keep
    return [r.text for r in picked], keep


def _has(r: Row, modality: str) -> bool:
    return modality == "tabular" or (r.image is not None if modality == "image"
                                     else r.text is not None)


def _model(modality: str, n: int) -> Pipeline:
    return {"tabular": _tab_model, "text": _txt_model}.get(modality, lambda: _img_model(n))()


def _fit_logits(train: list[Row], test: list[Row], modality: str) -> np.ndarray:
    """Logits of a modality model fitted on ``train`` for ``test`` (NaN where absent)."""
    xtr, ktr = _inputs(train, modality)
    ytr = np.array([r.label for r, k in zip(train, ktr, strict=True) if k])
    out = np.full(len(test), np.nan)
    if len(ytr) < 10 or len(set(ytr)) < 2 or min(np.bincount(ytr)) < 3:
        return out
    xte, kte = _inputs(test, modality)
    if kte.sum() == 0:
        return out
    model = _model(modality, len(ytr)).fit(xtr, ytr)
    out[kte] = model.decision_function(xte)
    return out


def fusion_scores(train: list[Row], test: list[Row], seed: int) -> np.ndarray:
    """Late fusion: the mean of the modality logits over the modalities a patient has.

    ``seed`` is unused (kept for a stable signature): no fold splitting happens here.
    """
    logits = np.column_stack([_fit_logits(train, test, m) for m in MODALITIES])
    present = ~np.isnan(logits)
    return np.asarray(np.nansum(logits, axis=1) / np.maximum(present.sum(axis=1), 1))


def evaluate(rows: list[Row], repeats: int) -> dict[str, Any]:
    """Pooled cross-validated AUC per modality and for fusion, and local vs pooled per site."""
    y = np.array([r.label for r in rows])
    res: dict[str, list[float]] = defaultdict(list)
    sites = sorted({r.site for r in rows})
    for rep in range(repeats):
        scores = {m: np.full(len(rows), np.nan) for m in (*MODALITIES, "fusion")}
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=rep).split(y, y):
            train, test = [rows[i] for i in tr], [rows[i] for i in te]
            for m in MODALITIES:
                scores[m][te] = _fit_logits(train, test, m)
            scores["fusion"][te] = fusion_scores(train, test, rep)
        for m, s in scores.items():
            ok = ~np.isnan(s)
            res[m].append(roc_auc_score(y[ok], s[ok]))
        complete = np.all([~np.isnan(scores[m]) for m in MODALITIES], axis=0)
        res["fusion (all three present)"].append(roc_auc_score(y[complete],
                                                               scores["fusion"][complete]))
        res["best single (all three present)"].append(max(
            roc_auc_score(y[complete], scores[m][complete]) for m in MODALITIES))
        # local vs pooled, per site, on the same held-out patients of that site
        for site in sites:
            idx = [i for i, r in enumerate(rows) if r.site == site]
            others = [rows[i] for i, r in enumerate(rows) if r.site != site]
            ys = y[idx]
            local = np.full(len(idx), np.nan)
            pooled = np.full(len(idx), np.nan)
            for tr, te in StratifiedKFold(5, shuffle=True, random_state=rep).split(ys, ys):
                train = [rows[idx[i]] for i in tr]
                test = [rows[idx[i]] for i in te]
                local[te] = fusion_scores(train, test, rep)
                pooled[te] = fusion_scores(train + others, test, rep)
            res[f"{site} local"].append(roc_auc_score(ys, local))
            res[f"{site} pooled"].append(roc_auc_score(ys, pooled))
    return {k: (float(np.mean(v)), float(np.std(v))) for k, v in res.items()}


TASK_FILES = {"covid_oxygen": "covid_oxygen_24h", "alzheimers": "alzheimers"}


def main() -> None:
    """Print the signal table for each sample task found under the given folder."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("root", type=Path, help="folder written by `mmfl sample-data`")
    ap.add_argument("--repeats", type=int, default=3, help="CV repeats (different fold seeds)")
    ap.add_argument("--task", action="append",
                    help="covid_oxygen_24h, covid_oxygen_72h, alzheimers (repeatable)")
    ap.add_argument("--reader", choices=["own", "package"], default="own",
                    help="own: this script's reader; package: multimodal_fl.data.cohort")
    args = ap.parse_args()
    threadpool_limits(1)  # BLAS threads oversubscribe these small fits (20x slower on 2 cores)
    tasks = args.task or ["covid_oxygen_24h", "alzheimers"]
    for task_name in tasks:
        folder = "alzheimers" if task_name == "alzheimers" else "covid_oxygen"
        task = load_task(task_name)
        rows = [r for site in sorted((args.root / folder).iterdir()) if site.is_dir()
                for r in (cohort_via_package if args.reader == "package" else cohort)(site, task)]
        per_site: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in rows:
            per_site[r.site][0] += 1
            per_site[r.site][1] += r.label
        print(f"\n## {task_name}: {len(rows)} patients, "
              + ", ".join(f"{s} {n} ({k} pos)" for s, (n, k) in sorted(per_site.items())))
        cov = {m: sum(_has(r, m) for r in rows) for m in MODALITIES}
        print("coverage: " + ", ".join(f"{m} {c}" for m, c in cov.items()))
        result = evaluate(rows, args.repeats)
        print(f"| model | AUC (mean ± sd over {args.repeats} CV repeats) |")
        print("| --- | --- |")
        for k, (mean, sd) in result.items():
            print(f"| {k} | {mean:.3f} ± {sd:.3f} |")


if __name__ == "__main__":
    main()

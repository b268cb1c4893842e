"""Alzheimer's on OASIS-1: repeated stratified k-fold cross-validation (default 5x5).

One command, from the repository root::

    MMFL_CACHE=/tmp/mmfl_cache nice -n 10 .venv/bin/python benchmarks/oasis_cv.py

1. **Import.** ``import_csv`` (what ``mmfl data import-csv`` runs) with the shipped mapping
   ``configs/mappings/oasis1.yaml`` writes the OASIS-1 first sessions into one site directory
   under ``--out`` (default: a temporary folder, removed after; never inside the repository:
   the OASIS Data Use Agreement forbids redistribution). Label: CDR > 0 (very mild dementia
   or worse); CDR is never a feature.
2. **Cohort.** The shipped experiment ``configs/oasis1.yaml`` is prepared twice, with the task
   ``configs/tasks/oasis1_dementia.yaml`` (age, sex, MMSE, education, SES, eTIV, nWBV, ASF) and
   with its variant without MMSE. The cross-validation runs over the labelled subjects that
   have the MRI slices (the image the pipeline links: the first by path, the axial slice),
   resized to ``--image-size`` pixels once (pixels cached across folds and models).
3. **Folds.** ``RepeatedStratifiedKFold`` (``--folds`` x ``--repeats``, seed ``--seed``). In
   each fold the training folds are split again, stratified, into an inner training part
   (80%) and an inner validation part (20%): every setting is chosen there, never on the
   test fold. The networks (smallcnn image encoder, tabular MLP, fusion) keep the shipped
   configs' optimiser settings (lr 3e-4, weight decay 1e-4, batch 32, at most 300 steps;
   federated 15 rounds of 20 local steps; fixed before this benchmark was written) and
   choose their training length by early stopping on the inner validation AUC (federated:
   the round with the best pooled validation AUC). Every model with the tabular linear path
   starts it as a logistic regression fitted on its training rows, the penalty chosen by
   5-fold CV on them (``training.linear_warmup_fit`` in ``configs/oasis1.yaml``; each
   federated site on its own rows in its first round; runs before 2026-11-30 session 8
   fitted the path alone for 3000 steps instead) and is validated once after it, so early
   stopping may keep the warmed-up model. The logistic regression
   (median-imputed, standardised) chooses ``C`` by an inner stratified 5-fold CV on the
   training folds (``GridSearchCV``, AUC) and is refitted on all of them. The tabular
   model is the config's (``modalities.tabular.linear_path`` on, the package default chosen
   on other cohorts, with the warm-up above); every fusion model uses it. An ablation row
   chooses the linear path per fold by the inner validation AUC of the tabular model
   trained with and without it (a tie keeps the plain MLP), as runs before 2026-11-30
   (session 7) did for every model: about 31 validation subjects cannot tell the two apart.
4. **Models per fold.** Image only (the image encoder and a head, on the pixels), trained
   twice: centralized, and federated over ``--sites`` sites (the training folds spread by a
   hash of the subject id, as ``oasis_sites.py``; the in-process federated engine, FedAvg).
   Per feature set: tabular only without the linear path, with it (the config's model,
   the row the targets read), and the one chosen inside (ablation); logistic regression.
   The fusion models train on cached image inputs (the package's frozen-encoder path),
   which is what fits 5x5 folds into the CPU budget. With ``--crossfit K`` (default 3)
   those inputs are **cross-fitted**:
   validation and test subjects get the logit of the fold's image-only model, and each of
   K stratified folds of the inner training part gets the logit of an image model trained
   on the other K - 1 (K more image trainings per fold), so a fusion head learns how far
   the image holds on unseen subjects (:func:`crossfit_image`). Centralized fusion
   ``concat``, ``attention`` and ``late`` on those; ablations: concat on the cross-fitted
   embeddings and on the in-sample embeddings (``--crossfit 0`` makes those the main
   rows, the 2x5 run's protocol), and each fusion model scored with the image hidden
   (tabular path only). Federated ``concat`` on the federated image model's in-sample
   embeddings, compared with the centralized concat of the same protocol.
5. **Figures.** Per model the mean over repeats of the AUC of the pooled out-of-fold scores
   (each repeat scores every subject once), with a 95% stratified bootstrap CI over subjects
   (:func:`multimodal_fl.evaluation.metrics.repeated_cv_auc`, one resample shared by every
   repeat and model, so differences are paired), beside the mean +- SD of the per-fold AUCs;
   paired CIs of fusion minus tabular and fusion minus logistic regression; the
   federated / centralized ratio with its paired CI; the targets of issue 14 item 4.

``--repeats 1 --max-folds 1`` times one fold; ``--quick`` trains fewer steps (a smoke test,
not a figure).
When the data folder is absent the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from safetensors.torch import load_file
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import (
    GridSearchCV,
    RepeatedStratifiedKFold,
    StratifiedKFold,
    train_test_split,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from multimodal_fl.config import ExperimentConfig, load_config
from multimodal_fl.data.csv_import import import_csv
from multimodal_fl.engines.federated import run_federated_experiment
from multimodal_fl.evaluation.metrics import MetricValue, repeated_cv_auc
from multimodal_fl.training import (
    CohortDataset,
    SiteData,
    batch_augmenter,
    build_model,
    fit_tabular_standardizer,
    load_site_data,
    load_weights,
    predict,
    train,
    warmup_fit,
    warmup_steps,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "oasis1"
MAPPING = REPO / "configs" / "mappings" / "oasis1.yaml"
CONFIG = REPO / "configs" / "oasis1.yaml"
#: Feature sets: variant name -> task file (relative to ``configs/``).
TASKS = {"with MMSE": "tasks/oasis1_dementia.yaml",
         "without MMSE": "tasks/oasis1_dementia_no_mmse.yaml"}
FUSIONS = ("concat", "attention", "late")
LR = "logistic regression"
FED = "federated concat"
MLP = "tabular MLP"
WIDE = "tabular MLP + linear path"
TAB = "tabular, linear path chosen inside (ablation)"
XEMB = "fusion concat, cross-fitted image embeddings (ablation)"
INSAMPLE = "fusion concat, in-sample image embeddings (ablation)"
#: Earlier figures on the same subjects, quoted beside the results (not recomputed here).
REFERENCES = [
    ("benchmarks/oasis_sites.py at 89f3b50 (path x10), 2D slices, 10 seeds x one 60/20/20 "
     "split, with MMSE", "fusion concat 0.829 / late 0.841, tabular 0.851 / 0.841, logistic "
     "regression 0.866"),
    ("issue 14, 3D volumes, one split, with MMSE",
     "federated fusion 0.883 [0.783, 0.965], tabular 0.891, logistic regression 0.900"),
    ("../shared/data/README.md", "AUC far above 0.95 on this set signals a leak"),
]


@dataclass
class Fold:
    """One test fold of one repeat, with the inner split of its training folds."""

    repeat: int
    k: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass
class Scores:
    """Out-of-fold scores: model name -> array [repeats, subjects] (NaN until scored)."""

    n_repeats: int
    n: int
    table: dict[str, np.ndarray] = field(default_factory=dict)
    fold_auc: dict[str, list[float]] = field(default_factory=dict)
    choices: list[bool] = field(default_factory=list)  # linear path chosen, per fold

    def put(self, model: str, fold: Fold, y: np.ndarray, score: np.ndarray) -> None:
        """Store a model's test-fold scores and the fold's AUC."""
        arr = self.table.setdefault(model, np.full((self.n_repeats, self.n), np.nan))
        arr[fold.repeat, fold.test] = score
        self.fold_auc.setdefault(model, []).append(float(roc_auc_score(y[fold.test], score)))


def site_of(subject: str, n_sites: int) -> int:
    """Site index of a subject: sha256 of its id modulo the number of sites."""
    h = int.from_bytes(hashlib.sha256(subject.encode()).digest()[:8], "big")
    return h % n_sites


def experiment_yaml(work: Path, site_dir: Path, task: str, n_sites: int, args: argparse.Namespace
                    ) -> Path:
    """The shipped experiment with this run's task, sites, image size and step budget."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["task"] = str((CONFIG.parent / task).resolve())
    cfg["sites"] = [{"name": f"site_{chr(ord('a') + i)}", "path": str(site_dir)}
                    for i in range(n_sites)]
    cfg["modalities"]["image"]["size"] = args.image_size
    cfg["federated"]["min_sites"] = min(2, n_sites)
    if args.quick:
        cfg["training"]["steps"] = 50
        cfg["federated"].update(rounds=3, local_steps=10)
    path = work / f"oasis_cv_{Path(task).stem}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def load_cohort(cfg: ExperimentConfig, work: Path) -> tuple[CohortDataset, list[str]]:
    """The prepared subjects that have an image, sorted by id, and the tabular columns."""
    sites = load_site_data(cfg.model_copy(update={"sites": cfg.sites[:1]}), work / "prepare")
    sd = next(iter(sites.values()))
    ds = sd.dataset
    j = ds.modalities.index("image")
    rows = sorted(ds.mask[:, j].nonzero().flatten().tolist(), key=lambda i: ds.patient_ids[i])
    return ds.subset(rows), list(sd.feature_names)


def fold_plan(y: np.ndarray, folds: int, repeats: int, seed: int) -> list[Fold]:
    """Stratified test folds, and a stratified 80/20 inner split of each fold's training part."""
    cv = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    plan = []
    for i, (trn, tst) in enumerate(cv.split(np.zeros(len(y)), y)):
        itr, iva = train_test_split(trn, test_size=0.2, stratify=y[trn],
                                    random_state=seed * 1000 + i)
        plan.append(Fold(i // folds, i % folds, np.sort(itr), np.sort(iva), tst))
    return plan


def with_linear_path(cfg: ExperimentConfig, on: bool) -> ExperimentConfig:
    """``cfg`` with ``modalities.tabular.linear_path`` set to ``on``."""
    tab = cfg.modalities.tabular.model_copy(update={"linear_path": bool(on)})
    mods = cfg.modalities.model_copy(update={"tabular": tab})
    return cfg.model_copy(update={"modalities": mods})


def train_centralized(cfg: ExperimentConfig, ds: CohortDataset, fold: Fold,
                      mods: Sequence[str], seed: int) -> tuple[torch.nn.Module, float]:
    """A fusion model on ``mods`` trained on the inner training part, early-stopped on val.

    Returns the model (best weights restored) and its best inner validation AUC (``-inf``
    when undefined).
    """
    tr = ds.subset(fold.train.tolist()).select_modalities(mods)
    va = ds.subset(fold.val.tolist()).select_modalities(mods)
    model = build_model(cfg.model_copy(update={"seed": seed}), tr)
    fit_tabular_standardizer(model, [tr])
    result = train(model, tr, va, cfg.training, generator=torch.Generator().manual_seed(seed),
                   augment=batch_augmenter(cfg, model), warmup_steps=warmup_steps(cfg, model),
                   warmup_fit=warmup_fit(cfg, model))
    auc = result.best_val_auc
    return model, float("-inf") if auc is None else float(auc)


def score(model: torch.nn.Module, ds: CohortDataset, fold: Fold, mods: Sequence[str], *,
          hide: str | None = None) -> np.ndarray:
    """Test-fold scores of ``model``; ``hide`` marks a modality absent for every subject."""
    te = ds.subset(fold.test.tolist()).select_modalities(mods)
    if hide is not None:
        mask = te.mask.clone()
        mask[:, te.modalities.index(hide)] = False
        te = CohortDataset(te.patient_ids, te.labels.numpy(), te.inputs, mask, te.modalities,
                           meta=te.meta, precomputed=te.precomputed)
    return np.asarray(predict(model, te), dtype=np.float64)  # type: ignore[arg-type]


def logistic(X: np.ndarray, y: np.ndarray, fold: Fold, seed: int) -> np.ndarray:
    """Logistic regression on all training folds, C by inner 5-fold CV; test-fold scores."""
    trn = np.concatenate([fold.train, fold.val])
    pipe = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                         LogisticRegression(max_iter=5000))
    search = GridSearchCV(pipe, {"logisticregression__C": np.logspace(-3, 2, 11)},
                          scoring="roc_auc",
                          cv=StratifiedKFold(5, shuffle=True, random_state=seed))
    search.fit(X[trn], y[trn])
    return np.asarray(search.predict_proba(X[fold.test])[:, 1], dtype=np.float64)


def image_embeddings(ds: CohortDataset, image_model: torch.nn.Module) -> torch.Tensor:
    """The frozen image encoder of ``image_model`` run over every subject: ``[N, width]``."""
    encoder = image_model.get_submodule("encoders.image")
    encoder.eval()
    with torch.no_grad():
        return torch.cat([encoder(x) for x in ds.inputs["image"].split(64)]).to(torch.float32)


def image_logits(ds: CohortDataset, image_model: torch.nn.Module) -> torch.Tensor:
    """The image-only model's logit of every subject, as a one-column input: ``[N, 1]``."""
    p = predict(image_model, ds.select_modalities(["image"]))  # type: ignore[arg-type]
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return torch.from_numpy(np.log(p) - np.log1p(-p)).to(torch.float32).unsqueeze(1)


def with_image_input(ds: CohortDataset, image: torch.Tensor) -> CohortDataset:
    """``ds`` with its images replaced by ``image`` (rows = subjects), a precomputed input.

    All fusion models of a fold train on such cached inputs (the package's frozen-encoder
    path) instead of the pixels.
    """
    inputs = dict(ds.inputs) | {"image": image}
    return CohortDataset(ds.patient_ids, ds.labels.numpy(), inputs, ds.mask, ds.modalities,
                         meta=ds.meta, precomputed=(*ds.precomputed, "image"))


def with_embeddings(ds: CohortDataset, image_model: torch.nn.Module) -> CohortDataset:
    """``ds`` with its images replaced by ``image_model``'s (in-sample) embeddings."""
    return with_image_input(ds, image_embeddings(ds, image_model))


def crossfit_image(cfg: ExperimentConfig, ds: CohortDataset, fold: Fold, y: np.ndarray,
                   image_model: torch.nn.Module, seed: int, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-fitted image inputs of every subject: (image logits ``[N, 1]``, embeddings).

    Validation and test subjects get those of ``image_model`` (trained on the whole inner
    training part, so they are out of sample already). The inner training part is split
    into ``k`` stratified folds; each fold's subjects get those of an image model trained on
    the other ``k - 1`` (early-stopped on the same inner validation part), so a fusion
    model learns how far the image signal holds on subjects its encoder has not seen,
    not how well the encoder remembers its own training subjects. The logit is one
    number whose meaning every image model shares (stacking); the embeddings of ``k``
    separately trained encoders share no coordinates (the ablation row shows the cost).
    """
    logits, emb = image_logits(ds, image_model), image_embeddings(ds, image_model)
    inner = StratifiedKFold(k, shuffle=True, random_state=seed)
    for j, (a, b) in enumerate(inner.split(fold.train, y[fold.train])):
        sub = Fold(fold.repeat, fold.k, fold.train[a], fold.val, fold.test)
        model, _ = train_centralized(cfg, ds, sub, ["image"], seed * 10 + j + 1)
        rows = ds.subset(fold.train[b].tolist())
        idx = torch.from_numpy(fold.train[b])
        logits[idx] = image_logits(rows, model)
        emb[idx] = image_embeddings(rows, model)
    return logits, emb


def train_federated(cfg: ExperimentConfig, ds: CohortDataset, names: list[str], fold: Fold,
                    mods: Sequence[str], seed: int, work: Path) -> torch.nn.Module:
    """FedAvg over the training folds spread across the config's sites; the chosen model."""
    ds = ds.select_modalities(mods)
    role = {int(i): "train" for i in fold.train} | {int(i): "val" for i in fold.val}
    role |= {int(i): "test" for i in fold.test}
    sites = [s.name for s in cfg.sites]
    members: dict[str, list[int]] = {s: [] for s in sites}
    for i in sorted(role):
        members[sites[site_of(ds.patient_ids[i], len(sites))]].append(i)
    data = {s: SiteData(s, ds.subset(rows), {ds.patient_ids[i]: role[i] for i in rows},
                        feature_names=names) for s, rows in members.items()}
    run_dir = work / f"fed_{fold.repeat}_{fold.k}"
    fcfg = cfg.model_copy(update={"seed": seed})
    run_federated_experiment(fcfg, run_dir, data=data)
    model = build_model(fcfg, ds.subset(fold.train.tolist()))
    load_weights(model, load_file(run_dir / "model.safetensors"))
    shutil.rmtree(run_dir, ignore_errors=True)
    return model


def tabular_models(cfg: ExperimentConfig, ds: CohortDataset, fold: Fold, res: Scores,
                   y: np.ndarray, seed: int) -> bool:
    """Tabular MLP without and with the linear path, and the one the inner validation picks.

    Returns whether the linear path was chosen (the higher inner validation AUC; a tie
    keeps the plain MLP).
    """
    fits = {on: train_centralized(with_linear_path(cfg, on), ds, fold, ["tabular"], seed)
            for on in (False, True)}
    scores = {on: score(model, ds, fold, ["tabular"]) for on, (model, _) in fits.items()}
    res.put(MLP, fold, y, scores[False])
    res.put(WIDE, fold, y, scores[True])
    chosen = fits[True][1] > fits[False][1]
    res.put(TAB, fold, y, scores[chosen])
    res.choices.append(chosen)
    return chosen


def fusion_models(cfg: ExperimentConfig, ds: CohortDataset, fold: Fold, res: Scores,
                  y: np.ndarray, seed: int) -> None:
    """Centralized fusion of every kind on ``ds`` (images already a precomputed input)."""
    both = ["image", "tabular"]
    for kind in FUSIONS:
        kcfg = cfg.model_copy(update={"fusion": cfg.fusion.model_copy(update={"kind": kind})})
        model, _ = train_centralized(kcfg, ds, fold, both, seed)
        res.put(f"fusion {kind}", fold, y, score(model, ds, fold, both))
        res.put(f"fusion {kind}, image hidden at test", fold, y,
                score(model, ds, fold, both, hide="image"))


def run_fold(cfgs: dict[str, ExperimentConfig], cohorts: dict[str, tuple[CohortDataset, list[str]]],
             fold: Fold, results: dict[str, Scores], y: np.ndarray, work: Path,
             crossfit: int = 3) -> None:
    """Every model of one fold, for every feature set (the image-only models once).

    Fusion models use the config's tabular model (linear path on). With
    ``crossfit`` >= 2 their training subjects' image input is the cross-fitted image logit
    (:func:`crossfit_image`), with two ablations beside them (cross-fitted embeddings,
    in-sample embeddings); ``crossfit=0`` keeps the in-sample embeddings (the 2x5 run's
    protocol).
    """
    seed = 1000 * fold.repeat + fold.k
    first = next(iter(cohorts))
    ds0, names0 = cohorts[first]
    image, _ = train_centralized(cfgs[first], ds0, fold, ["image"], seed)
    fed_image = train_federated(cfgs[first], ds0, names0, fold, ["image"], seed, work)
    img_scores = score(image, ds0, fold, ["image"])
    fed_img_scores = score(fed_image, ds0, fold, ["image"])
    crossed = crossfit_image(cfgs[first], ds0, fold, y, image, seed, crossfit) \
        if crossfit >= 2 else None
    both = ["image", "tabular"]
    for variant, (pixels, names) in cohorts.items():
        res = results[variant]
        res.put("image only", fold, y, img_scores)
        res.put("image only, federated", fold, y, fed_img_scores)
        tabular_models(cfgs[variant], pixels, fold, res, y, seed)
        cfg = cfgs[variant]  # the config's tabular model (linear path, warm-up) in every fusion
        res.put(LR, fold, y, logistic(pixels.inputs["tabular"].numpy(), y, fold, seed))
        insample = with_embeddings(pixels, image)
        if crossed is None:
            fusion_models(cfg, insample, fold, res, y, seed)
        else:
            fusion_models(cfg, with_image_input(pixels, crossed[0]), fold, res, y, seed)
            for name, ds in ((XEMB, with_image_input(pixels, crossed[1])), (INSAMPLE, insample)):
                model, _ = train_centralized(cfg, ds, fold, both, seed)
                res.put(name, fold, y, score(model, ds, fold, both))
        fed_ds = with_embeddings(pixels, fed_image)
        fed = train_federated(cfg, fed_ds, names, fold, both, seed, work)
        res.put(FED, fold, y, score(fed, fed_ds, fold, both))


def ci_text(m: MetricValue, digits: int = 3) -> str:
    """``0.871 [0.842, 0.899]`` or the reason the figure is undefined."""
    return m.text(digits)


def paired(y: np.ndarray, done: dict[str, np.ndarray], model: str, base: str, n_boot: int,
           seed: int, *, limit: float | None = None,
           compare: Literal["difference", "ratio"] = "difference",
           where: str = "") -> list[str]:
    """Print one paired comparison row; a target line when it falls below ``limit``."""
    d = repeated_cv_auc(y, done[model], baseline=done[base], compare=compare,
                        n_boot=n_boot, seed=seed)
    label = f"{model} / {base}, ratio" if compare == "ratio" else f"{model} - {base}"
    print(f"| {label} | {ci_text(d)} |")
    if limit is not None and (d.value is None or d.value < limit):
        target = f"{limit:.2f}" if compare == "ratio" else f"{limit:+.2f}"
        return [f"{where}: {label} = {ci_text(d)} (target >= {target})"]
    return []


def report(variant: str, res: Scores, y: np.ndarray, n_boot: int, seed: int) -> list[str]:
    """The variant's table, paired comparisons and target lines (markdown), and a verdict list.

    The targets read the config's tabular model (:data:`WIDE`: linear path on, as the
    package default, with the config's warm-up), which every fusion model uses; the
    federated / centralized ratio compares federated concat with the centralized concat of
    the same protocol (in-sample image embeddings).
    """
    done = {m: a for m, a in res.table.items() if np.isfinite(a).all()}
    auc = {m: repeated_cv_auc(y, a, n_boot=n_boot, seed=seed) for m, a in done.items()}
    print(f"\n#### {variant}\n")
    print(f"Linear path chosen by the inner validation in {sum(res.choices)} of "
          f"{len(res.choices)} folds.\n")
    print("| model | mean pooled AUC [95% CI] | per-fold AUC, mean +- SD |")
    print("| --- | --- | --- |")
    for m, v in auc.items():
        f = res.fold_auc[m]
        print(f"| {m} | {ci_text(v)} | {np.mean(f):.3f} +- {np.std(f, ddof=1):.3f} |")
    print("\n| paired comparison (same subjects, same resamples) | value [95% CI] |")
    print("| --- | --- |")
    fails: list[str] = []
    for kind in FUSIONS:
        fails += paired(y, done, f"fusion {kind}", WIDE, n_boot, seed, limit=0.0,
                        where=variant)
        fails += paired(y, done, f"fusion {kind}", LR, n_boot, seed, limit=-0.01,
                        where=variant)
    fails += paired(y, done, WIDE, LR, n_boot, seed, limit=0.0, where=variant)
    for m in (MLP, TAB):
        paired(y, done, m, LR, n_boot, seed)
    paired(y, done, TAB, WIDE, n_boot, seed)
    paired(y, done, WIDE, MLP, n_boot, seed)
    for m in (XEMB, INSAMPLE):
        if m in done:
            paired(y, done, "fusion concat", m, n_boot, seed)
    base = INSAMPLE if INSAMPLE in done else "fusion concat"
    fails += paired(y, done, FED, base, n_boot, seed, limit=0.99, compare="ratio", where=variant)
    return fails


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=None,
                    help="where the imported site goes (default: a temporary folder, removed)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sites", type=int, default=3, help="sites of the federated model")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--variants", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--crossfit", type=int, default=3,
                    help="inner folds of the cross-fitted image inputs of the fusion models "
                    "(k image trainings per fold); 0: in-sample embeddings, as the 2x5 run")
    ap.add_argument("--max-folds", type=int, default=None,
                    help="stop after this many folds (timing one fold; no figures)")
    ap.add_argument("--quick", action="store_true", help="few steps: a smoke test, no figures")
    args = ap.parse_args(argv)
    if args.crossfit == 1 or args.crossfit < 0:
        ap.error(f"--crossfit {args.crossfit}: give 0 (in-sample image embeddings) or at "
                 "least 2 inner folds")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Import, prepare, cross-validate, print the tables; exit 1 when a target is missed."""
    args = parse_args(argv)
    csv_path = args.data / "oasis_cross-sectional.csv"
    if not csv_path.is_file() or not (args.data / "images").is_dir():
        print(f"skipped: no OASIS-1 data at {args.data} (needs oasis_cross-sectional.csv and "
              "images/); pass --data", file=sys.stderr)
        return 0
    tmp = tempfile.TemporaryDirectory(prefix="oasis_cv_")
    work = Path(tmp.name)
    site_dir = (args.out.resolve() if args.out is not None else work / "sites") / "oasis1"
    if site_dir.is_relative_to(REPO):
        print(f"--out {site_dir} is inside the repository; OASIS data may not be committed, "
              f"choose a folder outside {REPO}", file=sys.stderr)
        return 2
    os.environ.setdefault("MMFL_CACHE", str(work / "cache"))
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        if site_dir.exists():
            shutil.rmtree(site_dir)
        import_csv(csv_path, MAPPING, site_dir)
        cfgs = {v: load_config(experiment_yaml(work, site_dir, TASKS[v], args.sites, args))
                for v in args.variants}
        cohorts = {v: load_cohort(c, work) for v, c in cfgs.items()}
        ids = {tuple(ds.patient_ids) for ds, _ in cohorts.values()}
        if len(ids) != 1:
            raise SystemExit("the feature sets prepared different subjects; compare the tasks")
        ds0 = next(iter(cohorts.values()))[0]
        y = ds0.labels.numpy().astype(int)
        plan = fold_plan(y, args.folds, args.repeats, args.seed)
        print(f"### Alzheimer's on OASIS-1 ({args.repeats}x{args.folds}-fold CV)\n")
        print(f"{len(y)} subjects with an MRI slice and a CDR ({int(y.sum())} with CDR > 0, "
              f"{int((1 - y).sum())} with CDR 0); image {args.image_size} px; federated over "
              f"{args.sites} sites; import + preparation {time.perf_counter() - t0:.0f} s.")
        for v, (_, names) in cohorts.items():
            print(f"- {v}: {', '.join(names)}")
        results = {v: Scores(args.repeats, len(y)) for v in cohorts}
        for fold in plan[:args.max_folds]:
            t = time.perf_counter()
            run_fold(cfgs, cohorts, fold, results, y, work, args.crossfit)
            print(f"  repeat {fold.repeat} fold {fold.k}: {time.perf_counter() - t:.0f} s",
                  file=sys.stderr, flush=True)
        if args.max_folds is not None and args.max_folds < len(plan):
            print(f"\nStopped after {args.max_folds} fold(s) (--max-folds): no figures. Rows: "
                  f"{', '.join(next(iter(results.values())).table)}.")
            return 0
        fails: list[str] = []
        for v, res in results.items():
            fails += report(v, res, y, args.n_boot, args.seed)
        print(f"\nSubject bootstrap: {args.n_boot} stratified resamples, seed {args.seed}.")
        print("\nReference figures (not recomputed here):\n")
        for where, text in REFERENCES:
            print(f"- {where}: {text}")
        print("\nTargets missed:" if fails else "\nAll targets met.")
        for line in fails:
            print(f"- {line}")
        print(f"\nTotal {time.perf_counter() - t0:.0f} s, load average "
              f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs.")
        return 1 if fails else 0
    finally:
        tmp.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())

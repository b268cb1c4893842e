"""Modality ablation, centralized: each single modality vs fusion, test AUC with 95% CIs.

For each sample task (``configs/covid_oxygen.yaml``: late fusion; ``configs/alzheimers.yaml``:
concat fusion, both used as shipped) the sites are prepared ONCE with every modality, then
for each seed the patients are re-split (``split_patients`` with that seed, so the test set
changes with the seed) and a centralized model (all sites pooled) is trained on

* each single modality (``CohortDataset.select_modalities``: patients without that modality
  are left out of training and validation), and
* fusion of all modalities.

Test AUC is pooled over sites. Two AUCs are reported per configuration:

* ``all``: every test patient; a single-modality model gives a constant score of 0.5 to a
  patient who lacks its modality (it has nothing to go on), so every configuration is
  scored on the same patients. The pass/fail check uses this column.
* ``covered``: only the test patients who have the modality (``n`` says how many).

Per configuration the table gives the mean AUC over seeds, the per-seed AUCs, and the
bootstrap 95% CI (stratified, 1000 resamples) of seed 0's test set.

On COVID-19 the ablation is repeated with missing data at one site (``--missing-site``,
default ``site_a``): 30% of its patients with an image lose it and all its notes are
dropped (presence mask set false before splitting, so training, validation and test all
see the missingness).

Usage::

    MMFL_CACHE=/tmp/mmfl_cache .venv/bin/python benchmarks/ablation.py
    .venv/bin/python benchmarks/ablation.py --tasks covid_oxygen --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from multimodal_fl.config import ExperimentConfig, load_config
from multimodal_fl.evaluation.metrics import binary_metrics
from multimodal_fl.training import (
    CohortDataset,
    SiteData,
    batch_augmenter,
    build_model,
    fit_tabular_standardizer,
    load_site_data,
    predict,
    split_patients,
    train,
)

REPO = Path(__file__).resolve().parents[1]
#: Score given by a single-modality model to a patient without its modality.
MISSING_SCORE = 0.5


@dataclass
class SeedResult:
    """One configuration trained and tested with one seed."""

    seed: int
    auc_all: float | None
    auc_covered: float | None
    n_all: int
    n_covered: int
    ci_all: tuple[float | None, float | None] = (None, None)
    ci_covered: tuple[float | None, float | None] = (None, None)
    seconds: float = 0.0


@dataclass
class ConfigResult:
    """All seeds of one configuration (a set of modalities)."""

    name: str
    modalities: tuple[str, ...]
    seeds: list[SeedResult] = field(default_factory=list)

    def mean(self, column: str = "all") -> float | None:
        """Mean AUC over the seeds where it is defined (``column``: ``all`` or ``covered``)."""
        vals = [getattr(s, f"auc_{column}") for s in self.seeds]
        ok = [v for v in vals if v is not None]
        return float(np.mean(ok)) if ok else None


def resplit(sites: Mapping[str, SiteData], cfg: ExperimentConfig, seed: int) -> dict[str, SiteData]:
    """Split every site's patients again with ``seed`` (same rule as every engine).

    Parameters
    ----------
    sites : mapping of str to SiteData
        Prepared sites (their own split is ignored).
    cfg : ExperimentConfig
        Gives the split fractions.
    seed : int
        Split seed.

    Returns
    -------
    dict of str to SiteData
    """
    out: dict[str, SiteData] = {}
    for name, sd in sites.items():
        ds = sd.dataset
        splits = split_patients(ds.patient_ids, ds.labels.numpy().astype(int), seed=seed,
                                site=name, fractions=cfg.training.split)
        out[name] = SiteData(name, ds, splits, feature_names=list(sd.feature_names))
    return out


def _fraction_hash(seed: int, site: str, pid: str) -> float:
    digest = hashlib.sha256(f"missing|{seed}|{site}|{pid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def with_missing(sd: SiteData, *, image_fraction: float, drop_text: bool,
                 seed: int = 0) -> SiteData:
    """Make a site lose a fraction of its images and (optionally) all its notes.

    Parameters
    ----------
    sd : SiteData
        The prepared site.
    image_fraction : float
        Fraction (0-1) of the patients WITH an image whose image is marked absent (the
        ``round(fraction * n)`` patients with the smallest hash of (seed, site, id)).
    drop_text : bool
        Mark every note of the site absent.
    seed : int
        Which patients lose their image.

    Returns
    -------
    SiteData
        Same patients and split; patients left with no modality are dropped.
    """
    if not 0.0 <= image_fraction <= 1.0:
        raise ValueError(f"image_fraction must be in [0, 1], got {image_fraction}")
    ds = sd.dataset
    mask = ds.mask.clone()
    mods = list(ds.modalities)
    if "image" in mods and image_fraction > 0:
        j = mods.index("image")
        have = [i for i in range(len(ds)) if bool(mask[i, j])]
        have.sort(key=lambda i: _fraction_hash(seed, sd.site, ds.patient_ids[i]))
        for i in have[: round(image_fraction * len(have))]:
            mask[i, j] = False
    if drop_text and "text" in mods:
        mask[:, mods.index("text")] = False
    keep = mask.any(1).nonzero().flatten().tolist()
    new = CohortDataset(ds.patient_ids, ds.labels.numpy(), ds.inputs, mask, mods,
                        meta=ds.meta, precomputed=ds.precomputed).subset(keep)
    splits = {p: sd.splits[p] for p in new.patient_ids}
    return SiteData(sd.site, new, splits, feature_names=list(sd.feature_names))


def _ci(m: object) -> tuple[float | None, float | None]:
    return (getattr(m, "lo", None), getattr(m, "hi", None))


def run_config(cfg: ExperimentConfig, sites: Mapping[str, SiteData], mods: Sequence[str],
               seed: int, *, n_boot: int) -> SeedResult:
    """Train one centralized model on ``mods`` and test it on the pooled test patients.

    Parameters
    ----------
    cfg : ExperimentConfig
        Experiment (its ``seed`` should equal ``seed``).
    sites : mapping of str to SiteData
        Prepared, split sites.
    mods : sequence of str
        Modalities the model sees.
    seed : int
        Training seed (batch order, augmentation, modality dropout).
    n_boot : int
        Bootstrap resamples for the CIs (0: none).

    Returns
    -------
    SeedResult
    """
    t0 = time.perf_counter()
    tr = CohortDataset.concat([s.train for s in sites.values()]).select_modalities(mods)
    va = CohortDataset.concat([s.val for s in sites.values()]).select_modalities(mods)
    te_full = CohortDataset.concat([s.test for s in sites.values()])
    te = te_full.select_modalities(mods)
    model = build_model(cfg, tr)
    fit_tabular_standardizer(model, [tr])
    train(model, tr, va, cfg.training, generator=torch.Generator().manual_seed(seed),
          augment=batch_augmenter(cfg, model))
    p = predict(model, te)
    score = dict(zip(te.patient_ids, p.tolist(), strict=True))
    y_all = te_full.labels.numpy().astype(int)
    s_all = np.array([score.get(pid, MISSING_SCORE) for pid in te_full.patient_ids])
    m_all = binary_metrics(y_all, s_all, metrics=["auc"], n_boot=n_boot, seed=seed)["auc"]
    m_cov = binary_metrics(te.labels.numpy().astype(int), p, metrics=["auc"], n_boot=n_boot,
                           seed=seed)["auc"]
    return SeedResult(seed, m_all.value, m_cov.value, len(te_full), len(te), _ci(m_all),
                      _ci(m_cov), time.perf_counter() - t0)


def ablate(cfg_path: Path, sites: Mapping[str, SiteData], configs: Mapping[str, Sequence[str]],
           seeds: Sequence[int], *, n_boot: int, overrides: Sequence[str] = (),
           log: bool = True) -> list[ConfigResult]:
    """Run every configuration for every seed.

    Parameters
    ----------
    cfg_path : Path
        Experiment YAML.
    sites : mapping of str to SiteData
        Prepared sites with every modality.
    configs : mapping of str to sequence of str
        Configuration name -> modalities.
    seeds : sequence of int
        Seeds (split + initialisation + training).
    n_boot : int
        Bootstrap resamples, only for the first seed (the CI reported).
    overrides : sequence of str
        ``--set``-style overrides for the config.
    log : bool
        Print one line per trained model to stderr.

    Returns
    -------
    list of ConfigResult
    """
    results = [ConfigResult(name, tuple(m)) for name, m in configs.items()]
    for k, seed in enumerate(seeds):
        cfg = load_config(cfg_path, [*overrides, f"seed={seed}"])
        split_sites = resplit(sites, cfg, seed)
        for res in results:
            r = run_config(cfg, split_sites, res.modalities, seed, n_boot=n_boot if k == 0 else 0)
            res.seeds.append(r)
            if log:
                print(f"  {res.name:8s} seed {seed}: AUC all {_f(r.auc_all)} covered "
                      f"{_f(r.auc_covered)} (n={r.n_covered}/{r.n_all}) {r.seconds:.0f}s",
                      file=sys.stderr, flush=True)
    return results


def _f(v: float | None) -> str:
    return "undefined" if v is None else f"{v:.3f}"


def _ci_str(ci: tuple[float | None, float | None]) -> str:
    return "-" if ci[0] is None or ci[1] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown_table(results: Sequence[ConfigResult]) -> str:
    """The results as a markdown table (mean over seeds, per-seed values, seed-0 CIs)."""
    lines = [
        "| configuration | mean AUC, all test patients | per seed | 95% CI (seed 0) "
        "| mean AUC, patients with the modality | n with / all (seed 0) | 95% CI (seed 0) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        per = ", ".join(_f(s.auc_all) for s in r.seeds)
        s0 = r.seeds[0]
        lines.append(
            f"| {r.name} | {_f(r.mean('all'))} | {per} | {_ci_str(s0.ci_all)} "
            f"| {_f(r.mean('covered'))} | {s0.n_covered} / {s0.n_all} | {_ci_str(s0.ci_covered)} |"
        )
    return "\n".join(lines)


def verdict(results: Sequence[ConfigResult], fusion: str = "fusion") -> tuple[bool, str]:
    """Does fusion beat the best single modality (mean AUC over seeds, all test patients)?

    Returns
    -------
    (bool, str)
        The outcome and a sentence with the figures (and the per-seed wins).
    """
    fus = next(r for r in results if r.name == fusion)
    singles = [r for r in results if r.name != fusion and r.mean("all") is not None]
    best = max(singles, key=lambda r: r.mean("all") or 0.0)
    fm, bm = fus.mean("all"), best.mean("all")
    ok = fm is not None and bm is not None and fm > bm
    wins = sum(1 for a, b in zip(fus.seeds, best.seeds, strict=True)
               if a.auc_all is not None and b.auc_all is not None and a.auc_all > b.auc_all)
    diffs = [a.auc_all - b.auc_all for a, b in zip(fus.seeds, best.seeds, strict=True)
             if a.auc_all is not None and b.auc_all is not None]
    sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float("nan")
    text = (f"fusion {_f(fm)} vs best single modality ({best.name}) {_f(bm)}: "
            f"difference {(fm or 0) - (bm or 0):+.3f} (SD over seeds {sd:.3f}); fusion higher on "
            f"{wins}/{len(diffs)} seeds -> {'PASS' if ok else 'FAIL'}")
    return ok, text


def prepare(cfg_path: Path, overrides: Sequence[str] = ()) -> dict[str, SiteData]:
    """Build and prepare every site of the config once, with every modality it enables."""
    cfg = load_config(cfg_path, list(overrides))
    with tempfile.TemporaryDirectory() as tmp:
        return load_site_data(cfg, Path(tmp))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints markdown tables and PASS/FAIL lines."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["covid_oxygen", "alzheimers"],
                    help="config names under configs/ (default: both sample tasks)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--missing-site", default="site_a")
    ap.add_argument("--missing-image-fraction", type=float, default=0.3)
    ap.add_argument("--no-missing", action="store_true", help="skip the missing-data run")
    args = ap.parse_args(argv)
    os.environ.setdefault("MMFL_CACHE", "/tmp/mmfl_cache")
    torch.set_num_threads(1)
    overrides = ["training.num_threads=1"]
    failures = 0
    t_start = time.perf_counter()
    for task in args.tasks:
        cfg_path = REPO / "configs" / f"{task}.yaml"
        if not cfg_path.exists():
            known = sorted(p.stem for p in cfg_path.parent.glob("*.yaml"))
            print(f"no config {cfg_path}; accepted: {known}", file=sys.stderr)
            return 2
        sites = prepare(cfg_path, overrides)
        mods = list(next(iter(sites.values())).dataset.modalities)
        configs: dict[str, Sequence[str]] = {m: [m] for m in mods}
        configs["fusion"] = mods
        print(f"\n### {task} ({cfg_path.relative_to(REPO)}), centralized, seeds {args.seeds}\n")
        res = ablate(cfg_path, sites, configs, args.seeds, n_boot=args.n_boot, overrides=overrides)
        print(markdown_table(res))
        ok, text = verdict(res)
        failures += not ok
        print(f"\n{task}: {text}")
        if task == "covid_oxygen" and not args.no_missing:
            if args.missing_site not in sites:
                print(f"missing-data run: no site {args.missing_site!r} in {list(sites)}",
                      file=sys.stderr)
                return 2
            miss = dict(sites)
            miss[args.missing_site] = with_missing(
                sites[args.missing_site], image_fraction=args.missing_image_fraction,
                drop_text=True)
            print(f"\n### {task}, {args.missing_site}: {args.missing_image_fraction:.0%} of "
                  f"images and all notes missing, seeds {args.seeds}\n")
            res = ablate(cfg_path, miss, configs, args.seeds, n_boot=args.n_boot,
                         overrides=overrides)
            print(markdown_table(res))
            ok, text = verdict(res)
            failures += not ok
            print(f"\n{task} with missing data: {text}")
    print(f"\nAUC 'all': every pooled test patient, a single-modality model scores a patient "
          f"without its modality {MISSING_SCORE}; CIs: stratified bootstrap ({args.n_boot}) "
          f"of seed {args.seeds[0]}'s test set. Total {time.perf_counter() - t_start:.0f}s, "
          f"load average {os.getloadavg()[0]:.2f}.")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

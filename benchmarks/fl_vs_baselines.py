"""Federated vs centralized vs local-only test AUC on the sample tasks, with CIs (issue 5).

For every task config and seed this trains the experiment three ways, each writing its own
run directory exactly as ``mmfl train CONFIG --engine ...`` does:

* ``federated``: the in-process engine
  (:func:`multimodal_fl.engines.federated.run_federated_experiment`);
* ``centralized``: every site's training patients pooled
  (:func:`multimodal_fl.engines.baselines.run_centralized`);
* ``local``: one model per site on its own data (:func:`multimodal_fl.engines.baselines.run_local`).

The three share the per-site splits of a seed, so each site's test patients are the same in all
three. From every run's ``sites/<site>/predictions.csv`` (the test rows) it computes the
**pooled** test AUC (all sites' test patients together) and each **site's** test AUC, each with
a stratified percentile bootstrap 95% CI (:func:`multimodal_fl.evaluation.metrics.bootstrap_ci`),
and paired bootstrap CIs of the differences federated − centralized and federated − local on the
same patients (:func:`~multimodal_fl.evaluation.metrics.paired_bootstrap_difference`).

Targets (issue 5, printed PASS/FAIL, medians over seeds, on the COVID-19 task):

* federated pooled test AUC ≥ 0.99 × centralized;
* mean per-site test AUC of federated ≥ 1.16 × local-only (EXAM's +16 %, relative).

The local and centralized engines keep the step with the best validation AUC (early stopping);
the federated engine keeps the round ``federated.select`` names (``best_val`` by default; before
commit 92adb0e it always kept the last round). ``--best-round`` adds ``federated_best``: the
federated run retrained for as many rounds as its best validation round (the sites'
validation AUCs weighted by validation size), which is what best-round selection gives (runs
are deterministic, so the first k rounds of a longer run are a k-round run); with
``--set federated.select=last`` it shows what selection adds.

``--seeds`` are *experiment* seeds (splits, initialisation) on one cohort: the shipped sample
cohorts, generated with generator seed 0, on which the shipped configs were tuned.
``--data-seeds S ...`` runs everything on cohorts generated with other generator seeds: each is
written once (``mmfl sample-data WORK/data/seed<S> --seed S``, reused while its ``MANIFEST.json``
names the same seed and generator version) and the configs' sites are pointed at it with
``--set sites.<i>.path=...`` (:func:`site_path_overrides`); data seed 0 is the shipped
``sample_data/``. The tables are printed per data seed, then one verdict table over all of
them, with the paired per-site differences federated − local-only.

Run from the repository root (``--set`` overrides go to all three engines)::

    MMFL_CACHE=/tmp/mmfl_cache .venv/bin/python benchmarks/fl_vs_baselines.py --seeds 0 1 2
    MMFL_CACHE=/tmp/mmfl_cache .venv/bin/python benchmarks/fl_vs_baselines.py --data-seeds 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from multimodal_fl.config import ExperimentConfig, load_config
from multimodal_fl.evaluation.metrics import (
    MetricValue,
    bootstrap_ci,
    bootstrap_seed,
    derive_seed,
    paired_bootstrap_difference,
)
from multimodal_fl.sample_data import GENERATOR_VERSION, generate

REPO = Path(__file__).resolve().parents[1]
#: The shipped sample cohorts (generator seed 0) the shipped configs point at.
SAMPLE_ROOT = REPO / "sample_data"
ENGINES = ("federated", "centralized", "local")
#: The federated run stopped at its best validation round (``--best-round``; a diagnosis).
BEST = "federated_best"
TARGET_CENTRAL = 0.99
TARGET_LOCAL = 1.16


@dataclass
class EngineResult:
    """Test AUCs of one run directory.

    Parameters
    ----------
    engine : str
        ``federated``, ``centralized`` or ``local``.
    seed : int
        The experiment seed.
    pooled : MetricValue
        AUC over every site's test patients.
    per_site : dict[str, MetricValue]
        AUC of each site's test patients.
    test : pandas.DataFrame
        The test rows (``site``, ``patient_id``, ``label``, ``score``).
    seconds : float
        Wall time of the run.
    """

    engine: str
    seed: int
    pooled: MetricValue
    per_site: dict[str, MetricValue]
    test: pd.DataFrame
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def mean_site_auc(self) -> float | None:
        """Mean of the defined per-site AUCs (None when none is defined)."""
        values = [m.value for m in self.per_site.values() if m.value is not None]
        return float(np.mean(values)) if values else None


def train(engine: str, cfg: ExperimentConfig, run_dir: Path) -> float:
    """Train one engine into ``run_dir`` unless it already holds a finished run.

    Parameters
    ----------
    engine : str
        One of :data:`ENGINES`.
    cfg : ExperimentConfig
        The experiment.
    run_dir : Path
        The run directory.

    Returns
    -------
    float
        Seconds the run took (for a reused run: the ``timing_s.total`` it recorded).
    """
    metrics = run_dir / "metrics.json"
    if metrics.is_file() and any(run_dir.glob("sites/*/predictions.csv")):
        timing = json.loads(metrics.read_text()).get("timing_s", {})
        return float(timing.get("total", 0.0))
    started = time.perf_counter()
    if engine == "federated":
        from multimodal_fl.engines.federated import run_federated_experiment

        run_federated_experiment(cfg, run_dir)
    elif engine == "centralized":
        from multimodal_fl.engines.baselines import run_centralized

        run_centralized(cfg, run_dir, warn=lambda _msg: None)
    elif engine == "local":
        from multimodal_fl.engines.baselines import run_local

        run_local(cfg, run_dir)
    else:
        raise ValueError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    return time.perf_counter() - started


def site_path_overrides(config: Path, data_root: Path, sample_root: Path = SAMPLE_ROOT
                        ) -> list[str]:
    """``--set`` overrides that point a config's sites at other generated cohorts.

    Each site's ``path`` (relative to the config file, as ``load_config`` resolves it) must lie
    under ``sample_root``; its override names the same place under ``data_root``
    (``../sample_data/covid_oxygen/site_a`` -> ``DATA_ROOT/covid_oxygen/site_a``).

    Parameters
    ----------
    config : Path
        The experiment YAML file.
    data_root : Path
        A folder written by ``mmfl sample-data`` (another generator seed).
    sample_root : Path
        The sample-data folder the config's sites point into (default: ``sample_data/``).

    Returns
    -------
    list of str
        ``sites.<i>.path=<absolute path>`` per site, in the config's order (the path quoted
        as a YAML string).

    Raises
    ------
    ValueError
        If the config has no sites, or a site lies outside ``sample_root``.
    """
    raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    sites = raw.get("sites") if isinstance(raw, dict) else None
    if not sites:
        raise ValueError(f"{config}: no 'sites' list to point at generated cohorts")
    base, root = config.resolve().parent, sample_root.resolve()
    overrides = []
    for i, site in enumerate(sites):
        path = Path(str(site.get("path", ""))).expanduser() if isinstance(site, dict) else None
        name = site.get("name", i) if isinstance(site, dict) else i
        resolved = (path if path.is_absolute() else base / path).resolve() if path else None
        if resolved is None or not resolved.is_relative_to(root):
            raise ValueError(f"{config}: site {name!r} ({resolved}) is not under the sample "
                             f"data {root}; --data-seeds only re-points sites of the "
                             f"generated sample cohorts")
        target = data_root.resolve() / resolved.relative_to(root)
        overrides.append(f"sites.{i}.path={json.dumps(str(target))}")
    return overrides


def generated_cohorts(work: Path, seed: int) -> Path:
    """The sample cohorts of generator seed ``seed`` under ``work/data/seed<seed>``.

    Written once with :func:`multimodal_fl.sample_data.generate` (the default profile, as
    ``mmfl sample-data OUT --seed SEED``); reused while its ``MANIFEST.json`` names the same
    seed, profile and generator version.

    Parameters
    ----------
    work : Path
        The benchmark's work folder.
    seed : int
        The generator seed.

    Returns
    -------
    Path
        The folder (holding ``covid_oxygen/`` and ``alzheimers/``).
    """
    out = work / "data" / f"seed{seed}"
    manifest = out / "MANIFEST.json"
    if manifest.is_file():
        doc = json.loads(manifest.read_text())
        if (doc.get("seed"), doc.get("profile"), doc.get("generator_version")) == (
                seed, "default", GENERATOR_VERSION):
            return out
    print(f"generating the sample cohorts with generator seed {seed} -> {out}",
          file=sys.stderr, flush=True)
    generate(out, seed=seed)
    return out


def best_round(run_dir: Path) -> tuple[int, float]:
    """The round of a federated run with the best validation AUC (earliest on ties).

    The score of a round is the mean of the sites' ``val_auc`` weighted by each site's number
    of validation patients (from its ``predictions.csv``); sites without one are left out.

    Parameters
    ----------
    run_dir : Path
        A finished federated run directory.

    Returns
    -------
    tuple[int, float]
        The round and its score.

    Raises
    ------
    ValueError
        If no round has a validation AUC.
    """
    doc = json.loads((run_dir / "metrics.json").read_text())
    n_val = {
        p.parent.name: int((pd.read_csv(p)["split"] == "val").sum())
        for p in run_dir.glob("sites/*/predictions.csv")
    }
    best: tuple[int, float] | None = None
    for row in doc["rounds"]:
        num = den = 0.0
        for site, metrics in row["eval_metrics"].items():
            auc = metrics.get("val_auc")
            if auc is not None and np.isfinite(auc) and n_val.get(site):
                num += n_val[site] * float(auc)
                den += n_val[site]
        if den > 0 and (best is None or num / den > best[1]):
            best = (int(row["round"]), num / den)
    if best is None:
        raise ValueError(f"{run_dir}: no round has a validation AUC (val_auc) to select on")
    return best


def read_test_rows(run_dir: Path) -> pd.DataFrame:
    """Read every site's test predictions of a run directory.

    Parameters
    ----------
    run_dir : Path
        A run directory with ``sites/<site>/predictions.csv``.

    Returns
    -------
    pandas.DataFrame
        Columns ``site``, ``patient_id``, ``label``, ``score``, sorted by site and patient.

    Raises
    ------
    FileNotFoundError
        If no site wrote predictions.
    """
    frames = []
    for path in sorted(run_dir.glob("sites/*/predictions.csv")):
        frame = pd.read_csv(path)
        frame = frame[frame["split"] == "test"][["patient_id", "label", "score"]].copy()
        frame.insert(0, "site", path.parent.name)
        frames.append(frame)
    if not frames:
        raise FileNotFoundError(f"{run_dir}: no sites/<site>/predictions.csv (run not finished?)")
    return pd.concat(frames).sort_values(["site", "patient_id"]).reset_index(drop=True)


def evaluate(engine: str, seed: int, run_dir: Path, *, n_boot: int, seconds: float
             ) -> EngineResult:
    """Pooled and per-site test AUC with bootstrap CIs from a run directory.

    Parameters
    ----------
    engine : str
        The engine's name.
    seed : int
        The experiment seed (also seeds the bootstrap).
    run_dir : Path
        The run directory.
    n_boot : int
        Bootstrap resamples.
    seconds : float
        Training wall time to record.

    Returns
    -------
    EngineResult
    """
    return evaluate_rows(engine, seed, read_test_rows(run_dir), n_boot=n_boot, seconds=seconds)


def evaluate_rows(engine: str, seed: int, test: pd.DataFrame, *, n_boot: int, seconds: float
                  ) -> EngineResult:
    """Pooled and per-site test AUC with bootstrap CIs from test rows.

    Parameters
    ----------
    engine : str
        The engine's name.
    seed : int
        The experiment seed (also seeds the bootstrap).
    test : pandas.DataFrame
        Columns ``site``, ``patient_id``, ``label``, ``score`` (:func:`read_test_rows`).
    n_boot : int
        Bootstrap resamples.
    seconds : float
        Training wall time to record.

    Returns
    -------
    EngineResult
    """
    def interval(part: pd.DataFrame) -> MetricValue:
        # seeded as the engines seed a site's interval, so a site's here is its metrics.json's
        scores = part["score"].to_numpy(np.float64)
        return bootstrap_ci("auc", part["label"].to_numpy(np.int64), scores, n_boot=n_boot,
                            seed=bootstrap_seed(seed, scores))

    pooled = interval(test)
    per_site = {str(site): interval(part) for site, part in test.groupby("site", sort=True)}
    return EngineResult(engine, seed, pooled, per_site, test, seconds)


def paired(a: EngineResult, b: EngineResult, *, n_boot: int, site: str | None = None
           ) -> MetricValue:
    """Paired bootstrap of AUC(b) − AUC(a) on the test patients both runs scored.

    Parameters
    ----------
    a, b : EngineResult
        Baseline and compared run (same seed, so the same test patients).
    n_boot : int
        Bootstrap resamples.
    site : str or None
        Restrict to one site's patients (None: pooled).

    Returns
    -------
    MetricValue
        The difference and its 95% interval.
    """
    ta, tb = a.test, b.test
    if site is not None:
        ta, tb = ta[ta["site"] == site], tb[tb["site"] == site]
    both = ta.merge(tb, on=["site", "patient_id"], suffixes=("_a", "_b"))
    if not (both["label_a"] == both["label_b"]).all():
        raise ValueError(f"{a.engine} and {b.engine} disagree on test labels (seed {a.seed})")
    return paired_bootstrap_difference(
        both["label_a"].to_numpy(np.int64), both["score_a"].to_numpy(np.float64),
        both["score_b"].to_numpy(np.float64), n_boot=n_boot,
        seed=derive_seed(a.seed, "paired", a.engine, b.engine, site or "pooled"),
    )


def fmt(m: MetricValue) -> str:
    """Format a metric as ``value [lo, hi]`` (or its reason when undefined).

    Parameters
    ----------
    m : MetricValue
        The metric.

    Returns
    -------
    str
        Three decimals.
    """
    if m.value is None:
        return f"undefined ({m.reason})"
    if m.lo is None or m.hi is None:
        return f"{m.value:.3f}"
    return f"{m.value:.3f} [{m.lo:.3f}, {m.hi:.3f}]"


def task_tables(name: str, results: dict[int, dict[str, EngineResult]], n_boot: int
                ) -> tuple[str, dict[str, float]]:
    """Markdown tables for one task, and the median ratios over seeds.

    Parameters
    ----------
    name : str
        The task (config) name.
    results : dict[int, dict[str, EngineResult]]
        Seed -> engine -> result.
    n_boot : int
        Bootstrap resamples for the paired differences.

    Returns
    -------
    tuple[str, dict[str, float]]
        The markdown text and ``{"fed_over_central": ..., "fed_over_local": ...}`` medians.
    """
    sites = sorted({s for by in results.values() for r in by.values() for s in r.per_site})
    lines = [f"### {name}", "",
             "| seed | engine | pooled test AUC [95% CI] | " + " | ".join(sites)
             + " | mean per-site | train s |",
             "| --- | --- | --- | " + " | ".join("---" for _ in sites) + " | --- | --- |"]
    ratios_c: list[float] = []
    ratios_l: list[float] = []
    best_c: list[float] = []
    best_l: list[float] = []
    diffs: list[str] = []
    for seed, by in sorted(results.items()):
        for engine in (*ENGINES, BEST):
            r = by.get(engine)
            if r is None:
                continue
            mean = r.mean_site_auc
            cells = [fmt(r.per_site[s]) if s in r.per_site else "-" for s in sites]
            lines.append(f"| {seed} | {engine} | {fmt(r.pooled)} | " + " | ".join(cells)
                         + f" | {'-' if mean is None else f'{mean:.3f}'} | {r.seconds:.0f} |")
        fed, cen, loc = by.get("federated"), by.get("centralized"), by.get("local")
        if fed and cen and fed.pooled.value is not None and cen.pooled.value:
            ratios_c.append(fed.pooled.value / cen.pooled.value)
            diffs.append(f"| {seed} | federated − centralized, pooled | "
                         f"{fmt(paired(cen, fed, n_boot=n_boot))} |")
        if fed and loc and fed.mean_site_auc is not None and loc.mean_site_auc:
            ratios_l.append(fed.mean_site_auc / loc.mean_site_auc)
            diffs.append(f"| {seed} | federated − local, pooled test patients | "
                         f"{fmt(paired(loc, fed, n_boot=n_boot))} |")
        best = by.get(BEST)
        if best and cen and best.pooled.value is not None and cen.pooled.value:
            best_c.append(best.pooled.value / cen.pooled.value)
            diffs.append(f"| {seed} | federated_best − centralized, pooled | "
                         f"{fmt(paired(cen, best, n_boot=n_boot))} |")
        if best and loc and best.mean_site_auc is not None and loc.mean_site_auc:
            best_l.append(best.mean_site_auc / loc.mean_site_auc)
            diffs.append(f"| {seed} | federated_best − local, pooled test patients | "
                         f"{fmt(paired(loc, best, n_boot=n_boot))} |")
    lines += ["", "Paired bootstrap differences of test AUC (same patients, 95% CI):", "",
              "| seed | difference | ΔAUC [95% CI] |", "| --- | --- | --- |", *diffs, ""]
    medians: dict[str, float] = {}
    if ratios_c:
        medians["fed_over_central"] = float(statistics.median(ratios_c))
        each = ", ".join(f"{x:.3f}" for x in ratios_c)
        ok = medians["fed_over_central"] >= TARGET_CENTRAL
        lines.append(f"- federated / centralized pooled test AUC: median "
                     f"**{medians['fed_over_central']:.3f}** over seeds ({each}); target ≥ "
                     f"{TARGET_CENTRAL}: **{'PASS' if ok else 'FAIL'}**")
    if ratios_l:
        medians["fed_over_local"] = float(statistics.median(ratios_l))
        each = ", ".join(f"{100 * (x - 1):+.1f} %" for x in ratios_l)
        ok = medians["fed_over_local"] >= TARGET_LOCAL
        lines.append(f"- mean per-site test AUC, federated vs local-only: median "
                     f"**{100 * (medians['fed_over_local'] - 1):+.1f} %** over seeds ({each}); "
                     f"target ≥ +{100 * (TARGET_LOCAL - 1):.0f} %: "
                     f"**{'PASS' if ok else 'FAIL'}**")
    if best_c:
        medians["best_over_central"] = float(statistics.median(best_c))
        lines.append(f"- diagnosis, federated_best / centralized pooled test AUC: median "
                     f"{medians['best_over_central']:.3f} "
                     f"({', '.join(f'{x:.3f}' for x in best_c)})")
    if best_l:
        medians["best_over_local"] = float(statistics.median(best_l))
        lines.append(f"- diagnosis, mean per-site test AUC federated_best vs local-only: "
                     f"median {100 * (medians['best_over_local'] - 1):+.1f} % "
                     f"({', '.join(f'{100 * (x - 1):+.1f} %' for x in best_l)})")
    return "\n".join(lines) + "\n", medians


def site_gain_table(results: dict[int, dict[str, EngineResult]], n_boot: int) -> str:
    """Markdown table of federated − local-only test AUC at each site (paired bootstrap).

    Parameters
    ----------
    results : dict[int, dict[str, EngineResult]]
        Seed -> engine -> result.
    n_boot : int
        Bootstrap resamples.

    Returns
    -------
    str
        One row per seed with both runs, one column per site; empty when no seed has both.
    """
    sites = sorted({s for by in results.values() for r in by.values() for s in r.per_site})
    rows = []
    for seed, by in sorted(results.items()):
        fed, loc = by.get("federated"), by.get("local")
        if fed is None or loc is None:
            continue
        cells = [fmt(paired(loc, fed, n_boot=n_boot, site=s)) for s in sites]
        rows.append(f"| {seed} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    return "\n".join([
        "Federated − local-only test AUC at each site (paired bootstrap on the site's test "
        "patients, 95% CI):", "",
        "| seed | " + " | ".join(sites) + " |", "| --- | " + " | ".join("---" for _ in sites)
        + " |", *rows, ""]) + "\n"


@dataclass
class Verdict:
    """The targets of one task on one cohort, for the verdict table.

    Parameters
    ----------
    task : str
        The task (config) name.
    data_seed : int or None
        The generator seed of the cohort (None: the config's own sites).
    results : dict[int, dict[str, EngineResult]]
        Experiment seed (or any key that orders the runs) -> engine -> result.
    label : str
        The cohort's name in the table (default: from ``data_seed``).
    """

    task: str
    data_seed: int | None
    results: dict[int, dict[str, EngineResult]]
    label: str = ""

    @property
    def cohort(self) -> str:
        """How the verdict table names the cohort."""
        if self.label:
            return self.label
        if self.data_seed is None:
            return "the config's own sites"
        return "0 (shipped, tuned on)" if self.data_seed == 0 else str(self.data_seed)


def verdict_row(v: Verdict, n_boot: int) -> str:
    """One markdown row of the verdict table (medians over the experiment seeds).

    Parameters
    ----------
    v : Verdict
        The runs of one task on one cohort.
    n_boot : int
        Bootstrap resamples for the paired differences.

    Returns
    -------
    str
        Federated / centralized and its target, the paired pooled differences, the mean
        per-site gain over local-only and its target, and how many per-site paired CIs of
        federated − local lie above 0, cover it or lie below it.
    """
    ratios, diffs, gains = [], [], []
    above = cover = below = 0
    for _seed, by in sorted(v.results.items()):
        fed, cen, loc = by.get("federated"), by.get("centralized"), by.get("local")
        if fed and cen and fed.pooled.value is not None and cen.pooled.value:
            ratios.append(fed.pooled.value / cen.pooled.value)
            diffs.append(fmt(paired(cen, fed, n_boot=n_boot)))
        if fed and loc and fed.mean_site_auc is not None and loc.mean_site_auc:
            gains.append(fed.mean_site_auc / loc.mean_site_auc)
            for site in sorted(set(fed.per_site) & set(loc.per_site)):
                d = paired(loc, fed, n_boot=n_boot, site=site)
                if d.lo is not None and d.lo > 0:
                    above += 1
                elif d.hi is not None and d.hi < 0:
                    below += 1
                elif d.value is not None:
                    cover += 1

    def judged(values: list[float], target: float, pct: bool) -> tuple[str, str]:
        if not values:
            return "-", "-"
        med = statistics.median(values)
        show = (lambda x: f"{100 * (x - 1):+.1f} %") if pct else (lambda x: f"{x:.3f}")
        each = ", ".join(show(x) for x in values)
        return f"{show(med)} ({each})", "PASS" if med >= target else "FAIL"

    ratio, ratio_ok = judged(ratios, TARGET_CENTRAL, pct=False)
    gain, gain_ok = judged(gains, TARGET_LOCAL, pct=True)
    return (f"| {v.task} | {v.cohort} | {ratio} | **{ratio_ok}** | {'; '.join(diffs) or '-'} "
            f"| {gain} | **{gain_ok}** | {above} / {cover} / {below} |")


def verdict_table(verdicts: list[Verdict], n_boot: int) -> str:
    """The verdict table over tasks and cohorts (issue-5 targets, PASS/FAIL by median).

    Parameters
    ----------
    verdicts : list of Verdict
        One per task and data seed.
    n_boot : int
        Bootstrap resamples.

    Returns
    -------
    str
        Markdown: a row per task and cohort, then per task a row over every cohort it was
        not tuned on (data seeds other than 0), when there are several.
    """
    pooled = []
    for task in dict.fromkeys(v.task for v in verdicts):
        untuned = [v for v in verdicts if v.task == task and v.data_seed]
        if len(untuned) > 1:
            runs = {i: by for i, by in enumerate(
                by for v in untuned for _seed, by in sorted(v.results.items()))}
            seeds = ", ".join(str(v.data_seed) for v in untuned)
            pooled.append(Verdict(task, None, runs, label=f"{seeds} together (not tuned on)"))
    return "\n".join([
        "### Verdicts", "",
        f"| task | data seed | federated / centralized, pooled test AUC: median (per seed) "
        f"| ≥ {TARGET_CENTRAL} | federated − centralized, pooled ΔAUC [95% CI] per seed "
        f"| mean per-site AUC, federated vs local-only: median (per seed) "
        f"| ≥ +{100 * (TARGET_LOCAL - 1):.0f} % "
        f"| sites × seeds: federated − local CI above 0 / covering 0 / below 0 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *(verdict_row(v, n_boot) for v in [*verdicts, *pooled]), ""]) + "\n"


def run_task(config: Path, data_seed: int | None, args: argparse.Namespace, work: Path,
             sites: list[str]) -> tuple[str, dict[int, dict[str, EngineResult]]]:
    """Train and evaluate every engine and experiment seed of one config on one cohort.

    Parameters
    ----------
    config : Path
        The experiment YAML file.
    data_seed : int or None
        Generator seed of the cohort (None or 0: the config's own sites, ``sample_data/``).
    args : argparse.Namespace
        The parsed command line (``seeds``, ``engines``, ``overrides``, ``best_round``,
        ``n_boot``).
    work : Path
        Run directories go under ``work/<name>/[data<S>/]seed<seed>/<engine>``.
    sites : list of str
        ``--set`` overrides pointing the sites at the cohort (from
        :func:`site_path_overrides`; empty for the config's own sites).

    Returns
    -------
    tuple[str, dict[int, dict[str, EngineResult]]]
        The config's name and seed -> engine -> result.
    """
    overrides = [*args.overrides, *sites]
    results: dict[int, dict[str, EngineResult]] = {}
    name = config.stem
    for seed in args.seeds:
        cfg = load_config(config, [*overrides, f"seed={seed}"])
        name = cfg.name or config.stem
        base = work / name if data_seed is None else work / name / f"data{data_seed}"
        for engine in args.engines:
            run_dir = base / f"seed{seed}" / engine
            print(f"{name} seed {seed}: {engine} -> {run_dir}", file=sys.stderr, flush=True)
            seconds = train(engine, cfg, run_dir)
            results.setdefault(seed, {})[engine] = evaluate(
                engine, seed, run_dir, n_boot=args.n_boot, seconds=seconds)
            if engine == "federated" and args.best_round:
                k, score = best_round(run_dir)
                print(f"{name} seed {seed}: best validation round {k} ({score:.3f})",
                      file=sys.stderr, flush=True)
                cfg_k = load_config(config, [*overrides, f"seed={seed}",
                                             f"federated.rounds={k}"])
                best_dir = base / f"seed{seed}" / f"{BEST}_r{k}"
                seconds = train("federated", cfg_k, best_dir)
                results[seed][BEST] = evaluate(BEST, seed, best_dir, n_boot=args.n_boot,
                                               seconds=seconds)
    return name, results


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate and print the markdown tables.

    Parameters
    ----------
    argv : list of str or None
        Command-line arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 (targets are reported, not enforced).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=Path, nargs="+",
                        default=[REPO / "configs" / "covid_oxygen.yaml",
                                 REPO / "configs" / "alzheimers.yaml"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="Experiment seeds (splits, initialisation) on each cohort.")
    parser.add_argument("--data-seeds", type=int, nargs="+", default=None,
                        help="Generator seeds of the sample cohorts to run on (0: the shipped "
                        "sample_data/; others are generated into WORK/data/seed<S>). Default: "
                        "the configs' own sites.")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="Config override a.b=c for every engine (repeatable).")
    parser.add_argument("--best-round", action="store_true",
                        help="Also retrain federated up to its best validation round "
                        "(federated_best; a diagnosis).")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=None,
                        help="Run directories go here (reused when finished; default: tmp).")
    parser.add_argument("--json", type=Path, default=None, help="Also write a summary here.")
    args = parser.parse_args(argv)
    if args.n_boot < 1:
        parser.error(f"--n-boot {args.n_boot}: expected a positive number of resamples")
    if args.data_seeds is not None and min(args.data_seeds) < 0:
        parser.error(f"--data-seeds {args.data_seeds}: expected generator seeds ≥ 0")
    work = args.work or Path(tempfile.mkdtemp(prefix="mmfl_fl_vs_baselines_"))
    t0 = time.time()
    load = os.getloadavg()
    summary: dict[str, Any] = {}
    verdicts: list[Verdict] = []
    if args.data_seeds:
        for config in args.configs:  # every config re-pointable, before any generation
            try:
                site_path_overrides(config, work)
            except (OSError, ValueError) as exc:
                parser.error(str(exc))
    for data_seed in args.data_seeds or [None]:
        root = generated_cohorts(work, data_seed) if data_seed else None
        for config in args.configs:
            sites = site_path_overrides(config, root) if root else []
            name, results = run_task(config, data_seed, args, work, sites)
            title = name if data_seed is None else f"{name}, data seed {data_seed}"
            text, medians = task_tables(title, results, args.n_boot)
            text += "\n" + site_gain_table(results, args.n_boot)
            verdicts.append(Verdict(name, data_seed, results))
            summary[title] = {
                "task": name, "data_seed": data_seed, "medians": medians,
                "runs": {str(seed): {e: {"pooled": r.pooled.value, "mean_site": r.mean_site_auc,
                                         "per_site": {s: m.value for s, m in r.per_site.items()}}
                                     for e, r in by.items()} for seed, by in results.items()},
            }
            print(text, flush=True)
    print(verdict_table(verdicts, args.n_boot), flush=True)
    print(f"overrides: {args.overrides or 'none'}; seeds {args.seeds}; data seeds "
          f"{args.data_seeds or 'the configs own'}; n_boot {args.n_boot}; load average at start "
          f"{load[0]:.2f}, at end {os.getloadavg()[0]:.2f}; wall {time.time() - t0:.0f} s; run "
          f"directories under {work}")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

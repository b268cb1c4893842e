"""Recalibration on the sample tasks: calibration of the pooled test split before and after.

For every task and seed this generates the sample cohorts with that seed (``mmfl sample-data
--seed S``; seed 0 is the repository's ``sample_data/``), trains the shipped config
(``configs/<task>.yaml``, experiment seed S) with the in-process federated engine (or another
``--engines``), which recalibrates its final model on the secure-summed pooled validation
histogram (``evaluation.recalibrate``, Platt scaling by default), and reads every site's
``sites/<site>/predictions.csv``: the test rows pooled, ``score_raw`` (the model's own score,
"before") and ``score`` (recalibrated by the method the run used).

``--methods`` compares recalibration methods on the same runs without retraining: each is
fitted by the engine's own function (:func:`~multimodal_fl.evaluation.recalibration.
fit_recalibration`) on the validation histograms the run's own fit used: the fine histogram
of the validation rows' ``score_raw`` of the sites in the secure sum, plus the counts-only
(coarsened) histograms the other sites disclosed (a site whose validation class counts are
released stays out of the sum: ``validation_inputs``), and applied to the test rows'
``score_raw``. The script first checks that this refit of the run's own method reproduces
the run's ``score`` column (to 1e-9), so every method's row is what the engine would have
written with it.

Printed per task and seed, before and after:

* mean predicted risk against the observed fraction, and ``|mean - observed|``
  (calibration-in-the-large; target at most 0.05 after);
* ECE on 10 equal-width bins (target at most 0.10 after, and below the 95th percentile of the
  ECE a perfectly calibrated model would have on the same scores: labels drawn from the
  scores, ``--n-sim`` times);
* the calibration slope (logistic regression of the label on ``logit(score)``) with its Wald
  95% CI (target: the CI contains 1 after, on at least 2 of 3 seeds);
* AUC (target: unchanged, to 1e-9).

Two **yardsticks** follow each task's table; they are not methods the package offers, they
say how much of what is left is noise. Both are Platt fits on a fine histogram
(:func:`~multimodal_fl.evaluation.recalibration.fit_on_scores`): ``every validation row``
fits on all sites' validation rows (what the fit would see if every site's validation
histogram could join the secure sum, no site's coarsened), ``the test rows`` fits on the
test rows themselves (in-sample: no split-to-split noise in the map; what is left is the
ECE's own noise at this n, and the limit of a two-parameter map).

Run from the repository root (about 20 minutes on 2 shared cores)::

    MMFL_CACHE=/tmp/calib/cache nice -n 10 .venv/bin/python benchmarks/calibration.py \\
        --seeds 0 1 2 --work /tmp/calib/bench
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression

from multimodal_fl.config import load_config
from multimodal_fl.engines import run
from multimodal_fl.engines.recalibration import disclosed_validation_counts
from multimodal_fl.evaluation.histograms import fine_counts
from multimodal_fl.evaluation.metrics import expected_calibration_error, roc_auc
from multimodal_fl.evaluation.recalibration import (
    FITTED,
    Recalibration,
    fit_on_scores,
    fit_recalibration,
)
from multimodal_fl.federated.server import RoundRecord
from multimodal_fl.sample_data import generate

REPO = Path(__file__).resolve().parents[1]
TASKS = ("covid_oxygen", "alzheimers")
ENGINE_NAMES = {"federated": "inprocess", "centralized": "centralized", "local": "local"}
CITL_TARGET = 0.05
ECE_TARGET = 0.10
#: The yardsticks' names: Platt fitted on every validation row, and on the test rows.
YARDSTICKS = ("every validation row", "the test rows")


@dataclass
class Figures:
    """Calibration figures of one score column on the pooled test rows."""

    mean: float
    observed: float
    ece: float
    ece_p95: float
    ece_cal_ok: float  # share of a calibrated model's draws with ECE <= ECE_TARGET
    slope: float
    slope_lo: float
    slope_hi: float
    auc: float

    @property
    def citl(self) -> float:
        """``|mean predicted - observed|``."""
        return abs(self.mean - self.observed)


def slope_ci(y: np.ndarray, s: np.ndarray) -> tuple[float, float, float]:
    """Calibration slope and its Wald 95% CI (logistic regression of ``y`` on ``logit(s)``)."""
    x = logit(np.clip(s, 1e-6, 1 - 1e-6))
    fit = LogisticRegression(C=np.inf, max_iter=1000).fit(x[:, None], y)
    beta = np.array([fit.intercept_[0], fit.coef_[0, 0]])
    design = np.column_stack([np.ones_like(x), x])
    p = expit(design @ beta)
    cov = np.linalg.inv(design.T @ (design * (p * (1 - p))[:, None]))
    se = float(np.sqrt(cov[1, 1]))
    return float(beta[1]), float(beta[1] - 1.96 * se), float(beta[1] + 1.96 * se)


def ece_null(s: np.ndarray, n_sim: int, seed: int) -> tuple[float, float]:
    """A perfectly calibrated model's ECE on these scores (labels drawn from them): its 95th
    percentile, and the share of draws that meet the ECE target."""
    rng = np.random.default_rng(seed)
    sims = [expected_calibration_error(rng.binomial(1, s), s, n_bins=10) for _ in range(n_sim)]
    return float(np.percentile(sims, 95)), float(np.mean(np.asarray(sims) <= ECE_TARGET))


def figures(y: np.ndarray, s: np.ndarray, *, n_sim: int, seed: int) -> Figures:
    """Every figure of one score column."""
    slope, lo, hi = slope_ci(y, s)
    auc = roc_auc(y, s).value
    p95, cal_ok = ece_null(s, n_sim, seed)
    return Figures(mean=float(s.mean()), observed=float(y.mean()),
                   ece=expected_calibration_error(y, s, n_bins=10),
                   ece_p95=p95, ece_cal_ok=cal_ok, slope=slope, slope_lo=lo, slope_hi=hi,
                   auc=float("nan") if auc is None else float(auc))


def cohorts(seed: int, work: Path) -> Path:
    """The sample cohorts of ``seed`` (the repository's own for seed 0)."""
    if seed == 0:
        return REPO / "sample_data"
    root = work / f"data_seed{seed}"
    if not (root / "MANIFEST.json").is_file():
        print(f"generating the sample cohorts of seed {seed} -> {root}", file=sys.stderr,
              flush=True)
        generate(root, seed=seed)
    return root


def config_for(task: str, seed: int, data: Path, work: Path, overrides: list[str]) -> Any:
    """The shipped config of ``task`` on ``data``, experiment seed ``seed``."""
    doc = yaml.safe_load((REPO / "configs" / f"{task}.yaml").read_text())
    for site in doc["sites"]:
        site["path"] = str(data / task / site["name"])
    doc["seed"] = seed
    doc["name"] = f"{task}_seed{seed}"
    path = work / "configs" / f"{task}_seed{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return load_config(path, overrides)


def train(engine: str, cfg: Any, run_dir: Path) -> dict[str, Any]:
    """Train unless ``run_dir`` holds a finished run; its ``metrics.json``."""
    metrics = run_dir / "metrics.json"
    if not (metrics.is_file() and any(run_dir.glob("sites/*/predictions.csv"))):
        run(cfg, ENGINE_NAMES[engine], out_dir=run_dir, overwrite=True, report=False)
    out: dict[str, Any] = json.loads(metrics.read_text())
    return out


def pooled_rows(run_dir: Path) -> pd.DataFrame:
    """Every site's prediction rows, pooled (a ``site`` column says whose)."""
    frames = [pd.read_csv(p).assign(site=p.parent.name)
              for p in sorted(run_dir.glob("sites/*/predictions.csv"))]
    return pd.concat(frames, ignore_index=True)


def validation_inputs(rows: pd.DataFrame, metrics: dict[str, Any], n_bins: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The validation histograms (negatives, positives) the run's own fit was made on.

    A federated run fits on the secure sum of the fine histograms of the sites that released
    nothing of their validation split, plus the counts-only histograms the other sites
    disclosed at the round its ``source`` names (coarsened cells spread over their fine bins,
    as :func:`~multimodal_fl.engines.recalibration.disclosed_validation_counts` reads them);
    a run that fell back to the disclosed histograms alone fits on those; the centralized and
    local-only engines fit on every validation row. The benchmark fits every method on the
    same inputs, so the figures are what the package would apply.
    """
    recal = metrics.get("recalibration") or {}
    source = str(recal.get("source", ""))
    found = re.search(r"round (\d+)", source)
    docs: dict[str, Any] = {}
    if found:
        row = next(r for r in metrics.get("rounds", []) if r["round"] == int(found[1]))
        docs = RoundRecord(**row).disclosed_validation()
    val = rows[rows["split"] == "val"]
    fine = val if not docs else val[~val["site"].isin(list(docs))]
    if source.startswith("the counts-only"):
        fine = val.iloc[:0]
    held = fine_counts(fine["label"], fine["score_raw"], n_bins).astype(np.float64)
    neg, pos = held[:n_bins], held[n_bins:]  # what each site holds for the secure sum
    counts = disclosed_validation_counts(docs) if docs else None
    if counts is not None:
        neg, pos = neg + counts[0], pos + counts[1]
    return neg, pos


def refit(inputs: tuple[np.ndarray, np.ndarray], method: str) -> Recalibration:
    """The engine's fit of ``method`` on the run's validation histograms."""
    return fit_recalibration(*inputs, method=method)


def check_refit(rows: pd.DataFrame, recal: dict[str, Any],
                inputs: tuple[np.ndarray, np.ndarray]) -> str:
    """The run's own method refitted reproduces its ``score`` column (else: raise)."""
    if not recal.get("applied"):
        same = np.array_equal(rows["score"].to_numpy(), rows["score_raw"].to_numpy())
        if not same:
            raise SystemExit("a run without recalibration has score != score_raw")
        return "the run applied none (score == score_raw)"
    fit = refit(inputs, str(recal["method"]))
    gap = float(np.max(np.abs(fit.apply(rows["score_raw"]) - rows["score"].to_numpy())))
    if gap > 1e-9 or abs(fit.a - recal["a"]) > 1e-9 or abs(fit.b - recal["b"]) > 1e-9:
        raise SystemExit(f"the refit of {recal['method']} differs from the run's by {gap}")
    return f"refit of the run's {recal['method']} reproduces its scores (max gap {gap:.1e})"


def row(seed: int, when: str, f: Figures, n: int) -> str:
    """One markdown row."""
    return (f"| {seed} | {when} | {n} | {f.mean:.3f} | {f.observed:.3f} | {f.citl:.3f} | "
            f"{f.ece:.3f} | {f.ece_p95:.3f} | {f.slope:.2f} [{f.slope_lo:.2f}, {f.slope_hi:.2f}] "
            f"| {f.auc:.4f} |")


def verdicts(after: dict[int, Figures], before: dict[int, Figures]) -> list[str]:
    """The issue's targets over the seeds, PASS or FAIL."""
    def ok(flag: bool) -> str:
        return "PASS" if flag else "FAIL"

    seeds = sorted(after)
    citl = [after[s].citl for s in seeds]
    ece = [after[s].ece for s in seeds]
    below = [after[s].ece < after[s].ece_p95 for s in seeds]
    slope = [after[s].slope_lo <= 1 <= after[s].slope_hi for s in seeds]
    auc = [abs(after[s].auc - before[s].auc) <= 1e-9 for s in seeds]
    return [
        f"- |mean predicted - observed| <= {CITL_TARGET} per seed: "
        f"{', '.join(f'{v:.3f}' for v in citl)}: **{ok(all(v <= CITL_TARGET for v in citl))}**",
        f"- ECE (10 bins) <= {ECE_TARGET} per seed: {', '.join(f'{v:.3f}' for v in ece)}: "
        f"**{ok(all(v <= ECE_TARGET for v in ece))}** (a perfectly calibrated model on the "
        f"same scores meets it with probability "
        f"{', '.join(f'{after[s].ece_cal_ok:.2f}' for s in seeds)}; on every seed "
        f"{float(np.prod([after[s].ece_cal_ok for s in seeds])):.2f})",
        f"- ECE below the 95th percentile of a calibrated model's per seed: {below}: "
        f"**{ok(all(below))}**",
        f"- slope CI contains 1 on at least 2 of {len(seeds)} seeds: {sum(slope)} of "
        f"{len(seeds)}: **{ok(sum(slope) >= min(2, len(seeds)))}**",
        f"- AUC unchanged (to 1e-9) per seed: {auc}: **{ok(all(auc))}**",
    ]


@dataclass
class SeedResult:
    """One seed's figures: before, and after each method, with the fits."""

    n: int
    before: Figures
    after: dict[str, Figures]
    fits: dict[str, Recalibration]
    run: dict[str, Any]
    check: str
    yardsticks: dict[str, Figures]


def task_table(task: str, engine: str, results: dict[int, SeedResult]) -> str:
    """The markdown table and verdicts of one task and engine."""
    methods = list(next(iter(results.values())).after)
    lines = [f"### {task} ({engine})", "",
             "| seed | scores | n test | mean predicted | observed | abs diff | ECE | "
             "ECE p95 if calibrated | slope [95% CI] | AUC |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for seed, r in sorted(results.items()):
        lines.append(row(seed, "before", r.before, r.n))
        lines += [row(seed, m, r.after[m], r.n) for m in methods]
    lines.append("")
    for seed, r in sorted(results.items()):
        fits = "; ".join(f"{m} a = {f.a:.3f}, b = {f.b:.3f}" for m, f in r.fits.items())
        lines.append(f"- seed {seed}: {fits} (on {next(iter(r.fits.values())).n} pooled "
                     f"validation patients); the run: {r.run.get('method')}, "
                     f"{r.run.get('source') or r.run.get('reason')}; {r.check}")
    for m in methods:
        lines += ["", f"Targets, {m}:"]
        lines += verdicts({s: r.after[m] for s, r in results.items()},
                          {s: r.before for s, r in results.items()})
    lines += ["", f"Yardsticks, {task} (Platt on a fine histogram; not methods the package "
              "offers):", "",
              "| seed | Platt fitted on | abs diff | ECE | ECE p95 if calibrated |",
              "| --- | --- | --- | --- | --- |"]
    for seed, r in sorted(results.items()):
        lines += [f"| {seed} | {name} | {f.citl:.3f} | {f.ece:.3f} | {f.ece_p95:.3f} |"
                  for name, f in r.yardsticks.items()]
    for name in YARDSTICKS:
        eces = [r.yardsticks[name].ece for _, r in sorted(results.items())]
        met = sum(v <= ECE_TARGET for v in eces)
        lines.append(f"- Platt fitted on {name}: ECE <= {ECE_TARGET} on {met} of {len(eces)} "
                     f"seeds ({', '.join(f'{v:.3f}' for v in eces)})")
    return "\n".join(lines)


def measure(rows: pd.DataFrame, metrics: dict[str, Any], methods: list[str], *, n_bins: int,
            n_sim: int, seed: int) -> SeedResult:
    """Before, and after each method (fitted on the run's validation inputs), on the test rows."""
    recal = metrics.get("recalibration") or {}
    inputs = validation_inputs(rows, metrics, n_bins)
    check = check_refit(rows, recal, inputs)
    test = rows[rows["split"] == "test"]
    y, raw = test["label"].to_numpy(dtype=np.int64), test["score_raw"].to_numpy()
    fits = {m: refit(inputs, m) for m in methods}
    val = rows[rows["split"] == "val"]
    sticks = {YARDSTICKS[0]: fit_on_scores(val["label"], val["score_raw"], method="platt",
                                           n_bins=n_bins),
              YARDSTICKS[1]: fit_on_scores(y, raw, method="platt", n_bins=n_bins)}
    return SeedResult(int(y.size), figures(y, raw, n_sim=n_sim, seed=seed),
                      {m: figures(y, f.apply(raw), n_sim=n_sim, seed=seed)
                       for m, f in fits.items()}, fits, recal, check,
                      {k: figures(y, f.apply(raw), n_sim=n_sim, seed=seed)
                       for k, f in sticks.items()})


def main(argv: list[str] | None = None) -> int:
    """Train, recalibrate, measure and print the tables.

    Parameters
    ----------
    argv : list of str or None

    Returns
    -------
    int
        0 (targets are reported, not enforced).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--engines", nargs="+", default=["federated"],
                        choices=sorted(ENGINE_NAMES))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="Config override a.b=c (repeatable).")
    parser.add_argument("--methods", nargs="+", default=list(FITTED), choices=FITTED,
                        help="Recalibration methods to compare on the same runs.")
    parser.add_argument("--n-sim", type=int, default=2000,
                        help="Simulated calibrated label draws for the ECE percentile.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmfl_calibration"))
    args = parser.parse_args(argv)
    t0, load = time.time(), os.getloadavg()
    for task in args.tasks:
        for engine in args.engines:
            results = {}
            for seed in args.seeds:
                cfg = config_for(task, seed, cohorts(seed, args.work), args.work,
                                 args.overrides)
                run_dir = args.work / "runs" / task / f"seed{seed}" / engine
                print(f"{task} seed {seed}: {engine} -> {run_dir}", file=sys.stderr,
                      flush=True)
                metrics = train(engine, cfg, run_dir)
                results[seed] = measure(pooled_rows(run_dir), metrics, args.methods,
                                        n_bins=cfg.evaluation.histogram_bins,
                                        n_sim=args.n_sim, seed=seed)
            print(task_table(task, engine, results) + "\n", flush=True)
    print(f"seeds {args.seeds}; engines {args.engines}; methods {args.methods}; "
          f"overrides {args.overrides or 'none'}; "
          f"n_sim {args.n_sim}; load average at start {load[0]:.2f}, at end "
          f"{os.getloadavg()[0]:.2f}; wall {time.time() - t0:.0f} s; runs under {args.work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

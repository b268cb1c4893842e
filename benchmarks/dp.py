"""Test AUC against epsilon: DP-SGD at each site (epsilon 1, 3, 8, none) and site-level DP.

Trains the sample COVID-19 config (``configs/covid_oxygen.yaml``, 4 sites) with the in-process
engine once per setting, each into its own run directory as ``mmfl train`` does:

* ``none``: the shipped config, no privacy section (its model has BatchNorm and a sparse
  forward; every DP row below has GroupNorm);
* ``dp eps=E``: ``privacy.dp: {target_epsilon: E, max_grad_norm: C, delta: 1e-5}``: each site
  calibrates its noise multiplier so that its epsilon at delta reaches E by the last round
  (Opacus' RDP accountant), trains with Poisson-sampled batches, per-patient clipping and noise;
* ``site-level z=Z``: ``privacy.site_level: {clip_norm: S, noise_multiplier: Z}``: the server
  clips each site's update to S and adds Gaussian noise to their sum (no DP-SGD at the sites).

From every run's ``sites/<site>/predictions.csv`` (test rows) it computes the pooled test AUC
(all sites' test patients) with a stratified percentile bootstrap 95% CI, and the mean of the
sites' test AUCs; the epsilons come from the run's ``metrics.json`` (``privacy``). DP runs are
not reproducible bit for bit (the noise and the batches come from the OS's CSPRNG), so one
seed is one draw.

Run from the repository root (``--rounds`` shortens every run, and the table says so)::

    MMFL_CACHE=/tmp/mmfl_cache nice -n 10 .venv/bin/python benchmarks/dp.py --work /tmp/dp_bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from multimodal_fl.config import load_config
from multimodal_fl.engines import run
from multimodal_fl.evaluation.metrics import bootstrap_ci, derive_seed

REPO = Path(__file__).resolve().parents[1]


def settings(epsilons: list[float], clip: float, site_clip: float, site_noise: list[float]
             ) -> list[tuple[str, list[str]]]:
    """Every row's name and its ``--set`` overrides."""
    rows = [("none", [])]
    rows += [(f"dp eps={e:g}", [f"privacy.dp.target_epsilon={e}",
                                f"privacy.dp.max_grad_norm={clip}"]) for e in epsilons]
    rows += [(f"site-level z={z:g}", [f"privacy.site_level.clip_norm={site_clip}",
                                      f"privacy.site_level.noise_multiplier={z}"])
             for z in site_noise]
    return rows


def test_aucs(run_dir: Path, seed: int, n_boot: int) -> dict[str, Any]:
    """Pooled test AUC with its CI and each site's test AUC, from the sites' predictions."""
    frames = []
    per_site = {}
    for path in sorted((run_dir / "sites").glob("*/predictions.csv")):
        df = pd.read_csv(path)
        test = df[df["split"] == "test"]
        frames.append(test)
        site = bootstrap_ci("auc", test["label"].to_numpy(), test["score"].to_numpy(),
                            n_boot=0, seed=seed)
        per_site[path.parent.name] = site.value
    pooled = pd.concat(frames)
    auc = bootstrap_ci("auc", pooled["label"].to_numpy(), pooled["score"].to_numpy(),
                       n_boot=n_boot, seed=derive_seed(seed, "dp-bench"))
    return {"pooled": auc.value, "lo": auc.lo, "hi": auc.hi, "n": len(pooled),
            "sites": per_site}


def clipped_sites(site_dp: dict[str, Any]) -> int:
    """How many sites' updates were clipped in one round's ``site_dp`` record.

    A plain round names the clipped sites (``clipped``); a round with secure aggregation
    records only their number (``clipped_count``): the sites clip before masking.
    """
    if "clipped_count" in site_dp:
        return int(site_dp["clipped_count"])
    return len(site_dp.get("clipped", []))


def one_row(name: str, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Train one setting (reusing a finished run in ``--work``) and read its figures."""
    sets = [*overrides, *args.set]
    if args.rounds is not None:
        sets.append(f"federated.rounds={args.rounds}")
    cfg = load_config(args.config, sets)
    out = args.work / name.replace(" ", "_").replace("=", "")
    t0 = time.perf_counter()
    if not (out / "metrics.json").is_file() or "stopped_after_round" in json.loads(
            (out / "metrics.json").read_text()):
        run(cfg, "inprocess", out_dir=out, overwrite=True, report=False)
    metrics = json.loads((out / "metrics.json").read_text())
    seconds = (metrics.get("timing_s") or {}).get("train", time.perf_counter() - t0)
    privacy = metrics.get("privacy") or {}
    eps = [v["epsilon"] for v in ((privacy.get("dp") or {}).get("sites") or {}).values()]
    site_level = privacy.get("site_level") or {}
    clipped = [clipped_sites(r.get("site_dp", {})) for r in metrics["rounds"]]
    sigmas = [json.loads(p.read_text())["fits"][-1]["noise_multiplier"]
              for p in sorted(out.glob("sites/*/privacy.json"))]  # at the sites, not the server
    return {"setting": name, "rounds": cfg.federated.rounds, **test_aucs(out, cfg.seed,
                                                                        args.n_boot),
            "epsilon_max": max(eps) if eps else None, "epsilon_min": min(eps) if eps else None,
            "noise_min": min(sigmas) if sigmas else None,
            "noise_max": max(sigmas) if sigmas else None,
            "site_level_epsilon": site_level.get("epsilon"),
            "clipped_per_round": statistics.mean(clipped) if site_level else None,
            "train_s": seconds}


def table(rows: list[dict[str, Any]], delta: float) -> str:
    """The markdown table of ``docs/benchmarks.md``."""
    head = (f"| setting | rounds | epsilon per site at delta={delta:g} (min-max) | "
            "sites' noise multiplier | site-level epsilon | pooled test AUC [95% CI] | "
            "mean per-site AUC | sites clipped per round | train s |")
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        eps = ("-" if r["epsilon_max"] is None else
               f"{r['epsilon_min']:.2f}-{r['epsilon_max']:.2f}")
        sigma = ("-" if r.get("noise_max") is None else
                 f"{r['noise_min']:.2f}-{r['noise_max']:.2f}")
        sl = "-" if r["site_level_epsilon"] is None else f"{r['site_level_epsilon']:.2f}"
        auc = f"{r['pooled']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"
        sites = [v for v in r["sites"].values() if v is not None and np.isfinite(v)]
        mean = f"{statistics.mean(sites):.3f}" if sites else "-"
        clipped = "-" if r["clipped_per_round"] is None else f"{r['clipped_per_round']:.1f}/4"
        lines.append(f"| {r['setting']} | {r['rounds']} | {eps} | {sigma} | {sl} | {auc} | "
                     f"{mean} | {clipped} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    """Parse the arguments, train every setting, print the table (and write the JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "covid_oxygen.yaml")
    ap.add_argument("--work", type=Path, required=True, help="run directories (reused)")
    ap.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 3.0, 8.0])
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="DP-SGD's C")
    ap.add_argument("--site-clip", type=float, default=0.5, help="site-level S")
    ap.add_argument("--site-noise", type=float, nargs="*", default=[1.0], help="site-level z")
    ap.add_argument("--rounds", type=int, default=None, help="fewer rounds than the config's")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--set", action="append", default=[], help="more config overrides")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, overrides in settings(args.epsilons, args.max_grad_norm, args.site_clip,
                                    args.site_noise):
        rows.append(one_row(name, overrides, args))
        print(f"{name}: pooled test AUC {rows[-1]['pooled']:.3f} ({rows[-1]['train_s']:.0f} s)",
              flush=True)
    print(table(rows, 1e-5))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

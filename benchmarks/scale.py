"""Scale: cohort build, embedding, time per round and peak memory at 1,000 to 50,000 patients.

For each size (patients per task) and number of sites, this generates the ``scale`` profile of
the sample data (``mmfl sample-data OUT --profile scale --patients N --sites K``; 128-pixel
chest X-rays for COVID-19, 48-voxel brain volumes for Alzheimer's) and trains it in process
(``mmfl train --engine inprocess``: :func:`multimodal_fl.engines.run`) with images at the
configured size (2D: 64 pixels, 3D: 32 voxels; the image encoder frozen, so its embeddings
are computed once and cached), tabular features and the notes (MiniLM, frozen). It measures,
from the run's own progress events:

- **cohort**: building every site's cohort (FHIR, images linked; ``data.workers`` automatic),
  from the start of the run to the first site's preparation;
- **embedding**: reading the images at the configured size and embedding images and notes
  with the frozen encoders (a cold cache), to the last preparation event;
- **cohort CPU**: the CPU seconds (user + system) of this process and its finished children
  (the cohort pool's workers, shut down by then) from the start of the run to the first
  site's preparation (``os.times``): the cohort's cost without the machine's load, which
  the wall seconds include;
- **round**: the median wall seconds of a federated round (``RoundRecord.seconds``);
- **peak RSS**: the largest sum of the resident set sizes of this process and all its
  children (the cohort pool's workers), sampled every 0.1 s with psutil;
- **generate**: writing the sample data (not part of the run; the loky pool of
  :func:`multimodal_fl.sample_data.generate`).

Each configuration runs in a fresh interpreter (``--one``), so that one run's memory never
counts in the next. ``--cohort-only`` stops each run once its cohorts are built (no
embedding, no rounds) and prints the cohort's wall and CPU seconds per 1,000 patients:
whether building the cohorts grows linearly, in minutes instead of an hour at 50,000.
Below the table: the least-squares slope (seconds and MB per 1,000 patients) over the sizes
run at 20 sites; with ``--cohort-only`` the ratio of the cohort's CPU seconds per patient at
the largest and the smallest size; otherwise, unless ``--sizes`` names 50,000, the time and
memory that slope projects for 50,000 patients, against the one-hour budget for such a run.
Run from the repository root::

    .venv/bin/python benchmarks/scale.py [--sizes 1000 5000 10000] [--rounds 3] [--work DIR]
        [--cohort-only] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TASKS = {"2d": "covid_oxygen", "3d": "alzheimers"}


class PeakRSS:
    """Sample the summed RSS of this process and its children in a thread; keep the peak.

    Parameters
    ----------
    interval : float
        Seconds between samples.
    """

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.marks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        """The summed RSS now (bytes), and update the peak."""
        import psutil

        total = 0
        for proc in [self.process, *self.process.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.peak = max(self.peak, total)
        return total

    def mark(self, name: str) -> None:
        """Record the peak so far under ``name`` (the peak up to the end of a phase)."""
        self.sample()
        self.marks[name] = self.peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class CohortBuilt(Exception):
    """Raised from a ``--cohort-only`` run's progress callback once the cohorts are built."""


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its children that have exited."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def experiment(variant: str, data: Path, sites: int, rounds: int) -> Any:
    """The experiment config of one variant (``2d`` or ``3d``) over the generated sites."""
    from multimodal_fl.config import ExperimentConfig, load_task

    task = TASKS[variant]
    image = ({"encoder": "smallcnn", "spatial_dims": 2, "size": 64} if variant == "2d"
             else {"encoder": "smallcnn", "spatial_dims": 3, "size": 32})
    task_file = "covid_oxygen_24h" if task == "covid_oxygen" else "alzheimers"
    return ExperimentConfig.model_validate({
        "name": f"scale-{variant}",
        "task": load_task(task_file),
        "sites": [{"name": f"site_{k + 1:03d}", "path": str(data / task / f"site_{k + 1:03d}")}
                  for k in range(sites)],
        "data": {"on_error": "skip", "cache_dir": str(data.parent / f"cache-{data.name}")},
        "modalities": {"image": {**image, "frozen": True, "embed_dim": 32},
                       "tabular": {"hidden": [64], "embed_dim": 32},
                       "text": {"encoder": "minilm", "frozen": True}},
        "fusion": {"kind": "concat", "dim": 16},
        "training": {"batch_size": 32, "num_threads": 1},
        "federated": {"engine": "inprocess", "rounds": rounds, "local_steps": 10,
                      "min_sites": 2},
        "seed": 0,
    })


def one(variant: str, patients: int, sites: int, rounds: int, work: Path, *,
        reuse: bool = False, cohort_only: bool = False) -> dict[str, Any]:
    """Generate, train in process and measure one configuration (run in its own interpreter).

    With ``cohort_only`` the run stops at the first site's preparation (:class:`CohortBuilt`):
    the embedding, round and total figures are NaN.
    """
    from multimodal_fl.engines import run
    from multimodal_fl.progress import PrepareEvent
    from multimodal_fl.sample_data import generate

    data = work / f"{variant}-{patients}-{sites}"
    shutil.rmtree(data.parent / f"cache-{data.name}", ignore_errors=True)
    generated = float("nan")
    if not (reuse and (data / "MANIFEST.json").is_file()):
        shutil.rmtree(data, ignore_errors=True)
        t0 = time.perf_counter()
        generate(data, profile="scale", patients=patients, sites=sites, tasks=(TASKS[variant],))
        generated = time.perf_counter() - t0
    cfg = experiment(variant, data, sites, rounds)
    times: dict[str, float] = {}
    rounds_s: list[float] = []
    run_dir = work / f"run-{data.name}"
    with PeakRSS() as rss:
        start = time.perf_counter()  # the run: cohorts, preparation, rounds, predictions
        cpu_start = cpu_seconds()

        def progress(event: object) -> None:
            if isinstance(event, PrepareEvent):
                now = time.perf_counter() - start
                if event.modality == "records":
                    times["cohort"] = now
                else:
                    if "embedding" not in times:
                        rss.mark("cohort")
                        times["cohort_cpu"] = cpu_seconds() - cpu_start
                        if cohort_only:
                            raise CohortBuilt
                    times["embedding"] = now

        def on_round(record: Any) -> None:
            if not rounds_s:
                rss.mark("embedding")
            rounds_s.append(float(record.seconds))

        try:
            run(cfg, engine="inprocess", out_dir=run_dir, overwrite=True, on_round=on_round,
                progress=progress, report=False)
            total = time.perf_counter() - start
        except CohortBuilt:
            total = float("nan")
    cohort_s = times.get("cohort", 0.0)
    n = sum(1 for _ in run_dir.glob("sites/*"))
    shutil.rmtree(run_dir, ignore_errors=True)
    nan = float("nan")
    return {"variant": variant, "patients": patients, "sites": sites, "generate_s": generated,
            "cohort_s": cohort_s, "cohort_cpu_s": times.get("cohort_cpu", nan),
            "embedding_s": nan if cohort_only else times.get("embedding", cohort_s) - cohort_s,
            "round_s": statistics.median(rounds_s) if rounds_s else nan,
            "total_s": total, "peak_mb": rss.peak / 2**20,
            "peak_cohort_mb": rss.marks.get("cohort", 0) / 2**20,
            "peak_embedding_mb": rss.marks.get("embedding", 0) / 2**20, "site_dirs": n,
            "load": os.getloadavg()}


def main() -> None:
    """Run every configuration in a fresh interpreter and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000],
                        help="Patients per task; 100 sites are added from 10,000 patients.")
    parser.add_argument("--site-counts", type=int, nargs="+", default=[20, 100],
                        help="Sites per task; counts above 20 only from 10,000 patients.")
    parser.add_argument("--variants", nargs="+", default=["2d", "3d"], choices=sorted(TASKS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale-benchmark"))
    parser.add_argument("--one", nargs=3, metavar=("VARIANT", "PATIENTS", "SITES"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--reuse", action="store_true",
                        help="Keep sample data already generated under --work (its generation "
                        "time is then not measured).")
    parser.add_argument("--cohort-only", action="store_true",
                        help="Stop each run once its cohorts are built: cohort wall and CPU "
                        "seconds only (no embedding, no rounds).")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one:
        variant, patients, sites = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(one(variant, patients, sites, args.rounds, args.work,
                             reuse=args.reuse, cohort_only=args.cohort_only)))
        return
    started = time.perf_counter()
    load_before = os.getloadavg()
    print(header(cohort_only=args.cohort_only), flush=True)
    rows = []
    for size in args.sizes:
        for sites in [k for k in args.site_counts if k <= 20 or size >= 10000]:
            for variant in args.variants:
                cmd = [sys.executable, __file__, "--one", variant, str(size), str(sites),
                       "--rounds", str(args.rounds), "--work", str(args.work),
                       *(["--reuse"] if args.reuse else []),
                       *(["--cohort-only"] if args.cohort_only else [])]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(line(row, cohort_only=args.cohort_only), flush=True)
    _summary(rows, args, load_before, time.perf_counter() - started)


def header(*, cohort_only: bool = False) -> str:
    """The table's header row (``cohort_only``: the cohort's columns alone)."""
    if cohort_only:
        return ("| images | patients | sites | generate s | cohort s | cohort CPU s | "
                "cohort CPU s per 1,000 patients | peak MB (cohort) | load 1 min |")
    return ("| images | patients | sites | generate s | cohort s | cohort CPU s | embedding s | "
            "round s | peak MB (cohort) | peak MB (to round 1) | peak MB (run) | load 1 min |")


def line(r: dict[str, Any], *, cohort_only: bool = False) -> str:
    """One configuration's table row (the columns of :func:`header`)."""
    gen = "-" if r["generate_s"] != r["generate_s"] else f"{r['generate_s']:.0f}"
    head = (f"| {r['variant']} | {r['patients']:,} | {r['sites']} | {gen} | "
            f"{r['cohort_s']:.1f} | {r['cohort_cpu_s']:.1f} | ")
    if cohort_only:
        per = r["cohort_cpu_s"] / r["patients"] * 1000
        return f"{head}{per:.2f} | {r['peak_cohort_mb']:,.0f} | {r['load'][0]:.1f} |"
    return (f"{head}{r['embedding_s']:.1f} | {r['round_s']:.2f} | "
            f"{r['peak_cohort_mb']:,.0f} | {r['peak_embedding_mb']:,.0f} | {r['peak_mb']:,.0f} | "
            f"{r['load'][0]:.1f} |")


def _slope(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    """Least-squares ``(intercept, per patient)`` of ``key`` against patients."""
    import numpy as np

    x = np.array([r["patients"] for r in rows], dtype=float)
    y = np.array([r[key] for r in rows], dtype=float)
    per, at0 = np.polyfit(x, y, 1)
    return float(at0), float(per)


def _summary(rows: list[dict[str, Any]], args: argparse.Namespace,
             load_before: tuple[float, float, float], wall: float) -> None:
    import psutil

    print()
    print(f"Machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
          f"Python {platform.python_version()}, torch threads 1; {args.rounds} rounds of 10 local "
          f"steps, median round; load average (1/5/15 min) {load_before[0]:.1f}/"
          f"{load_before[1]:.1f}/{load_before[2]:.1f} at the start, "
          f"{'/'.join(f'{v:.1f}' for v in os.getloadavg())} at the end; "
          f"{wall / 60:.0f} min in all.")
    for variant in args.variants:
        mine = sorted((r for r in rows if r["variant"] == variant and r["sites"] == 20),
                      key=lambda r: r["patients"])
        if len(mine) < 2:
            continue
        keys = ("generate_s", "cohort_s", "cohort_cpu_s", "embedding_s", "total_s", "peak_mb")
        fits = {k: _slope(mine, k) for k in keys if all(r[k] == r[k] for r in mine)}
        slope = ", ".join(f"{k} {per * 1000:+.2f}" for k, (_, per) in fits.items())
        print(f"{variant}, 20 sites, least squares over {[r['patients'] for r in mine]} "
              f"patients: per 1,000 patients {slope}")
        if args.cohort_only:
            low, high = mine[0], mine[-1]
            ratio = ((high["cohort_cpu_s"] / high["patients"])
                     / (low["cohort_cpu_s"] / low["patients"]))
            print(f"{variant}, cohort CPU s per patient at {high['patients']:,} / at "
                  f"{low['patients']:,} patients: {ratio:.2f} (1: linear)")
        if 50000 in args.sizes or args.cohort_only:
            continue
        proj = {k: at0 + per * 50000 for k, (at0, per) in fits.items()}
        run_min = proj["total_s"] / 60
        gen_min = proj.get("generate_s", float("nan")) / 60
        verdict = "within" if run_min + gen_min <= 60 else "over"
        print(f"{variant}, 50,000 patients: NOT RUN; projected from that slope: generate "
              f"{gen_min:.0f} min, run {run_min:.0f} min (cohort {proj['cohort_s'] / 60:.1f}, "
              f"embedding {proj['embedding_s'] / 60:.1f}), peak {proj['peak_mb']:,.0f} MB: "
              f"{verdict} the one-hour budget")


if __name__ == "__main__":
    main()

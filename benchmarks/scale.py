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
- **round**: the median wall seconds of a federated round (``RoundRecord.seconds``);
- **peak RSS**: the largest sum of the resident set sizes of this process and all its
  children (the cohort pool's workers), sampled every 0.1 s with psutil;
- **generate**: writing the sample data (not part of the run; the loky pool of
  :func:`multimodal_fl.sample_data.generate`).

Each configuration runs in a fresh interpreter (``--one``), so that one run's memory never
counts in the next. The table gives the slope (seconds and MB per 1,000 patients) between the
two largest sizes run; 50,000 patients run only with ``--sizes`` naming it, and otherwise
their time is projected from that slope. Run from the repository root::

    .venv/bin/python benchmarks/scale.py [--sizes 1000 10000] [--rounds 3] [--work /tmp/mmfl-scale]
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
        reuse: bool = False) -> dict[str, Any]:
    """Generate, train in process and measure one configuration (run in its own interpreter)."""
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
    with PeakRSS() as rss:
        start = time.perf_counter()

        def progress(event: object) -> None:
            if isinstance(event, PrepareEvent):
                now = time.perf_counter() - start
                if event.modality == "records":
                    times["cohort"] = now
                else:
                    if "embedding" not in times:
                        rss.mark("cohort")
                    times["embedding"] = now

        def on_round(record: Any) -> None:
            if not rounds_s:
                rss.mark("embedding")
            rounds_s.append(float(record.seconds))

        outcome = run(cfg, engine="inprocess", out_dir=work / f"run-{data.name}",
                      overwrite=True, on_round=on_round, progress=progress, report=False)
        total = time.perf_counter() - start
    cohort_s = times.get("cohort", 0.0)
    n = sum(1 for _ in outcome.run_dir.glob("sites/*"))
    shutil.rmtree(work / f"run-{data.name}", ignore_errors=True)
    return {"variant": variant, "patients": patients, "sites": sites, "generate_s": generated,
            "cohort_s": cohort_s, "embedding_s": times.get("embedding", cohort_s) - cohort_s,
            "round_s": statistics.median(rounds_s) if rounds_s else float("nan"),
            "total_s": total, "peak_mb": rss.peak / 2**20,
            "peak_cohort_mb": rss.marks.get("cohort", 0) / 2**20,
            "peak_embedding_mb": rss.marks.get("embedding", 0) / 2**20, "site_dirs": n,
            "load": os.getloadavg()}


def main() -> None:
    """Run every configuration in a fresh interpreter and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--variants", nargs="+", default=["2d", "3d"], choices=sorted(TASKS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmfl-scale"))
    parser.add_argument("--one", nargs=3, metavar=("VARIANT", "PATIENTS", "SITES"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--reuse", action="store_true",
                        help="Keep sample data already generated under --work (its generation "
                        "time is then not measured).")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one:
        variant, patients, sites = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(one(variant, patients, sites, args.rounds, args.work,
                             reuse=args.reuse)))
        return
    rows = []
    for size in args.sizes:
        for sites in ([20, 100] if size >= 10000 else [20]):
            for variant in args.variants:
                cmd = [sys.executable, __file__, "--one", variant, str(size), str(sites),
                       "--rounds", str(args.rounds), "--work", str(args.work),
                       *(["--reuse"] if args.reuse else [])]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(_line(row), flush=True)
    _table(rows, args)


def _line(r: dict[str, Any]) -> str:
    return (f"| {r['variant']} | {r['patients']:,} | {r['sites']} | {r['generate_s']:.0f} | "
            f"{r['cohort_s']:.1f} | {r['embedding_s']:.1f} | {r['round_s']:.2f} | "
            f"{r['peak_cohort_mb']:,.0f} | {r['peak_embedding_mb']:,.0f} | {r['peak_mb']:,.0f} | "
            f"{r['load'][0]:.1f} |")


def _table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import psutil

    print()
    print(f"Machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
          f"Python {platform.python_version()}; {args.rounds} rounds, median round.")
    print()
    print("| images | patients | sites | generate s | cohort s | embedding s | round s | "
          "peak MB (cohort) | peak MB (embedding) | peak MB (run) | load 1 min |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_line(r))
    print()
    for variant in args.variants:
        mine = sorted((r for r in rows if r["variant"] == variant and r["sites"] == 20),
                      key=lambda r: r["patients"])
        if len(mine) < 2:
            continue
        a, b = mine[-2], mine[-1]
        k = (b["patients"] - a["patients"]) / 1000
        slope = {key: (b[key] - a[key]) / k for key in
                 ("generate_s", "cohort_s", "embedding_s", "total_s", "peak_mb")}
        line = ", ".join(f"{key} {v:+.2f}" for key, v in slope.items())
        print(f"{variant}: per 1,000 patients ({a['patients']:,} -> {b['patients']:,}, 20 "
              f"sites): {line}")
        if 50000 not in args.sizes:
            extra = (50000 - b["patients"]) / 1000
            proj = {key: b[key] + slope[key] * extra for key in slope}
            print(f"{variant}: 50,000 patients NOT RUN; projected from that slope: generate "
                  f"{proj['generate_s'] / 60:.0f} min, run {proj['total_s'] / 60:.0f} min "
                  f"(cohort {proj['cohort_s'] / 60:.1f}, embedding "
                  f"{proj['embedding_s'] / 60:.1f}), peak {proj['peak_mb']:,.0f} MB")


if __name__ == "__main__":
    main()

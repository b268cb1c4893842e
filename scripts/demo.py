"""The demo behind ``make demo``: every step of the main job on the bundled sample data.

Steps run in order through the ``mmfl`` command line, so the demo exercises exactly what
a user types. A step whose command is not available in this build is reported and
skipped, never faked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MMFL = [sys.executable, "-m", "multimodal_fl"]
RUNS = ROOT / "runs" / "demo"


def available(verb: list[str]) -> bool:
    """True when ``mmfl <verb> --help`` succeeds."""
    probe = subprocess.run([*MMFL, *verb, "--help"], capture_output=True, cwd=ROOT)
    return probe.returncode == 0


def step(title: str, args: list[str], times: list[tuple[str, float]]) -> None:
    """Run one demo step, printing its title and wall time (appended to ``times``); stop the
    demo on failure."""
    print(f"\n=== {title}\n$ mmfl {' '.join(args)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run([*MMFL, *args], cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"demo step failed ({result.returncode}): mmfl {' '.join(args)}")
    seconds = time.perf_counter() - start
    times.append((title, seconds))
    print(f"--- {title}: {seconds:.1f} s", flush=True)


def timing_table(times: list[tuple[str, float]], total: float) -> str:
    """The demo's steps and their wall times as a Markdown table, the whole demo last.

    Parameters
    ----------
    times : list of (str, float)
        Each step's title and wall seconds, in the order they ran.
    total : float
        The whole demo's wall seconds.

    Returns
    -------
    str
        The table of ``docs/benchmarks.md`` ("`make demo` timings"), one row per step.
    """
    rows = ["| step | wall s |", "| --- | ---: |"]
    rows += [f"| {title} | {seconds:.1f} |" for title, seconds in times]
    rows.append(f"| whole demo | {total:.0f} |")
    return "\n".join(rows)


def main() -> None:
    """Run the demo."""
    start = time.perf_counter()
    times: list[tuple[str, float]] = []
    configs = ["configs/covid_oxygen.yaml", "configs/alzheimers.yaml"]
    if RUNS.exists():
        shutil.rmtree(RUNS)
    # One embedding cache for every run of the demo: each engine reads the same notes and
    # images, so frozen embeddings are computed once (the cache keys by content + encoder).
    os.environ.setdefault("MMFL_CACHE", str(ROOT / "runs" / "cache"))
    for config in configs:
        step(f"data summary: {config}", ["data", "summary", config], times)
    if available(["train"]):
        for config in configs:
            name = Path(config).stem
            for engine in ("inprocess", "local", "centralized"):
                out = RUNS / f"{name}-{engine}"
                step(f"train {name} ({engine})",
                     ["train", config, "--engine", engine, "--out", str(out)], times)
            if available(["report"]):
                runs = [str(RUNS / f"{name}-{e}") for e in ("inprocess", "local", "centralized")]
                step(f"report {name}", ["report", *runs, "--out", str(RUNS / f"{name}-report")],
                     times)
    else:
        print("\n(training is not in this build yet: the demo stops after the data summaries)")
    if available(["pca"]):
        # how do the cohorts differ? federated PCA of the FHIR features (docs/pca.md)
        step("federated PCA: alzheimers tabular",
             ["pca", "configs/alzheimers.yaml", "--features", "tabular",
              "--out", str(RUNS / "alzheimers-pca")], times)
    total = time.perf_counter() - start
    print(f"\ndemo finished in {total:.0f} s\n\n{timing_table(times, total)}")


if __name__ == "__main__":
    main()

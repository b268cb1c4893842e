"""FHIR throughput: the package's cohort builder vs fhiry on the shared Synthea COVID-19 bundles.

Builds the ``covid_oxygen_24h`` cohort from the shared Synthea COVID-19 bundles
(``../shared/data/synthea/synthea_covid_dev.tgz``, 267 transaction bundles) and, in the
same run and interleaved, flattens the same bundles with fhiry (``Fhiry().process_source()``
over the folder), and reads them alone with ``json.load`` and ``orjson.loads``. Prints a
Markdown table: median wall and CPU seconds over the repeats, MB/s and patients/s (wall),
and the ratio to fhiry; then the CPU seconds of the cohort build against ``json.load``'s, in
this process and in a fresh interpreter.

Usage (from the repository root)::

    .venv/bin/python benchmarks/fhir_throughput.py [--repeats 3] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson


def _extract(data: Path, dest: Path) -> Path:
    tgz = data / "synthea" / "synthea_covid_dev.tgz"
    if not tgz.is_file():
        sys.exit(f"shared data not found: {tgz}")
    with tarfile.open(tgz) as tar:
        tar.extractall(dest, filter="data")
    site = dest / "site"
    (site).mkdir()
    (dest / "hw_dev").rename(site / "fhir")
    return site


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--validation-all-only", action="store_true",
                        help="Only time one build with data.validation=all (every resource "
                        "validated) against one with validation=task, and check the tables "
                        "are equal.")
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    args = parser.parse_args()

    import fhiry
    import pandas as pd
    from fhiry import Fhiry

    from multimodal_fl.config import DataConfig, load_task
    from multimodal_fl.data import build_cohort

    task = load_task("covid_oxygen_24h")
    with tempfile.TemporaryDirectory() as tmp:
        site = _extract(args.data, Path(tmp))
        files = sorted((site / "fhir").glob("*.json"))
        mb = sum(f.stat().st_size for f in files) / 1e6
        n_bundles = len(files)
        info: dict[str, object] = {}
        if args.validation_all_only:
            _validation_all(site, task, mb)
            return

        def ours() -> None:
            c = build_cohort(site, task, data=DataConfig(validation="task"))
            info["ours"] = (len(c.table), int(c.table.label.sum()),
                            c.counts["resources_validated"], c.counts["resources_read"],
                            c.counts["patients_read"])

        def with_fhiry() -> None:
            f = Fhiry()
            f.folder = str(site / "fhir")
            with contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                f.process_source()
            info["fhiry"] = f.df.shape

        def json_only() -> None:
            for p in files:
                with p.open(encoding="utf-8") as fh:
                    json.load(fh)

        def orjson_only() -> None:
            for p in files:
                orjson.loads(p.read_bytes())

        runs: dict[str, Callable[[], None]] = {
            "json.load (reading only)": json_only,
            "orjson.loads (reading only)": orjson_only,
            "multimodal_fl build_cohort (covid_oxygen_24h)": ours,
            f"fhiry {fhiry.__version__ if hasattr(fhiry, '__version__') else ''} "
            "Fhiry.process_source".replace("  ", " "): with_fhiry,
        }
        wall: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)

        fresh = statistics.median(_fresh_json_load(files) for _ in range(args.repeats))

    fhiry_name = list(runs)[3]
    ours_name = list(runs)[2]
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    n_pat = info["ours"][4]  # type: ignore[index]
    print(f"Synthea COVID-19 bundles: {n_bundles} files, {mb:.1f} MB, {n_pat} patients; "
          f"median of {args.repeats} interleaved repeats. Python {platform.python_version()}, "
          f"pandas {pd.__version__}, orjson {orjson.__version__}.")
    print(f"cohort: patients, positives, resources validated / read = {info['ours'][:4]}; "  # type: ignore[index]
          f"fhiry dataframe shape = {info['fhiry']}")
    print()
    print("| reader | wall s (median) | CPU s (median) | MB/s | patients/s | "
          "throughput vs fhiry |")
    print("|---|---|---|---|---|---|")
    for name in runs:
        ratio = med[fhiry_name] / med[name]
        print(f"| {name} | {med[name]:.2f} | {med_cpu[name]:.2f} | {mb / med[name]:.1f} | "
              f"{n_pat / med[name]:.1f} | {ratio:.2f}x |")
    print()
    print(f"ratio build_cohort / fhiry throughput: wall {med[fhiry_name] / med[ours_name]:.2f}x, "
          f"CPU {med_cpu[fhiry_name] / med_cpu[ours_name]:.2f}x; per-repeat wall s: "
          f"ours {[round(x, 2) for x in wall[ours_name]]}, "
          f"fhiry {[round(x, 2) for x in wall[fhiry_name]]}")
    json_name = next(iter(runs))
    print(f"CPU s build_cohort / json.load in this process: "
          f"{med_cpu[ours_name] / med_cpu[json_name]:.2f}x (target: at most 1.5x)")
    print(f"CPU s build_cohort / json.load in a fresh interpreter ({fresh:.2f} CPU s, median of "
          f"{args.repeats}; no package imported, so its garbage collector has little to "
          f"scan): {med_cpu[ours_name] / fresh:.2f}x")


def _fresh_json_load(files: list[Path]) -> float:
    """CPU seconds of ``json.load`` over ``files`` in a fresh interpreter (its own clock)."""
    code = ("import json, sys, time\n"
            "c0 = time.process_time()\n"
            "for p in sys.argv[1:]:\n"
            "    with open(p, encoding='utf-8') as fh:\n"
            "        json.load(fh)\n"
            "print(time.process_time() - c0)\n")
    out = subprocess.run([sys.executable, "-c", code, *map(str, files)], check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip())


def _validation_all(site: Path, task: object, mb: float) -> None:
    import pandas as pd

    from multimodal_fl.config import DataConfig
    from multimodal_fl.data import build_cohort

    tables = {}
    for mode in ("task", "all"):
        w0, c0 = time.perf_counter(), time.process_time()
        c = build_cohort(site, task, data=DataConfig(validation=mode))  # type: ignore[arg-type]
        w, cp = time.perf_counter() - w0, time.process_time() - c0
        tables[mode] = c.table
        print(f"validation={mode}: {w:.2f} s wall, {cp:.2f} s CPU, {mb / w:.1f} MB/s, "
              f"{c.counts['resources_validated']} of {c.counts['resources_read']} validated")
    pd.testing.assert_frame_equal(tables["task"], tables["all"])
    print("cohort tables equal: True")


if __name__ == "__main__":
    main()

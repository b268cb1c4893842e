"""Engine overhead per round: the in-process engine and the Flower deployment (issue 5).

For one experiment (default: the sample COVID-19 task, ``configs/covid_oxygen.yaml``) this

1. trains it with the **in-process** engine
   (:func:`multimodal_fl.engines.federated.run_federated_experiment` over an
   :class:`~multimodal_fl.federated.inprocess.InProcessFederation`) and measures, per round,
   the wall time of the whole round (fit + evaluation + checkpoint, from one round's end
   to the next) and the time the sites spent in their own ``handle()`` calls
   (``InProcessFederation.last_site_seconds``, summed over the round's fit and evaluate
   broadcasts). The **engine overhead** is the difference: request copying, reply checks,
   aggregation, the server optimiser, the checkpoint and the loop itself. The engine's own
   ``RoundRecord.server_seconds`` (checks + aggregation + server step only, no copying and no
   checkpoint) is printed beside it;
2. trains the same experiment (same seed, same rounds) on a **Flower loopback deployment**
   (:func:`multimodal_fl.federated.flower.run_loopback`: a SuperLink and one SuperNode per site
   on 127.0.0.1, ``site-worker`` on) and reports its round wall time (``metrics.json`` ``rounds``
   ``seconds``) and the difference to the in-process round;
3. checks the two final models are equal bit for bit (same seed, same thread count);
4. breaks each Flower message down (issue 15): every SuperNode's ClientApp writes one timing
   line per message into ``MMFL_MESSAGE_TIMINGS`` (:mod:`multimodal_fl.federated.flower.client`:
   Flower's process start, the package's ClientApp import, the hand-off to the site worker, the
   site's own work), read back here; the rest of a round (Flower's transport, the SuperNode's
   polling, the process exit) is the round's wall time minus the server's own work minus the
   slowest site's ClientApp process (start to reply handed back to Flower). The package's
   share of a message is its import plus its hand-off, in CPU seconds. Since issue 15 a Flower
   round is one message exchange (the evaluation rides with the next fit), so the loopback /
   in-process ratio compares the Flower round with the in-process round (fit + evaluation).

Medians are taken over rounds (and repeats). Run from the repository root::

    MMFL_CACHE=/tmp/mmfl_cache .venv/bin/python benchmarks/engine_overhead.py --rounds 10
    MMFL_CACHE=/tmp/mmfl_cache .venv/bin/python benchmarks/engine_overhead.py --rounds 10 \
        --set federated.local_steps=200

Rounds are cut with ``--rounds`` only to save time; the work per round is the shipped config's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from multimodal_fl.config import ExperimentConfig, load_config
from multimodal_fl.federated.protocol import Reply, Request, SiteFailure

REPO = Path(__file__).resolve().parents[1]


class TimedFederation:
    """Wrap an in-process federation and add up each broadcast's site time.

    Parameters
    ----------
    inner : multimodal_fl.federated.inprocess.InProcessFederation
        The federation whose ``last_site_seconds`` is read after every broadcast.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        #: Site seconds (sum over sites) per broadcast since the last :meth:`take`.
        self.site_seconds: list[float] = []
        #: Wall seconds per broadcast since the last :meth:`take`.
        self.broadcast_seconds: list[float] = []

    def sites(self) -> list[str]:
        """Return the inner federation's sites.

        Returns
        -------
        list[str]
            Site names, sorted.
        """
        return list(self.inner.sites())

    def broadcast(
        self, requests: Mapping[str, Request], timeout: float | None = None
    ) -> dict[str, Reply | SiteFailure]:
        """Broadcast through the inner federation and record the sites' own time.

        Parameters
        ----------
        requests : Mapping[str, Request]
            Site name -> request.
        timeout : float or None
            Per-site timeout.

        Returns
        -------
        dict[str, Reply | SiteFailure]
            The inner federation's answers.
        """
        started = time.perf_counter()
        answers: dict[str, Reply | SiteFailure] = self.inner.broadcast(requests, timeout)
        self.broadcast_seconds.append(time.perf_counter() - started)
        self.site_seconds.append(float(sum(self.inner.last_site_seconds.values())))
        return answers

    def take(self) -> tuple[float, float]:
        """Return (site seconds, broadcast seconds) since the last call, and reset.

        Returns
        -------
        tuple[float, float]
            Sums over the broadcasts recorded since the previous call.
        """
        out = (sum(self.site_seconds), sum(self.broadcast_seconds))
        self.site_seconds, self.broadcast_seconds = [], []
        return out


def run_inprocess(cfg: ExperimentConfig, run_dir: Path) -> list[dict[str, float]]:
    """Train ``cfg`` in process and time every round.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment.
    run_dir : Path
        Its run directory (created).

    Returns
    -------
    list[dict[str, float]]
        Per round: ``wall`` (end of the previous round to the end of this one, checkpoint
        included), ``sites`` (sum of the sites' ``handle()`` seconds), ``overhead`` (the
        difference), ``record`` (``RoundRecord.seconds``) and ``server`` (``server_seconds``).
    """
    from multimodal_fl.engines.federated import inprocess_federation, run_federated_experiment
    from multimodal_fl.training import torch_threads

    with torch_threads(cfg.training.num_threads):
        federation = TimedFederation(inprocess_federation(cfg, run_dir))
    rows: list[dict[str, float]] = []
    mark = [0.0]

    def on_round(record: Any) -> None:
        now = time.perf_counter()
        sites, _ = federation.take()
        wall = now - mark[0]
        rows.append({
            "round": float(record.round), "wall": wall, "sites": sites,
            "overhead": wall - sites, "record": float(record.seconds),
            "server": float(record.server_seconds),
        })
        print(f"  in-process round {record.round}: wall {wall:.2f} s, sites {sites:.2f} s, "
              f"engine {1000 * (wall - sites):.1f} ms", file=sys.stderr, flush=True)
        mark[0] = time.perf_counter()

    original = federation.broadcast

    def first_fit_marks(requests: Mapping[str, Request], timeout: float | None = None
                        ) -> dict[str, Reply | SiteFailure]:
        # The first round starts with its fit broadcast (init/moments come before it).
        if not rows and mark[0] == 0.0 and any(r.kind == "fit" for r in requests.values()):
            federation.take()  # drop the init / moments stages
            mark[0] = time.perf_counter()
        return original(requests, timeout)

    federation.broadcast = first_fit_marks  # type: ignore[method-assign]
    run_federated_experiment(cfg, run_dir, federation=federation, on_round=on_round)
    return rows


def run_flower(cfg: ExperimentConfig, run_dir: Path, work: Path
               ) -> tuple[list[dict[str, float]], float, list[dict[str, Any]]]:
    """Train ``cfg`` on a Flower loopback deployment (site workers on) and read its rounds.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment.
    run_dir : Path
        The run directory the ServerApp writes.
    work : Path
        Flower's working folder (app, home, logs).

    Returns
    -------
    tuple[list[dict[str, float]], float, list[dict[str, Any]]]
        Per round ``record`` (round seconds) and ``server`` (server seconds); the wall seconds
        of the whole deployment (start of the SuperLink to the end of the run); every
        message's timing line (all SuperNodes).
    """
    from multimodal_fl.engines.flower_jobs import experiment_run_config
    from multimodal_fl.federated.flower import run_loopback
    from multimodal_fl.federated.flower.client import TIMINGS_ENV

    entries = experiment_run_config(cfg, run_dir=run_dir, site_out=run_dir, site_worker=True)
    entries["min-nodes"] = len(cfg.sites)
    sites = {s.name: Path(s.path) for s in cfg.sites}
    started = time.perf_counter()
    timings = work / "timings"
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    run_loopback(sites, entries, work, timeout=3000.0,
                 env={TIMINGS_ENV: str(timings), "PYTHONPATH": pythonpath})
    total = time.perf_counter() - started
    lines = [json.loads(line) for path in sorted(timings.glob("*.jsonl"))
             for line in path.read_text().splitlines()]
    doc = json.loads((run_dir / "metrics.json").read_text())
    rows = [
        {"round": float(r["round"]), "record": float(r["seconds"]),
         "server": float(r["server_seconds"])}
        for r in doc["rounds"]
    ]
    return rows, total, lines


def same_model(a: Path, b: Path) -> bool:
    """Return whether two ``model.safetensors`` files hold the same arrays, bit for bit.

    Parameters
    ----------
    a, b : Path
        The two files.

    Returns
    -------
    bool
        True if the keys, dtypes, shapes and bytes agree.
    """
    from safetensors.numpy import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return sorted(x) == sorted(y) and all(
        x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
        and np.asarray(x[k]).tobytes() == np.asarray(y[k]).tobytes()
        for k in x
    )


def _median(rows: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


#: The parts of a message, as the ClientApp's timing line names them, and their row labels.
PARTS = (
    ("flower_start", "Flower: `flwr-clientapp` process start and Flower's imports"),
    ("import", "package: the ClientApp module's import"),
    ("handler_wait", "Flower: loading the app, reading the message"),
    ("handoff", "package: hand-off (decode, worker socket, encode)"),
    ("site_work", "site: its own `handle()` (in the worker)"),
)


def message_breakdown(lines: list[dict[str, Any]], rounds: list[dict[str, float]]
                      ) -> tuple[list[str], dict[str, float]]:
    """The per-message table of the fit messages (one per site and round) and its summary.

    Parameters
    ----------
    lines : list of dict
        The ClientApp timing lines of the run.
    rounds : list of dict
        The Flower rounds (``round``, ``record``, ``server``).

    Returns
    -------
    tuple[list[str], dict[str, float]]
        Markdown table rows, and ``package_cpu`` (median CPU seconds of import + hand-off per
        fit message), ``rest`` (median per round of the round's wall time minus the server's
        work minus the slowest site's ClientApp process: transport, polling, process exit),
        ``messages`` (fit messages counted), ``exchanges`` (messages per site and round).
    """
    fits = [x for x in lines if x["kind"] == "fit"]
    rows = ["| part of a fit message (median over sites x rounds) | wall s | CPU s |",
            "| --- | --- | --- |"]
    for key, label in PARTS:
        wall = statistics.median(x[key]["wall"] for x in fits)
        cpu = statistics.median(x[key]["cpu"] for x in fits)
        rows.append(f"| {label} | {wall:.3f} | {cpu:.3f} |")
    package = [x["import"]["cpu"] + x["handoff"]["cpu"] for x in fits]
    rows.append(f"| **package's share** (import + hand-off) | "
                f"{statistics.median(x['import']['wall'] + x['handoff']['wall'] for x in fits):.3f}"
                f" | **{statistics.median(package):.3f}** (target ≤ 0.3: "
                f"{'PASS' if statistics.median(package) <= 0.3 else 'FAIL'}) |")
    rest = []
    for r in rounds:
        mine = [x for x in fits if x["round"] == int(r["round"])]
        if mine:
            slowest = max(x["handler_end"] - x["process_start"] for x in mine)
            rest.append(r["record"] - r["server"] - slowest)
    if rest:
        rows.append(f"| Flower: transport, SuperNode polling, process exit (round − server − "
                    f"slowest ClientApp) | {statistics.median(rest):.3f} | |")
    per_round = len([x for x in lines if x["kind"] in ("fit", "evaluate")]) / max(
        1, len({x["site"] for x in lines})) / max(1, len(rounds))
    return rows, {"package_cpu": float(statistics.median(package)),
                  "rest": float(statistics.median(rest)) if rest else float("nan"),
                  "messages": float(len(fits)), "exchanges": per_round}


def _print_flower(cfg: ExperimentConfig, flower_rows: list[dict[str, float]],
                  flower_total: list[float], flower_lines: list[dict[str, Any]],
                  identical: list[bool], med_record: float) -> None:
    """Print the Flower rows of the table and the per-message breakdown."""
    med_fl = _median(flower_rows, "record")
    med_fl_server = _median(flower_rows, "server")
    print(f"| Flower loopback | round wall time (`RoundRecord.seconds`), "
          f"n={len(flower_rows)} | {med_fl:.2f} s |")
    print(f"| Flower loopback | round time − in-process round time | "
          f"{med_fl - med_record:+.2f} s ({100 * (med_fl / med_record - 1):+.0f} %) |")
    print(f"| Flower loopback | `server_seconds` | {1000 * med_fl_server:.1f} ms |")
    print(f"| Flower loopback | whole deployment (start, {cfg.federated.rounds} rounds, "
          f"predict, stop) | {statistics.median(flower_total):.1f} s |")
    ratio = med_fl / med_record
    print(f"| both | **loopback / in-process round** (`RoundRecord.seconds`) | "
          f"**{ratio:.2f}x** |")
    print(f"| both | final model.safetensors identical bit for bit | "
          f"{'yes' if all(identical) else 'NO'} |")
    if flower_lines:
        table, summary = message_breakdown(flower_lines, flower_rows)
        print(f"\nPer message (Flower loopback, {int(summary['messages'])} fit messages; "
              f"{summary['exchanges']:.2f} fit/evaluate messages per site and round):\n")
        print("\n".join(table))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the markdown table.

    Parameters
    ----------
    argv : list of str or None
        Command-line arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "covid_oxygen.yaml")
    parser.add_argument("--rounds", type=int, default=None,
                        help="Cut federated.rounds (work per round unchanged).")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="Config override a.b=c (repeatable).")
    parser.add_argument("--no-flower", action="store_true", help="Only the in-process engine.")
    parser.add_argument("--work", type=Path, default=None, help="Working folder (default: tmp).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the raw rows here.")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error(f"--rounds {args.rounds}: expected a positive number of rounds")
        overrides.append(f"federated.rounds={args.rounds}")
    cfg = load_config(args.config, overrides)
    work = args.work or Path(tempfile.mkdtemp(prefix="mmfl_engine_overhead_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    load_before = os.getloadavg()
    inproc: list[dict[str, float]] = []
    flower_rows: list[dict[str, float]] = []
    flower_total: list[float] = []
    flower_lines: list[dict[str, Any]] = []
    identical: list[bool] = []
    for rep in range(args.repeats):
        print(f"repeat {rep + 1}/{args.repeats}: in-process", file=sys.stderr, flush=True)
        in_dir = work / f"inprocess_{rep}"
        inproc += run_inprocess(cfg, in_dir)
        if not args.no_flower:
            print(f"repeat {rep + 1}/{args.repeats}: Flower loopback", file=sys.stderr, flush=True)
            fl_dir = work / f"flower_{rep}"
            rows, total, lines = run_flower(cfg, fl_dir, work / f"flower_work_{rep}")
            flower_lines += lines
            flower_rows += rows
            flower_total.append(total)
            identical.append(same_model(in_dir / "model.safetensors",
                                        fl_dir / "model.safetensors"))
    load_after = os.getloadavg()

    med_wall = _median(inproc, "wall")
    med_sites = _median(inproc, "sites")
    med_over = _median(inproc, "overhead")
    share = float(statistics.median(r["overhead"] / r["wall"] for r in inproc))
    med_server = _median(inproc, "server")
    med_record = _median(inproc, "record")
    n = len(inproc)
    print(f"\n{cfg.name}: {len(cfg.sites)} sites, {cfg.federated.rounds} rounds x "
          f"{args.repeats} repeat(s), local_steps {cfg.federated.local_steps}, batch "
          f"{cfg.training.batch_size}, {cfg.training.num_threads} torch thread(s)\n")
    print("| engine | quantity (median over rounds) | value |")
    print("| --- | --- | --- |")
    print(f"| in-process | round wall time (fit + evaluate + checkpoint), n={n} | "
          f"{med_wall:.2f} s |")
    print(f"| in-process | sites' own `handle()` time in the round | {med_sites:.2f} s |")
    print(f"| in-process | **engine overhead** = round wall − sites' time | "
          f"**{1000 * med_over:.1f} ms** |")
    print(f"| in-process | engine overhead / round wall | **{100 * share:.2f} %** "
          f"(target ≤ 5 %: {'PASS' if share <= 0.05 else 'FAIL'}) |")
    print(f"| in-process | `server_seconds` (checks + aggregation + server step) | "
          f"{1000 * med_server:.1f} ms |")
    print(f"| in-process | `RoundRecord.seconds` (no checkpoint) | {med_record:.2f} s |")
    if flower_rows:
        _print_flower(cfg, flower_rows, flower_total, flower_lines, identical, med_record)
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; wall "
          f"{time.time() - t_start:.0f} s; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    if args.json is not None:
        args.json.write_text(json.dumps(
            {"inprocess": inproc, "flower": flower_rows, "flower_total": flower_total,
             "messages": flower_lines,
             "identical": identical, "load": [load_before, load_after]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

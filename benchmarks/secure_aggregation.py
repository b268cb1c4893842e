"""Secure aggregation's cost per round, in process (issue 15, item 3).

Trains one experiment (default: the sample COVID-19 task, ``configs/covid_oxygen.yaml``) in
process twice on the same prepared site data, same seed: plain rounds, then secured rounds
(``federated.secure_aggregation: true``). A wrapper around the federation times every
broadcast by request kind and counts the bytes of arrays that cross, both ways. Printed, as
medians over rounds:

* the round's wall time (``RoundRecord.seconds``: fit, aggregation, evaluation), plain and
  secured, and their difference;
* the secured round's parts: the fit broadcast (the sites train; their replies carry no
  weights) and the four ``secure_sum`` steps (keys, encrypted shares, masked vectors, unmasking
  shares), and the server's own decoding (``RoundRecord.server_seconds``);
* bytes per site and round: the plain fit reply's weights against the secured round's
  replies (the masked vector is int64: twice a float32 weight) and requests;
* how far the secured model is from the plain one after round 1 (the same start and the same
  updates: within the stated bound, ``2**-25`` plus one float32 rounding) and after the last
  round (later rounds start from models that differ by that much, and local training with
  Adam amplifies it), with both runs' last training loss and pooled test AUC;
* the site's own cost of a secured fit: encoding one update (:func:`~multimodal_fl.federated.
  secure_update.encode_update`), median of 5.

Run from the repository root::

    MMFL_CACHE=/tmp/mmfl_cache .venv/bin/python benchmarks/secure_aggregation.py --rounds 5

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
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from multimodal_fl.config import ExperimentConfig, load_config
from multimodal_fl.federated.protocol import Kind, Reply, Request, SiteFailure

REPO = Path(__file__).resolve().parents[1]


def _nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(v).nbytes for v in arrays.values()))


class KindTimer:
    """A federation wrapper: wall seconds and array bytes of every broadcast, by kind and round.

    Parameters
    ----------
    inner : Federation
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        #: (round, kind) -> wall seconds, bytes to the sites, bytes back (a secure sum's kind
        #: names its vector: ``secure_sum/fit_update``, ``secure_sum/test_histograms``).
        self.seconds: dict[tuple[int, str], float] = defaultdict(float)
        self.sent: dict[tuple[int, str], int] = defaultdict(int)
        self.received: dict[tuple[int, str], int] = defaultdict(int)
        #: round -> the global weights its fit requests carried (the previous round's model).
        self.starts: dict[int, dict[str, np.ndarray]] = {}

    def sites(self) -> list[str]:
        """The inner federation's sites."""
        return list(self.inner.sites())

    def broadcast(self, requests: Mapping[str, Request], timeout: float | None = None
                  ) -> dict[str, Reply | SiteFailure]:
        """Broadcast through the inner federation, timing it and counting bytes."""
        started = time.perf_counter()
        answers = self.inner.broadcast(requests, timeout)
        if requests:
            first = next(iter(requests.values()))
            if first.kind == Kind.FIT and first.round not in self.starts:
                self.starts[first.round] = {k: np.array(v) for k, v in first.weights.items()}
            vector = first.config.get("vector")  # a secure sum: which vector
            key = (first.round, str(first.kind) + (f"/{vector}" if vector else ""))
            self.seconds[key] += time.perf_counter() - started
            self.sent[key] += sum(_nbytes(r.weights) + _nbytes(r.arrays)
                                  for r in requests.values())
            self.received[key] += sum(_nbytes(a.weights) + _nbytes(a.arrays)
                                      for a in answers.values() if isinstance(a, Reply))
        return answers


def run(cfg: ExperimentConfig, data: Mapping[str, Any], run_dir: Path
        ) -> tuple[list[Any], KindTimer, dict[str, np.ndarray]]:
    """Train ``cfg`` in process on prepared ``data``; the round records, the timer, the model."""
    from safetensors.numpy import load_file

    from multimodal_fl.engines.federated import inprocess_federation, run_federated_experiment

    records: list[Any] = []
    timer = KindTimer(inprocess_federation(cfg, run_dir, data=data))
    run_federated_experiment(cfg, run_dir, federation=timer, on_round=records.append)
    return records, timer, load_file(str(run_dir / "model.safetensors"))


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _per_round(timer: KindTimer, rounds: range, kind: str, table: str = "seconds") -> list[float]:
    source = getattr(timer, table)
    return [float(source.get((r, kind), 0)) for r in rounds]


def _rows(plain: list[Any], secure: list[Any], plain_timer: KindTimer, secure_timer: KindTimer,
          rounds: range, n_sites: int) -> list[tuple[str, str]]:
    """The table's rows: medians over rounds of times and bytes."""
    steps = "secure_sum/fit_update"

    def med(timer: KindTimer, kind: str, table: str = "seconds") -> float:
        return _median(_per_round(timer, rounds, kind, table))

    plain_round = _median([r.seconds for r in plain])
    secure_round = _median([r.seconds for r in secure])
    per_site = 1e6 * n_sites
    return [
        ("plain round (fit + FedAvg + evaluate), `RoundRecord.seconds`", f"{plain_round:.2f} s"),
        ("secured round, `RoundRecord.seconds`", f"{secure_round:.2f} s"),
        ("**secured − plain**", f"**{secure_round - plain_round:+.2f} s "
         f"({100 * (secure_round / plain_round - 1):+.1f} %)**"),
        ("plain: fit broadcast", f"{med(plain_timer, 'fit'):.2f} s"),
        ("secured: fit broadcast (sites train, hold the update)",
         f"{med(secure_timer, 'fit'):.2f} s"),
        ("secured: the four `secure_sum` steps (all sites)",
         f"{med(secure_timer, steps) * 1000:.0f} ms"),
        ("plain: `server_seconds` (checks, FedAvg, server step)",
         f"{_median([r.server_seconds for r in plain]) * 1000:.1f} ms"),
        ("secured: `server_seconds` (checks, decoding, server step)",
         f"{_median([r.server_seconds for r in secure]) * 1000:.1f} ms"),
        ("plain: bytes from each site per round (fit weights)",
         f"{med(plain_timer, 'fit', 'received') / per_site:.2f} MB"),
        ("secured: bytes from each site per round (all replies)",
         f"{med(secure_timer, steps, 'received') / per_site:.2f} MB"),
        ("secured: bytes to each site per round (fit weights + steps)",
         f"{(med(secure_timer, 'fit', 'sent') + med(secure_timer, steps, 'sent')) / per_site:.2f}"
         " MB"),
    ]


def _gap(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """The largest abs difference of two state dicts' floating values."""
    return max(float(np.abs(a[k].astype(np.float64) - v.astype(np.float64)).max())
               for k, v in b.items() if np.issubdtype(v.dtype, np.floating))


def _exactness(plain: list[Any], secure: list[Any], plain_timer: KindTimer,
               secure_timer: KindTimer, plain_model: Mapping[str, np.ndarray],
               secure_model: Mapping[str, np.ndarray]) -> list[tuple[str, str]]:
    """How far the secured model is from the plain one, after round 1 and at the end."""
    rows = []
    if 2 in plain_timer.starts and 2 in secure_timer.starts:
        rows.append(("max abs(secured − plain) after round 1 (same start, same updates)",
                     f"{_gap(secure_timer.starts[2], plain_timer.starts[2]):.2e}"))
    rows.append((f"max abs(secured − plain) of the final model ({len(plain)} rounds)",
                 f"{_gap(secure_model, plain_model):.2e}"))
    rows.append(("last round's training loss, plain / secured",
                 f"{plain[-1].train_loss:.5f} / {secure[-1].train_loss:.5f}"))
    return rows


def _pooled_auc(run_dir: Path) -> str:
    """The pooled test AUC (secure sum of the test histograms) from ``metrics.json``."""
    doc = json.loads((run_dir / "metrics.json").read_text())
    auc = ((doc.get("pooled_from_histograms") or {}).get("overall") or {}).get("auc") or {}
    value = auc.get("value")
    return "-" if value is None else f"{value:.3f} [{auc.get('lo', 0):.3f}, {auc.get('hi', 0):.3f}]"


def _encode_seconds(model: Mapping[str, np.ndarray], cfg: ExperimentConfig) -> float:
    """Median seconds of one :func:`encode_update` of a model-sized update."""
    from multimodal_fl.federated.secure_update import SecureAggregation, encode_update

    rng = np.random.default_rng(0)
    new = {k: (v + rng.normal(0, 1e-3, v.shape).astype(v.dtype)
               if np.issubdtype(v.dtype, np.floating) else v) for k, v in model.items()}
    settings = SecureAggregation(clip=cfg.federated.secure_clip)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        encode_update(new, model, n_samples=100, group_counts={}, loss=0.5, settings=settings)
        times.append(time.perf_counter() - started)
    return _median(times)


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
    parser.add_argument("--work", type=Path, default=None, help="Working folder (default: tmp).")
    args = parser.parse_args(argv)
    overrides = [] if args.rounds is None else [f"federated.rounds={args.rounds}"]
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: expected a positive number of rounds")
    cfg = load_config(args.config, overrides)
    secure_cfg = load_config(args.config, [*overrides, "federated.secure_aggregation=true"])
    work = args.work or Path(tempfile.mkdtemp(prefix="mmfl_secure_aggregation_"))
    work.mkdir(parents=True, exist_ok=True)

    from multimodal_fl.training import load_site_data, torch_threads

    load_before, t_start = os.getloadavg(), time.time()
    data = load_site_data(cfg, work / "prep")
    with torch_threads(cfg.training.num_threads):
        print("plain rounds", file=sys.stderr, flush=True)
        plain, plain_timer, plain_model = run(cfg, data, work / "plain")
        print("secured rounds", file=sys.stderr, flush=True)
        secure, secure_timer, secure_model = run(secure_cfg, data, work / "secure")
    load_after = os.getloadavg()
    rounds = range(1, cfg.federated.rounds + 1)
    n_sites = len(cfg.sites)
    values = sum(v.size for v in plain_model.values() if np.issubdtype(v.dtype, np.floating))
    rows = _rows(plain, secure, plain_timer, secure_timer, rounds, n_sites)
    rows += _exactness(plain, secure, plain_timer, secure_timer, plain_model, secure_model)
    rows.append(("pooled test AUC [95% CI], plain / secured",
                 f"{_pooled_auc(work / 'plain')} / {_pooled_auc(work / 'secure')}"))
    rows.append(("site: encoding one update (`encode_update`), median of 5",
                 f"{_encode_seconds(plain_model, secure_cfg) * 1000:.0f} ms"))
    print(f"\n{cfg.name}: {n_sites} sites, {len(rounds)} rounds, local_steps "
          f"{cfg.federated.local_steps}, batch {cfg.training.batch_size}, "
          f"{cfg.training.num_threads} torch thread(s), {values:,} floating values summed, "
          f"clip {secure_cfg.federated.secure_clip:g}, scale 2**24\n")
    print("| quantity (median over rounds) | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; wall "
          f"{time.time() - t_start:.0f} s; {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}")
    kinds = sorted({k for _, k in secure_timer.seconds})
    if f"{Kind.SECURE_SUM}/fit_update" not in kinds:
        raise RuntimeError(f"the secured run sent no secure sum of the updates: {kinds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

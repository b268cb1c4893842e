"""Benchmark: FederatedPCA over K sites vs scikit-learn PCA on the pooled data.

For each (n, d) the pooled data is generated once (a low-rank signal plus noise, each
site shifted by its own mean), split unevenly over K sites, and then, repeats times and
interleaved:

* federated: every site's :func:`~multimodal_fl.federated.pca.local_summary` plus the
  server's merge and fit, timed as a whole (``fed``); also the parallel-site view,
  ``max(site time) + merge time`` (``parallel``), which is what a consortium waits for
  when the sites compute at the same time;
* pooled: ``sklearn.decomposition.PCA(n_components, svd_solver="full").fit(X)`` on the
  already stacked data (the issue's oracle, the ratios' denominator), and, for the same
  numerics as ``FederatedPCA``'s default, ``svd_solver="covariance_eigh"`` (``pooled_eigh``).

Medians over the repeats are printed as a markdown table, with the subspace error and
the largest relative difference of explained variance between the two fits, and the
bytes the sites send (their summaries) next to the bytes of their raw data.

Run ``python benchmarks/fpca.py --help`` for options; the defaults are the table in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import scipy
import sklearn
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_info, threadpool_limits

from multimodal_fl.federated.pca import SVD_SOLVERS, FederatedPCA, local_summary, subspace_error

SITE_SHARES = (0.4, 0.3, 0.2, 0.1)


@dataclass
class Row:
    """One line of the table."""

    n: int
    d: int
    k: int
    fed_s: float
    parallel_s: float
    pooled_s: float
    pooled_eigh_s: float
    subspace_err: float
    ev_rel_err: float
    sent_bytes: int
    raw_bytes: int
    largest_site_sent: int
    largest_site_raw: int


def site_shares(sites: int) -> list[float]:
    """Fractions of the pooled data each site holds: uneven for up to 4 sites, else equal."""
    if sites <= len(SITE_SHARES):
        head = list(SITE_SHARES[:sites])
        return [x / sum(head) for x in head]
    return [1.0 / sites] * sites


def make_data(n: int, d: int, sites: int, seed: int) -> list[np.ndarray]:
    """Uneven sites sharing a 10-dimensional signal, each with its own mean."""
    rng = np.random.default_rng(seed)
    signal = 10
    basis = np.linalg.qr(rng.normal(size=(d, signal)))[0]
    shares = np.array(site_shares(sites))
    sizes = np.floor(shares / shares.sum() * n).astype(int)
    sizes[0] += n - sizes.sum()
    out = []
    for size in sizes:
        z = rng.normal(size=(size, signal)) * np.linspace(10.0, 3.0, signal)
        out.append(z @ basis.T + rng.normal(size=(size, d)) + 2.0 * rng.normal(size=d))
    return out


def time_federated(
    sites: list[np.ndarray], k: int, solver: str
) -> tuple[float, float, FederatedPCA]:
    """Whole federated time, parallel-site time, and the fitted estimator."""
    start = time.perf_counter()
    site_times = []
    summaries = []
    for x in sites:
        t0 = time.perf_counter()
        summaries.append(local_summary(x, svd_solver=solver))
        site_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    est = FederatedPCA(k, svd_solver=solver).fit_from_summaries(summaries)
    merge_time = time.perf_counter() - t0
    total = time.perf_counter() - start
    return total, max(site_times) + merge_time, est


def time_pooled(x: np.ndarray, k: int, solver: str = "full") -> tuple[float, PCA]:
    """Pooled sklearn PCA time and the fitted estimator."""
    start = time.perf_counter()
    est = PCA(n_components=k, svd_solver=solver).fit(x)
    return time.perf_counter() - start, est


def run_case(
    n: int, d: int, k: int, n_sites: int, repeats: int, seed: int, solver: str
) -> Row:
    """Benchmark one size; repeats are interleaved so drift hits both sides alike."""
    sites = make_data(n, d, n_sites, seed)
    pooled_x = np.vstack(sites)
    fed_t, par_t, pool_t, eigh_t = [], [], [], []
    fed = ref = None
    for _ in range(repeats):
        total, parallel, fed = time_federated(sites, k, solver)
        fed_t.append(total)
        par_t.append(parallel)
        t, ref = time_pooled(pooled_x, k)
        pool_t.append(t)
        eigh_t.append(time_pooled(pooled_x, k, "covariance_eigh")[0])
    assert fed is not None and ref is not None
    summaries = [local_summary(x, svd_solver=solver) for x in sites]
    sent = [s.nbytes for s in summaries]
    raw = [x.nbytes for x in sites]
    big = int(np.argmax([x.shape[0] for x in sites]))
    return Row(
        n=n,
        d=d,
        k=k,
        fed_s=statistics.median(fed_t),
        parallel_s=statistics.median(par_t),
        pooled_s=statistics.median(pool_t),
        pooled_eigh_s=statistics.median(eigh_t),
        subspace_err=subspace_error(fed.components_, ref.components_),
        ev_rel_err=float(np.max(np.abs(fed.explained_variance_ / ref.explained_variance_ - 1.0))),
        sent_bytes=sum(sent),
        raw_bytes=sum(raw),
        largest_site_sent=sent[big],
        largest_site_raw=raw[big],
    )


def _mb(b: int) -> str:
    return f"{b / 1e6:.2f}"


def table(rows: list[Row], n_sites: int) -> str:
    """Markdown table of the rows."""
    lines = [
        f"| n (total) | d | k | federated, {n_sites} sites one after another (ms) "
        "| parallel view: max site + merge (ms) | pooled sklearn PCA full (ms) "
        "| ratio fed/pooled | ratio parallel/pooled | pooled sklearn PCA covariance_eigh (ms) "
        "| ratio fed/pooled covariance_eigh | subspace error | max rel. error of "
        "explained variance | sent by all sites (MB) | raw data of all sites (MB) "
        "| largest site: sent / raw (MB) |",
        "|" + "---|" * 15,
    ]
    for r in rows:
        lines.append(
            f"| {r.n:,} | {r.d} | {r.k} | {r.fed_s * 1e3:.1f} | {r.parallel_s * 1e3:.1f} "
            f"| {r.pooled_s * 1e3:.1f} | {r.fed_s / r.pooled_s:.2f} "
            f"| {r.parallel_s / r.pooled_s:.2f} | {r.pooled_eigh_s * 1e3:.1f} "
            f"| {r.fed_s / r.pooled_eigh_s:.2f} | {r.subspace_err:.1e} | {r.ev_rel_err:.1e} "
            f"| {_mb(r.sent_bytes)} | {_mb(r.raw_bytes)} "
            f"| {_mb(r.largest_site_sent)} / {_mb(r.largest_site_raw)} |"
        )
    return "\n".join(lines)


def environment(threads: int) -> str:
    """One paragraph describing the machine and libraries."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    blas = sorted(
        {
            f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')})"
            for i in threadpool_info()
        }
    )
    return (
        f"Python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"scikit-learn {sklearn.__version__}; BLAS: {', '.join(blas)}; BLAS threads limited to "
        f"{threads} (threadpoolctl) for both sides; OPENBLAS_CORETYPE="
        f"{os.environ.get('OPENBLAS_CORETYPE', '(unset)')}; CPU: {cpu}, {os.cpu_count()} "
        "logical cores."
    )


def main(argv: list[str] | None = None) -> int:
    """Parse options, run every size, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n",
        type=int,
        nargs="+",
        default=[2_000, 20_000, 100_000],
        help="total samples over all sites",
    )
    parser.add_argument("--d", type=int, nargs="+", default=[64, 256, 512], help="features")
    parser.add_argument("--k", type=int, default=10, help="components kept")
    parser.add_argument("--sites", type=int, default=4, help="number of sites (K)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per size (>= 1)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads for both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--svd-solver",
        choices=SVD_SOLVERS,
        default="auto",
        help="FederatedPCA's svd_solver, at the sites and the server (default auto)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.sites < 1 or args.threads < 1:
        parser.error("--repeats, --sites and --threads must be at least 1")
    rows = []
    with threadpool_limits(limits=args.threads):
        for d in args.d:
            for n in args.n:
                rows.append(
                    run_case(n, d, args.k, args.sites, args.repeats, args.seed, args.svd_solver)
                )
                print(f"done n={n} d={d}", file=sys.stderr, flush=True)
        env = environment(args.threads)
    print(
        f"FederatedPCA(svd_solver={args.svd_solver!r}). "
        f"Median of {args.repeats} interleaved repeats; site shares "
        f"{[round(x, 3) for x in site_shares(args.sites)]}. {env}\n"
    )
    print(table(rows, args.sites))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

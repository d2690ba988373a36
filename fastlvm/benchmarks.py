"""Side-by-side runner: fastlvm against its peers, in one process, on the same data.

``fastlvm bench`` prints, per workload, the seconds per EM iteration of
sklearn and fastlvm started from identical parameters (each library's best,
timed in alternating rounds), their ratio, the median and range of the
per-round ratios, fastlvm's GFLOP/s (model flops, below) and its fraction of
this machine's GEMM peak, measured here with numpy matmul.  ``--memory`` adds
the out-of-memory case: peak resident memory added by fitting N=10M, D=16,
K=64 float32 'full'.

Model flops per iteration (multiply-adds count 2): full 2 N K D(D+1) + 8 N K D;
tied 2 N D(D+1) + 8 N K D; diag 10 N K D; spherical 8 N K D.
"""

import argparse
import functools
import gc
import time

import numpy as np

# pause before each timed block: long enough for OpenBLAS's spinning worker threads
# to go to sleep after a threaded call (see time_iteration)
BLAS_SETTLE_SECONDS = 0.3

WORKLOADS = [  # (covariance_type, N, D, K): the targets
    ("full", 200_000, 16, 32),
    ("diag", 1_000_000, 32, 16),
    ("tied", 200_000, 32, 16),
    ("spherical", 1_000_000, 32, 64),
]


def gemm_peak(dtype, n=2000, repeat=3):
    """Best GFLOP/s of an n x n matmul with numpy (the machine's GEMM peak)."""
    a = np.random.default_rng(0).random((n, n)).astype(dtype)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeat))
    return 2 * n**3 / best / 1e9


def model_flops(cov, n, d, k):
    return {"full": 2 * n * k * d * (d + 1) + 8 * n * k * d,
            "tied": 2 * n * d * (d + 1) + 8 * n * k * d,
            "diag": 10 * n * k * d, "spherical": 8 * n * k * d}[cov]


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _initial_parameters(X, cov, k, seed):
    """Parameters after one sklearn EM step from random rows (shared by both)."""
    import warnings

    from sklearn.mixture import GaussianMixture as Sk

    sub = X[np.random.default_rng(seed).choice(X.shape[0], min(X.shape[0], 20_000),
                                               replace=False)].astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = Sk(k, covariance_type=cov, max_iter=1, init_params="random_from_data",
                random_state=seed).fit(sub)
    return dict(weights_init=gm.weights_, means_init=gm.means_,
                precisions_init=gm.precisions_)


def time_iteration(cov, n, d, k, dtype, repeat=3, seed=0, peers=("sklearn",), inner=3):
    """Seconds per EM iteration (E-step + M-step) for fastlvm and its peers.

    The libraries are timed in turn, ``repeat`` rounds of one peer iteration
    each followed by ``inner`` fastlvm iterations, so that a slow spell of the
    shared machine falls on both rather than on whichever ran in it: timed one
    after the other (fastlvm's iterations first, then sklearn's), the same
    code's speed-up moved between 9.5x and 13.1x from run to run.

    Each timed block starts after ``BLAS_SETTLE_SECONDS`` of sleep.  OpenBLAS's
    worker threads keep spinning for a while after a threaded call (its thread
    timeout, 2^28 cycles by default: about 70 ms), and sklearn's iteration is
    threaded BLAS: the two fastlvm 'diag' iterations that followed it at once
    took 49-57 ms on two contended cores, against 25-30 ms a third of a
    second later.  The pause gives each library the machine to itself.

    Returns
    -------
    dict
        peer name -> best seconds over all its timed iterations, and
        ``"rounds"``: peer name -> list of that peer's per-round ratio
        (its iteration over the best fastlvm iteration of the same round).
    """
    import warnings

    from sklearn.mixture import GaussianMixture as Sk

    from fastlvm import GaussianMixture
    from fastlvm._config import serial_blas

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * 4
    X = (centers[rng.integers(0, k, n)] + rng.standard_normal((n, d))).astype(dtype)
    params = _initial_parameters(X, cov, k, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fl = GaussianMixture(k, covariance_type=cov, max_iter=1, tol=0, **params).fit(X)
        fl._em_iteration(X, None)  # JIT warm-up done; time steady-state iterations
        iterations = {}
        if "sklearn" in peers:
            sk = Sk(k, covariance_type=cov, max_iter=1, tol=0, **params).fit(X)

            def sk_iteration(X=X):
                _, log_resp = sk._e_step(X)
                sk._m_step(X, log_resp)

            iterations["sklearn"] = sk_iteration
        times = {name: [] for name in ["fastlvm", *iterations]}
        rounds = {name: [] for name in iterations}
        fl_iteration = functools.partial(fl._em_iteration, X, None)
        for _ in range(max(1, repeat)):
            round_times = {}
            for name, fn in iterations.items():
                time.sleep(BLAS_SETTLE_SECONDS)
                round_times[name] = _timed(fn)
            time.sleep(BLAS_SETTLE_SECONDS)
            with serial_blas():  # as fit() runs its iterations
                best = min(_timed(fl_iteration) for _ in range(inner))
            times["fastlvm"].append(best)
            for name, t in round_times.items():
                times[name].append(t)
                rounds[name].append(t / best)
    del X, fl_iteration, iterations
    gc.collect()
    return {**{name: min(t) for name, t in times.items()}, "rounds": rounds}


def peak_memory_fit(n=10_000_000, d=16, k=64, max_iter=2, seed=0):
    """Peak resident memory added by a GaussianMixture fit, as a fraction of X.

    Uses Linux's resettable high-water mark (/proc/self/clear_refs, VmHWM).

    Returns
    -------
    dict with bytes of X, added peak bytes, the ratio, and seconds.
    """
    import warnings

    from fastlvm import GaussianMixture

    X = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    gm = GaussianMixture(k, covariance_type="full", max_iter=1, tol=0,
                         init_params="random_from_data", random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(X[:20_000])  # compile kernels outside the measurement
        gc.collect()
        base = _rss()
        _reset_peak()
        gm.set_params(max_iter=max_iter)
        seconds = _timed(lambda: gm.fit(X))
    added = max(0, _peak_rss() - base)
    return {"x_bytes": X.nbytes, "added_bytes": added, "ratio": added / X.nbytes,
            "seconds": seconds, "n_iter": gm.n_iter_}


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss():
    return _status_kb("VmRSS:")


def _peak_rss():
    return _status_kb("VmHWM:")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run(workloads=WORKLOADS, dtypes=("float64", "float32"), scale=1.0, repeat=3,
        memory=False, out=print):
    """Run the comparison and print a Markdown table; returns the rows."""
    import os
    import platform

    import numba

    peak = {dt: gemm_peak(np.dtype(dt)) for dt in dtypes}
    out(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"numba threads {numba.get_num_threads()}; GEMM peak (numpy matmul): "
        + ", ".join(f"{dt} {peak[dt]:.1f} GFLOP/s" for dt in dtypes))
    out("")
    out("| workload | dtype | sklearn s/iter | fastlvm s/iter | speed-up | per round "
        "| fastlvm GFLOP/s | % of GEMM peak |")
    out("|---|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for cov, n, d, k in workloads:
        n = max(1000, int(n * scale))
        for dt in dtypes:
            t = time_iteration(cov, n, d, k, np.dtype(dt), repeat=repeat)
            gflops = model_flops(cov, n, d, k) / t["fastlvm"] / 1e9
            per_round = t.pop("rounds")["sklearn"]
            row = dict(cov=cov, n=n, d=d, k=k, dtype=dt, **t, ratio=t["sklearn"] / t["fastlvm"],
                       round_ratios=per_round, gflops=gflops, peak_fraction=gflops / peak[dt])
            rows.append(row)
            out(f"| {cov} N={n:,} D={d} K={k} | {dt} | {t['sklearn']:.3f} | "
                f"{t['fastlvm']:.4f} | {row['ratio']:.1f}x | {_ratio_range(per_round)} | "
                f"{gflops:.1f} | {100 * row['peak_fraction']:.0f}% |")
    if memory:
        m = peak_memory_fit()
        out("")
        out(f"memory: fit N=10,000,000 D=16 K=64 float32 full ({m['n_iter']} iterations, "
            f"{m['seconds']:.1f} s): X is {m['x_bytes'] / 2**20:.0f} MiB, peak RSS grew by "
            f"{m['added_bytes'] / 2**20:.0f} MiB = {100 * m['ratio']:.1f}% of X")
    return rows


def _ratio_range(ratios):
    """'median (min-max)' of per-round speed-ups, e.g. '14.2x (12.9-15.0)'."""
    r = np.asarray(ratios)
    return f"{np.median(r):.1f}x ({r.min():.1f}-{r.max():.1f})"


def _positive(kind):
    """An argparse type: ``kind`` (int or float) of a value above 0."""
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0; got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastlvm bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=_positive(float), default=1.0,
                        help="multiply every workload's N by this (e.g. 0.05 for a quick run)")
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"],
                        choices=["float64", "float32"])
    parser.add_argument("--covariance-types", nargs="+", choices=[w[0] for w in WORKLOADS],
                        default=[w[0] for w in WORKLOADS])
    parser.add_argument("--repeat", type=_positive(int), default=3,
                        help="rounds: one sklearn iteration, then the best of three "
                             "fastlvm iterations")
    parser.add_argument("--memory", action="store_true",
                        help="also measure peak memory of the N=10M, K=64 full fit")
    args = parser.parse_args(argv)
    workloads = [w for w in WORKLOADS if w[0] in args.covariance_types]
    run(workloads, args.dtypes, args.scale, args.repeat, args.memory)
    return 0

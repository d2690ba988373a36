"""Triton kernels on a CUDA device: correctness against the float64 reference,
then timings of the fused E-step (CUDA events, median of repeats).

    python bench/triton_check.py [--quick | --bench-only | --streaming | --wide]

Prints one table; no assertion on timings.
"""

import argparse
import contextlib
import itertools
import os
import sys
import time

import numpy as np

from fastlvm.kernels import estep_stats_ref, gaussian_log_prob_ref
from fastlvm.kernels.estep_stats import EStepStats, recenter

# asv imports every module of bench/ to find its benchmarks, in an environment
# without torch: there the imports below fail and a run of the script re-raises
_MISSING = None
try:
    import torch

    from fastlvm.kernels.estep_stats._triton import estep_stats_triton
    from fastlvm.kernels.gaussian_log_prob._triton import gaussian_log_prob_triton
    from fastlvm.kernels.log_responsibilities._triton import log_responsibilities_triton
except ImportError as exc:
    _MISSING = exc
    torch = estep_stats_triton = gaussian_log_prob_triton = log_responsibilities_triton = None


def make_params(rng, cov, k, d):
    if cov in ("full", "tied"):
        kk = k if cov == "full" else 1
        u = np.triu(rng.standard_normal((kk, d, d)) * 0.3 / np.sqrt(d))
        idx = np.arange(d)
        u[:, idx, idx] = np.abs(u[:, idx, idx]) + 0.5
        return u if cov == "full" else u[0]
    if cov == "diag":
        return rng.random((k, d)) + 0.5
    return rng.random(k) + 0.5


def rel(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


CHECK_SHAPES = ((1, 1, 1), (1000, 7, 5), (5003, 33, 70), (2000, 130, 19))  # (N, D, K)


def check(rng, device="cuda", shapes=CHECK_SHAPES):
    """The Triton kernels against the float64 references over ``shapes``, every
    covariance type and dtype, on ``device`` ('cpu': Triton's interpreter, a dry
    run); returns the worst float32 relative error."""
    worst = 0.0
    for cov in ("full", "tied", "diag", "spherical"):
        for dt in (np.float32, np.float64):
            for n, d, k in shapes:
                X = (rng.standard_normal((n, d)) + 5).astype(dt)
                means = X[rng.integers(0, n, k)].astype(np.float64) + 0.3
                pc = make_params(rng, cov, k, d)
                w = rng.random(k) + 0.1
                w /= w.sum()
                sw = rng.random(n) * 2
                Xt = torch.from_numpy(X).to(device)
                try:
                    lp = gaussian_log_prob_triton(Xt, means, pc, cov).cpu().numpy()
                    got = estep_stats_triton(Xt, w, means, pc, cov,
                                             torch.from_numpy(sw).to(device))
                except Exception as exc:  # report and go on: one table for the whole run
                    print(f"check {cov:9s} {dt.__name__:7s} n={n:5d} d={d:3d} k={k:3d} "
                          f"ERROR {type(exc).__name__}: {str(exc)[:200]}  <-- FAIL")
                    continue
                e_lp = rel(lp, gaussian_log_prob_ref(X, means, pc, cov))
                got = EStepStats(got[0], *(a.cpu().numpy() for a in got[1:]))
                got = recenter(got, means, cov)
                ref = estep_stats_ref(X, w, means, pc, cov, sw)
                errs = [abs(got[0] - ref[0]) / abs(ref[0])] + [
                    rel(a, b) for a, b in zip(got[1:4], ref[1:4])]
                V = torch.from_numpy(lp).to(device)
                lr, ln = log_responsibilities_triton(V)
                e_lr = rel(ln.cpu().numpy(), np.logaddexp.reduce(lp.astype(np.float64), 1))
                e = max([e_lp, e_lr] + errs)
                worst = max(worst, e) if dt == np.float32 else worst
                flag = "" if e < (2e-4 if dt == np.float32 else 1e-10) else "  <-- FAIL"
                print(f"check {cov:9s} {dt.__name__:7s} n={n:5d} d={d:3d} k={k:3d} "
                      f"max rel err {e:.1e}{flag}", flush=True)
    return worst


def median_ms(fn, reps=10, device="cuda"):
    """Median device milliseconds of ``reps`` calls of ``fn`` on the current CUDA
    device, between two torch CUDA events (``bench/_timing.torch_cuda_ms``); on
    the CPU (``device='cpu'``), by the host's clock."""
    from _timing import median_ms as host_ms  # bench/, the script's directory
    from _timing import torch_cuda_ms

    return torch_cuda_ms(fn, reps) if device == "cuda" else host_ms(fn, reps)


@contextlib.contextmanager
def path_variant(path):
    """For path 'chunked-wgmma', the chunked E-step's moments kernel at session 34's
    wgmma tiles (64 components by 32 rows, feature blocks of 64 for 'diag' and 128
    otherwise; slower on an H200 than the table's, 2026-12-04); for
    'chunked-unshifted', the chunked kernels shifting X's rows themselves, as
    before session 62 (no chunk's shifted rows: ``SHIFTED_ELEMENTS`` 0); other
    paths as they are."""
    from _patched import attributes_set  # bench/, the script's directory
    from _tile_tables import tables_replaced

    from fastlvm.kernels.estep_stats import _triton_chunked as ch

    if path == "chunked-unshifted":
        with attributes_set(ch, SHIFTED_ELEMENTS=0):
            yield
        return
    if path != "chunked-wgmma":
        yield
        return

    from fastlvm.kernels import _triton_gaussian as tg

    table = ch.chunk_configs

    def older(dtype, bd, code):
        lp, mo = table(dtype, bd, code)
        if dtype != torch.float32:
            return lp, mo
        return lp, mo._replace(block_n=32, block_k=64,
                               block_j=min(bd, 64 if code == tg.DIAG else 128))

    with tables_replaced({(ch, "chunk_configs"): older}):
        yield


def run_flash_gmm_workload(rng, quick, shape=(1_000_000, 128, 1024), covs=None):
    """Flash-GMM's workload: one E-step with statistics, N=1M, D=128, K=1024, float32.

    ``shape`` (N, D, K) and ``covs`` time another (``--wide``: rows past 256
    features, which take the chunked kernels at any K; 'recompute' there is the
    fused kernels, which hold whole rows)."""
    n, d, k = shape
    X = torch.randn(n, d, device="cuda", dtype=torch.float32)
    means = X[torch.randint(0, n, (k,), device="cuda")].double()
    w = torch.full((k,), 1.0 / k, device="cuda", dtype=torch.float64)
    rows = []
    if covs is None:
        covs = ("spherical", "diag") if quick else ("spherical", "diag", "tied", "full")
    for cov in covs:
        pc = torch.as_tensor(make_params(rng, cov, k, d), device="cuda")
        # beyond one component tile: the chunks' stored log-densities (the default)
        # against the log-densities recomputed beside the moments ('full' has one
        # path up to 256 features; past them 'chunked' is its square feature blocks and
        # 'recompute' its fused kernels); 'chunked-wgmma' is the chunked path with session
        # 34's moments tiles (64 components in feature blocks, on wgmma; the table's 32
        # over all features take mma.sync); 'chunked-unshifted' shifts the rows in the
        # kernels, as before session 62 (the default shifts each chunk's rows once)
        paths = (("chunked",) if cov == "full" and d <= 256 else
                 ("chunked", "chunked-unshifted", "chunked-wgmma", "recompute") if d <= 256
                 else ("chunked", "chunked-unshifted", "recompute"))
        # each variant's statistics against one computed on the FMA units (IEEE
        # float32 products), by the path that recomputes the log-densities: the
        # timed tiles are checked at full size too (tf32x3 ~1e-6, tf32 ~1e-3)
        os.environ["FASTLVM_TRITON_PRECISION"] = "ieee"
        try:
            reference = estep_stats_triton(X, w, means, pc, cov, large_k="recompute"
                                           if cov != "full" else "chunked")
        except Exception as exc:  # report and go on: one table for the whole run
            print(f"estep {cov} ieee reference: ERROR {type(exc).__name__}: {exc}"[:300])
            reference = None
        # and against the same E-step computed in float64 (float32 rows, float64
        # coefficients and sums): which of the two float32 runs is nearer the sums.
        # 'full' at Flash-GMM's K = 1024 would take tens of seconds in float64: skipped
        exact = None
        if not (cov == "full" and k > 64):
            try:
                exact = estep_stats_triton(X, w, means, pc, cov, compute_in_float64=True,
                                           large_k="recompute" if cov != "full"
                                           else "chunked")
            except Exception as exc:  # report and go on
                print(f"estep {cov} float64 reference: ERROR {type(exc).__name__}: "
                      f"{exc}"[:300])
        if reference is not None and exact is not None:
            print(f"estep N={n} D={d} K={k} {cov:9s} ieee  : statistics "
                  f"{_worst_rel(reference, exact, cov):.1e} from float64", flush=True)
        for precision, path in itertools.product(("tf32x3", "tf32"), paths):
            os.environ["FASTLVM_TRITON_PRECISION"] = precision

            def estep():
                with path_variant(path):
                    return estep_stats_triton(X, w, means, pc, cov,
                                              large_k=path.split("-")[0])

            t0 = time.perf_counter()
            try:
                got = estep()
            except Exception as exc:  # report and go on: one table for the whole run
                print(f"estep {cov} {precision} {path}: ERROR {type(exc).__name__}: "
                      f"{exc}"[:300])
                continue
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            err = "-"
            if reference is not None:
                err = f"{_worst_rel(got, reference, cov):.1e}"
            if exact is not None:
                err += f" from IEEE, {_worst_rel(got, exact, cov):.1e} from float64"
            else:
                err += " from IEEE"
            ms = median_ms(estep, reps=2 if cov == "full" else 10)
            rows.append((cov, precision, path, ms, first))
            print(f"estep N={n} D={d} K={k} {cov:9s} {precision:6s} {path:9s}: {ms:9.2f} ms "
                  f"(first call incl. compile {first:.1f} s; statistics {err})", flush=True)
    os.environ.pop("FASTLVM_TRITON_PRECISION", None)
    return rows


def _worst_rel(got, reference, cov):
    """The largest relative difference of N_k, sum x and the second moments of two
    ``estep_stats_triton`` results, the reference's moments moved to ``got``'s shift
    (a float64 run may round its centres otherwise)."""
    reference = recenter(EStepStats(*reference), got[4], cov)
    return max(rel(a.cpu().numpy(), b.cpu().numpy()) for a, b in zip(got[1:4], reference[1:4]))


FLOAT64_WORKLOADS = (("spherical", 1_000_000, 128, 1024), ("diag", 1_000_000, 128, 1024),
                     ("tied", 1_000_000, 128, 1024), ("diag", 1_000_000, 32, 16),
                     ("tied", 1_000_000, 32, 16))


def run_float64_compute_cost(rng, device="cuda", workloads=FLOAT64_WORKLOADS):
    """What computing float32 rows in float64 costs (``computes_in_float64``: means
    more than about 40 deviations from their common centre): the same E-step with
    float32 and with float64 coefficients, Triton and (where cupy imports) CuPy, at
    Flash-GMM's workload and at the EM benchmarks' D = 32, K = 16.  The data are
    the same both ways: only the compute dtype differs.  ``device='cpu'``: a dry run
    on the interpreter and the CUDA emulator, timed by the host's clock."""
    from _timing import cupy_ms  # bench/, the script's directory
    from _timing import median_ms as host_ms

    try:
        import cupy

        from fastlvm.kernels.estep_stats._cupy import estep_stats_cupy
    except ImportError:
        cupy = None
    rows = []
    for cov, n, d, k in workloads:
        X = torch.randn(n, d, device=device, dtype=torch.float32)
        means = X[torch.randint(0, n, (k,), device=device)].double().cpu().numpy()
        w = np.full(k, 1.0 / k)
        pc = make_params(rng, cov, k, d)
        # (data, E-step, device timer) per backend
        backends = [("triton", X, estep_stats_triton,
                     lambda fn, reps: median_ms(fn, reps, device))]
        if cupy is not None:
            backends.append(("cupy", cupy.asarray(X.cpu().numpy()) if device == "cpu"
                             else cupy.asarray(X), estep_stats_cupy,
                             cupy_ms if device == "cuda" else host_ms))
        for name, Xb, fn, timer in backends:
            times = {}
            for f64 in (False, True):
                def estep():
                    return fn(Xb, w, means, pc, cov, compute_in_float64=f64)
                try:
                    times[f64] = timer(estep, 5)
                except Exception as exc:
                    print(f"float64 compute {name} {cov} D={d} K={k}: ERROR "
                          f"{type(exc).__name__}: {exc}"[:300], flush=True)
            if len(times) == 2:
                rows.append((name, cov, d, k, times[False], times[True]))
                print(f"float64 compute {name:6s} {cov:9s} N={n} D={d:3d} K={k:4d}: "
                      f"float32 {times[False]:8.2f} ms, float64 {times[True]:8.2f} ms, "
                      f"{times[True] / times[False]:.2f}x", flush=True)
    return rows


def memory_10m():
    """Peak device memory beyond X of one E-step at N=10M, D=128, K=1024 (float32),
    on each of Triton's large-K paths."""
    from benchmarks_gpu import estep_bytes_beyond_X  # bench/, the script's directory

    n, d, k = 10_000_000, 128, 1024
    for path in ("chunked", "recompute"):
        extra = estep_bytes_beyond_X("triton", n, d, k, large_k=path)
        print(f"memory N=10M D=128 K=1024 spherical ({path}): X {n * d * 4 / 2**20:.0f} MiB, "
              f"E-step peak beyond X {extra / 2**20:.1f} MiB", flush=True)


EM_WORKLOADS = (("diag", 1_000_000, 32, 16), ("full", 200_000, 16, 32),
                ("spherical", 1_000_000, 32, 64), ("tied", 200_000, 32, 16))


def run_em_iteration_table(device="cuda", workloads=EM_WORKLOADS, iterations=20):
    """GaussianMixture.fit on a CUDA tensor (its defaults: the iterations replayed from a
    CUDA graph) against sklearn on the host, per iteration (``device='cpu'``: a dry
    run, CPU tensors on Triton's interpreter)."""
    from sklearn.mixture import GaussianMixture as SkGMM

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cupy_vs_triton import caller

    from fastlvm import GaussianMixture
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    call = caller("triton", device)

    def fit(max_iter, init, Xt):
        return call(GaussianMixture(max_iter=max_iter, **init).fit, Xt)

    for cov, n, d, k in workloads:
        rng = np.random.default_rng(0)
        X = (rng.standard_normal((n, d)) + rng.integers(0, 4, (n, 1))).astype(np.float32)
        Xt = torch.as_tensor(X, device=device)
        init = dict(n_components=k, covariance_type=cov, random_state=0,
                    init_params="random_from_data", tol=0)
        fit(2, init, Xt)  # compile
        sync()
        t0 = time.perf_counter()
        g = fit(iterations, init, Xt)
        sync()
        t0b = time.perf_counter()
        fit(0, init, Xt)
        sync()
        per_dev = ((t0b - t0) - (time.perf_counter() - t0b)) / iterations
        t1 = time.perf_counter()
        SkGMM(max_iter=3, **init).fit(X)
        t2 = time.perf_counter()
        SkGMM(max_iter=1, **init).fit(X)
        per_sk = ((t2 - t1) - (time.perf_counter() - t2)) / 2
        print(f"em-iteration {cov:9s} N={n} D={d} K={k} float32: fastlvm/H100 "
              f"{per_dev * 1e3:8.2f} ms, sklearn/16-core host {per_sk * 1e3:9.1f} ms "
              f"(x{per_sk / per_dev:.0f}); bound {g.lower_bound_:.4f}", flush=True)


def run_streaming(n=8_000_000, d=32, k=16):
    """fit on a host array streamed to the GPU (device='cuda') against the same
    fit on a resident CUDA tensor, per EM iteration."""
    from fastlvm import GaussianMixture

    rng = np.random.default_rng(0)
    X = (rng.standard_normal((n, d)) + rng.integers(0, 4, (n, 1))).astype(np.float32)
    kw = dict(n_components=k, covariance_type="diag", init_params="random_from_data",
              random_state=0, tol=0)
    per = {}
    for name, data, extra in (("resident tensor", torch.as_tensor(X, device="cuda"), {}),
                              ("streamed host array", X, {"device": "cuda"})):
        GaussianMixture(max_iter=1, **kw, **extra).fit(data)  # compile, warm
        t0 = time.perf_counter()
        g = GaussianMixture(max_iter=5, **kw, **extra).fit(data)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        GaussianMixture(max_iter=1, **kw, **extra).fit(data)
        torch.cuda.synchronize()
        per[name] = ((t1 - t0) - (time.perf_counter() - t1)) / 4
        print(f"streaming N={n} D={d} K={k} diag float32, {name}: "
              f"{per[name] * 1e3:.1f} ms/iteration, bound {g.lower_bound_:.6f}", flush=True)
    gbps = X.nbytes / per["streamed host array"] / 1e9
    print(f"streamed: {gbps:.1f} GB/s of host rows per iteration")


def main():
    import warnings

    warnings.simplefilter("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bench-only", action="store_true")
    ap.add_argument("--streaming", action="store_true")
    ap.add_argument("--no-flash", action="store_true",
                    help="skip the 10M-row memory figure and Flash-GMM's E-step (timed in "
                         "sessions 51 and 59): the reference grid, float64's cost and the "
                         "EM iteration against sklearn only")
    ap.add_argument("--wide", action="store_true",
                    help="only the E-step on rows of 300 and 768 features, K = 16, every "
                         "covariance type: the chunked kernels against the fused ones")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, file=sys.stderr)
    rng = np.random.default_rng(0)
    if args.streaming:
        run_streaming()
        return
    if args.wide:
        for shape in ((1_000_000, 300, 16), (400_000, 768, 16)):
            run_flash_gmm_workload(rng, False, shape, ("spherical", "diag", "tied", "full"))
        return
    # issue 3's figures first (memory at 10M rows, Flash-GMM's E-step), so that a
    # stage cut off by its time cap loses the least of them
    if not args.no_flash:
        memory_10m()
        run_flash_gmm_workload(rng, args.quick)
    if not args.bench_only:
        worst = check(rng)
        print(f"worst float32 relative error: {worst:.1e}")
    run_float64_compute_cost(rng)
    run_em_iteration_table()


if __name__ == "__main__":
    if _MISSING is not None:
        raise _MISSING
    main()

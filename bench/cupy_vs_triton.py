"""CuPy against Triton, side by side in one process, on the same device and data.

Workloads (issue 4): Flash-GMM's E-step (N=1M, D=128, K=1024, float32, every
covariance type), one GaussianMixture EM iteration (N=1M, D=32, K=16, float32)
and the device memory an E-step needs beyond X at N=10M, D=128, K=1024
('spherical'); and issue 5's mixture-of-PPCA E-step (N=1M, D=64, K=16, q=4,
float32) beside a 'diag' GaussianMixture E-step with the same N, D and K.
Prints a markdown table with the ratio CuPy / faster of the two
(the issue's goal: at most 1.5 on every workload), with CuPy's chunked cuBLAS
E-step beside its tile kernels where both apply (K <= 64), and each backend's EM
iteration with its fused M-step against the unfused one.  Needs a CUDA GPU, cupy,
torch and triton; data is generated, nothing is downloaded.

    python bench/cupy_vs_triton.py [--quick] [--out bench/results/gpu-<device>-cupy.md]
        [--only estep|em|mppca|fused|memory ...]
"""

import argparse
import time

import numpy as np

COVS = ("full", "tied", "diag", "spherical")


def median_ms(fn, sync, reps):
    """Median milliseconds of ``reps`` synchronised calls after a warm-up call; NaN,
    with the error printed, where the call raises (one table for the whole run)."""
    try:
        fn()
        sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
    except Exception as exc:
        print(f"ERROR {type(exc).__name__}: {str(exc)[:400]}", flush=True)
        return float("nan")
    return 1e3 * float(np.median(times))


def cupy_chunked():
    """CuPy's E-step on its chunked cuBLAS path only (no tile plan), within the block."""
    from _patched import attributes_set  # bench/, the script's directory

    from fastlvm.kernels.estep_stats import _cupy_tiles

    return attributes_set(_cupy_tiles, MAX_COMPONENTS=0)


def syncs(torch, cupy, device):
    """(Triton's sync, CuPy's sync): the devices' synchronize, or no-ops on the CPU
    (``device='cpu'``: the interpreter and the CUDA emulator, whose calls return
    when their work is done)."""
    if device == "cpu":
        return (lambda: None), (lambda: None)
    return torch.cuda.synchronize, cupy.cuda.Device().synchronize


def on_triton(fn, device):
    """``fn`` called as Triton's data needs: on the CPU (``device='cpu'``) under
    ``FASTLVM_BACKEND=triton``, since CPU tensors take the Triton kernels (through
    the interpreter) only when asked; on a GPU as it is."""
    if device != "cpu":
        return fn
    from _patched import environ_set  # bench/, the script's directory

    def run():
        with environ_set(FASTLVM_BACKEND="triton"):
            return fn()

    return run


def caller(backend, device):
    """``call(fn, *args)``, which runs ``fn(*args)`` as ``backend``'s data need it:
    Triton's through :func:`on_triton`, any other backend's as it is."""
    if backend.lower() != "triton":
        return lambda fn, *args: fn(*args)
    return lambda fn, *args: on_triton(lambda: fn(*args), device)()


def cupy_both(fn, n, k, d, cov, reps, chunked_fn=None, sync=None):
    """(CuPy ms, CuPy chunked ms or None where the tile kernels do not apply);
    ``chunked_fn``, where given, is timed on the chunked path in ``fn``'s place (a
    callable that keeps state, such as a recorded graph, needs a fresh one); ``sync``
    waits for CuPy's work (the device's synchronize by default)."""
    import cupy

    from fastlvm.kernels.estep_stats._cupy_tiles import tile_plan

    sync = sync or cupy.cuda.Device().synchronize
    t = median_ms(fn, sync, reps)
    if tile_plan(n, k, d, cov, np.float32) is None:
        return t, None
    with cupy_chunked():
        return t, median_ms(chunked_fn or fn, sync, reps)


def estep_rows(torch, cupy, quick, reps, device="cuda", shape=None):
    """Flash-GMM's E-step (N, D, K = 1M, 128, 1024; 'full' at K = 64), or ``shape``
    (N, D, K; 'full' at min(K, 64)) on ``device`` (see :func:`syncs`)."""
    # run as a script, bench/ is on sys.path (imported here, not at the top, so
    # asv's discovery of bench/ as a package never needs it)
    from benchmarks_gpu import identity_precisions

    from fastlvm.kernels.estep_stats._cupy import estep_stats_cupy
    from fastlvm.kernels.estep_stats._triton import estep_stats_triton

    n, d, k = shape or ((200_000 if quick else 1_000_000), 128, 1024)
    sync_tr, sync_cp = syncs(torch, cupy, device)
    X = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    Xt, Xc = torch.as_tensor(X, device=device), cupy.asarray(X)
    w = np.full(k, 1.0 / k)
    for cov in COVS:
        kk = min(k, 64) if cov == "full" else k  # K D^2 full moments: 64 fit the tiles
        args = (w[:kk] * k / kk, X[:kk].astype(np.float64), identity_precisions(cov, kk, d),
                cov)
        t_tr = median_ms(lambda: estep_stats_triton(Xt, *args), sync_tr, reps)
        t_cp = cupy_both(lambda: estep_stats_cupy(Xc, *args), n, kk, d, cov, reps,
                         sync=sync_cp)
        yield (f"E-step N={n:,} D={d} K={kk} {cov} f32", t_tr, *t_cp)


def em_iteration(data, k, cov, cuda_graph=False):
    """A callable that runs one EM iteration on ``data`` of a model it fits (one
    iteration, seeded) on its first call, so that median_ms's warm-up fits and a
    failed fit is reported as any failed call is.  ``cuda_graph=True``: the
    iteration recorded as a CUDA graph (either backend), the first call running
    the eager warm-up iterations and the recording, so every timed call replays."""
    from fastlvm import GaussianMixture
    from fastlvm.mixture._device_em_step import GRAPH_WARMUP_STEPS

    model = []

    def run():
        if not model:
            # False: the kernels' iteration, as CuPy's default (Triton's default records)
            model.append(GaussianMixture(k, covariance_type=cov, random_state=0, max_iter=1,
                                         init_params="random_from_data",
                                         cuda_graph=cuda_graph).fit(data))
            for _ in range(GRAPH_WARMUP_STEPS + 1 if cuda_graph else 0):
                model[0]._em_iteration(data, None)
        model[0]._em_iteration(data, None)

    return run


def em_rows(torch, cupy, quick, reps, device="cuda", shape=None):
    """The EM iteration, eager (the kernels and their launches), then recorded as
    a CUDA graph by both backends (what Triton's users get by default; CuPy's with
    cuda_graph=True); N, D, K = 1M, 32, 16, or ``shape``, on ``device`` (see
    :func:`syncs`)."""
    rng = np.random.default_rng(0)
    n, d, k = shape or ((200_000 if quick else 1_000_000), 32, 16)
    sync_tr, sync_cp = syncs(torch, cupy, device)
    X = (rng.standard_normal((n, d)) + rng.integers(0, 4, (n, 1))).astype(np.float32)
    Xt, Xc = torch.as_tensor(X, device=device), cupy.asarray(X)
    for graph in (False, True):
        for cov in COVS:
            t_tr = median_ms(on_triton(em_iteration(Xt, k, cov, graph), device), sync_tr,
                             reps)
            t_cp = cupy_both(em_iteration(Xc, k, cov, graph), n, k, d, cov, reps,
                             em_iteration(Xc, k, cov, graph), sync=sync_cp)
            yield (f"EM iteration{', graph' if graph else ''} N={n:,} D={d} K={k} {cov} f32",
                   t_tr, *t_cp)


def fused_rows(torch, cupy, quick, reps, device="cuda", shape=None):
    """Each backend's EM iteration with its fused device M-step (the default) and with
    the unfused one (the E-step's statistics, then the M-step as array operations),
    same data and start; N, D, K = 1M, 32, 16 (and 'spherical' at 4 K too), or
    ``shape``, on ``device`` (see :func:`syncs`)."""
    from _patched import attributes_set  # bench/, the script's directory

    from fastlvm import GaussianMixture
    from fastlvm.mixture import _gaussian_mixture

    rng = np.random.default_rng(0)
    n, d, k = shape or ((200_000 if quick else 1_000_000), 32, 16)
    X = (rng.standard_normal((n, d)) + rng.integers(0, 4, (n, 1))).astype(np.float32)
    sync_tr, sync_cp = syncs(torch, cupy, device)
    backends = (("Triton", torch.as_tensor(X, device=device), sync_tr),
                ("CuPy", cupy.asarray(X), sync_cp))
    applies = _gaussian_mixture.fused_iteration_applies
    rows = []
    for backend, data, sync in backends:
        call = caller(backend, device)
        for cov, kk in (("full", k), ("tied", k), ("diag", k), ("spherical", k),
                        ("spherical", 4 * k)):
            times = []
            for fused in (True, False):
                try:
                    with attributes_set(_gaussian_mixture, fused_iteration_applies=(
                            applies if fused else (lambda model, X: False))):
                        gm = call(GaussianMixture(kk, covariance_type=cov,
                                                  init_params="random_from_data",
                                                  random_state=0, max_iter=1,
                                                  cuda_graph=False).fit, data)
                        times.append(median_ms(
                            lambda: call(gm._em_iteration, data, None), sync, reps))
                except Exception as exc:
                    print(f"ERROR fit {backend} {cov}: {type(exc).__name__}: "
                          f"{str(exc)[:400]}", flush=True)
                    times.append(float("nan"))
            rows.append((f"{backend} EM iteration N={n:,} D={d} K={kk} {cov} f32", *times))
    return rows


def mppca_rows(torch, cupy, quick, reps, device="cuda", shape=None):
    """MPPCA's E-step at D = 64 and at MNIST's 784, and a 'diag' GMM's at D = 64,
    N = 1M (a quarter at D = 784), K = 16, q = 4; or ``shape`` (N, D, K, q, wide D),
    on ``device`` (see :func:`syncs`)."""
    from benchmarks_gpu import identity_precisions

    from fastlvm.kernels.estep_stats._cupy import estep_stats_cupy
    from fastlvm.kernels.estep_stats._triton import estep_stats_triton
    from fastlvm.kernels.mppca_stats._cupy import mppca_stats_cupy
    from fastlvm.kernels.mppca_stats._triton import mppca_stats_triton

    rng = np.random.default_rng(0)
    n, d, k, q, d_wide = shape or ((200_000 if quick else 1_000_000), 64, 16, 4, 784)
    sync_tr, sync_cp = syncs(torch, cupy, device)
    X = rng.standard_normal((n, d)).astype(np.float32)
    Xt_narrow, Xc_narrow = torch.as_tensor(X, device=device), cupy.asarray(X)
    w = np.full(k, 1.0 / k)
    means = X[:k].astype(np.float64)
    mppca = (w, means, rng.standard_normal((k, q, d)), np.ones(k))
    diag = (w, means, identity_precisions("diag", k, d), "diag")
    # MNIST's width: rows past 128 padded features take the Triton kernels that step
    # through the features (``_triton_low_rank_wide.py``)
    n_wide = max(n // 4, 1)
    X = rng.standard_normal((n_wide, d_wide)).astype(np.float32)
    wide_pair = torch.as_tensor(X, device=device), cupy.asarray(X)
    wide = (w, X[:k].astype(np.float64), rng.standard_normal((k, q, d_wide)), np.ones(k))
    del X
    rows = []
    for label, fn_tr, fn_cp, args, cov in (
            (f"MPPCA E-step N={n:,} D={d} K={k} q={q} f32", mppca_stats_triton,
             mppca_stats_cupy, mppca, None),
            (f"MPPCA E-step N={n_wide:,} D={d_wide} K={k} q={q} f32", mppca_stats_triton,
             mppca_stats_cupy, wide, None),
            (f"diag GMM E-step N={n:,} D={d} K={k} f32", estep_stats_triton, estep_stats_cupy,
             diag, "diag")):
        Xt, Xc = wide_pair if args is wide else (Xt_narrow, Xc_narrow)
        t_tr = median_ms(lambda: fn_tr(Xt, *args), sync_tr, reps)
        fn = lambda: fn_cp(Xc, *args)  # noqa: E731
        t_cp = (cupy_both(fn, n, k, d, cov, reps, sync=sync_cp) if cov else
                (median_ms(fn, sync_cp, reps), None))
        rows.append((label, t_tr, *t_cp))
    return rows


def memory_row(torch, cupy, quick):
    from benchmarks_gpu import estep_bytes_beyond_X

    n, d, k = (2_000_000 if quick else 10_000_000), 128, 1024
    triton_bytes = estep_bytes_beyond_X("triton", n, d, k)
    torch.cuda.empty_cache()  # its X, for CuPy's pool
    cupy_bytes = estep_bytes_beyond_X("cupy", n, d, k)
    return f"E-step memory beyond X, N={n:,} D={d} K={k}", triton_bytes, cupy_bytes


GROUPS = ("estep", "em", "mppca", "fused", "memory")  # the tables' groups of rows, in order


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller N, fewer repeats")
    ap.add_argument("--reps", type=int, help="timed repeats per row (default 3 with "
                    "--quick, else 10)")
    ap.add_argument("--out", help="also write the table to this markdown file")
    ap.add_argument("--only", action="append", choices=GROUPS,
                    help="only these groups of rows (repeatable; default: all)")
    args = ap.parse_args()
    groups = set(args.only or GROUPS)
    reps = args.reps or (3 if args.quick else 10)
    import cupy
    import torch

    from fastlvm.kernels._cupy_tf32 import dot_precision as cupy_precision
    from fastlvm.kernels._triton_gaussian import dot_precision as triton_precision

    name = torch.cuda.get_device_name()
    lines = [f"# CuPy against Triton on {name}", "",
             f"Median of {reps} timed runs after a warm-up, one process, same data; "
             "ratio = CuPy / faster. float32 products: Triton "
             f"{triton_precision(torch.float32)}, CuPy {cupy_precision(np.float32)} "
             "(its log-densities beyond 64 components; the moments IEEE).", "",
             "| workload | Triton ms | CuPy ms | CuPy / faster | CuPy chunked ms |",
             "|---|---|---|---|---|"]
    # each row is printed as it is measured (estep_rows and em_rows yield them), so a
    # stage cut off by its timeout keeps the rows it finished
    for name, group in (("estep", estep_rows), ("em", em_rows), ("mppca", mppca_rows)):
        if name not in groups:
            continue
        for label, t_tr, t_cp, t_chunked in group(torch, cupy, args.quick, reps):
            chunked = "-" if t_chunked is None else f"{t_chunked:.2f}"
            print(f"{label}: Triton {t_tr:.2f} ms, CuPy {t_cp:.2f} ms, chunked {chunked}",
                  flush=True)
            lines.append(f"| {label} | {t_tr:.2f} | {t_cp:.2f} | "
                         f"{t_cp / min(t_tr, t_cp):.2f} | {chunked} |")
    if "fused" in groups:
        lines += ["", "Each backend's EM iteration, fused M-step (3-5 launches, one read) "
                  "against the unfused one (85-105 torch or 49-57 CuPy operations for the "
                  "M-step):", "",
                  "| workload | fused ms | unfused ms | unfused / fused |", "|---|---|---|---|"]
        for label, t_f, t_u in fused_rows(torch, cupy, args.quick, reps):
            print(f"{label}: fused {t_f:.3f} ms, unfused {t_u:.3f} ms", flush=True)
            lines.append(f"| {label} | {t_f:.3f} | {t_u:.3f} | {t_u / t_f:.2f} |")
    if "memory" in groups:
        label, b_tr, b_cp = memory_row(torch, cupy, args.quick)
        lines += ["", "| memory | Triton MiB | CuPy MiB |", "|---|---|---|",
                  f"| {label} | {b_tr / 2**20:.1f} | {b_cp / 2**20:.1f} |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

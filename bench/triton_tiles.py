"""Tile sizes of the Triton mixture E-step, timed on the device: data for tile_config.

    python bench/triton_tiles.py [--reps 10] [--flash] [--out FILE] [--smoke]

``tile_config``'s table (kernels/_triton_gaussian.py) was timed at Flash-GMM's
K = 1024.  At the EM workloads' small K its configs hold a lot of shared memory:
compiled for sm_90, the 'diag' statistics kernel at D = 32, K = 16, float32,
tf32x3 held 144.5 KiB per program at BLOCK_N = 128 with two stages (116.5 KiB
since the component tile is cut to K), so an H100/H200 runs one program of four
warps per SM, and the row splits (4 per SM, ``n_splits``) run in four waves.
The H200 profile had that kernel at 0.67 ms for N = 1M, D = 32, K = 16, against
0.19 ms for the log-normaliser kernel on the same rows.

For each workload this times ``_log_norm_kernel`` and the statistics kernel
(``_stats_kernel``; ``_full_stats_kernel`` for 'full') over candidate
(BLOCK_N, num_stages, num_warps) and, for the statistics, row splits per SM;
the table's own choice is marked ``*``.  Tile sizes fix the order of the sums,
so a new choice goes into the table (a fixed function of the shapes), never a
run-time autotuner.  Prints a markdown table; asserts nothing.

``--smoke`` runs two tiny workloads through Triton's interpreter on the CPU, to
check the script itself (set TRITON_INTERPRET=1).
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fastlvm.kernels import _triton_gaussian as tg
from fastlvm.kernels.estep_stats import _triton as es
from triton_check import make_params

# the side-by-side runner's EM workloads (float32); Flash-GMM's, whose row of the
# table was timed at its size already, with --flash.  About 14 compiles each.
WORKLOADS = (("diag", 1_000_000, 32, 16), ("spherical", 1_000_000, 32, 64),
             ("tied", 200_000, 32, 16), ("full", 200_000, 16, 32))
FLASH_GMM = (("spherical", 1_000_000, 128, 1024),)
SMOKE = (("diag", 300, 5, 3), ("full", 200, 4, 3))
CANDIDATES = ((32, 1, 4), (64, 1, 4), (64, 2, 4), (128, 1, 4), (128, 2, 4), (64, 1, 8))
SPLITS_PER_SM = (4, 8, 16)


def _timer(device):
    def median_ms(fn, reps):
        fn()  # compiles
        times = []
        for _ in range(reps):
            if device == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
            else:
                t = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t))
        return float(np.median(times))

    return median_ms


def _problem(cov, n, d, k, device):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((k, d)) * 4
    X = torch.as_tensor(centers[rng.integers(0, k, n)] + rng.standard_normal((n, d)),
                        dtype=torch.float32, device=device)
    pc = make_params(rng, cov, k, d)
    log_w = torch.full((k,), -np.log(k), dtype=torch.float64, device=device)
    return X, tg.GaussianTileParams(X, centers, pc, cov, log_w)


def _launch_log_norm(X, p, cfg, prec):
    n = X.shape[0]
    n_blocks = triton.cdiv(n, cfg.block_n)
    out = torch.empty(n, device=X.device, dtype=X.dtype)
    part = torch.empty(n_blocks, device=X.device, dtype=X.dtype)

    def run():
        tg._log_norm_kernel[(n_blocks,)](
            X, p.s, p.c0, p.a, p.b, p.s, p.c, p.u, out, part, n, p.n_features,
            p.n_components, X.stride(0), X.stride(1), COV=p.code, HAS_SW=False,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=p.block_d,
            BLOCK_J=cfg.block_j, PRECISION=prec, **cfg.launch())
    return run


def _launch_stats(X, p, lse, cfg, prec, per_sm, sms):
    n, k, bd = X.shape[0], p.n_components, p.block_d
    dev, dt = X.device, X.dtype
    if p.code == tg.FULL:
        bj = es.moment_block(bd, dt, cfg)
        others = k * (bd // bj)
    else:
        others = triton.cdiv(k, cfg.block_k)
    splits = max(1, min(triton.cdiv(n, cfg.block_n), -(-per_sm * sms // others), 1024))
    per = triton.cdiv(triton.cdiv(n, splits), cfg.block_n) * cfg.block_n
    splits = triton.cdiv(n, per)
    nk = torch.empty(splits, k, device=dev, dtype=dt)
    s1 = torch.empty(splits, k, bd, device=dev, dtype=dt)
    if p.code == tg.FULL:
        s2 = torch.empty(splits, k, bd, bd, device=dev, dtype=dt)

        def run():
            es._full_stats_kernel[(k, bd // bj, splits)](
                X, lse, lse, p.c0, p.a, p.c, p.u, nk, s1, s2, n, p.n_features, k, per,
                X.stride(0), X.stride(1), HAS_SW=False, BLOCK_N=cfg.block_n, BLOCK_D=bd,
                BLOCK_J=bj, PRECISION=prec, **cfg.launch())
        return run
    s2 = torch.empty((splits, k, bd) if p.code == tg.DIAG else (splits, k), device=dev,
                     dtype=dt)

    def run():
        es._stats_kernel[(others, splits)](
            X, lse, lse, p.c0, p.a, p.b, p.s, p.c, p.u, nk, s1, s2, n, p.n_features, k, per,
            X.stride(0), X.stride(1), COV=p.code, HAS_SW=False, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, BLOCK_D=bd, BLOCK_J=cfg.block_j, PRECISION=prec,
            **cfg.launch())
    return run


def _timed(median_ms, reps, make_run, *args):
    """Milliseconds of ``make_run(*args)()``, or the reason there are none (a config
    over the device's shared memory, say), so that one bad config leaves the sweep
    running."""
    from triton.runtime.errors import OutOfResources

    try:
        return f"{median_ms(make_run(*args), reps):.3f}"
    except OutOfResources:
        return "too big"
    except Exception as exc:
        return f"error: {type(exc).__name__}: {str(exc)[:80]}"


def sweep(workloads, candidates, splits_per_sm, reps, device):
    median_ms = _timer(device)
    sms = (torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda"
           else 2)
    prec = tg.dot_precision(torch.float32)
    lines = ["| workload | kernel | BLOCK_N, stages, warps | splits per SM | ms |",
             "|---|---|---|---|---|"]
    for cov, n, d, k in workloads:
        X, p = _problem(cov, n, d, k, device)
        table = tg.tile_config(p.code, X.dtype, p.block_d, prec, k)
        name = f"{cov} N={n:,} D={d} K={k}"
        lse = tg.log_norm(X, p)[0]
        configs = [table] + [table._replace(block_n=bn, num_stages=st, num_warps=w)
                             for bn, st, w in candidates
                             if (bn, st, w) != (table.block_n, table.num_stages,
                                                table.num_warps)]
        for cfg in configs:
            mark = "*" if cfg == table else ""
            tiles = f"{cfg.block_n}, {cfg.num_stages}, {cfg.num_warps}{mark}"
            if cov != "full":
                ms = _timed(median_ms, reps, _launch_log_norm, X, p, cfg, prec)
                lines.append(f"| {name} | log_norm | {tiles} | - | {ms} |")
            for per_sm in splits_per_sm:
                ms = _timed(median_ms, reps, _launch_stats, X, p, lse, cfg, prec, per_sm, sms)
                split_mark = "*" if per_sm == 4 else ""
                lines.append(f"| {name} | stats | {tiles} | {per_sm}{split_mark} | {ms} |")
            print("\n".join(lines[-(len(splits_per_sm) + (cov != "full")):]), flush=True)
        del X, p, lse
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--flash", action="store_true",
                        help="also Flash-GMM's workload (N=1M, D=128, K=1024)")
    parser.add_argument("--out", help="also write the table here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny workloads on the CPU through the interpreter")
    args = parser.parse_args()
    if args.smoke:
        table = sweep(SMOKE, ((16, 1, 4),), (4,), 1, "cpu")
    else:
        print(f"device: {torch.cuda.get_device_name(0)}, triton {triton.__version__}",
              flush=True)
        workloads = WORKLOADS + (FLASH_GMM if args.flash else ())
        table = sweep(workloads, CANDIDATES, SPLITS_PER_SM, args.reps, "cuda")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()

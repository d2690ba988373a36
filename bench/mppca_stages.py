"""Where the MixtureOfPPCA E-step's time goes: its tile loop, stage by stage.

    python bench/mppca_stages.py [--rows N] [--dtype float32|float64] [--fitted]

Runs the fused kernel's per-tile stages (the same functions ``mppca_stats`` calls)
over N rows of the benchmark's data (D = 64, K = 16, q = 4), on one thread,
switching the stages on one at a time: 0 the tile copy, 1 + the log-densities,
2 + the normaliser (log-sum-exp and responsibilities), 3 + the statistics.  Each
line gives the cumulative best of 3 and the stage's increment.  A fifth line
times the pruned tile path instead (``kernels/mppca_stats/_numba_pruning.py``:
anchors, per-component blocks, the dense pass for the rows it leaves; on the
kernel's larger tiles for it), with the count of those rows, and the next the
same path with anchor hints, as an EM iteration after the first finds them (the
last pass's anchors; no nearest-mean search).  Single-thread
figures move by tens of percent on a shared machine: compare runs made side by
side, never across days.  No assertion on timings.
"""

import argparse
import os
import sys
import time

import numba
import numpy as np

# run as a script, bench/ is on sys.path already; asv imports this module as
# bench.mppca_stages while it discovers benchmarks, and then it is not
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from latent_linear_vs_peers import mppca_data  # noqa: E402

from fastlvm._config import tile_rows
from fastlvm.kernels._numba_support import load_tile_transposed
from fastlvm.kernels.log_responsibilities._numba import normalise_tile
from fastlvm.kernels.mppca_log_prob._numba import (LOW_RANK_TILE_BYTES, LowRankTileParams,
                                                   low_rank_log_prob_tile)
from fastlvm.kernels.mppca_stats._numba import _tile_low_rank_stats, tile_scratch
from fastlvm.kernels.mppca_stats._numba_pruning import (PRUNE_TILE_FACTOR, PruningParams,
                                                        pruned_tile_stats, pruning_scratch)

STAGES = ("tile copy", "log-densities", "normaliser", "statistics", "pruned path",
          "pruned path, hinted anchors")


@numba.njit
def _run(stage, X, hints, const, means, whitened, inv_noise, whitened64, chol_inv_t,
         inv_noise64, cancel, centres_t, shift, centre_sq, gap, inv_sd, nats, whitened_t,
         max_survivors, pulls, tile):
    """The kernel's tile loop up to ``stage`` (4: the pruned path; 5: the same
    with anchor hints, read and written in ``hints``); returns a checksum of its
    outputs and the rows the pruned path left to the dense one."""
    n = X.shape[0]
    n_comp, dp = means.shape
    qp = whitened.shape[2]
    xT, cT, uT, wuT, ucT, idx, sq, logp, resp, mx, y = tile_scratch(X, n_comp, dp, qp, tile)
    nk = np.zeros(n_comp)
    first = np.zeros((n_comp, dp))
    sum_sq = np.zeros(n_comp)
    sum_u = np.zeros((n_comp, qp))
    cross = np.zeros((n_comp, dp, qp))
    u_second = np.zeros((n_comp, qp, qp))
    sw = np.ones(1)
    pscratch = pruning_scratch(X, n_comp, centres_t.shape[1], dp, qp, X.shape[1], tile,
                               max_survivors)
    dirty_weight = np.empty(tile)
    loglik = 0.0
    n_dirty = 0
    for r0 in range(0, n, tile):
        nb = min(tile, n - r0)
        if stage < 4:  # the pruned path reads its tile itself
            load_tile_transposed(X, r0, nb, xT)
        else:
            ll, nb, _, _ = pruned_tile_stats(
                X, r0, xT, nb, sw, False, hints, stage == 5, const, means, whitened, inv_noise,
                whitened64, chol_inv_t, inv_noise64, cancel, centres_t, shift, centre_sq, gap,
                inv_sd, nats, whitened_t, max_survivors, pulls, pscratch, dirty_weight, nk,
                first, sum_sq, sum_u, cross, u_second)
            loglik += ll
            n_dirty += nb
        if stage >= 1:
            low_rank_log_prob_tile(xT, nb, const, means, whitened, inv_noise, whitened64,
                                   chol_inv_t, inv_noise64, cancel, uT, sq, logp)
        if stage >= 2:
            loglik += normalise_tile(logp, nb, mx, y, sw, r0, False, resp)
        if stage >= 3:
            _tile_low_rank_stats(xT, nb, resp, means, uT, sq, cT, wuT, ucT, idx, nk, first,
                                 sum_sq, sum_u, cross, u_second)
    return loglik + nk.sum(), n_dirty


def benchmark_data(n, dtype, seed=0, d=64, k=16, q=4, fitted=False):
    """The MixtureOfPPCA benchmark's data (``latent_linear_vs_peers.mppca_data``) and
    parameters near its generating ones, or (``fitted``) those of the benchmark's
    state: two EM iterations from k-means, which leave one cluster split between
    two components (their rows dirty)."""
    X, centres, comps = mppca_data(n, d, k, q, np.random.default_rng(seed))
    X = X.astype(dtype)
    if fitted:
        import warnings

        from fastlvm import MixtureOfPPCA

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # max_iter reached
            m = MixtureOfPPCA(k, n_latent=q, max_iter=2, random_state=0).fit(X)
        params = LowRankTileParams(m.means_, m.components_, m.noise_variance_, X.dtype)
        return X, params, params.const + np.log(m.weights_)
    params = LowRankTileParams(centres + 0.1, comps * 1.1, np.full(k, 0.3), X.dtype)
    return X, params, params.const + np.log(np.full(k, 1 / k))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--fitted", action="store_true",
                        help="the benchmark's parameters after its two EM iterations")
    args = parser.parse_args()
    X, params, const = benchmark_data(args.rows, args.dtype, fitted=args.fitted)
    numba.set_num_threads(1)
    tile = tile_rows(params.means.shape[1], X.dtype.itemsize, LOW_RANK_TILE_BYTES)
    prune = PruningParams(params, X.shape[1])
    prev = 0.0
    for stage, name in enumerate(STAGES):
        # the kernel gives the pruned path PRUNE_TILE_FACTOR times the rows
        stage_tile = tile * (PRUNE_TILE_FACTOR if stage >= 4 else 1)
        kernel_args = (const, *params.kernel_args(), *prune.kernel_args(), stage_tile)
        hints = np.full(X.shape[0], -1, dtype=np.int32)
        _run(stage, X[:stage_tile], hints, *kernel_args)  # compile outside the timing
        if stage == 5:  # the hints an EM iteration finds: the last pass's anchors
            _run(stage, X, hints, *kernel_args)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            check = _run(stage, X, hints, *kernel_args)
            times.append(time.perf_counter() - t)
        best = min(times)
        check, n_dirty = check
        if stage < 4:
            print(f"{args.dtype} stage {stage} (+ {name}): {best * 1e3:7.1f} ms "
                  f"(+{(best - prev) * 1e3:6.1f})  checksum {check:.6g}", flush=True)
        else:
            print(f"{args.dtype} {name}, all stages: {best * 1e3:7.1f} ms  checksum "
                  f"{check:.6g}, {n_dirty} rows to the dense pass", flush=True)
        prev = best


if __name__ == "__main__":
    main()

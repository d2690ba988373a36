"""The CuPy E-step's tile kernels against its chunked path, over their launch shapes.

    python bench/cupy_tiles.py [--reps 10] [--out FILE] [--smoke]

``kernels/estep_stats/_cupy_tiles.py`` takes the E-step of a mixture with few
components (K <= MAX_COMPONENTS) through one kernel (two for 'full') instead of
the chunked cuBLAS path, in runs of tiles of up to ROWS_PER_TILE rows, at most
MAX_BLOCKS runs ('full''s ``full_moments`` takes up to THREADS rows a tile and
MAX_BLOCKS / K runs).  Those constants were set without a GPU.  For the EM workloads of the
side-by-side runner (float32) this times ``estep_sums``, the call of a fused EM
iteration, on the chunked path and on the tile kernels for each (rows per tile,
MAX_BLOCKS) below (the module's own marked ``*``), in device milliseconds (median
of --reps after a warm-up, CUDA events).  The plan is a fixed function of the
shapes, so a new choice is a new constant, never a run-time tuner.  Prints a
markdown table; asserts nothing.

Then, at the module's own launch shape, the tile kernels built for more blocks an
SM (``BLOCKS_PER_SM``): NVRTC ``-DESTEP_MIN_BLOCKS=b``, the minimum in
``estep_tiles``' ``__launch_bounds__`` (2 by default), and ``--maxrregcount`` of
65536 / (256 b) rounded down to 8 for the 'full' kernels, which have no bounds.
nvcc 13.0's sm_90 build of ``estep_tiles<float>`` holds 128 registers a thread at
2 blocks, the most its bounds allow (the first kernel held 117): 16 of 64 warps, though its
48 KB of shared memory would admit four blocks.  At 3 it holds 80 (68 bytes
spilled), at 4, 64 (144 bytes); ``full_moments<float>`` holds 96 (two blocks; 60 and
212 bytes spilled at 80 and 64), ``full_log_norm<float>`` 55.  On an H200 the first
kernels took 1.11 ms for a 'diag' E-step of 1M x 32 rows at K = 16 ('full': 4.36 +
8.75 ms) against 0.27 ms for Triton's whole 'diag' EM iteration
(``bench/results/gpu-h200.md``, session 60).

``--smoke`` runs two tiny workloads on the CPU, through the CUDA emulator of
tests/kernels/cuda_emulator.py and the NumPy-backed cupy of tests/kernels/fake_cupy.py,
to check the script itself.
"""

import argparse
import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _patched import attributes_set  # noqa: E402
from _timing import cupy_ms, median_ms  # noqa: E402

WORKLOADS = (("diag", 1_000_000, 32, 16), ("spherical", 1_000_000, 32, 16),
             ("tied", 1_000_000, 32, 16), ("full", 1_000_000, 32, 16),
             ("spherical", 1_000_000, 32, 64), ("diag", 1_000_000, 64, 16))
SMOKE = (("diag", 300, 5, 3), ("full", 200, 4, 3))
ROWS = (32, 64, 128)  # ROWS_PER_TILE tried
MAX_BLOCKS = (264, 528, 1024, 2112)
BLOCKS_PER_SM = (3, 4)  # builds of the tile kernels for more blocks an SM (module doc)


def _timer(device):
    return cupy_ms if device == "cuda" else median_ms


def _timed(median_ms, reps, run):
    """Milliseconds of ``run()``, or why there are none, so one bad shape leaves the
    sweep running."""
    try:
        return f"{median_ms(run, reps):.3f}"
    except Exception as exc:  # noqa: BLE001 - a diagnostic table, not a library path
        return f"error: {type(exc).__name__}: {str(exc)[:80]}"


def occupancy_options(blocks, threads):
    """NVRTC options that build the tile kernels for ``blocks`` blocks of ``threads``
    an SM: the launch bounds' minimum, and the register cap it implies (an SM's
    65,536 registers shared out, in the allocation's steps of 8)."""
    return (f"-DESTEP_MIN_BLOCKS={blocks}",
            f"--maxrregcount={65536 // (threads * blocks) // 8 * 8}")


def sweep(cupy, workloads, tile_rows, max_blocks, reps, device, blocks_per_sm=()):
    from triton_check import make_params

    from fastlvm.kernels._cupy_gaussian import ExpandedParams
    from fastlvm.kernels._cupy_source import CudaSource
    from fastlvm.kernels.estep_stats import _cupy as es
    from fastlvm.kernels.estep_stats import _cupy_tiles as tiles

    median_ms = _timer(device)
    own = (tiles.ROWS_PER_TILE, tiles.MAX_BLOCKS)
    kernels = tiles.ESTEP_KERNELS
    capped = {blocks: CudaSource(kernels.file_name, kernels.kernel_names,
                                 kernels.options + occupancy_options(blocks, tiles.THREADS))
              for blocks in blocks_per_sm}
    lines = ["| workload | path | rows per tile | MAX_BLOCKS | ms |", "|---|---|---|---|---|"]
    for cov, n, d, k in workloads:
        rng = np.random.default_rng(0)
        centers = rng.standard_normal((k, d)) * 4
        X = cupy.asarray((centers[rng.integers(0, k, n)]
                          + rng.standard_normal((n, d))).astype(np.float32))
        params = ExpandedParams(np.float32, centers, make_params(rng, cov, k, d), cov,
                                np.full(k, -np.log(k)))
        name = f"{cov} N={n:,} D={d} K={k}"
        run = functools.partial(es.estep_sums, X, params)
        with attributes_set(tiles, MAX_COMPONENTS=0):
            ms = _timed(median_ms, reps, run)
        lines.append(f"| {name} | chunked | - | - | {ms} |")
        for rows in tile_rows:
            for blocks in max_blocks:
                with attributes_set(tiles, ROWS_PER_TILE=rows, MAX_BLOCKS=blocks):
                    plan = tiles.tile_plan(n, k, d, cov, np.float32)
                    ms = "no plan" if plan is None else _timed(median_ms, reps, run)
                mark = "*" if (rows, blocks) == own else ""
                lines.append(f"| {name} | tiles | {rows}{mark} | {blocks}{mark} | {ms} |")
        for per_sm, source in capped.items():
            with attributes_set(tiles, ESTEP_KERNELS=source):
                ms = _timed(median_ms, reps, run)
            lines.append(f"| {name} | tiles, built for {per_sm} blocks an SM | {own[0]} | "
                         f"{own[1]} | {ms} |")
        print("\n".join(lines[-(1 + len(tile_rows) * len(max_blocks) + len(capped)):]),
              flush=True)
        del X, params, run
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", help="also write the table here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny workloads on the CPU through the CUDA emulator")
    args = parser.parse_args()
    if args.smoke:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tests.kernels import fake_cupy

        cupy = sys.modules["cupy"] = fake_cupy.fake_cupy()
        table = sweep(cupy, SMOKE, (32,), (2, 1024), 1, "cpu", (4,))
    else:
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        print(f"device: {name}, cupy {cupy.__version__}", flush=True)
        table = sweep(cupy, WORKLOADS, ROWS, MAX_BLOCKS, args.reps, "cuda",
                      BLOCKS_PER_SM)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()

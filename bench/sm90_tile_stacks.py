"""Registers and stack of the Triton mixture kernels' sm_90 builds over candidate tiles.

    python bench/sm90_tile_stacks.py gaussian D [--dtype float32] [--precision tf32x3]
        [--cov full ...] [--tiles BLOCK_N,BLOCK_K,BLOCK_J,WARPS ...]
    python bench/sm90_tile_stacks.py mppca D [--dtype float32] [--q 4 ...]
        [--tiles BLOCK_N,[BLOCK_F,]WARPS ...]

Compiles, runs nothing, needs no GPU: each launch of ``gaussian_log_prob_triton``
and of ``estep_stats_triton`` (K = 5 and 19, the one-pass and the chunked paths), or of
``low_rank_log_norm`` and ``mppca_stats_triton``, goes through
``tests/kernels/sm90_launches.py``'s sm_90 driver with the tile table
(``_triton_gaussian._table_config`` and, for 'full' and 'tied''s scatter past 256
padded features, ``_triton_square_blocks.square_block_configs``;
``_triton_low_rank.low_rank_config`` and ``row_pass_config``, and past 128 padded
features ``_triton_low_rank_wide.wide_configs``) replaced by each
candidate in turn, the table's own first.
Prints a line per candidate: each launch's kernel, tiles, registers and stack bytes
per thread (``cuobjdump -res-usage``).  Stack beyond a few bytes is spilled
registers; a build of 32 registers and kilobytes of stack keeps its tiles in local
memory.  This is how the 16-row tiles of 256 padded features and of the MPPCA row
kernels at BLOCK_D = 128, BLOCK_Q = 32 were chosen (``bench/results/sm90-spills.md``).
A compile-time measure: a tile's speed is ``bench/triton_tiles.py``'s, on a GPU.
"""

import argparse
import os
import sys

_SHOWN = ("BLOCK_N", "BLOCK_K", "BLOCK_J", "BLOCK_M", "BLOCK_R", "BLOCK_F", "PASS",
          "num_warps")
_launches = []  # main() puts sm90_launches' record here (``Launch`` each)


def _usage(run):
    """``run()``'s launches as 'kernel[tiles] <registers>r/<stack>B', or the error."""
    first = len(_launches)
    try:
        run()
    except Exception as exc:  # a candidate past the shared memory: say so, go on
        return f"{type(exc).__name__}: {str(exc)[:80]}"
    found = []
    for launch in _launches[first:]:
        tiles = ",".join(f"pass {v}" if k == "PASS" else f"{v}"
                         for k, v in launch.tiles.items() if k in _SHOWN)
        usage = "?" if launch.usage is None else "{}r/{}B".format(*launch.usage)
        found.append(f"{launch.kernel.strip('_').removesuffix('_kernel')}[{tiles}] {usage}")
    return "; ".join(found)


def gaussian(d, dtype, covs, candidates, weighted=False):
    import numpy as np
    import torch

    from fastlvm.kernels import _triton_gaussian as tg
    from fastlvm.kernels.estep_stats import _triton_square_blocks as sb
    from fastlvm.kernels.estep_stats._triton import estep_stats_triton
    from fastlvm.kernels.gaussian_log_prob._triton import gaussian_log_prob_triton

    from _tile_tables import tables_replaced  # bench/, the script's directory

    rng = np.random.default_rng(0)
    for cov in covs:
        for k in (5, 19):
            X = torch.from_numpy((rng.standard_normal((300, d)) + 5).astype(dtype))
            means = X[:k].double().numpy() + 0.3
            pc = {"full": np.broadcast_to(np.eye(d), (k, d, d)).copy(), "tied": np.eye(d),
                  "diag": np.ones((k, d)), "spherical": np.ones(k)}[cov]
            sw = torch.from_numpy(rng.random(300) * 2)
            for cand in [None] + candidates:
                cfg = None if cand is None else tg.TileConfig(*cand, 1)
                swap = ({} if cand is None else
                        {(tg, "_table_config"): lambda code, f64, bd, precision, c=cfg: c,
                         # 'full''s chunks and 'tied''s scatter on wide rows
                         (sb, "square_block_configs"): lambda dtype, c=cfg: (c, c)})
                # each entry point on its own: one refused leaves the other's line
                with tables_replaced(swap):
                    line = " | ".join((
                        "log_prob: " + _usage(lambda: gaussian_log_prob_triton(X, means, pc,
                                                                               cov)),
                        "estep: " + _usage(lambda: estep_stats_triton(
                            X, np.full(k, 1 / k), means, pc, cov,
                            sample_weight=sw if weighted else None))))
                print(f"{cov} K={k} {'table' if cand is None else cand}: {line}", flush=True)


def mppca(d, dtype, qs, candidates):
    import numpy as np
    import torch

    from fastlvm.kernels import _triton_gaussian as tg
    from fastlvm.kernels import _triton_low_rank as lr
    from fastlvm.kernels.mppca_stats._triton import mppca_stats_triton

    from _tile_tables import low_rank_tables, tables_replaced  # bench/

    rng = np.random.default_rng(0)
    for q in qs:
        X = torch.from_numpy(rng.standard_normal((300, d)).astype(dtype))
        means, comp = rng.standard_normal((5, d)), rng.standard_normal((5, q, d)) * 0.3
        for cand in [None] + candidates:
            # BLOCK_N, [BLOCK_F,] WARPS; the feature step only matters past 128 features
            swap = ({} if cand is None else low_rank_tables(
                lr, tg.TileConfig(cand[0], 16, cand[1] if len(cand) == 3 else 64, cand[-1], 1)))
            with tables_replaced(swap):
                line = _usage(lambda: mppca_stats_triton(X, np.full(5, 0.2), means, comp,
                                                         np.ones(5)))
            print(f"q={q} {'table' if cand is None else cand}: {line}", flush=True)


def _ints(text):
    return tuple(int(v) for v in text.split(","))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=("gaussian", "mppca"))
    parser.add_argument("d", type=int, help="the feature count")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--precision", choices=("tf32x3", "tf32", "ieee"),
                        help="float32 products (FASTLVM_TRITON_PRECISION)")
    parser.add_argument("--cov", action="append", choices=("full", "tied", "diag", "spherical"))
    parser.add_argument("--q", action="append", type=int)
    parser.add_argument("--sample-weight", action="store_true",
                        help="gaussian: the E-step with sample weights (other builds)")
    parser.add_argument("--tiles", action="append", type=_ints, default=[],
                        help="a candidate: BLOCK_N,BLOCK_K,BLOCK_J,WARPS (gaussian) or "
                             "BLOCK_N,[BLOCK_F,]WARPS (mppca; BLOCK_F: the feature step past "
                             "128 features, 64 if not given); repeatable")
    args = parser.parse_args(argv)
    want = (4,) if args.family == "gaussian" else (2, 3)
    if any(len(t) not in want for t in args.tiles):
        parser.error(f"--tiles takes {' or '.join(map(str, want))} integers for {args.family}")
    if args.precision:
        os.environ["FASTLVM_TRITON_PRECISION"] = args.precision
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    from tests.kernels.sm90_launches import _fake_sm90

    os.environ.pop("TRITON_INTERPRET", None)
    global _launches
    _launches = _fake_sm90(quiet=True)
    import numpy as np

    dtype = np.dtype(args.dtype).type
    if args.family == "gaussian":
        gaussian(args.d, dtype, args.cov or ["full", "tied", "diag", "spherical"], args.tiles,
                 args.sample_weight)
    else:
        mppca(args.d, dtype, args.q or [4, 20], args.tiles)


if __name__ == "__main__":
    main()

"""Tile sizes of the Triton mixture E-step, timed on the device: data for tile_config.

    python bench/triton_tiles.py [--reps 10] [--flash] [--chunked | --mppca | --square]
        [--workload ...] [--out FILE] [--smoke]

``tile_config``'s table (kernels/_triton_gaussian.py) was timed at Flash-GMM's
K = 1024.  At the EM workloads' small K its configs hold a lot of shared memory:
compiled for sm_90, the 'diag' statistics kernel at D = 32, K = 16, float32,
tf32x3 held 144.5 KiB per program at BLOCK_N = 128 with two stages (116.5 KiB
since the component tile is cut to K), so an H100/H200 runs one program of four
warps per SM, and the row splits (4 per SM, ``n_splits``) run in four waves.
The H200 profile had that kernel at 0.67 ms for N = 1M, D = 32, K = 16, against
0.19 ms for the log-normaliser kernel on the same rows.

For each workload this times ``log_norm`` and ``launch_moments`` (the statistics
kernel, ``_stats_kernel`` or ``_full_stats_kernel`` for 'full'), the calls
``estep_stats_triton`` makes, over candidate (BLOCK_N, num_stages, num_warps),
the table's tiles under register caps (``REGISTER_CAPS``, Triton's ``maxnreg``:
more programs an SM, some spills) and, for the statistics, row splits per SM;
the table's own choice is marked ``*``.  Where one component tile holds every
component, it also times the one-pass statistics kernel ("stats, one pass"),
which ``estep_stats_triton`` runs there instead of ``log_norm`` followed by
"stats": compare it with the sum of those two rows.  Tile sizes fix the order of
the sums, so a new choice goes into the table (a fixed function of the shapes),
never a run-time autotuner.  Prints a markdown table; asserts nothing.

``--chunked`` times the large-K path's moments kernel instead
(``_triton_chunked.py``, Flash-GMM's N = 1M, D = 128, K = 1024, 'spherical' and
'diag'): its table's config and candidate (rows, components, feature block)
tiles on the first chunk's stored log-densities, scaled to the E-step's chunks.
The log-density kernel's tiles are those of a plain GEMM and stay.

``--workload COV:N:D:K`` (repeatable) sweeps those Gaussian workloads instead,
for instance ``diag:1000000:128:16``, where the one-pass statistics kernel spills
a kilobyte in sm_90 builds (``bench/results/sm90-spills.md``).

``--mppca`` times the mixture of PPCA's whole E-step (``mppca_stats_triton``:
the log-normaliser and statistics kernels, float32's two passes each) over
candidate (BLOCK_N, num_warps) of ``low_rank_config`` and ``row_pass_config``,
whose float32 statistics kernel still spills 0.2-0.8 KB at D = 64 to 128 in
those builds, and of the wide rows' tables at D = 784; rows of at most 128
padded features also through the wide rows' kernels; ``--workload N:D:K:Q``
picks its shapes.

``--square`` times the wide rows' 'full' and 'tied' E-steps
(``_triton_square_blocks.py``, D = 300 and 768, K = 16) at candidate row tiles of
the block-pair moments kernel (and 'tied''s scatter): at 64 rows Triton 3.6's
float32 build of 'full''s moments keeps 288 bytes of stack, at 32 none.

``--smoke`` runs tiny workloads through Triton's interpreter on the CPU, to
check the script itself (set TRITON_INTERPRET=1).
"""

import argparse
import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _patched import attributes_set  # noqa: E402
from _tile_tables import low_rank_tables, tables_replaced  # noqa: E402
from _timing import median_ms, torch_cuda_ms  # noqa: E402
from triton_check import make_params  # noqa: E402

# asv imports every module of bench/ to find its benchmarks, in an environment
# without torch: there the imports below fail and a run of the script re-raises
_MISSING = None
try:
    import torch
    import triton

    from fastlvm.kernels import _triton_gaussian as tg
    from fastlvm.kernels.estep_stats import _triton as es
except ImportError as exc:
    _MISSING = exc
    torch = triton = tg = es = None

# the side-by-side runner's EM workloads (float32); Flash-GMM's, whose row of the
# table was timed at its size already, with --flash.  About 14 compiles each.
WORKLOADS = (("diag", 1_000_000, 32, 16), ("spherical", 1_000_000, 32, 64),
             ("tied", 200_000, 32, 16), ("full", 200_000, 16, 32))
FLASH_GMM = (("spherical", 1_000_000, 128, 1024),)
SMOKE = (("diag", 300, 5, 3), ("full", 200, 4, 3))
CANDIDATES = ((32, 1, 4), (64, 1, 4), (64, 2, 4), (128, 1, 4), (128, 2, 4), (64, 1, 8))
# register caps (maxnreg) tried at the table's tiles: the one-pass statistics kernel holds
# 224-255 registers at these workloads (sm_90 builds, Triton 3.9), two 128-thread
# programs an SM; 168 admits three (spilling 80 bytes for 'diag'), 128 four (288)
REGISTER_CAPS = (168, 128)
SPLITS_PER_SM = (4, 8, 16)
# the mixture of PPCA's (N, D, K, q): cupy_vs_triton.py's E-step, and wider rows
MPPCA = ((1_000_000, 64, 16, 4), (1_000_000, 32, 16, 4), (500_000, 128, 16, 4),
         (500_000, 128, 16, 20), (250_000, 784, 16, 4))
MPPCA_SMOKE = ((300, 20, 3, 2), (40, 200, 3, 2))
MPPCA_CANDIDATES = ((16, 4), (32, 4), (64, 4), (16, 8), (32, 8), (64, 8))
# candidates the fused kernels (rows of at most 128 padded features) are not run at:
# (64 rows, 8 warps) hit "illegal memory access" on the H200 inside this sweep at
# D = 32 (session 58) and D = 128 (session 59), which poisoned the context and ended
# the sweep; alone, and under compute-sanitizer at N = 300, it ran cleanly.  Not found
FUSED_MPPCA_CRASHES = {(64, 8)}
# the wide rows' MPPCA kernels (``_triton_low_rank_wide.py``) at MNIST's width: the
# log-densities' (BLOCK_M, BLOCK_KT, BLOCK_F, warps, stages) and the statistics'
# (BLOCK_R, BLOCK_F, warps, stages, row splits per SM), each swept with the other at
# its table (the first of each list: session 59's table at q = 4).  Registers and
# stack of the sm_90 builds (Triton 3.9, D = 300, q = 4 / 20): log-densities 64 rows x
# 64 features x 4 warps 255r/216B / 255r/488B, 64 x 32 x 4 (the table) 250r/0B /
# 226r/0B, 32 x 64 x 4 254r/0B / 255r/192B; statistics 64 x 64 x 4 (the table)
# 186r/0B / 235r/0B; at D = 784, 128 x 64 x 4 spills 136 / 632 bytes
WIDE_MPPCA = ((250_000, 784, 16, 4), (250_000, 784, 16, 20))
WIDE_MPPCA_SMOKE = ((40, 200, 3, 2),)
WIDE_LOG_PROB = ((32, 8, 32, 8, 1), (64, 8, 64, 4, 1), (64, 8, 32, 4, 2), (32, 8, 64, 4, 1),
                 (64, 16, 32, 4, 1), (64, 8, 64, 4, 2), (64, 8, 64, 8, 1), (128, 8, 64, 8, 1),
                 (64, 8, 128, 4, 1))
WIDE_STATS = ((64, 64, 8, 1, 4), (64, 64, 4, 2, 4), (64, 64, 4, 1, 16), (64, 64, 4, 2, 8),
              (64, 64, 4, 2, 16), (64, 64, 4, 3, 16), (32, 64, 4, 2, 16), (128, 64, 8, 2, 16),
              (64, 128, 4, 2, 16), (64, 32, 4, 2, 16), (64, 64, 4, 2, 32))
# the wide rows' square blocks: 'full' and 'tied' past 256 padded features
SQUARE = (("full", 1_000_000, 300, 16), ("tied", 1_000_000, 300, 16),
          ("full", 400_000, 768, 16), ("tied", 400_000, 768, 16))
SQUARE_SMOKE = (("full", 70, 300, 3), ("tied", 70, 300, 3))
SQUARE_ROWS = (64, 32)
CHUNKED = (("spherical", 1_000_000, 128, 1024), ("diag", 1_000_000, 128, 1024))
CHUNKED_SMOKE = (("spherical", 300, 20, 40), ("diag", 300, 20, 40))
# (BLOCK_R, BLOCK_K, BLOCK_F, num_warps, num_stages), float32 at BLOCK_D = 128; the
# compiler's registers for sm_90 (tf32x3) in the comments: 32 x 32 over all features is
# the session-33 table (mma.sync), the rest take wgmma
CHUNK_CANDIDATES = ((32, 32, 128, 8, 2),  # 'diag' 252, 'spherical' 190
                    (32, 64, 64, 8, 2),   # 224, 156
                    (32, 64, 128, 8, 2),  # 'diag' spills 400 bytes; 'spherical' 220
                    (64, 64, 64, 8, 2),   # 'diag' spills 232 bytes; 188
                    (32, 128, 32, 8, 2),  # 208, 185
                    (32, 128, 64, 8, 2))  # 'diag' spills 40 bytes; 244


def _timer(device):
    return torch_cuda_ms if device == "cuda" else median_ms


def _problem_arrays(cov, n, d, k, device):
    """(X (n, d) float32 on ``device``, centers (k, d), precisions' Cholesky factors)."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((k, d)) * 4
    X = torch.as_tensor(centers[rng.integers(0, k, n)] + rng.standard_normal((n, d)),
                        dtype=torch.float32, device=device)
    return X, centers, make_params(rng, cov, k, d)


def _problem(cov, n, d, k, device):
    X, centers, pc = _problem_arrays(cov, n, d, k, device)
    log_w = torch.full((k,), -np.log(k), dtype=torch.float64, device=device)
    return X, tg.GaussianTileParams(X, centers, pc, cov, log_w)


def _timed(median_ms, reps, run):
    """Milliseconds of ``run()``, or the reason there are none (a config over the
    device's shared memory, say), so that one bad config leaves the sweep running."""
    from triton.runtime.errors import OutOfResources

    try:
        return f"{median_ms(run, reps):.3f}"
    except OutOfResources:
        return "too big"
    except Exception as exc:  # noqa: BLE001 - a diagnostic table, not a library path
        return f"error: {type(exc).__name__}: {str(exc)[:80]}"


def sweep(workloads, candidates, splits_per_sm, reps, device):
    median_ms = _timer(device)
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
        configs += [table._replace(maxnreg=cap) for cap in REGISTER_CAPS]
        for cfg in configs:
            mark = "*" if cfg == table else ""
            cap = "" if cfg.maxnreg is None else f", maxnreg {cfg.maxnreg}"
            tiles = f"{cfg.block_n}, {cfg.num_stages}, {cfg.num_warps}{cap}{mark}"
            if cov != "full":
                ms = _timed(median_ms, reps, functools.partial(tg.log_norm, X, p, None, cfg))
                lines.append(f"| {name} | log_norm | {tiles} | - | {ms} |")
            one_pass = es.one_pass_applies(p.code, k, cfg)
            for per_sm in splits_per_sm:
                split_mark = "*" if per_sm == tg.moment_splits_per_sm(p.code, X.dtype) else ""
                for kernel, given in (("stats", lse), ("stats, one pass", None))[:1 + one_pass]:
                    ms = _timed(median_ms, reps, functools.partial(
                        es.launch_moments, X, None, given, p, cfg, prec, per_sm))
                    lines.append(f"| {name} | {kernel} | {tiles} | {per_sm}{split_mark} | {ms} |")
            print("\n".join(lines[-((1 + one_pass) * len(splits_per_sm) + (cov != "full")):]),
                  flush=True)
        del X, p, lse
    return "\n".join(lines)


def _mppca_problem(n, d, k, q, device):
    """(X, run): float32 rows of K well-separated components on ``device`` and
    ``run()``, their mixture-of-PPCA E-step (``mppca_stats_triton``) left on the
    device."""
    from fastlvm.kernels.mppca_stats import _triton as ms

    rng = np.random.default_rng(0)
    means = rng.standard_normal((k, d)) * 4
    components = rng.standard_normal((k, q, d))
    X = torch.as_tensor(means[rng.integers(0, k, n)] + rng.standard_normal((n, d)),
                        dtype=torch.float32, device=device)
    return X, functools.partial(ms.mppca_stats_triton, X, np.full(k, 1.0 / k), means,
                                components, np.ones(k), keep_on_device=True)


def mppca_sweep(workloads, candidates, reps, device):
    """The mixture of PPCA's E-step (``mppca_stats_triton``) at its own tile tables
    (marked *; the statistics kernel's tiles shown), then with ``low_rank_config``
    and ``row_pass_config`` (the statistics' and the log-normaliser's tiles), or past
    128 padded features both of ``wide_configs``, replaced by each candidate
    (BLOCK_N, num_warps) in turn.  Rows of at most 128 padded features are also
    timed through the wide rows' kernels (``_triton_low_rank_wide.py``, at their
    table): on an H200 at D = 64, q = 4 they took 31.8 ms against the fused
    kernels' 12.4 (``bench/results/gpu-h200.md``, session 58)."""
    from fastlvm.kernels import _triton_low_rank as lr
    from fastlvm.kernels import _triton_low_rank_wide as wide

    median_ms = _timer(device)
    lines = ["| workload | BLOCK_N, warps | ms |", "|---|---|---|"]
    for n, d, k, q in workloads:
        X, run = _mppca_problem(n, d, k, q, device)
        is_wide = wide.wide_low_rank_rows(tg.block_d(d))
        table = (wide.wide_configs(X.dtype, tg.block_d(d), tg.block_d(q))[1] if is_wide
                 else lr.low_rank_config(X.dtype, tg.block_d(d)))
        workload = f"N={n:,} D={d} K={k} q={q}"
        configs = [table] + [table._replace(block_n=bn, num_warps=w) for bn, w in candidates
                             if (bn, w) != (table.block_n, table.num_warps)]
        for cfg in configs:
            if not is_wide and (cfg.block_n, cfg.num_warps) in FUSED_MPPCA_CRASHES:
                t = "skipped (FUSED_MPPCA_CRASHES)"
            else:
                with tables_replaced({} if cfg == table else low_rank_tables(lr, cfg)):
                    t = _timed(median_ms, reps, run)
            mark = "*" if cfg == table else ""
            lines.append(f"| {workload} | {cfg.block_n}, {cfg.num_warps}{mark} | {t} |")
            print(lines[-1], flush=True)
        if not is_wide:
            with attributes_set(wide, FUSED_MAX_BLOCK_D=8), tables_replaced({}):
                t = _timed(median_ms, reps, run)
            lines.append(f"| {workload} | wide rows' kernels* | {t} |")
            print(lines[-1], flush=True)
        del X
    return "\n".join(lines)


def wide_mppca_sweep(workloads, log_prob_tiles, stats_tiles, reps, device, first=None):
    """The mixture of PPCA's whole float32 E-step (``mppca_stats_triton``) on wide
    rows at the tables of ``wide_configs`` (marked *), then with the log-density
    kernel's tiles replaced by each of ``log_prob_tiles`` in turn, then the
    statistics kernel's (with its row splits per SM, ``STATS_SPLITS_PER_SM``) by
    each of ``stats_tiles``: the two kernels' times add, so the best of each list
    is the best pair.  Past the first workload, only the ``first`` candidates of
    each list.  On an H200 at D = 784, q = 4 the session-59 kernels took 80 ms
    against CuPy's 19-21 (``bench/results/gpu-h200.md``)."""
    from fastlvm.kernels import _triton_low_rank_wide as wide

    median_ms = _timer(device)
    lines = ["| workload | kernel | tiles | ms |", "|---|---|---|---|"]
    table, splits = wide.wide_configs, wide.STATS_SPLITS_PER_SM
    for i, (n, d, k, q) in enumerate(workloads):
        X, run = _mppca_problem(n, d, k, q, device)
        lp_cfg, st_cfg = table(X.dtype, tg.block_d(d), tg.block_d(q))
        workload = f"N={n:,} D={d} K={k} q={q}"
        cands = [("table*", lp_cfg, st_cfg, splits)]
        cands += [("log-densities", tg.TileConfig(*c), st_cfg, splits)
                  for c in log_prob_tiles[:first if i else None]]
        cands += [("statistics", lp_cfg, tg.TileConfig(c[0], 1, *c[1:4]), c[4])
                  for c in stats_tiles[:first if i else None]]
        for kernel, lp, st, per_sm in cands:
            tiles = {"table*": f"{tuple(lp)} / {tuple(st)}, {splits} splits per SM",
                     "log-densities": f"{tuple(lp)}",
                     "statistics": f"{tuple(st)}, {per_sm} splits per SM"}[kernel]
            with attributes_set(wide, STATS_SPLITS_PER_SM=per_sm), tables_replaced(
                    {(wide, "wide_configs"): lambda dtype, bd, bq, lp=lp, st=st: (lp, st)}):
                t = _timed(median_ms, reps, run)
            lines.append(f"| {workload} | {kernel} | {tiles} | {t} |")
            print(lines[-1], flush=True)
        del X
    return "\n".join(lines)


def square_sweep(workloads, row_tiles, reps, device):
    """The whole E-step (``estep_stats_triton``) of wide 'full' and 'tied' rows with
    ``square_block_configs``' moments config at each row tile in turn (the table's
    marked *); the log-density tiles stay."""
    from fastlvm.kernels.estep_stats import _triton_square_blocks as sb

    median_ms = _timer(device)
    table_configs = sb.square_block_configs
    lines = ["| workload | moments BLOCK_R | ms per E-step |", "|---|---|---|"]
    for cov, n, d, k in workloads:
        X, centers, pc = _problem_arrays(cov, n, d, k, device)
        lp, table = table_configs(X.dtype)
        run = functools.partial(es.estep_stats_triton, X, np.full(k, 1.0 / k), centers, pc,
                                cov, keep_on_device=True)
        for rows in [table.block_n] + [r for r in row_tiles if r != table.block_n]:
            cfg = table._replace(block_n=rows)
            with tables_replaced({} if cfg == table else {
                    (sb, "square_block_configs"): lambda dtype, c=cfg: (lp, c)}):
                t = _timed(median_ms, reps, run)
            mark = "*" if cfg == table else ""
            lines.append(f"| {cov} N={n:,} D={d} K={k} | {rows}{mark} | {t} |")
            print(lines[-1], flush=True)
        del X, run
    return "\n".join(lines)


def chunked_sweep(workloads, candidates, reps, device):
    """The chunked E-step's moments kernel over candidate tiles, on one chunk whose
    log-densities and log-normalisers are in place (each candidate's pass sizes its
    own row splits, as the table's would); ms for the whole E-step's chunks (the
    chunk's time times their count)."""
    from fastlvm.kernels.estep_stats import _triton_chunked as ch

    median_ms = _timer(device)
    prec = tg.dot_precision(torch.float32)
    table_configs = ch.chunk_configs
    lines = ["| workload | moments tiles: BLOCK_R, BLOCK_K, BLOCK_F, warps, stages "
             "| ms per E-step |", "|---|---|---|"]
    for cov, n, d, k in workloads:
        X, p = _problem(cov, n, d, k, device)
        lp, table = table_configs(X.dtype, p.block_d, p.code)
        name = f"{cov} N={n:,} D={d} K={k}"
        for cfg in [table] + [c for c in (tg.TileConfig(*c) for c in candidates) if c != table]:
            with attributes_set(ch, chunk_configs=lambda dtype, bd, code, cfg=cfg: (lp, cfg)):
                pass_ = ch._ChunkedPass(X, p, prec, None)
            rows = X[:pass_.step]
            pass_.add_chunk(0, rows, None)  # the chunk's log-densities and normalisers
            ms = _timed(median_ms, reps, functools.partial(
                pass_._moments, rows, pass_.ll_parts, False, cfg))
            if not ms.startswith(("too", "error")):
                ms = f"{float(ms) * triton.cdiv(n, pass_.step):.3f}"
            mark = "*" if cfg == table else ""
            lines.append(f"| {name} | {cfg.block_n}, {cfg.block_k}, "
                         f"{min(cfg.block_j, p.block_d)}, {cfg.num_warps}, "
                         f"{cfg.num_stages}{mark} | {ms} |")
            print(lines[-1], flush=True)
            del pass_, rows
        del X, p
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--flash", action="store_true",
                        help="also Flash-GMM's workload (N=1M, D=128, K=1024)")
    parser.add_argument("--out", help="also write the table here")
    parser.add_argument("--chunked", action="store_true",
                        help="the large-K path's moments kernel (Flash-GMM's size) instead")
    parser.add_argument("--mppca", action="store_true",
                        help="the mixture of PPCA's E-step over its kernels' tiles")
    parser.add_argument("--mppca-wide", action="store_true",
                        help="the wide rows' MPPCA kernels, each over its own tiles")
    parser.add_argument("--square", action="store_true",
                        help="the wide rows' 'full' and 'tied' moments over row tiles")
    parser.add_argument("--workload", action="append", default=[],
                        help="COV:N:D:K (Gaussian) or N:D:K:Q (--mppca), repeatable")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny workloads on the CPU through the interpreter")
    args = parser.parse_args()
    given = [tuple(w.split(":")) for w in args.workload]
    if args.mppca or args.mppca_wide:
        given = [tuple(int(v) for v in w) for w in given]
    else:
        given = [(w[0],) + tuple(int(v) for v in w[1:]) for w in given]
    if args.smoke:
        if args.chunked:
            table = chunked_sweep(CHUNKED_SMOKE, ((16, 16, 16, 4, 1), (16, 32, 32, 4, 1)), 1,
                                  "cpu")
        elif args.mppca:
            table = mppca_sweep(given or MPPCA_SMOKE, ((16, 4),), 1, "cpu")
        elif args.mppca_wide:
            table = wide_mppca_sweep(given or WIDE_MPPCA_SMOKE, ((16, 2, 16, 4, 1),),
                                     ((16, 16, 4, 1, 8),), 1, "cpu")
        elif args.square:
            table = square_sweep(given or SQUARE_SMOKE, (32,), 1, "cpu")
        else:
            table = sweep(given or SMOKE, ((16, 1, 4),), (4,), 1, "cpu")
    else:
        print(f"device: {torch.cuda.get_device_name(0)}, triton {triton.__version__}",
              flush=True)
        if args.chunked:
            table = chunked_sweep(CHUNKED, CHUNK_CANDIDATES, args.reps, "cuda")
        elif args.mppca:
            table = mppca_sweep(given or MPPCA, MPPCA_CANDIDATES, args.reps, "cuda")
        elif args.mppca_wide:
            table = wide_mppca_sweep(given or WIDE_MPPCA, WIDE_LOG_PROB, WIDE_STATS,
                                     args.reps, "cuda", first=4)
        elif args.square:
            table = square_sweep(given or SQUARE, SQUARE_ROWS, args.reps, "cuda")
        else:
            workloads = given or WORKLOADS + (FLASH_GMM if args.flash else ())
            table = sweep(workloads, CANDIDATES, SPLITS_PER_SM, args.reps, "cuda")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    if _MISSING is not None:
        raise _MISSING
    main()

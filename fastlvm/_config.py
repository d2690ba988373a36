"""The one place for Numba flags, tile sizes, chunk sizes and thread counts.

Everything tunable lives here so that kernels, drivers and benchmarks agree.
Environment variables (read once, at import):

``FASTLVM_BACKEND``
    Force a backend (``reference``, ``numba``, ``triton``, ``cupy``); see
    :mod:`fastlvm._dispatch`.
``FASTLVM_CHUNK_ROWS``
    Default number of rows a driver hands to one kernel call.
``FASTLVM_NUMBA_CACHE``
    ``0`` disables Numba's on-disk cache of compiled kernels (default on).
``FASTLVM_SPAN_THREADS``
    Which threads share the Numba kernels' parallel loops with the calling
    thread once torch is imported: ``auto`` (default: torch's OpenMP threads
    where torch has its own runtime, else fastlvm's pool), ``pool`` (always
    fastlvm's pool) or ``openmp`` (torch's, an error where it has none); see
    ``kernels/_thread_spans.py``.
"""

import contextlib
import os

# Numba fast-math flags: reassociation (so LLVM vectorises reductions) and
# contraction (FMA).  Deliberately *not* ``nnan``/``ninf``: log-sum-exp must
# treat -inf exactly, and NaN must propagate rather than vanish.
NUMBA_FASTMATH = frozenset({"nsz", "arcp", "contract", "reassoc"})
NUMBA_CACHE = os.environ.get("FASTLVM_NUMBA_CACHE", "1") != "0"
SPAN_THREADS_VAR = "FASTLVM_SPAN_THREADS"
SPAN_THREADS = os.environ.get(SPAN_THREADS_VAR, "auto").strip().lower() or "auto"

# Rows per kernel call in the Python drivers (EM, predict, k-means).  Each
# call returns only summed statistics, so this bounds the size of per-call
# outputs such as (chunk, K) log-probabilities, not the E-step's memory.
DEFAULT_CHUNK_ROWS = int(os.environ.get("FASTLVM_CHUNK_ROWS", 262_144))

# The passes that do hold a (rows, K) array -- predictions' log-densities and
# responsibilities, the 'random' start's responsibilities -- take, by default,
# at most this many bytes of float64 per such array: fewer rows than
# DEFAULT_CHUNK_ROWS once K > 16 (at K = 256, 537 MB per array became 32 MiB).
BLOCK_BYTES = 32 << 20

# The passes that copy chunks of rows to float64 -- the mean and scatter
# matrix, PPCA's and factor analysis's transform and score, the missing-data
# EM's start, the mixtures' device starts -- take, by default, at most this
# many bytes per copy: DEFAULT_CHUNK_ROWS rows up to 32 features, fewer beyond
# (at D = 784 a default chunk's copy was 1.6 GB, on the host as on a GPU).
ROW_COPY_BYTES = 64 << 20

# Each of the two pinned host buffers and two device buffers through which
# ``device=`` streams a host array's rows takes, by default, at most this many
# bytes: DEFAULT_CHUNK_ROWS rows up to 256 float32 features (128 float64), fewer
# beyond (at D = 784, float32, the four buffers took 3.3 GB).
STREAM_CHUNK_BYTES = 256 << 20


def chunk_rows(width, chunk_size=None, budget=None, itemsize=8):
    """Rows per chunk of a pass that holds (rows, ``width``) arrays.

    Parameters
    ----------
    width : int
        Numbers a row of the pass's largest array holds (D, or K).
    chunk_size : int or None
        The user's rows per chunk, taken as it is; None for the default.
    budget : int or None
        Bytes one such array may take by default (None: ``ROW_COPY_BYTES``).
    itemsize : int, default=8
        Bytes per number (float64 copies; 4 for float32 rows kept as they are).

    Returns
    -------
    int
        ``chunk_size``, or ``budget // (itemsize * width)`` rows within [1,
        DEFAULT_CHUNK_ROWS].
    """
    if chunk_size:
        return chunk_size
    budget = ROW_COPY_BYTES if budget is None else budget
    return max(1, min(DEFAULT_CHUNK_ROWS, budget // (itemsize * max(1, width))))

# Runs of tiles whose partial statistics a parallel kernel holds at once
# before it merges them (in run order) into the running totals: at most
# TILES_PER_GROUP, within GROUP_BYTES of float64 partials (about a core's L2,
# so the merge reads them from cache), but at least MIN_RUNS_PER_GROUP.  Each
# group ends with a wait for every thread (kernels/_thread_spans.py), so
# small statistics take long groups; the grouping never changes a result.
TILES_PER_GROUP = 1024
GROUP_BYTES = 2 << 20
MIN_RUNS_PER_GROUP = 16

# Working-set target, in bytes, of one (n_features x tile_rows) tile of the
# data; small enough that a tile and its scratch stay in a core's L2, long
# enough that the kernels' row loops amortise their set-up.  48 KiB beat 32 KiB
# by 2-10% on each E-step (AVX-512 host with 1 MiB L2); 64 KiB was no better.
_TILE_BYTES = 49152


def tile_rows(n_features, itemsize, tile_bytes=_TILE_BYTES):
    """Rows per tile of a compiled kernel.

    Parameters
    ----------
    n_features : int
        Number of columns D of the data.
    itemsize : int
        Bytes per element of the data's dtype (4 or 8).
    tile_bytes : int, default=_TILE_BYTES
        Target size of one (D, rows) tile; a kernel whose inner loops run over
        the tile's rows but whose scratch is small beside the tile (the
        mixture of PPCA) asks for more, so that its loops stay long at large D.

    Returns
    -------
    int
        A multiple of 16 in [32, 512] so that a (D, rows) tile is about
        ``tile_bytes``.
    """
    rows = tile_bytes // max(1, n_features * itemsize)
    rows = max(32, min(512, rows))
    return rows - rows % 16


# Tiles of the kernels with O(D) work per row and component (see
# distance_tile_rows): at most this many rows, this many bytes of X, and this
# many bytes in each (K, tile) array of per-component values.
_DISTANCE_TILE_ROWS = 640
_DISTANCE_TILE_BYTES = 512 << 10
_DISTANCE_STAGE_BYTES = 96 << 10


def distance_tile_rows(n_features, itemsize, n_components):
    """Rows per tile of a kernel with O(D) work per row and component.

    The 'diag' and 'spherical' E-steps and log-densities and k-means compute
    distances to every component and then run more loops over the tile's rows
    per component (exponentials, masks, argmins, the copy out), each with its
    own set-up, so short tiles pay that set-up many times over.  Their tiles
    run to 640 rows, as long as the tile stays within 512 KiB and each (K, tile)
    array of per-component values within 96 KiB, and never shorter than
    :func:`tile_rows`; the row count is then cut to an odd number of 128-byte
    blocks, so that a walk down a column of a (K, tile) array spreads over
    half of L1's sets.  Measured on a 2-core Zen 5 against :func:`tile_rows`'
    tiles, paired in one process (bench/results/cpu-2core-epyc-em-iteration.md,
    session 24), per float64 EM iteration: 'diag' N = 1M, D = 32, K = 16 1.08x
    to 1.11x (192 -> 624 rows); D = 128 1.36x (48 -> 496 rows); 'spherical'
    K = 64, D = 128 1.53x (48 -> 176 rows).  A float64 Lloyd step at N = 1M,
    D = 32, K = 16 1.37x and 1.86x in two runs, k-means++'s candidate
    potentials 1.56x and 1.76x (192 -> 640 and 624 rows).  Longer arrays of
    per-component values lost: 'spherical' K = 64, D = 32 ran 3% slower with
    480 float32 rows (120 KiB arrays) and 10% slower with 1024 float64 rows
    (512 KiB), so it keeps 192 / 384.

    Parameters
    ----------
    n_features : int
        Number of columns D of the tile (padded, where the kernel pads).
    itemsize : int
        Bytes per element of the data's dtype (4 or 8).
    n_components : int
        K, the rows of the kernel's (K, tile) arrays.

    Returns
    -------
    int
        A multiple of 16; it depends on the shapes and dtype alone, so a
        kernel's sums, and their rounding, do not depend on the machine.
    """
    rows = tile_rows(n_features, itemsize)
    longer = min(_DISTANCE_TILE_ROWS, _DISTANCE_TILE_BYTES // max(1, n_features * itemsize),
                 _DISTANCE_STAGE_BYTES // (max(1, n_components) * itemsize))
    # a (K, tile) row stride of an odd number of 128-byte blocks: the loops
    # that walk a column of such an array (a row's K values) then spread over
    # half of L1's sets, where a power-of-two stride piles them into a few
    rows_per_block = max(16, 128 // itemsize)
    blocks = longer // rows_per_block
    blocks -= 1 - blocks % 2
    return max(rows, blocks * rows_per_block)


_BLAS_CONTROLLER = None


@contextlib.contextmanager
def serial_blas():
    """Run the enclosed code with one BLAS thread.

    The drivers alternate compiled passes over the data (Numba threads on every
    core) with small dense algebra on the statistics (M-steps, K Cholesky
    factorisations).  After each call OpenBLAS keeps its worker threads
    spinning for a while, and they take cores from the next pass: measured on
    2 cores, a 'full' EM iteration went from 0.22 s to 0.14 s with this limit.
    The small algebra gains nothing from BLAS threads.
    """
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _BLAS_CONTROLLER = ThreadpoolController()
    with _BLAS_CONTROLLER.limit(limits=1, user_api="blas"):
        yield

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
"""

import contextlib
import os

# Numba fast-math flags: reassociation (so LLVM vectorises reductions) and
# contraction (FMA).  Deliberately *not* ``nnan``/``ninf``: log-sum-exp must
# treat -inf exactly, and NaN must propagate rather than vanish.
NUMBA_FASTMATH = frozenset({"nsz", "arcp", "contract", "reassoc"})
NUMBA_CACHE = os.environ.get("FASTLVM_NUMBA_CACHE", "1") != "0"

# Rows per kernel call in the Python drivers (EM, predict, k-means).  Each
# call returns only summed statistics, so this bounds the size of per-call
# outputs such as (chunk, K) log-probabilities, not the E-step's memory.
DEFAULT_CHUNK_ROWS = int(os.environ.get("FASTLVM_CHUNK_ROWS", 262_144))

# Number of tiles whose partial statistics are held at once by a parallel
# kernel before being merged (in tile order) into the running totals.
TILES_PER_GROUP = 64

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

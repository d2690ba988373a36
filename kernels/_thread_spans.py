# The parallel loops of the Numba kernels, run on a pool of Python threads.
#
# Design: a kernel's parallel loop (over tiles, or over the runs of tiles of
# one group) is a serial ``nogil`` Numba function of a span [b0, b1) of the
# loop.  :func:`run_spans` cuts the loop into contiguous spans, a few per
# thread (``numba.get_num_threads()``, the calling thread's setting, as prange
# uses it); the calling thread and threads of a process-wide pool take the
# spans in turn as each finishes one, and the call returns when every span is
# done.  :func:`run_groups`
# is the skeleton of the kernels whose runs each fill a row of float64
# partial statistics: it runs a group of runs, then adds the rows into the
# totals in run order (:func:`add_rows`, over blocks of totals), group after
# group.
#
# Why not ``prange``: a ``parallel=True`` kernel compiles its loop body as a
# separate gufunc with every helper it calls linked in, then the kernel again
# with the gufunc linked in.  That made first compiles 2-3x slower than the
# same kernels compiled serially (the E-step kernel 10.4-11.4 s against
# 3.3-3.6 s).  On a 2-core VM a first default GaussianMixture fit on sklearn's
# digits, which compiles every kernel it uses, took 35-47 s with prange and
# 19-25 s with spans; the first `fastlvm fit` 66 s and 33 s.  That is paid on
# every fresh install and every CI run.  A span costs a dispatcher call (a few
# microseconds of argument checks, with the GIL) and the pool's hand-over
# (about 70 us when the pool sleeps, against prange's 2 us with spinning
# workers), so per-batch loops pass a ``grain``; the mixture kernels' spans
# run for milliseconds, and their E-steps and Lloyd steps timed within noise
# of the prange ones (bench/results/cpu-2core-epyc-em-iteration.md).
#
# Determinism: spans decide only which thread computes which runs.  Each run
# writes its own row of partials (or its own rows of output), and the rows are
# added in run order, so results do not depend on the thread count.
#
# Limits: a span runs on a pool thread only when the loop has more than one
# grain and the setting allows more than one thread; a call from a pool
# thread (a kernel called inside another's span) runs its spans inline rather
# than wait on the pool it occupies; a forked child starts a pool of its own.
# Kernels given to these functions must be compiled with ``nogil=True``, or
# their spans run one at a time.
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from ._numba_support import CACHE, FASTMATH

# floats of the totals one span of :func:`add_rows` adds at least (16 KiB)
MERGE_BLOCK = 2048
# spans per thread of a loop, taken by the threads as they come free
SPANS_PER_THREAD = 4
# elements a span of a per-batch loop should hold at least (:func:`span_grain`)
SPAN_ELEMENTS = 1 << 16

_POOL = None
_POOL_LOCK = threading.Lock()
_IN_POOL = threading.local()


def _mark_pool_thread():
    _IN_POOL.active = True


def _pool():
    """The process-wide pool (NUMBA_NUM_THREADS - 1 workers; the caller is one more)."""
    global _POOL
    if _POOL is None:
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = ThreadPoolExecutor(
                    max_workers=max(1, numba.config.NUMBA_NUM_THREADS - 1),
                    thread_name_prefix="fastlvm-kernel", initializer=_mark_pool_thread)
    return _POOL


def _forget_pool_in_child():
    """A forked child has none of its parent's threads: a pool inherited from the
    parent would queue spans that no thread runs.  The child makes its own."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def spans(n, parts):
    """``parts`` contiguous spans [b0, b1) of range(n), lengths differing by at
    most one, longer ones first; fewer when n < parts (no empty span)."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    out, b0 = [], 0
    for p in range(parts):
        b1 = b0 + base + (p < extra)
        out.append((b0, b1))
        b0 = b1
    return out


def span_grain(elements_per_iteration):
    """Iterations that hold about SPAN_ELEMENTS elements: the ``grain`` of a loop
    whose iterations each touch ``elements_per_iteration`` (a row of D pixels)."""
    return max(1, SPAN_ELEMENTS // max(1, int(elements_per_iteration)))


def run_spans(kernel, n, *args, grain=1):
    """``kernel(*args, b0, b1)`` for spans of range(n), in parallel.

    The loop is cut into up to SPANS_PER_THREAD spans per thread, which the
    threads (this one and the pool's) take in turn as they finish one: data
    whose runs cost unequal amounts (listed and dense tiles) keeps every
    thread busy to the end.

    Parameters
    ----------
    kernel : numba dispatcher compiled with ``nogil=True``
        A serial loop over b0 <= b < b1; spans of one call must write
        disjoint memory.
    n : int
        Iterations of the loop (tiles, or runs of a group).
    *args
        The kernel's leading arguments.
    grain : int, default=1
        Fewest iterations worth a span of their own: a loop of less than two
        grains runs in this thread (a hand-over to the pool costs tens of
        microseconds; the VAE's per-batch kernels pass a grain of ~64k
        elements).
    """
    threads = numba.get_num_threads()
    if n <= 0:
        return
    parts = min(threads * SPANS_PER_THREAD, n // max(1, grain))
    if parts <= 1 or threads == 1 or getattr(_IN_POOL, "active", False):
        kernel(*args, 0, n)
        return
    queue = iter(spans(n, parts))
    lock = threading.Lock()

    def drain():
        while True:
            with lock:
                span = next(queue, None)
            if span is None:
                return
            kernel(*args, *span)

    pending = [_pool().submit(drain) for _ in range(min(threads, parts) - 1)]
    try:
        drain()
    finally:
        for future in pending:
            future.result()  # waits for all; re-raises a span's exception


@numba.njit(nogil=True, fastmath=FASTMATH, cache=CACHE)
def add_rows(partials, g, totals, j0, j1):
    """totals[j] += partials[0, j], then partials[1, j], ... partials[g - 1, j],
    for the totals j in blocks [j0, j1) of MERGE_BLOCK (a span of blocks).

    Each total adds its rows one at a time in run order, as a serial loop over
    the rows would, so the sums do not depend on how the blocks are split.

    Parameters
    ----------
    partials : ndarray (>= g, F), float64
    g : int, rows in use
    totals : ndarray (F,), float64, added to
    j0, j1 : int, blocks of MERGE_BLOCK totals
    """
    start = j0 * MERGE_BLOCK
    stop = min(totals.shape[0], j1 * MERGE_BLOCK)
    for b in range(g):
        for j in range(start, stop):
            totals[j] += partials[b, j]


def add_partials(partials, g, totals):
    """Add the first ``g`` rows of ``partials`` into ``totals`` in row order,
    blocks of totals in parallel (a 'full' mixture's K D^2 second moments: a
    serial merge of 64 rows is a pass over tens of MB on one core)."""
    run_spans(add_rows, -(-totals.shape[0] // MERGE_BLOCK), partials, g, totals)


def run_groups(kernel, n_runs, group, totals, *args):
    """Fold every run into its own row of float64 partials and add the rows into
    ``totals`` in run order, ``group`` runs at a time.

    Parameters
    ----------
    kernel : numba dispatcher compiled with ``nogil=True``
        ``kernel(*args, g0, partials, b0, b1)`` folds runs g0 + b, for
        b0 <= b < b1, each into row b of ``partials``, which it zeroes first
        (``zeroed_row``).
    n_runs : int
    group : int
        Runs whose partials are held at once (:func:`group_size`).
    totals : ndarray (F,), float64, added to
    *args
        The kernel's leading arguments.
    """
    partials = np.empty((min(group, n_runs), totals.shape[0]))
    for g0 in range(0, n_runs, group):
        g = min(group, n_runs - g0)
        run_spans(kernel, g, *args, g0, partials)
        add_partials(partials, g, totals)

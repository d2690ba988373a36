# The parallel loops of the Numba kernels, run on a pool of Python threads.
#
# Design: a kernel's parallel loop (over tiles, or over the runs of tiles of
# one group) is a serial ``nogil`` Numba function of a span [b0, b1) of the
# loop.  :func:`run_spans` cuts the loop into contiguous spans, a few per
# thread (``numba.get_num_threads()``, the calling thread's setting, as prange
# uses it); the calling thread and threads of a process-wide pool claim the
# spans in turn through an atomic counter as each finishes one, and the call
# returns when every span is done.  :func:`run_groups`
# is the skeleton of the kernels whose runs each fill a row of float64
# partial statistics: it runs a group of runs, then adds the rows into the
# totals in run order (:func:`add_rows`, over blocks of totals), group after
# group.
#
# The hand-over (:class:`_SpanPool`): between jobs a worker spins without the
# GIL (:mod:`._atomics`) on the pool's generation counter for WORKER_SPIN_US,
# then sleeps on a condition; the caller publishes a job by bumping that
# counter, and waits for the last span by spinning on the job's counter (then
# sleeping on an event).  A worker that sees a job waits PICKUP_GRACE_US more
# before it asks for the GIL, time for the caller to dispatch its own first
# span and release it: asking while the caller holds it parks the worker on
# the GIL's condition, and waking a parked thread costs tens of microseconds
# on a VM.  With a concurrent.futures pool (before 2026-12) the worker's first
# span started 45-53 us into a call and an empty two-span job took 60-80 us;
# with spinning workers 11-18 us and 15-35 us (2-core EPYC VM).  The cost is
# up to WORKER_SPIN_US of a core after each job.
#
# Why not ``prange``: a ``parallel=True`` kernel compiles its loop body as a
# separate gufunc with every helper it calls linked in, then the kernel again
# with the gufunc linked in.  That made first compiles 2-3x slower than the
# same kernels compiled serially (the E-step kernel 10.4-11.4 s against
# 3.3-3.6 s).  On a 2-core VM a first default GaussianMixture fit on sklearn's
# digits, which compiles every kernel it uses, took 35-47 s with prange and
# 19-25 s with spans; the first `fastlvm fit` 66 s and 33 s.  That is paid on
# every fresh install and every CI run.  A span costs a dispatcher call (a few
# microseconds of argument checks, with the GIL), so per-batch loops pass a
# ``grain``; the mixture kernels' spans run for milliseconds, and their E-steps
# and Lloyd steps timed within noise of the prange ones
# (bench/results/cpu-2core-epyc-em-iteration.md).
#
# Determinism: spans decide only which thread computes which runs.  Each run
# writes its own row of partials (or its own rows of output), and the rows are
# added in run order, so results do not depend on the thread count.
#
# Once torch is imported, the spans run on torch's OpenMP threads instead of
# the pool, where torch has them (:mod:`._openmp_team`): torch's workers spin
# for milliseconds after each torch operation, and a second pool of spinning
# threads would take their cores turn about.  ``FASTLVM_SPAN_THREADS`` (read at
# import, :mod:`fastlvm._config`) chooses: ``auto`` (the default), ``pool``
# (never torch's threads) or ``openmp`` (torch's threads, an error where there
# are none).
#
# Limits: a span runs on another thread only when the loop has more than one
# grain and the setting allows more than one thread; a call from a pool
# thread (a kernel called inside another's span), or from a second Python
# thread while another's job holds the pool or team, runs its spans inline; a
# forked child starts a pool of its own, and never uses torch's OpenMP
# threads.  Kernels given to these functions must be compiled with
# ``nogil=True``, or their spans run one at a time.
import os
import sys
import threading

import numba
import numpy as np

from fastlvm._config import SPAN_THREADS, SPAN_THREADS_VAR

from . import _atomics
from ._numba_support import CACHE, FASTMATH
from ._openmp_team import OpenMPTeam, torch_openmp_library

# floats of the totals one span of :func:`add_rows` adds at least (16 KiB)
MERGE_BLOCK = 2048
# spans per thread of a loop, taken by the threads as they come free
SPANS_PER_THREAD = 4
# elements a span of a per-batch loop should hold at least (:func:`span_grain`):
# elements of arithmetic (the VAE's pixel rows: an exp and a log each, about
# 0.6 ns on one thread), or of a streaming pass (a scale in place: about 0.06
# ns an element in cache, and at batch 1024 x 784 its spans took 76-108 us
# against 46-65 us on one thread)
SPAN_ELEMENTS = 1 << 16
STREAM_SPAN_ELEMENTS = 1 << 20

# microseconds a worker spins for the next job before it sleeps, and one
# waiting for the last span of a job spins before it sleeps (see the header)
WORKER_SPIN_US = 200
FINISH_SPIN_US = 2000
# microseconds a worker that saw a job waits before it asks for the GIL, which
# the calling thread holds while it dispatches its own first span
PICKUP_GRACE_US = 2

# int64 counters sit a cache line (8 of them) apart, so that the threads'
# atomic updates of one do not contend with spins reading another
_LINE = 8
_GENERATION, _SLEEPERS = 0, _LINE  # of the pool's state
_CLAIMED, _FINISHED, _ENLISTED = 0, _LINE, 2 * _LINE  # of a job's counters

# where the spans run once torch is imported (SPAN_THREADS: 'auto', 'pool' or
# 'openmp', from FASTLVM_SPAN_THREADS)
_SPAN_THREAD_CHOICES = ("auto", "pool", "openmp")

_POOL = None
_POOL_LOCK = threading.Lock()
_IN_POOL = threading.local()
_TEAM = None  # torch's OpenMP team, once looked for and found
_TEAM_SEARCHED = False


class _Job:
    """One call of :func:`run_spans`: its spans, claimed and finished through
    atomic counters of its own, so a worker that picks up a job late (after
    its last span was claimed) finds nothing left to do."""

    def __init__(self, kernel, args, parts, helpers):
        self.kernel, self.args, self.parts = kernel, args, parts
        self.helpers = helpers  # workers that may join, besides the caller
        self.generation = 0  # the pool's generation counter once published
        self.counters = np.zeros(3 * _LINE, dtype=np.int64)
        self.errors = []
        self.done = threading.Event()

    def enlist(self):
        """Whether the calling worker may help (the first ``helpers`` may)."""
        return _atomics.fetch_add(self.counters, _ENLISTED, 1) < self.helpers

    def work(self):
        """Run spans of the job until none is left unclaimed."""
        counters, n = self.counters, len(self.parts)
        i = _atomics.fetch_add(counters, _CLAIMED, 1)
        while i < n:
            try:
                self.kernel(*self.args, *self.parts[i])
            except BaseException as error:  # re-raised by the caller
                self.errors.append(error)
            if _atomics.fetch_add(counters, _FINISHED, 1) == n - 1:
                self.done.set()
            i = _atomics.fetch_add(counters, _CLAIMED, 1)

    def wait(self, iterations):
        """Return once every span has finished: spin, then sleep."""
        n = len(self.parts)
        if not _atomics.await_at_least(self.counters, _FINISHED, n, iterations):
            self.done.wait()


class _SpanPool:
    """Worker threads that take part in the jobs of :func:`run_spans`.

    Between jobs a worker spins (without the GIL) on the pool's generation
    counter for up to WORKER_SPIN_US, then sleeps on a condition.  The caller
    publishes a job by storing it and adding one to the generation; it wakes
    sleepers only when the sleeper count says there are some.  (Both sides
    update their counter and then read the other's, sequentially consistent:
    a worker about to sleep sees the new generation, or the caller sees the
    sleeper and notifies under the condition's lock.)
    """

    def __init__(self, workers, worker_spin_us=WORKER_SPIN_US, finish_spin_us=FINISH_SPIN_US):
        self.state = np.zeros(2 * _LINE, dtype=np.int64)
        self.job = None
        self.busy = threading.Lock()  # one job at a time
        self.wake = threading.Condition()
        per_us = _atomics.pause_iterations_per_us()
        self.spin = max(1, int(worker_spin_us * per_us))
        self.finish_spin = max(1, int(finish_spin_us * per_us))
        self.grace = int(PICKUP_GRACE_US * per_us)
        for i in range(workers):
            threading.Thread(target=self._serve, name=f"fastlvm-kernel-{i}",
                             daemon=True).start()

    def _serve(self):
        _IN_POOL.active = True
        state, seen, taken = self.state, 0, 0
        while True:
            generation = _atomics.await_change(state, _GENERATION, seen, self.spin,
                                               self.grace)
            if generation == seen:
                with self.wake:
                    _atomics.fetch_add(state, _SLEEPERS, 1)
                    while _atomics.load(state, _GENERATION) == seen:
                        self.wake.wait()
                    _atomics.fetch_add(state, _SLEEPERS, -1)
                generation = _atomics.load(state, _GENERATION)
            seen = generation
            # the job stored is the newest (stored before its generation is
            # published), perhaps newer than the generation seen, or None once
            # done: a worker takes each job once at most
            job = self.job
            if job is not None and job.generation > taken:
                taken = job.generation
                if job.enlist():
                    job.work()
            del job  # hold no job's arrays while waiting for the next

    def run(self, kernel, args, parts, helpers):
        """Run ``kernel(*args, b0, b1)`` for every span in ``parts``, with up to
        ``helpers`` workers; False (nothing run) if another thread's job holds
        the pool."""
        job = _Job(kernel, args, parts, helpers)
        if not self.busy.acquire(blocking=False):
            return False
        try:
            # only the holder of ``busy`` moves the generation
            job.generation = _atomics.load(self.state, _GENERATION) + 1
            self.job = job
            _atomics.fetch_add(self.state, _GENERATION, 1)
            if _atomics.load(self.state, _SLEEPERS) > 0:
                with self.wake:
                    self.wake.notify_all()
            job.work()
            job.wait(self.finish_spin)
        finally:
            self.job = None
            self.busy.release()
        if job.errors:
            raise job.errors[0]
        return True


def _team():
    """torch's OpenMP team if the spans are to run on it (see the header), else None."""
    global _TEAM, _TEAM_SEARCHED
    if _TEAM_SEARCHED:
        return _TEAM
    if SPAN_THREADS not in _SPAN_THREAD_CHOICES:
        raise ValueError(f"{SPAN_THREADS_VAR}={SPAN_THREADS!r}: use one of "
                         f"{', '.join(_SPAN_THREAD_CHOICES)} (or leave it unset)")
    if SPAN_THREADS == "pool":
        return None
    # claims need the GIL (see _run_on_team): no team on a free-threaded build
    if "torch" in sys.modules and getattr(sys, "_is_gil_enabled", lambda: True)():
        with _POOL_LOCK:
            if not _TEAM_SEARCHED:
                library = torch_openmp_library()
                _TEAM = OpenMPTeam(library) if library is not None else None
                _TEAM_SEARCHED = True
    if _TEAM is None and SPAN_THREADS == "openmp":
        raise RuntimeError(f"{SPAN_THREADS_VAR}=openmp, but torch is not imported or has "
                           "no OpenMP runtime of its own: import torch first, or set "
                           f"{SPAN_THREADS_VAR}=auto")
    return _TEAM


def _run_on_team(team, kernel, args, parts, helpers):
    """:meth:`_SpanPool.run` on torch's OpenMP team: ``helpers + 1`` threads of
    the team claim the spans in turn.

    A span is claimed by ``next`` on one shared list iterator, a single step
    under the GIL that every team thread holds while it dispatches a span.
    Claiming through :class:`_Job`'s atomic counters (Numba calls that hand
    the GIL over) made an empty 8-span job take 162-210 us instead of 51-68.
    A span's own run_spans finds the team busy and runs inline.
    """
    claims, errors = iter(parts), []

    def work():
        for b0, b1 in claims:
            try:
                kernel(*args, b0, b1)
            except BaseException as error:  # noqa: BLE001 -- re-raised below
                errors.append(error)

    if not team.run(work, helpers + 1):
        return False
    if errors:
        raise errors[0]
    return True


def _pool():
    """The process-wide pool (NUMBA_NUM_THREADS - 1 workers; the caller is one more)."""
    global _POOL
    if _POOL is None:
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = _SpanPool(max(1, numba.config.NUMBA_NUM_THREADS - 1))
    return _POOL


def _forget_pool_in_child():
    """A forked child has none of its parent's threads: a pool inherited from the
    parent would hand spans to threads that do not exist.  The child makes its
    own, and leaves torch's OpenMP runtime alone (see :mod:`._openmp_team`)."""
    global _POOL, _POOL_LOCK, _TEAM, _TEAM_SEARCHED
    _POOL, _POOL_LOCK = None, threading.Lock()
    _TEAM, _TEAM_SEARCHED = None, True


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


def span_grain(elements_per_iteration, span_elements=SPAN_ELEMENTS):
    """Iterations that hold about ``span_elements`` elements (SPAN_ELEMENTS, or
    STREAM_SPAN_ELEMENTS for a streaming pass): the ``grain`` of a loop whose
    iterations each touch ``elements_per_iteration`` (a row of D pixels)."""
    return max(1, span_elements // max(1, int(elements_per_iteration)))


def run_spans(kernel, n, *args, grain=1):
    """``kernel(*args, b0, b1)`` for spans of range(n), in parallel.

    The loop is cut into up to SPANS_PER_THREAD spans per thread, which the
    threads (this one and the pool's, or torch's OpenMP team's) take in turn
    as they finish one: data whose runs cost unequal amounts (listed and dense
    tiles) keeps every thread busy to the end.

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
    team, helpers = _team(), min(threads, parts) - 1
    if team is not None:
        ran = _run_on_team(team, kernel, args, spans(n, parts), helpers)
    else:
        ran = _pool().run(kernel, args, spans(n, parts), helpers)
    if not ran:
        kernel(*args, 0, n)


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

"""The kernels' parallel loops on Python threads (kernels/_thread_spans.py)."""

import itertools
import multiprocessing
import os
import re
import threading
import time
from pathlib import Path

import numba
import numpy as np
import pytest

from fastlvm.kernels import _thread_spans as ts
from tests.kernels.span_recorder import record_spans


@numba.njit(nogil=True, cache=False)
def _mark(out, threads, b0, b1):
    """out[b] += b + 1 and threads[b] = this span's first index, for b in the span."""
    for b in range(b0, b1):
        out[b] += b + 1
        threads[b] = b0


@numba.njit(nogil=True, cache=False)
def _fail_at(out, bad, b0, b1):
    for b in range(b0, b1):
        if b == bad:
            raise ValueError("span failed")
        out[b] = 1.0


@numba.njit(nogil=True, cache=False)
def _runs_into_rows(values, g0, partials, b0, b1):
    """Run g0 + b adds values[g0 + b] * (column + 1) into row b (zeroed first)."""
    for b in range(b0, b1):
        for j in range(partials.shape[1]):
            partials[b, j] = values[g0 + b] * (j + 1)


def _with_threads(n, fn):
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        return fn()
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("n, parts", [(0, 3), (1, 4), (5, 2), (7, 3), (8, 8), (3, 8), (100, 7)])
def test_spans_cut_a_range_into_contiguous_near_equal_parts(n, parts):
    got = ts.spans(n, parts)
    assert len(got) == min(max(1, parts), max(n, 1)) if n else got == [(0, 0)]
    if n:
        assert got[0][0] == 0 and got[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(got))  # contiguous
        sizes = [b1 - b0 for b0, b1 in got]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 64])
def test_run_spans_runs_every_iteration_once(n, threads):
    out = np.zeros(max(n, 1))
    first = np.full(max(n, 1), -1, dtype=np.int64)
    _with_threads(min(threads, numba.config.NUMBA_NUM_THREADS),
                  lambda: ts.run_spans(_mark, n, out, first))
    np.testing.assert_array_equal(out[:n], np.arange(1, n + 1))
    if n > 1 and min(threads, numba.config.NUMBA_NUM_THREADS) > 1:
        assert len(set(first[:n])) > 1  # more than one span ran


def test_run_spans_raises_a_spans_error_after_every_span_is_done():
    n = 40
    out = np.zeros(n)
    with pytest.raises(ValueError, match="span failed"):
        _with_threads(min(2, numba.config.NUMBA_NUM_THREADS),
                      lambda: ts.run_spans(_fail_at, n, out, n - 1))  # the last span fails
    if numba.config.NUMBA_NUM_THREADS > 1:
        assert out[: n // 2].all()  # the first span finished (it ran in this thread)


def _pool_of(workers, **spins):
    """A pool of its own for a test (its daemon threads outlive the test)."""
    return ts._SpanPool(workers, **spins)


def test_a_call_from_a_pool_thread_runs_its_spans_inline():
    """A kernel driven from inside another's span must not wait on the pool it
    occupies: it runs its spans itself, in that thread."""
    seen = []

    def outer(out, b0, b1):
        if threading.current_thread().name.startswith("fastlvm-kernel"):
            inner = np.zeros(8)
            first = np.full(8, -1, dtype=np.int64)
            ts.run_spans(_mark, 8, inner, first)
            seen.append((set(first.tolist()), inner.sum()))
        time.sleep(0.01)  # long enough spans that the worker takes some
        out[b0:b1] += 1

    out = np.zeros(8)
    pool = _pool_of(1)
    for _ in range(20):  # until the worker has taken a span
        assert pool.run(outer, (out,), ts.spans(8, 8), 1)
        if seen:
            break
    assert seen and seen[0] == ({0}, 36)  # one span, all of it, in the worker


def test_a_pool_runs_every_span_once_on_both_threads_and_after_its_workers_sleep():
    """Jobs back to back (the worker spinning) and after the worker has gone to
    sleep (spins of 50 us, gaps of 20 ms): every span runs once, and the worker
    takes part in both cases."""
    pool = _pool_of(1, worker_spin_us=50, finish_spin_us=50)
    for gap in (0.0, 0.02):
        names = set()
        for _ in range(10):
            seen, out = [], np.zeros(64)
            time.sleep(gap)
            assert pool.run(record_spans(seen, 0.002), (out,), ts.spans(64, 8), 1)
            np.testing.assert_array_equal(out, 1)
            assert sorted((b0, b1) for *_, b0, b1 in seen) == ts.spans(64, 8)
            names |= {name for _, name, _, _ in seen}
        assert any(n.startswith("fastlvm-kernel") for n in names), (gap, names)
        assert threading.current_thread().name in names


def test_a_job_takes_no_more_workers_than_it_asks_for():
    pool = _pool_of(2)
    seen = []
    for _ in range(5):
        assert pool.run(record_spans(seen, 0.002), (np.zeros(16),), ts.spans(16, 16), 0)
    assert {name for _, name, _, _ in seen} == {threading.current_thread().name}


def test_a_second_thread_runs_inline_while_a_job_holds_the_pool():
    """run returns False (and runs nothing) while another thread's job holds the
    pool; run_spans then runs the loop in the calling thread."""
    pool = _pool_of(1)
    started, release = threading.Event(), threading.Event()

    def hold(out, b0, b1):
        started.set()
        release.wait(10)

    holder = threading.Thread(target=pool.run, args=(hold, (None,), [(0, 1)], 0))
    holder.start()
    try:
        assert started.wait(10)
        out = np.zeros(4)
        assert pool.run(record_spans([]), (out,), ts.spans(4, 2), 1) is False
        assert not out.any()
    finally:
        release.set()
        holder.join(10)


def test_a_job_picked_up_late_runs_nothing():
    """A worker that reads a finished job (its spans all claimed) does no span
    of it: the spans are claimed from the job's own counter."""
    out = np.zeros(6)
    job = ts._Job(record_spans([]), (out,), ts.spans(6, 3), 1)
    job.work()
    np.testing.assert_array_equal(out, 1)
    assert job.done.is_set()
    assert job.enlist() and not job.enlist()  # one helper asked for
    job.work()  # the late worker
    np.testing.assert_array_equal(out, 1)


def test_a_workers_span_error_is_raised_by_the_caller():
    pool = _pool_of(1)

    def fail_in_worker(out, b0, b1):
        time.sleep(0.002)
        if threading.current_thread().name.startswith("fastlvm-kernel"):
            raise RuntimeError("worker span failed")
        out[b0:b1] = 1

    for _ in range(20):  # until the worker has taken a span
        out = np.zeros(16)
        try:
            pool.run(fail_in_worker, (out,), ts.spans(16, 16), 1)
        except RuntimeError as error:
            assert "worker span failed" in str(error)
            assert out.sum() < 16
            break
    else:
        pytest.fail("the worker never took a span")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_runs_spans_on_a_pool_of_its_own():
    """The parent's pool threads do not exist in a forked child: spans handed to
    them would never run, and the child would wait forever."""
    out = np.zeros(64)
    first = np.full(64, -1, dtype=np.int64)
    _with_threads(min(2, numba.config.NUMBA_NUM_THREADS),
                  lambda: ts.run_spans(_mark, 64, out, first))  # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        total = pool.apply_async(_spans_in_child).get(timeout=60)
    assert total == 64 * 65 // 2


def _spans_in_child():
    out = np.zeros(64)
    first = np.full(64, -1, dtype=np.int64)
    _with_threads(min(2, numba.config.NUMBA_NUM_THREADS),
                  lambda: ts.run_spans(_mark, 64, out, first))
    return float(out.sum())


def test_add_partials_sums_each_total_in_run_order():
    """add_partials adds row 0, then row 1, ... into each total, whatever the
    thread count: the bits of a serial loop, across several blocks of totals."""
    rng = np.random.default_rng(0)
    g, f = 7, 2 * ts.MERGE_BLOCK + 5
    # magnitudes spread over 30 decades, so that another order rounds differently
    partials = rng.standard_normal((g + 2, f)) * 10.0 ** rng.integers(-15, 15, (g + 2, f))
    start = rng.standard_normal(f)
    expected = start.copy()
    for b in range(g):  # rows g, g + 1 are not in use
        expected = expected + partials[b]
    for threads in (1, numba.get_num_threads()):
        got = start.copy()
        _with_threads(threads, lambda got=got: ts.add_partials(partials, g, got))
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("group", [1, 2, 3, 64])
def test_run_groups_adds_every_run_in_run_order(group):
    rng = np.random.default_rng(1)
    n_runs, f = 11, 5
    values = rng.standard_normal(n_runs) * 10.0 ** rng.integers(-12, 12, n_runs)
    expected = np.zeros(f)
    for r in range(n_runs):
        expected = expected + values[r] * np.arange(1, f + 1)
    for threads in (1, numba.get_num_threads()):
        totals = np.zeros(f)
        _with_threads(threads, lambda totals=totals: ts.run_groups(_runs_into_rows, n_runs,
                                                                   group, totals, values))
        np.testing.assert_array_equal(totals, expected)


def test_no_kernel_compiles_a_parallel_loop():
    """prange kernels compile 2-3x slower than the span functions that replaced
    them (kernels/_thread_spans.py); none may come back unnoticed."""
    root = Path(ts.__file__).parent
    found = [f"{path.relative_to(root)}:{i}" for path in sorted(root.rglob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"parallel\s*=\s*True|\bprange\b", line.split("#")[0])]
    assert not found, found

"""The kernels' parallel loops on Python threads (kernels/_thread_spans.py)."""

import itertools
import multiprocessing
import os
import re
import threading
from pathlib import Path

import numba
import numpy as np
import pytest

from fastlvm.kernels import _thread_spans as ts


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


def test_a_call_from_a_pool_thread_runs_its_spans_inline():
    """A kernel driven from inside another's span must not wait on the pool it
    occupies: it runs its spans itself, in that thread."""
    seen = []

    def nested():
        out = np.zeros(8)
        first = np.full(8, -1, dtype=np.int64)
        ts.run_spans(_mark, 8, out, first)
        seen.append((threading.current_thread().name, set(first.tolist()), out.sum()))

    ts._pool().submit(nested).result()
    name, firsts, total = seen[0]
    assert name.startswith("fastlvm-kernel")
    assert firsts == {0} and total == 36  # one span, all of it


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

"""Atomic counters and spin-waits for compiled code (kernels/_atomics.py)."""

import threading
import time

import numba
import numpy as np
import pytest

from fastlvm.kernels import _atomics


@numba.njit(nogil=True, cache=False)
def _take_tickets(counter, ready, me, tickets):
    """Once every thread is ready (a barrier on ``ready``), tickets[i] = the
    counter's value before the i-th addition of one."""
    ready[me] = 1
    while _atomics.atomic_load(ready, 0) + _atomics.atomic_load(ready, 1) < 2:
        _atomics.cpu_relax()
    for i in range(tickets.shape[0]):
        tickets[i] = _atomics.atomic_add(counter, 0, 1)


def test_fetch_add_returns_the_value_before_and_load_reads_it():
    counter = np.zeros(16, dtype=np.int64)
    assert _atomics.fetch_add(counter, 3, 5) == 0
    assert _atomics.fetch_add(counter, 3, -2) == 5
    assert _atomics.load(counter, 3) == 3
    assert counter.tolist() == [0, 0, 0, 3] + [0] * 12


def test_concurrent_additions_hand_out_every_ticket_once():
    """Two threads (the GIL released) each take 200k tickets from one counter:
    every value 0 ... 399999 is handed out exactly once and none is lost (a
    plain read-modify-write, which the compiler may also keep in a register,
    hands the same values to both threads)."""
    counter, ready = np.zeros(1, dtype=np.int64), np.zeros(2, dtype=np.int64)
    tickets = [np.full(200_000, -1, dtype=np.int64) for _ in range(2)]
    threads = [threading.Thread(target=_take_tickets, args=(counter, ready, me, t))
               for me, t in enumerate(tickets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter[0] == 400_000
    np.testing.assert_array_equal(np.sort(np.concatenate(tickets)), np.arange(400_000))


def test_await_change_returns_the_new_value_or_times_out():
    counter = np.zeros(1, dtype=np.int64)
    assert _atomics.await_change(counter, 0, 0, 100, 0) == 0  # timed out
    counter[0] = 7
    assert _atomics.await_change(counter, 0, 0, 100, 5) == 7


def test_await_change_sees_another_threads_store():
    counter = np.zeros(1, dtype=np.int64)
    per_us = _atomics.pause_iterations_per_us()
    timer = threading.Timer(0.05, _atomics.fetch_add, args=(counter, 0, 1))
    timer.start()
    t0 = time.perf_counter()
    got = _atomics.await_change(counter, 0, 0, int(5e6 * per_us), 0)  # up to 5 s
    timer.join()
    assert got == 1 and time.perf_counter() - t0 < 4


def test_await_at_least():
    counter = np.array([4], dtype=np.int64)
    assert _atomics.await_at_least(counter, 0, 4, 1)
    assert not _atomics.await_at_least(counter, 0, 5, 10)


def test_pause_iterations_per_us_is_a_positive_rate():
    rate = _atomics.pause_iterations_per_us()
    assert rate >= 1.0
    t0 = time.perf_counter()
    _atomics.spin(int(rate * 2000))  # 2 ms of spinning, by the rate
    assert time.perf_counter() - t0 > 2e-4  # not 10x faster than measured


@pytest.mark.parametrize("bad", [np.zeros(2), np.zeros((2, 2), dtype=np.int64),
                                 np.zeros(2, dtype=np.int32)])
def test_atomics_refuse_anything_but_a_1d_int64_array(bad):
    with pytest.raises(numba.TypingError, match="1-d int64 array"):
        _atomics.fetch_add(bad, 0, 1)

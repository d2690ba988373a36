"""Device timing for the tile sweeps (bench/triton_tiles.py, bench/cupy_tiles.py)."""

import time

import numpy as np


def median_ms(fn, reps, event=None, elapsed=None):
    """Median milliseconds of ``reps`` calls of ``fn`` after one untimed call (which
    compiles): between two device events, ``event()`` each and ``elapsed(start,
    stop)`` in ms, on a GPU; by the host's clock where ``event`` is None."""
    fn()
    times = []
    for _ in range(reps):
        if event is None:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
        else:
            start, stop = event(), event()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(elapsed(start, stop))
    return float(np.median(times))

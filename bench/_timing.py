"""Device timing for the GPU scripts (bench/triton_tiles.py, bench/cupy_tiles.py,
bench/triton_check.py)."""

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


def torch_cuda_ms(fn, reps):
    """:func:`median_ms` between two torch CUDA events on the current device."""
    import torch

    return median_ms(fn, reps, event=lambda: torch.cuda.Event(enable_timing=True),
                     elapsed=lambda start, stop: start.elapsed_time(stop))


def cupy_ms(fn, reps):
    """:func:`median_ms` between two CuPy events on the current device."""
    import cupy

    return median_ms(fn, reps, event=cupy.cuda.Event, elapsed=cupy.cuda.get_elapsed_time)

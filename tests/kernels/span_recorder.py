"""A span function for the thread-span tests that records who ran what."""

import threading
import time


def record_spans(seen, pause=0.0):
    """A span function (Python: ``run_spans``, the pool and the team take any
    callable) that adds 1 to ``out[b0:b1]`` and appends (thread ident, thread
    name, b0, b1) to ``seen``, after sleeping ``pause`` seconds (2 ms is long
    enough for a second thread to take some spans)."""
    def record(out, b0, b1):
        if pause:
            time.sleep(pause)
        seen.append((threading.get_ident(), threading.current_thread().name, b0, b1))
        out[b0:b1] += 1
    return record

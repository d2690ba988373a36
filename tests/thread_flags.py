"""A thread-local flag raised for the length of a block (tests only): how the
suite's checks are switched off where a test needs them off
(``tests/triton_bounds.py``, ``tests/undefined_memory.py``)."""

import contextlib


@contextlib.contextmanager
def flag_raised(state, name):
    """Within the block ``state.<name>`` is True (``state``: a ``threading.local``);
    after it, what it was before (False when unset)."""
    before = getattr(state, name, False)
    setattr(state, name, True)
    try:
        yield
    finally:
        setattr(state, name, before)

"""Module attributes and environment variables set for a block of timings.

The bench scripts try a candidate (a tile table, a chunk budget, a precision, a
kernel build) by setting a module's attribute or an environment variable while
they time it.  The old value must come back after the block even when the
candidate fails, or every later row of the table would be timed with it: these
two context managers are the one way the scripts do that.
"""

import contextlib
import os


@contextlib.contextmanager
def attributes_set(obj, **values):
    """``obj.<name> = value`` for each keyword within the block; the old values back
    after it, even on an error."""
    saved = {name: getattr(obj, name) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


@contextlib.contextmanager
def environ_set(**values):
    """``os.environ[name] = value`` (None: unset) for each keyword within the block;
    each variable as it was after it, even on an error."""
    saved = {name: os.environ.get(name) for name in values}

    def apply(settings):
        for name, value in settings.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    apply(values)
    try:
        yield
    finally:
        apply(saved)

"""An estimator's attributes put back when a step raises (``partial_fit``)."""

import contextlib


@contextlib.contextmanager
def restored_on_error(estimator, *parts):
    """Run a step so that an exception leaves ``estimator`` as it was.

    A streaming step can fail after it changed the model: a mixture's batch
    is blended into the running statistics before its M-step finds the
    covariances overflowed.  Kept, such a half-done step breaks every later
    one and loses what the earlier batches built.  The steps rebind
    attributes and never write into the arrays they hold, so shallow copies
    of ``vars(estimator)`` and of the objects named in ``parts`` (attributes
    whose own fields the step rebinds) restore the state.

    Parameters
    ----------
    estimator : object
    *parts : str
        Names of attributes of ``estimator`` (None or objects) to restore too.
    """
    saved = dict(vars(estimator))
    saved_parts = [(vars(saved[name]), dict(vars(saved[name])))
                   for name in parts if saved.get(name) is not None]
    try:
        yield
    except BaseException:
        vars(estimator).clear()
        vars(estimator).update(saved)
        for fields, copy in saved_parts:
            fields.clear()
            fields.update(copy)
        raise

"""Triton's interpreter without its repeated language patching (tests only).

Under ``TRITON_INTERPRET=1`` a kernel launch patches ``triton.language`` for the
interpreter (``_patch_lang``: every builtin wrapped, found through
``inspect.getmembers`` on the language modules), runs the grid, and restores it.
Triton 3.9 (what CI installs) also patches on *every call of a* ``@triton.jit``
*helper* from inside the kernel, though the launch has already patched the
language the helper sees.  The patches are idempotent -- a builtin once wrapped is
no longer a builtin, so a second pass wraps nothing new -- but each pass scans the
modules' members again, and the E-step kernels call helpers hundreds of times a
launch: on the project's 2-core VM a three-iteration 'full' fit on 150 rows spent
41% of its time there (5.3 of 12.8 s profiled; 2.1-2.2 s against 1.2 s timed).

:func:`install` makes the second and later patching of a helper within one
launch a no-op.  Each launch still patches as before (a fresh record per launch)
and restores what it patched; each helper is still patched the first time it
runs in a launch.  Nothing a kernel computes changes:
``tests/kernels/test_triton_interpreter.py`` compares kernels' outputs with and
without it, bit for bit.  Only the test suite installs it (``conftest.py``);
the package never touches Triton's internals.

Limits: relies on ``triton.runtime.interpreter``'s ``_patch_lang`` (looked up at
call time by ``GridExecutor.__call__`` and ``InterpretedFunction.__call__``) and
``_LangPatchScope``; where a Triton release lacks them, :func:`install` leaves the
interpreter as it is and returns False.
"""

import functools
import threading

_launch = threading.local()  # .patched: helpers patched in the running launch, or None
_MARK = "__wrapped_by_fastlvm_tests__"  # on the wrapped GridExecutor.__call__
_original = None  # Triton's own _patch_lang while installed


def _patch_lang_once(fn):
    """``_patch_lang(fn)``, or an empty scope when ``fn`` was patched already in
    the running launch (the patches of that first call are still in place)."""
    from triton.runtime import interpreter

    patched = getattr(_launch, "patched", None)
    if patched is None or fn not in patched:
        if patched is not None:
            patched.add(fn)
        return _original(fn)
    return interpreter._LangPatchScope()


def _launch_with_fresh_record(call):
    @functools.wraps(call)
    def launch(self, *args, **kwargs):
        outer = getattr(_launch, "patched", None)
        _launch.patched = set()
        try:
            return call(self, *args, **kwargs)
        finally:
            _launch.patched = outer

    setattr(launch, _MARK, True)
    return launch


def installed():
    """Whether :func:`install` is in effect."""
    from triton.runtime import interpreter

    return getattr(interpreter.GridExecutor.__call__, _MARK, False)


def install():
    """Install the once-per-launch patching; True when it is (or already was) in place."""
    global _original
    from triton.runtime import interpreter

    needed = ("_patch_lang", "_LangPatchScope", "GridExecutor", "InterpretedFunction")
    if not all(hasattr(interpreter, name) for name in needed):
        return False
    if installed():
        return True
    _original = interpreter._patch_lang
    interpreter._patch_lang = _patch_lang_once
    interpreter.GridExecutor.__call__ = _launch_with_fresh_record(
        interpreter.GridExecutor.__call__)
    return True


def uninstall():
    """Put the interpreter back as Triton ships it (a no-op when not installed)."""
    global _original
    from triton.runtime import interpreter

    if not installed():
        return
    interpreter.GridExecutor.__call__ = interpreter.GridExecutor.__call__.__wrapped__
    interpreter._patch_lang = _original
    _original = None

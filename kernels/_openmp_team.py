# The kernels' parallel spans on the threads of torch's OpenMP runtime.
#
# Why: after each parallel operation an OpenMP runtime keeps its worker
# threads spinning for a while (libgomp: some milliseconds) so that the next
# operation starts at once.  A process that runs torch operations and
# fastlvm's kernels in turn -- a VAE's decoder, then the fused loss, then the
# decoder's backward -- then has two pools of spinning threads on the same
# cores: torch's OpenMP workers and fastlvm's span pool
# (:mod:`._thread_spans`).  Each steals the other's core: on a 2-core VM the
# fused ELBO's forward kernel (1024 x 784, float32) took 0.62-0.73 ms after
# another fused call and 1.48 ms right after a 256 x 256 ``torch.mm``.  Run
# on torch's own OpenMP threads, the spans find them spinning and start at
# once: 0.98-1.04 ms against 1.53-2.03 ms interleaved with eager PyTorch
# losses (bench/results/cpu-2core-epyc-vae.md, session 39).
#
# Design: :class:`OpenMPTeam` calls the runtime's ``GOMP_parallel`` (GNU
# libgomp's entry point, which LLVM's and Intel's runtimes provide for GNU
# compatibility; a runtime without it keeps the pool) with a ctypes callback.
# Every thread of the team, the calling one among them, enters Python through
# the callback (it takes the GIL to dispatch a span; the Numba kernels release
# it while they run) and calls the job's ``work``, which claims spans until
# none is left (:func:`._thread_spans._run_on_team`); ``GOMP_parallel``
# returns when every thread has finished.  Which thread runs which span never
# changes a result (see :mod:`._thread_spans`).
#
# Limits: only a runtime that torch itself loaded from its own directory (its
# Linux wheels ship libgomp; tested there only), with torch's parallel backend
# reported as OpenMP; anything else keeps the span pool.  One job at a time
# (another thread's call finds the team busy and runs inline), and never in a
# forked child: GNU libgomp does not survive fork, and a child's parallel
# region can wait for threads that exist only in the parent.
import ctypes
import os
import sys
import threading

_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_OPENMP_PREFIXES = ("libgomp", "libomp", "libiomp")


class OpenMPTeam:
    """Runs jobs on the thread team of an OpenMP runtime (a ``ctypes.CDLL`` that
    exports ``GOMP_parallel``)."""

    def __init__(self, library):
        self._parallel = library.GOMP_parallel
        self._parallel.argtypes = [_CALLBACK, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        self._parallel.restype = None
        self._callback = _CALLBACK(self._serve)  # kept alive as long as the team
        self._job = None  # (work, errors) while ``busy`` is held
        self.busy = threading.Lock()
        self.pid = os.getpid()

    def _serve(self, _data):
        """The body of the parallel region, on every thread of the team: it must
        not raise (ctypes would print the error and drop it)."""
        work, errors = self._job
        try:
            work()
        except BaseException as error:  # noqa: BLE001 -- re-raised by run
            errors.append(error)

    def run(self, work, threads):
        """Call ``work()`` on ``threads`` threads of the team, this one among them,
        and return once every call has returned; False (nothing run) if another
        thread's job holds the team or this is a forked child of the process
        that made it.  An exception in any thread is raised here."""
        if os.getpid() != self.pid or not self.busy.acquire(blocking=False):
            return False
        errors = []
        self._job = (work, errors)
        try:
            self._parallel(self._callback, None, threads, 0)
        finally:
            self._job = None
            self.busy.release()
        if errors:
            raise errors[0]
        return True


def torch_openmp_library():
    """torch's OpenMP runtime as a ``ctypes.CDLL``, or None.

    None unless torch is imported, reports OpenMP as its parallel backend, and
    has an OpenMP runtime exporting ``GOMP_parallel`` loaded from its own
    directory (threadpoolctl lists the loaded runtimes)."""
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "__config__"):
        return None
    try:
        if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
            return None
        from threadpoolctl import threadpool_info

        loaded = threadpool_info()
    except Exception:  # noqa: BLE001 -- a torch or threadpoolctl we cannot read
        return None
    torch_dir = os.path.realpath(os.path.dirname(torch.__file__))
    for info in loaded:
        path = os.path.realpath(info.get("filepath") or "")
        if (info.get("internal_api") == "openmp"
                and os.path.basename(path).startswith(_OPENMP_PREFIXES)
                and path.startswith(torch_dir + os.sep)):
            try:
                library = ctypes.CDLL(path)
            except OSError:
                continue
            if hasattr(library, "GOMP_parallel"):
                return library
    return None

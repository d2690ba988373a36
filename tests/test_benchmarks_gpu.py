"""``bench/benchmarks_gpu.py``'s asv benchmarks (issues 3 and 4), every cell of
every timing but the few :data:`LEFT_TO_A_GPU`, at small sizes on the CPU: Triton
through the interpreter, CuPy on the CUDA emulator (``tests/kernels/fake_cupy.py``).
asv reports a cell whose ``setup`` or timing raises as failed and goes on, so on a
GPU a broken cell costs its figure quietly; here it fails the test.  Each timing
must also end with the module's ``synchronize``, after the last kernel it launched
(asv would otherwise time the launches).  Not here: the ``track_*_bytes``
benchmarks, which read the GPU's allocator."""

import itertools

import pytest

from tests.conftest import SCRIPT_DRY_RUN, bench_script

pytestmark = SCRIPT_DRY_RUN
pytest.importorskip("torch")

# the workloads at sizes the interpreter and the emulator run in seconds; K = 70 is
# beyond one Triton component tile (the large-K paths), D = 300 and 768 stay the
# wide rows' (past 256 padded features)
SMALL = dict(DEVICE="cpu", FLASH_GMM=(80, 6, 70), CUPY_FULL_COMPONENTS=5, WIDE_ROWS=(9, 2),
             EM_ITERATION=(120, 3, 4), MPPCA_ROWS={64: 40, 784: 6}, MPPCA_COMPONENTS=(3, 2),
             LINEAR_GAUSSIAN=(60, 5, 2))
# the cells asv skips on purpose (setup raises NotImplementedError)
SKIPPED = {"TritonEStepFlashGMM": [("full", "tf32x3", "recompute"),
                                   ("full", "tf32", "recompute")]}
# cells left to a GPU: D = 768 takes the kernels D = 300 takes (both past 256 padded
# features) at 4x the interpreter's time (a minute with the bounds and race checks),
# and 'full''s two cells take 40 s at D = 300 (the race check's share: its D x D
# factors' loads), where tests/kernels/test_estep_stats.py's wide-row tests run
# both of its paths
LEFT_TO_A_GPU = {"TritonEStepWideRows": lambda cov, d, large_k: d == 768 or cov == "full"}
# cells whose work is torch's or CuPy's own operations (cuBLAS products, batched
# factorisations), which launch none of fastlvm's kernels: the pass for PPCA's and
# FactorAnalysis's scatter matrix, and the missing-data E-step
LIBRARY_OPS_ONLY = {"LinearGaussianFitGPU": lambda backend, model: model != "ppca-em"}
TIMED = ["TritonEStepFlashGMM", "TritonEStepWideRows", "TritonEMIteration", "CuPyEMIteration",
         "CuPyEStepFlashGMM", "CuPyEStepSmallK", "MPPCAEStepGPU", "LinearGaussianFitGPU"]


@pytest.fixture
def suite(cupy, monkeypatch):
    """The asv module at :data:`SMALL`'s sizes on the CPU, the emulator's cupy
    installed."""
    module = bench_script("benchmarks_gpu", monkeypatch)
    for name, value in SMALL.items():
        monkeypatch.setattr(module, name, value)
    return module


def test_every_timed_class_is_run_here(suite):
    """A timing class added to the module without a place in :data:`TIMED` would
    never run before a GPU session."""
    timed = sorted(name for name, value in vars(suite).items()
                   if isinstance(value, type) and not name.startswith("_")
                   and any(attr.startswith("time_") for attr in dir(value)))
    assert timed == sorted(TIMED)


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMED)
def test_every_cell_runs_and_synchronizes_after_its_kernels(suite, name, monkeypatch,
                                                             kernel_launches):
    launches = [0]  # the kernels launched by the last synchronize
    monkeypatch.setattr(suite, "synchronize", lambda backend: launches.__setitem__(
        0, sum(kernel_launches.values())))
    cls = getattr(suite, name)
    timings = [attr for attr in dir(cls) if attr.startswith("time_")]
    skipped = []
    left_to_a_gpu = LEFT_TO_A_GPU.get(name, lambda *cell: False)
    library_ops_only = LIBRARY_OPS_ONLY.get(name, lambda *cell: False)
    for cell in itertools.product(*cls.params):
        if left_to_a_gpu(*cell):
            continue
        if name.startswith("Triton") or "triton" in cell:  # CPU tensors take Triton's
            monkeypatch.setenv("FASTLVM_BACKEND", "triton")   # kernels when asked
        else:
            monkeypatch.delenv("FASTLVM_BACKEND", raising=False)
        bench = cls()
        try:
            bench.setup(*cell)
        except NotImplementedError:
            skipped.append(cell)
            continue
        try:
            for timing in timings:
                before = sum(kernel_launches.values())
                launches[0] = None
                getattr(bench, timing)(*cell)
                after = sum(kernel_launches.values())
                assert launches[0] is not None, (cell, timing, "no synchronize")
                if not library_ops_only(*cell):
                    assert after > before, (cell, timing, "launched no kernel")
                assert launches[0] == after, (cell, timing, "no synchronize after the "
                                              "last kernel")
        finally:
            if hasattr(bench, "teardown"):
                bench.teardown(*cell)
    assert skipped == SKIPPED.get(name, [])

"""``bench/triton_tiles.py``'s sweeps at their full candidate lists, on small shapes
under the interpreter, at the GPU's tile tables and with the tests' memory checks
(bounds, program order, NaN in fresh allocations); ``bench/cupy_tiles.py``'s at
its full launch shapes on the CUDA emulator (guarded arrays, both block orders).

A GPU session spends scarce device time on these sweeps, and a candidate whose
launch goes wrong costs the rest of it: an illegal address poisons the CUDA
context for every later candidate.  Here every candidate of every sweep runs
once, before that: a row that says "error" fails the test (a sweep keeps going
past a failing candidate and prints the reason in its table).  Timings here mean
nothing; the tiles' indexing, buffers and the scripts' own code are what is
checked.
"""

import pytest

from tests.conftest import CUDA, HAS_TRITON
from tests.kernels.test_triton_gpu_tables import gpu_tiles  # noqa: F401 - a fixture

INTERPRETED = pytest.mark.skipif(not HAS_TRITON or CUDA,
                                 reason="the sweeps run on the GPU itself there (bench/"
                                        "gpu_session.sh); here through the interpreter")
pytest.importorskip("torch")


def _rows(table):
    """The table's data rows (below its header and rule)."""
    return [line for line in table.splitlines()[2:] if line.startswith("|")]


def _no_errors(table):
    bad = [row for row in _rows(table) if "error" in row or "too big" in row]
    assert not bad, "\n".join(bad)


@INTERPRETED
def test_the_e_step_sweep(gpu_tiles):  # noqa: F811 - the fixture
    from bench import triton_tiles as tt

    table = tt.sweep((("spherical", 150, 20, 70), ("full", 70, 6, 3)), tt.CANDIDATES,
                     tt.SPLITS_PER_SM[:1], 1, "cpu")
    _no_errors(table)
    configs = 1 + len(tt.CANDIDATES) + len(tt.REGISTER_CAPS)  # the table's, at most
    assert len(_rows(table)) >= 2 * configs - 2  # 'spherical': log_norm and stats rows


@INTERPRETED
def test_the_chunked_sweep(gpu_tiles):  # noqa: F811
    from bench import triton_tiles as tt

    table = tt.chunked_sweep((("diag", 150, 20, 70),), tt.CHUNK_CANDIDATES, 1, "cpu")
    _no_errors(table)
    assert len(_rows(table)) >= len(tt.CHUNK_CANDIDATES)


@INTERPRETED
def test_the_mixture_of_ppca_sweeps(gpu_tiles):  # noqa: F811
    from bench import triton_tiles as tt

    table = tt.mppca_sweep(((150, 32, 3, 4),), tt.MPPCA_CANDIDATES, 1, "cpu")
    _no_errors(table)
    assert len(_rows(table)) == 1 + len(tt.MPPCA_CANDIDATES)  # and the wide kernels' row
    table = tt.wide_mppca_sweep(((60, 300, 2, 4),), tt.WIDE_LOG_PROB, tt.WIDE_STATS, 1,
                                "cpu")
    _no_errors(table)
    assert len(_rows(table)) == 1 + len(tt.WIDE_LOG_PROB) + len(tt.WIDE_STATS)


@INTERPRETED
def test_the_square_blocks_sweep(gpu_tiles):  # noqa: F811
    from bench import triton_tiles as tt

    table = tt.square_sweep((("tied", 60, 300, 3),), tt.SQUARE_ROWS, 1, "cpu")
    _no_errors(table)
    assert len(_rows(table)) == len(tt.SQUARE_ROWS)


def test_the_cupy_tiles_sweep(cupy_backend):
    """Every (rows per tile, MAX_BLOCKS) and occupancy build of the CuPy tile kernels,
    over a 'diag' E-step of 400 rows and a 'full' one, on the emulator."""
    from bench import cupy_tiles as ct

    table = ct.sweep(cupy_backend.estep.cupy, (("diag", 400, 5, 3), ("full", 150, 4, 3)),
                     ct.ROWS, ct.MAX_BLOCKS, 1, "cpu", ct.BLOCKS_PER_SM)
    _no_errors(table)
    per_workload = 1 + len(ct.ROWS) * len(ct.MAX_BLOCKS) + len(ct.BLOCKS_PER_SM)
    assert len(_rows(table)) == 2 * per_workload
    assert sum("no plan" in row for row in _rows(table)) < per_workload  # tiles ran

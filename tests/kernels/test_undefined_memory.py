"""Fresh allocations as a GPU may hand them back (``tests/undefined_memory.py``):
fastlvm's ``torch.empty`` / ``empty_like`` and the emulator's ``cupy.empty`` /
``empty_like`` are NaN (integers their largest value, booleans True), so a read of
an entry nobody wrote fails a test; torch's and the tests' own allocations are
left as torch makes them."""

import numpy as np
import pytest

from tests import undefined_memory
from tests.conftest import CUDA
from tests.kernels import cuda_emulator, fake_cupy

torch = pytest.importorskip("torch")


def _allocate_from(module_name, expression, **names):
    """``expression`` (a torch allocation) evaluated in code whose module is named
    ``module_name``."""
    scope = {"__name__": module_name, "torch": torch, **names}
    exec(f"def call():\n    return {expression}\n", scope)
    return scope["call"]()


@pytest.mark.skipif(CUDA, reason="installed where there is no GPU only")
def test_fastlvms_torch_allocations_are_undefined():
    assert undefined_memory.installed()
    got = {dtype: _allocate_from("fastlvm.kernels.anything", "torch.empty(4, dtype=dtype)",
                                 dtype=dtype)
           for dtype in (torch.float32, torch.float64, torch.int8, torch.int64, torch.bool)}
    assert torch.isnan(got[torch.float32]).all() and torch.isnan(got[torch.float64]).all()
    assert (got[torch.int8] == 127).all() and (got[torch.int64] == 2**63 - 1).all()
    assert got[torch.bool].all()
    like = torch.zeros(3, dtype=torch.int32)
    assert (_allocate_from("fastlvm.mixture.x", "torch.empty_like(like)", like=like)
            == 2**31 - 1).all()
    assert not undefined_memory.undefined(torch.zeros(0)).numel()


@pytest.mark.skipif(CUDA, reason="installed where there is no GPU only")
def test_other_callers_allocations_are_left_alone(monkeypatch):
    filled = []
    monkeypatch.setattr(undefined_memory, "undefined", filled.append)
    _allocate_from("tests.anything", "torch.empty(3)")
    _allocate_from("torch.nn.modules.x", "torch.empty_like(torch.ones(2))")
    assert filled == []
    _allocate_from("fastlvm", "torch.empty(3)")
    assert len(filled) == 1


@pytest.mark.skipif(not cuda_emulator.AVAILABLE, reason="the CUDA emulator needs g++ on Linux")
def test_the_emulators_cupy_allocations_are_undefined():
    fake = fake_cupy.fake_cupy()
    assert np.isnan(fake.empty((2, 3)).get()).all()
    assert (fake.empty_like(fake.zeros(3, dtype=np.int32)).get() == 2**31 - 1).all()
    assert fake.empty(2, dtype=bool).get().all()

"""The helpers that move numbers between the host and a device in one copy
(``fastlvm._arrays``), and the device checks read together
(``kernels/_checks.DeviceChecks``)."""

import numpy as np
import pytest

from fastlvm._arrays import f64_together, to_numpy_together
from fastlvm.kernels._checks import DeviceChecks

torch = pytest.importorskip("torch")


def test_to_numpy_together_reads_device_arrays_in_one_copy():
    from tests import torch_graphs

    a = torch.arange(6.0).reshape(2, 3) + 1  # queued work, then the one copy
    b = torch.tensor(True)
    with torch_graphs.counted_waits() as waits:
        out = to_numpy_together([a, 2, b, np.array([7.0])])
    assert [str(w) for w in waits] == ["Tensor.numpy"]
    assert [o.shape for o in out] == [(2, 3), (), (), (1,)]
    assert all(o.dtype == np.float64 for o in out)
    np.testing.assert_array_equal(out[0], [[1, 2, 3], [4, 5, 6]])
    assert out[1] == 2.0 and out[2] == 1.0 and out[3][0] == 7.0


def test_f64_together_copies_host_values_to_the_device_once():
    """The host values travel in one copy (one buffer: one synchronous transfer,
    which waits once for the work queued); device arrays stay as they are."""
    from tests import torch_graphs

    template = torch.zeros(3, dtype=torch.float32)
    on_device = torch.ones(2, dtype=torch.float64)
    values = [np.arange(4.0).reshape(2, 2), 3, on_device, [1.5, 2.5], np.float32(0.25)]
    with torch_graphs.counted_waits() as waits:
        template + 1  # work queued before the copies
        together = f64_together(template, values)
    assert [str(w) for w in waits] == ["torch.as_tensor behind queued work"]
    storages = {t.untyped_storage().data_ptr() for i, t in enumerate(together) if i != 2}
    assert len(storages) == 1
    assert together[2] is on_device
    for got, want in zip(together, values):
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
        np.testing.assert_array_equal(got.numpy(), np.asarray(want, dtype=np.float64))
    host = f64_together(np.zeros(1), values)
    assert all(isinstance(h, np.ndarray) and h.dtype == np.float64 for h in host)
    np.testing.assert_array_equal(host[2], [1.0, 1.0])


@pytest.mark.parametrize("failing, message", [((), None), ((1,), "second"),
                                              ((0, 1), "first")])
def test_device_checks_raise_the_first_failure_after_one_read(failing, message):
    from tests import torch_graphs

    checks = DeviceChecks()
    for i, name in enumerate(("first", "second")):
        checks.add(torch.tensor(i not in failing), ValueError(name))
    with torch_graphs.counted_waits() as waits:
        if message is None:
            checks.raise_failed()
        else:
            with pytest.raises(ValueError, match=message):
                checks.raise_failed()
    assert [str(w) for w in waits] == ["Tensor.numpy"]
    checks.raise_failed()  # emptied by the read: nothing left to raise

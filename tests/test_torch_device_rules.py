"""The stand-in of tests/torch_device_rules.py: what a CUDA tensor refuses of host
data is refused, and what it takes is let through."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.torch_device_rules import HostDataRefused, host_data_refused  # noqa: E402

T = torch.ones(3, dtype=torch.float64)

REFUSED = {
    "tensor - ndarray": lambda: T - np.ones(3),
    "tensor @ ndarray": lambda: T @ np.ones((3, 2)),
    "numpy.asarray(tensor)": lambda: np.asarray(T),
    "tensor.numpy()": lambda: T.numpy(),
    "a dtype change is no copy to the host": lambda: T.to(torch.float32).numpy(),
    "a view of a host copy is not marked": lambda: T.cpu()[:2].numpy(),
}
TAKEN = {
    "tensor.cpu().numpy()": lambda: T.cpu().numpy(),
    "tensor.detach().cpu().numpy()": lambda: T.detach().cpu().numpy(),
    "tensor.to('cpu').numpy()": lambda: T.to("cpu").numpy(),
    "tensor.to(device='cpu').numpy()": lambda: T.to(device="cpu").numpy(),
    "numpy.asarray(tensor.cpu())": lambda: np.asarray(T.cpu()),
    "torch.as_tensor(ndarray)": lambda: torch.as_tensor(np.ones(3)),
    "indexing by an ndarray": lambda: T[np.array([0, 1])],
    "a NumPy scalar": lambda: T * np.float64(2.0),
    "float() and item()": lambda: float(T.sum()) + T.sum().item(),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_as_on_a_gpu(name):
    with host_data_refused(), pytest.raises(HostDataRefused):
        REFUSED[name]()
    REFUSED[name]()  # outside, a CPU tensor allows it


@pytest.mark.parametrize("name", sorted(TAKEN))
def test_taken_as_on_a_gpu(name):
    with host_data_refused():
        TAKEN[name]()

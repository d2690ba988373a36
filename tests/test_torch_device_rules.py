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
    "a copy to the data's device is no copy to the host": lambda: T.to(T.device).numpy(),
    "a host tensor among the operands": lambda: T + torch.zeros(3),
    "a host tensor from NumPy among the operands": lambda: T * torch.from_numpy(np.ones(3)),
    "the result of host tensors among the operands": lambda: T - (torch.ones(3) * 2),
    "a host copy among the operands": lambda: T @ T.cpu(),
    "a tensor moved next to a host tensor": lambda: T + T.to(torch.zeros(3)),
    "a host tensor in a list of operands": lambda: torch.cat([T, torch.ones(1)]),
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
    "a view of a host copy": lambda: T.cpu()[:2].numpy(),
    "a host tensor made on the device": lambda: T + torch.zeros(3, device=T.device),
    "a host tensor moved to the data's device": lambda: T + torch.zeros(3).to(T.device),
    "a host tensor moved next to the data": lambda: T + torch.zeros(3).to(T),
    "a host tensor moved to the device, then back": lambda: (
        torch.zeros(3).to(T.device).cpu().numpy()),
    "a host scalar among the operands": lambda: T * torch.tensor(2.0),
    "host tensors among themselves": lambda: (torch.ones(3) + torch.zeros(3)).numpy(),
    "a host tensor filled from the device": lambda: torch.zeros(3).copy_(T).numpy(),
    "a device tensor filled from the host": lambda: T.clone().copy_(torch.zeros(3)),
    "torch.from_numpy(ndarray) read back": lambda: torch.from_numpy(np.ones(3)).numpy(),
    "a constructor that fills a device tensor": lambda: T + torch.randn(3, out=T.clone()),
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

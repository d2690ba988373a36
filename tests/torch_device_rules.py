"""CPU tensors that keep a CUDA tensor's rules about host data, for the tests that
run the device paths on the CPU (Triton's interpreter).

A CUDA tensor refuses what a CPU tensor quietly allows, so code that mixes host
data into device work passes on CPU tensors and fails on a GPU:

- reading it through NumPy: ``numpy.asarray(t)``, ``t.numpy()``, a NumPy
  function of it.  On a GPU that raises ("can't convert cuda:0 device type
  tensor to numpy"); the way to the host is ``t.cpu()`` (or ``.to('cpu')``) first;
- a NumPy array of one or more dimensions among a torch operation's operands
  (``t - ndarray``, ``t @ ndarray``): torch makes it a CPU tensor, which a CUDA
  tensor's operation refuses.  Constructors (``torch.as_tensor(a, device=...)``)
  and indexing take host data on a GPU too, and are let through.

:func:`host_data_refused` is a ``TorchFunctionMode`` that raises
:class:`HostDataRefused` at either, so such code fails here as it would there.
Every CPU tensor is taken for a CUDA one but the copies ``.cpu()`` and
``.to('cpu')`` make, so it suits tests whose tensors all stand for CUDA ones
(the device models' tests: ``tests/conftest.py``'s ``torch_device_path``),
not those that hold host tensors of their own (a kernel test's references).
Not seen: CPU tensors that the code makes itself without a ``device=`` and then
mixes with the data's (a GPU run, or the CuPy stand-in, whose arrays keep their
device, sees those).
"""

import contextlib

import numpy as np
import torch
from torch.overrides import TorchFunctionMode


class HostDataRefused(RuntimeError):
    """Host data where a CUDA tensor would refuse it."""


# functions that take host data on a GPU: constructors and indexing
_TAKES_HOST_DATA = {torch.as_tensor, torch.tensor, torch.Tensor.__getitem__,
                    torch.Tensor.__setitem__, torch.Tensor.new_tensor}
_READS_THROUGH_NUMPY = {torch.Tensor.numpy, torch.Tensor.__array__}
_ON_HOST = "_fastlvm_copied_to_the_host"  # the mark of a .cpu() / .to('cpu') copy


class _HostDataRefused(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS_THROUGH_NUMPY and not getattr(args[0], _ON_HOST, False):
            raise HostDataRefused(
                f"{getattr(func, '__name__', func)} of a tensor that stands for a CUDA one: "
                "a GPU tensor is read through .cpu() first (numpy.asarray of it raises "
                "there)")
        if func not in _TAKES_HOST_DATA:
            for value in (*args, *kwargs.values()):
                if isinstance(value, np.ndarray) and value.ndim > 0:
                    raise HostDataRefused(
                        f"a NumPy array of shape {value.shape} among the operands of "
                        f"{getattr(func, '__name__', func)}: a CUDA tensor's operation "
                        "refuses host data (make it a tensor on the device first)")
        out = func(*args, **kwargs)
        if _to_the_host(func, args, kwargs):
            if out is args[0]:  # a CPU tensor's .cpu() is itself; a GPU's is a copy
                out = out.clone()
            setattr(out, _ON_HOST, True)
        return out


def _to_the_host(func, args, kwargs):
    """Whether the call is ``t.cpu()`` or ``t.to`` with the CPU named."""
    if func is torch.Tensor.cpu:
        return True
    return func is torch.Tensor.to and any(
        isinstance(v, (str, torch.device)) and torch.device(v).type == "cpu"
        for v in (*args[1:], kwargs.get("device")) if v is not None)


@contextlib.contextmanager
def host_data_refused():
    """Within it, torch operations keep CUDA tensors' rules on host data."""
    with _HostDataRefused():
        yield

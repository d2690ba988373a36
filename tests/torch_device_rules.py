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
  and indexing take host data on a GPU too, and are let through;
- a host tensor of one or more dimensions among the operands of an operation on
  a CUDA tensor ("Expected all tensors to be on the same device"): one made by a
  constructor without ``device=`` (``torch.zeros(3)``, ``torch.from_numpy(a)``),
  or copied to the host.  A host scalar (0 dimensions) is taken, as CUDA takes it.

:func:`host_data_refused` is a ``TorchFunctionMode`` that raises
:class:`HostDataRefused` at any of these, so such code fails here as it would
there.  Every CPU tensor is taken for a CUDA one but those marked as host:
- the copies ``.cpu()`` and ``.to('cpu')`` (the device named by the string)
  make, and what constructors without ``device=`` make;
- the results of operations whose tensor operands are all host tensors (views
  of them too).
A constructor given ``device=`` makes a device tensor whatever it names (the
tests name 'cpu' where a GPU would be), and ``.to(X.device)``, ``.to(X)`` and
``.cuda()`` move a host tensor to the device (a ``torch.device``, as code that
follows the data names it, is the device here).  So the rules suit tests whose
tensors all stand for CUDA ones (the device models' tests:
``tests/conftest.py``'s ``torch_device_path``), made with ``device=``, not
those that hold host tensors of their own (a kernel test's references).
"""

import contextlib

import numpy as np
import torch
from torch.overrides import TorchFunctionMode


class HostDataRefused(RuntimeError):
    """Host data where a CUDA tensor would refuse it."""


# functions that take host data on a GPU: constructors, indexing, copies
_TAKES_HOST_DATA = {torch.as_tensor, torch.tensor, torch.Tensor.__getitem__,
                    torch.Tensor.__setitem__, torch.Tensor.new_tensor, torch.Tensor.copy_}
# constructors that make a host tensor unless given a device=
# (torch.from_numpy, which no mode sees, is wrapped by host_data_refused)
_CONSTRUCTORS = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
                 torch.linspace, torch.logspace, torch.eye, torch.rand, torch.randn,
                 torch.randint, torch.randperm, torch.tensor, torch.as_tensor,
                 torch.empty_strided}
_READS_THROUGH_NUMPY = {torch.Tensor.numpy, torch.Tensor.__array__}
_ON_HOST = "_fastlvm_on_the_host"  # the mark of a host tensor


def _on_host(t):
    return getattr(t, _ON_HOST, False)


def _tensors(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)


class _HostDataRefused(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", func)
        if func in _READS_THROUGH_NUMPY and not _on_host(args[0]):
            raise HostDataRefused(
                f"{name} of a tensor that stands for a CUDA one: a GPU tensor is read "
                "through .cpu() first (numpy.asarray of it raises there)")
        operands = list(_tensors((*args, *kwargs.values())))
        host = [t for t in operands if _on_host(t)]
        moved = _moved(func, args, kwargs)
        if func not in _TAKES_HOST_DATA and moved is None:
            for value in (*args, *kwargs.values()):
                if isinstance(value, np.ndarray) and value.ndim > 0:
                    raise HostDataRefused(
                        f"a NumPy array of shape {value.shape} among the operands of "
                        f"{name}: a CUDA tensor's operation refuses host data (make it a "
                        "tensor on the device first)")
            if len(host) < len(operands) and any(t.ndim > 0 for t in host):
                raise HostDataRefused(
                    f"a host tensor of shape {tuple(next(t for t in host if t.ndim).shape)} "
                    f"among the operands of {name} on a CUDA tensor: CUDA refuses it "
                    "(Expected all tensors to be on the same device); make it with "
                    "device=, or move it with .to(X.device)")
        out = func(*args, **kwargs)
        if moved is None and (args and out is args[0] or out is kwargs.get("out")):
            return out  # in place, into out= (or no change): it stays where it was
        if moved is None:
            made_here = func in _CONSTRUCTORS and kwargs.get("device") is None and not (
                args and isinstance(args[0], torch.Tensor))
            moved = made_here or (bool(operands) and len(host) == len(operands))
        elif out is args[0]:  # a CPU tensor's move is itself; a GPU's is a copy
            out = out.clone()
        for t in _tensors(out if isinstance(out, (list, tuple)) else (out,)):
            if moved:
                setattr(t, _ON_HOST, True)
            elif _on_host(t):
                delattr(t, _ON_HOST)
        return out


def _moved(func, args, kwargs):
    """True for a move to the host (``t.cpu()``, ``t.to('cpu')``, ``t.to(H)`` with
    H a host tensor), False for one to the device (``t.to(X.device)``, ``t.to(X)``,
    ``t.cuda()``), None for any other call (``t.to(dtype)`` included)."""
    if func is torch.Tensor.cpu:
        return True
    if func is torch.Tensor.cuda:
        return False
    if func is not torch.Tensor.to:
        return None
    for v in (*args[1:], kwargs.get("device")):
        if isinstance(v, str):
            return torch.device(v).type == "cpu"
        if isinstance(v, torch.Tensor):  # next to that tensor, wherever it is
            return _on_host(v)
        if isinstance(v, torch.device):
            return False
    return None


@contextlib.contextmanager
def host_data_refused():
    """Within it, torch operations keep CUDA tensors' rules on host data."""
    # torch.from_numpy makes a host tensor, and no TorchFunctionMode sees it
    from_numpy = torch.from_numpy

    def marked_from_numpy(array):
        out = from_numpy(array)
        setattr(out, _ON_HOST, True)
        return out

    torch.from_numpy = marked_from_numpy
    try:
        with _HostDataRefused():
            yield
    finally:
        torch.from_numpy = from_numpy

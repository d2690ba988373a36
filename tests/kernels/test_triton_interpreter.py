"""The test suite's once-per-launch language patching of Triton's interpreter
(``tests/triton_interpreter.py``) changes no kernel's result, and does cut the
patching: kernels with jit helpers (the 'full' E-step at two component tiles, the
fused ELBO forward and backward) give the same bits with and without it."""

import numpy as np
import pytest

from tests import triton_interpreter
from tests.conftest import CUDA, HAS_TRITON, make_params

pytestmark = pytest.mark.skipif(not HAS_TRITON or CUDA,
                                reason="Triton's interpreter runs where there is no GPU "
                                       "(and Triton is installed)")


def _kernel_outputs():
    """NumPy copies of the outputs of a few launches whose kernels call helpers."""
    import torch

    from fastlvm.kernels import elbo
    from fastlvm.kernels.estep_stats._triton import estep_stats_triton

    rng = np.random.default_rng(3)
    n, d, k = 37, 3, 20  # K beyond the interpreter's 16-wide component tile
    X = rng.standard_normal((n, d))
    means = X[rng.choice(n, k, replace=False)]
    weights = rng.random(k) + 0.2
    stats = estep_stats_triton(torch.as_tensor(X), weights / weights.sum(), means,
                               make_params(rng, "full", k, d), "full",
                               torch.as_tensor(rng.random(n) + 0.5))
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(5, 21, generator=g) > 0.5).float()
    leaves = [torch.randn(1, 5, 21, generator=g).requires_grad_(),
              torch.randn(5, 3, generator=g).requires_grad_(),
              torch.randn(5, 3, generator=g).requires_grad_()]
    bound = elbo(x, *leaves)
    grads = torch.autograd.grad((bound * torch.arange(5.0)).sum(), leaves)
    return [np.asarray(stats[0])] + [t.detach().numpy().copy() for t in (*stats[1:], bound,
                                                                          *grads)]


def test_once_per_launch_patching_changes_no_result(monkeypatch):
    from triton.runtime import interpreter

    if not triton_interpreter.installed():  # conftest installs it where Triton allows
        pytest.skip("this Triton's interpreter has no _patch_lang/_LangPatchScope to wrap")
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    scans = []
    counted = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin",
                        lambda *args: scans.append(1) or counted(*args))
    patched = _kernel_outputs()
    scans_patched = len(scans)
    triton_interpreter.uninstall()
    try:
        assert not triton_interpreter.installed()
        del scans[:]
        plain = _kernel_outputs()
    finally:
        assert triton_interpreter.install()
    assert len(patched) == len(plain) == 9
    for a, b in zip(patched, plain):
        np.testing.assert_array_equal(a, b)
    assert 0 < scans_patched < len(scans) / 10  # nearly all of the patching is gone

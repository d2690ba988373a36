"""``gaussian_mstep``: the M-step of a Gaussian mixture from the E-step kernel's
per-split partials, with the next E-step's coefficients, on the device.

An internal step of ``GaussianMixture`` on torch tensors (Triton) and cupy arrays
(CuPy): it keeps an EM iteration to a few launches (three for 'diag' and
'spherical', five for 'full' and 'tied' with the batched Cholesky) and one read
of the device.  The NumPy reference is its specification; the public statistics
remain :func:`fastlvm.kernels.estep_stats`.
"""

from fastlvm._dispatch import lazy

from ._reference import MStepResult, gaussian_mstep_ref

IMPLEMENTATIONS = {
    "reference": gaussian_mstep_ref,
    "triton": lazy("fastlvm.kernels.gaussian_mstep._triton", "gaussian_mstep_triton"),
    "cupy": lazy("fastlvm.kernels.gaussian_mstep._cupy", "gaussian_mstep_cupy"),
}

__all__ = ["IMPLEMENTATIONS", "MStepResult", "gaussian_mstep_ref"]

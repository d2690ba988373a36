"""``gaussian_mstep``: the M-step of a 'diag' or 'spherical' mixture from the E-step
kernel's per-split partials, with the next E-step's coefficients, on the device.

An internal step of ``GaussianMixture`` on torch tensors (Triton): it keeps an EM
iteration to three launches and one read of the device.  The NumPy reference is
its specification; the public statistics remain :func:`fastlvm.kernels.estep_stats`.
"""

from fastlvm._dispatch import lazy

from ._reference import MStepResult, gaussian_mstep_ref

IMPLEMENTATIONS = {
    "reference": gaussian_mstep_ref,
    "triton": lazy("fastlvm.kernels.gaussian_mstep._triton", "gaussian_mstep_triton"),
}

__all__ = ["gaussian_mstep_ref", "IMPLEMENTATIONS", "MStepResult"]

"""CuPy ``ppca_stats``: the one-component case of the CuPy mixture-of-PPCA pass
(``kernels/mppca_stats/_cupy.py``), its sums mapped to PPCA's by
``_one_component.py``, which states the design and its limits."""

from ..mppca_stats._cupy import mppca_stats_cupy
from ._one_component import ppca_stats_one_component


def ppca_stats_cupy(X, mean, components, noise_variance, sample_weight=None,
                    keep_on_device=False):
    """CuPy PPCA E-step statistics (see :func:`fastlvm.kernels.ppca_stats`) of a
    cupy array; ``keep_on_device`` as in
    :func:`._one_component.ppca_stats_one_component`."""
    return ppca_stats_one_component(mppca_stats_cupy, X, mean, components, noise_variance,
                                    sample_weight, keep_on_device)

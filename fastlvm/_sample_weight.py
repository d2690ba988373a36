"""Sample weights checked with sklearn's messages, for every fastlvm estimator that
takes them (the mixtures, and the VAE's host or device weights), and put in units
of a row for the fits whose optimum does not depend on their scale."""

import math

import numpy as np

from fastlvm._arrays import as_f64, cast_like, is_device_array, namespace


def check_sample_weight(sample_weight, n_samples):
    """float64 contiguous sample weights (or None), with sklearn's messages.

    A scalar weighs every row alike (as sklearn's ``_check_sample_weight``).

    Raises
    ------
    ValueError
        Wrong shape, complex, non-finite or negative weights, or all weights zero.
    """
    if sample_weight is None:
        return None
    sw = np.asarray(sample_weight)
    if np.iscomplexobj(sw):
        raise ValueError("sample_weight must be real; got complex values.")
    sw = sw.astype(np.float64, copy=False)
    if sw.ndim == 0:  # one weight for every row, as sklearn's _check_sample_weight takes it
        sw = np.full(n_samples, float(sw))
    if sw.ndim != 1 or sw.shape[0] != n_samples:
        raise ValueError(f"sample_weight.shape == {sw.shape}, expected ({n_samples},)!")
    if not np.isfinite(sw).all() or (sw < 0).any():
        raise ValueError("sample_weight must be finite and non-negative.")
    if not sw.sum() > 0:
        raise ValueError("sample_weight must contain at least one positive weight; all "
                         "weights are zero.")
    return np.ascontiguousarray(sw)


def in_row_units(sample_weight):
    """``sample_weight`` divided by the power of two nearest its mean (None stays
    None): weights in units of an average row, in the array's own library.

    For the fits whose optimum does not depend on the weights' scale.  The
    mixtures' maximum likelihood (GaussianMixture without a prior,
    MixtureOfPPCA) counts in rows what it adds to each N_k against empty
    components (sklearn's 10 eps): with weights that summed to 1 it moved
    float32 means 6e-6 from the unit-weight fit (50 times float32's eps), and
    weights of 1e-300 fit nothing.  PPCA's and FactorAnalysis's EM kernels
    weigh rows in X's dtype, where weights of 1e-100 are zero.  A power of two
    scales exactly: unit weights (mean 1) are kept bit for bit, and integer
    weights still fit as repeated rows.  Device weights are scaled where they
    are, with nothing read back (:func:`scaled_to_row_units`).

    Parameters
    ----------
    sample_weight : ndarray, torch tensor or cupy array of shape (n_samples,), or None
        Checked weights: finite, non-negative, with a positive sum.
    """
    return scaled_to_row_units(sample_weight)[0]


def scaled_to_row_units(sample_weight):
    """(:func:`in_row_units` of ``sample_weight``, the unit): the power of two
    nearest the weights' mean (1.0 for None), which sums of the returned
    weights are multiplied by to give them back in the caller's units.

    NumPy weights give a float unit.  Device weights (a torch tensor or cupy
    array) give a 0-d float64 array on their device, computed there by the same
    steps: an online step (``partial_fit``) then queues its work without waiting
    for the weights' sum."""
    if sample_weight is None:
        return None, 1.0
    if is_device_array(sample_weight):
        return _scaled_on_device(sample_weight)
    with np.errstate(over="ignore"):  # NumPy's sum; torch and cupy do not warn
        mean = float(sample_weight.sum()) / sample_weight.shape[0]
    if not 0.0 < mean < math.inf:  # a sum past float64's top, or a mean below its bottom
        mean = float(sample_weight.max())
    unit = math.ldexp(1.0, round(math.log2(mean)))
    return (sample_weight if unit == 1.0 else sample_weight / unit), unit


def _scaled_on_device(sample_weight):
    """:func:`scaled_to_row_units` of device weights, nothing read back: the sum in
    the weights' dtype, the mean and the unit in float64, as on the host (both
    round half to even); dividing by a power of two is exact, so a unit of 1
    keeps the weights' bits."""
    xp = namespace(sample_weight)
    mean = as_f64(sample_weight.sum()) / sample_weight.shape[0]
    mean = xp.where((mean > 0.0) & (mean < math.inf), mean, as_f64(sample_weight.max()))
    unit = xp.exp2(xp.round(xp.log2(mean)))
    return sample_weight / cast_like(unit, sample_weight), unit

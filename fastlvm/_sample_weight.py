"""Sample weights checked with sklearn's messages, for every fastlvm estimator that
takes them (the mixtures, and the VAE's host or device weights)."""

import numpy as np


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

"""Covariance-type vocabulary shared by the kernel ops.

sklearn's parameterisation throughout: ``precisions_cholesky`` is the upper
triangular U with ``precision = U @ U.T`` ('full': (K, D, D), 'tied': (D, D)),
the square roots of the precisions ('diag': (K, D)), or of the scalar
precisions ('spherical': (K,)).
"""

import math
import sys

from fastlvm._arrays import as_f64, log, namespace

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
COVARIANCE_CODE = {name: code for code, name in enumerate(COVARIANCE_TYPES)}
FULL, TIED, DIAG, SPHERICAL = range(4)


def precision_cholesky_shape(covariance_type, n_components, n_features):
    """Shape of ``precisions_cholesky`` for a covariance type."""
    return {
        "full": (n_components, n_features, n_features),
        "tied": (n_features, n_features),
        "diag": (n_components, n_features),
        "spherical": (n_components,),
    }[covariance_type]


def second_moment_shape(covariance_type, n_components, n_features):
    """Shape of the shifted second-moment statistic returned by ``estep_stats``."""
    return {
        "full": (n_components, n_features, n_features),
        "tied": (n_features, n_features),
        "diag": (n_components, n_features),
        "spherical": (n_components,),
    }[covariance_type]


def log_det_cholesky(precisions_cholesky, covariance_type, n_components, n_features):
    """log det of each component's precision Cholesky factor, float64 (K,), where the
    factors are (NumPy, torch or CuPy)."""
    pc = as_f64(precisions_cholesky)
    xp = namespace(pc)
    if covariance_type == "full":
        out = log(xp.einsum("kii->ki", pc)).sum(1)
    elif covariance_type == "tied":
        out = log(xp.einsum("ii->i", pc)).sum().reshape(1).repeat(n_components)
    elif covariance_type == "diag":
        out = log(pc).sum(1)
    else:
        out = n_features * log(pc)
    return out


def log_normaliser(precisions_cholesky, covariance_type, n_components, n_features):
    """Per-component constant log|U_k| - D/2 log(2 pi), float64 (K,)."""
    return (log_det_cholesky(precisions_cholesky, covariance_type, n_components, n_features)
            - 0.5 * n_features * math.log(2.0 * math.pi))


def shift_second_moment(nk, sum_x, second_moment, center, new_center, covariance_type):
    """Second moments around ``new_center`` from those around ``center``.

    sum r (x - c')(x - c')^T = S - a e^T - e a^T + N e e^T with a = sum r (x - c) and
    e = c' - c: exact algebra that never subtracts two large raw second moments.
    NumPy arrays or torch tensors alike (float64).

    Parameters
    ----------
    nk : (K,)
    sum_x : (K, D)
    second_moment : around ``center``; (K, D, D) full, (D, D) tied, (K, D) diag, (K,) spherical
    center, new_center : (K, D)
    covariance_type : str

    Returns
    -------
    second moment around ``new_center``, same shape
    """
    a = sum_x - nk[:, None] * center
    e = new_center - center
    if covariance_type == "full":
        cross = a[:, :, None] * e[:, None, :]
        return (second_moment - cross - cross.swapaxes(1, 2)
                + nk[:, None, None] * e[:, :, None] * e[:, None, :])
    if covariance_type == "tied":
        cross = a.T @ e
        return second_moment - cross - cross.T + (nk[:, None] * e).T @ e
    if covariance_type == "diag":
        return second_moment - 2 * a * e + nk[:, None] * e**2
    return second_moment - 2 * (a * e).sum(1) + nk * (e**2).sum(1)


def precision_factors_torch(covariances, covariance_type, out=None):
    """sklearn's upper-triangular precision factors of 'full' (K, D, D) or 'tied'
    (D, D) covariances on their device (batched Cholesky), and the factorisation's
    ``info`` (int32, (K,) or (1,); nonzero where a covariance is not positive
    definite).  Nothing is read back: a factor that failed holds NaN or inf.
    ``out``, a contiguous tensor of the covariances' shape and dtype, receives the
    factors (the transposing copy writes there) and is returned."""
    torch = sys.modules["torch"]
    stack = covariances if covariance_type == "full" else covariances[None]
    lower, info = torch.linalg.cholesky_ex(stack)
    eye = torch.eye(stack.shape[-1], dtype=stack.dtype, device=stack.device)
    factors = torch.linalg.solve_triangular(lower, eye.expand_as(stack), upper=False).mT
    factors = factors if covariance_type == "full" else factors[0]
    if out is None:
        return factors.contiguous(), info
    return out.copy_(factors), info

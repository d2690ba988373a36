"""``log_responsibilities``: row-wise log-sum-exp normalisation."""

from fastlvm._dispatch import is_device_backend, lazy, like, resolve, to_host_view

from .._checks import check_data, check_device_data
from ._numba import log_responsibilities_numba
from ._reference import log_responsibilities_ref


def _reference(V):
    log_resp, log_norm = log_responsibilities_ref(V)
    return log_resp.astype(V.dtype, copy=False), log_norm.astype(V.dtype, copy=False)


IMPLEMENTATIONS = {
    "reference": _reference,
    "numba": log_responsibilities_numba,
    "triton": lazy("fastlvm.kernels.log_responsibilities._triton",
                   "log_responsibilities_triton"),
    "cupy": lazy("fastlvm.kernels.log_responsibilities._cupy", "log_responsibilities_cupy"),
}


def log_responsibilities(weighted_log_prob):
    """Normalise rows of log-weights: log-responsibilities and log-normalisers.

    Exact for rows holding -inf entries (their responsibility is exactly 0) and
    for huge magnitudes (shifted by the row maximum).  A row that is entirely
    -inf gets ``log_norm = -inf`` and NaN log-responsibilities; NaN and +inf
    propagate as in ``v - logsumexp(v)``.

    Parameters
    ----------
    weighted_log_prob : array of shape (n_samples, n_components), float32/64
        log p(x_n | k) + log pi_k: NumPy array or torch CPU tensor (Numba),
        torch CUDA tensor (Triton), cupy array (CuPy).

    Returns
    -------
    log_resp : array of shape (n_samples, n_components), input dtype and type
    log_norm : array of shape (n_samples,), input dtype and type
    """
    backend, impl = resolve("log_responsibilities", IMPLEMENTATIONS, weighted_log_prob,
                            name="weighted_log_prob")
    if is_device_backend(backend):
        V = check_device_data(weighted_log_prob, name="weighted_log_prob",
                              check_finite=False)
    else:
        V = check_data(to_host_view(weighted_log_prob, "weighted_log_prob"),
                       name="weighted_log_prob", check_finite=False)
    if V.shape[1] < 1:
        raise ValueError("weighted_log_prob must have at least one column (component).")
    log_resp, log_norm = impl(V)
    return like(weighted_log_prob, log_resp), like(weighted_log_prob, log_norm)


__all__ = ["log_responsibilities", "log_responsibilities_ref", "IMPLEMENTATIONS"]

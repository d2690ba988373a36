"""``log_mean_exp``: log of the mean of exponentials over importance samples."""

from fastlvm._dispatch import lazy, resolve

from .._vae_checks import TORCH_REFERENCE, autocast_to_float32, check_tensor

IMPLEMENTATIONS = {
    "reference": lazy("fastlvm.kernels.log_mean_exp._reference", "log_mean_exp_ref"),
    "numba": lazy("fastlvm.kernels.log_mean_exp._numba", "log_mean_exp_numba"),
    "triton": lazy("fastlvm.kernels.log_mean_exp._triton", "log_mean_exp_triton"),
}


@autocast_to_float32
def log_mean_exp(log_w):
    """log (1/k) sum_s exp(log_w[s, b]) over the first axis, stable for any magnitude.

    The importance-sampled log-likelihood estimate and the IWAE bound are this
    reduction of the log importance weights.  Differentiable: the gradient is
    the normalised weights softmax_s(log_w[:, b]).  Columns that are all -inf
    give -inf; NaN propagates.

    Parameters
    ----------
    log_w : torch.Tensor of shape (k, batch), float32 or float64, k >= 1

    Returns
    -------
    torch.Tensor of shape (batch,), the input's dtype and device
    """
    check_tensor(log_w, "log_w", ndim=2)
    if log_w.shape[0] == 0:
        raise ValueError("log_w needs at least one sample (row); got shape "
                         f"{tuple(log_w.shape)}.")
    _, impl = resolve("log_mean_exp", IMPLEMENTATIONS, log_w, name="log_w",
                      any_device=TORCH_REFERENCE)
    return impl(log_w.contiguous())


__all__ = ["log_mean_exp", "IMPLEMENTATIONS"]

"""NumPy float64 reference of the fused VAE training step (``vae_mlp_step_numba``).

The same step written plainly: the forward through the layers, the bound (the
ELBO or the importance-weighted bound, see the kernel), the backward by the
chain rule, one Adam update (moments below the dtype's
smallest normal number set to 0, as in the kernel).  Same arguments and in-place
updates as the kernel (see its docstring), computed in float64 and stored
back in the arrays' dtype.
"""

import numpy as np

from . import ELBO, IWAE, IWAE_DREG

_HALF_LOG_2PI = 0.5 * np.log(2 * np.pi)


def _softplus(v):
    return np.maximum(v, 0) + np.log1p(np.exp(-np.abs(v)))


def _log_likelihood(x, dec, dec_logvar, bernoulli):
    """(log p rows (R,), d log p / d dec (R, D), d log p / d logvar (R, D) or None)."""
    if bernoulli:
        return ((x * dec - _softplus(dec)).sum(-1), x - 1 / (1 + np.exp(-dec)), None)
    inv_var = np.exp(-dec_logvar)
    resid = x - dec
    log_p = -0.5 * (dec_logvar + resid**2 * inv_var).sum(-1) - dec.shape[-1] * _HALF_LOG_2PI
    return log_p, resid * inv_var, 0.5 * (resid**2 * inv_var - 1)


def vae_mlp_step_ref(X, index, example_weight, eps, theta, grad, adam_m, adam_v, layers,
                     n_encoder, dec_logvar, lv_offset, bernoulli, objective, lr, beta1, beta2,
                     adam_eps, step):
    """See :func:`fastlvm.kernels.vae_mlp_step._numba.vae_mlp_step_numba`."""
    flat = theta.astype(np.float64)
    k, n_batch, n_latent = eps.shape
    eps = eps.astype(np.float64)
    c = np.asarray(example_weight, dtype=np.float64)  # (B,) relative sample weights

    def layer(i):
        w_off, b_off, n_out, n_in = (int(v) for v in layers[i])
        return flat[w_off:w_off + n_out * n_in].reshape(n_out, n_in), flat[b_off:b_off + n_out]

    x = X[index].astype(np.float64)
    inputs, a, h = [], x, None
    for i in range(len(layers)):
        if i == n_encoder:
            h = a
            mu, logvar = h[:, :n_latent], h[:, n_latent:]
            a = (mu + np.exp(0.5 * logvar) * eps).reshape(k * n_batch, n_latent)
        inputs.append(a)
        w, b = layer(i)
        a = a @ w.T + b
        if i not in (n_encoder - 1, len(layers) - 1):
            a = np.maximum(a, 0)

    lv = dec_logvar.astype(np.float64)
    x_rows = np.tile(x, (k, 1))
    log_p, d_dec, d_lv = _log_likelihood(x_rows, a, lv, bernoulli)
    z = inputs[n_encoder].reshape(k, n_batch, n_latent)
    if objective == ELBO:
        kl = 0.5 * (np.expm1(logvar) + mu**2 - logvar).sum(-1)
        bound = log_p.reshape(k, n_batch).mean(0) - kl
        coef = np.broadcast_to(-c / (n_batch * k), (k, n_batch))
    else:
        inv_var = np.exp(-logvar)
        log_w = log_p.reshape(k, n_batch) + 0.5 * (
            logvar + (z - mu)**2 * inv_var - z**2).sum(-1)
        top = log_w.max(0)
        weights = np.exp(log_w - top)
        bound = top + np.log(weights.mean(0))
        weights /= weights.sum(0)
        coef = -weights * c / n_batch
    rows = coef.reshape(-1, 1)

    g = np.zeros_like(flat)
    if lv_offset >= 0:
        g[lv_offset:lv_offset + X.shape[1]] = (rows * d_lv).sum(0)
    delta = rows * d_dec
    for i in range(len(layers) - 1, -1, -1):
        w_off, b_off, n_out, n_in = (int(v) for v in layers[i])
        a_in = inputs[i]
        g[w_off:w_off + n_out * n_in] = (delta.T @ a_in).ravel()
        g[b_off:b_off + n_out] = delta.sum(0)
        if i == 0:
            break
        delta = delta @ layer(i)[0]
        if i == n_encoder:  # through z = mu + exp(logvar / 2) eps, plus the latent terms
            d_z = delta.reshape(k, n_batch, n_latent)
            if objective == ELBO:  # + c_b KL_b / B
                d_mu = mu * (c / n_batch)[:, None]
                d_logvar = 0.5 * np.expm1(logvar) * (c / n_batch)[:, None]
            else:  # log N(z; 0, I) - log q(z | x) at fixed q, times each sample's coef
                u = (z - mu) * inv_var
                d_z = d_z + coef[..., None] * (u - z)
                if objective == IWAE_DREG:
                    d_z = d_z * weights[..., None]
                d_mu = np.zeros_like(mu)
                d_logvar = np.zeros_like(logvar)
                if objective == IWAE:  # the score terms: log q's own mu and logvar
                    d_mu = -(coef[..., None] * u).sum(0)
                    d_logvar = -0.5 * (coef[..., None] * (u * (z - mu) - 1)).sum(0)
            d_mu = d_mu + d_z.sum(0)
            d_logvar = d_logvar + (d_z * eps).sum(0) * 0.5 * np.exp(0.5 * logvar)
            delta = np.concatenate([d_mu, d_logvar], axis=1)
        else:
            delta = delta * (a_in > 0)

    m = beta1 * adam_m + (1 - beta1) * g
    v = beta2 * adam_v + (1 - beta2) * g * g
    normal = np.finfo(theta.dtype).tiny  # moments below it are set to 0, as the kernel does
    m[np.abs(m) < normal] = 0
    v[v < normal] = 0
    flat -= lr / (1 - beta1**step) * m / (np.sqrt(v) / np.sqrt(1 - beta2**step) + adam_eps)
    theta[...] = flat
    grad[...] = g
    adam_m[...] = m
    adam_v[...] = v
    return float((bound * c).sum())

"""Numba kernel of one whole Adam step of a VAE with multilayer-perceptron networks.

Design: at the batch sizes VAEs train with (around 128 rows) a training step
on the CPU is mostly host work around small matrix products: autograd's
bookkeeping, one dispatch per torch op, the optimiser's per-tensor loop.  On
two cores eager torch's step of the default D = 64 networks took about three
times its products (bench/results/cpu-2core-epyc-vae.md).  This kernel is the
whole step in one call: the batch gathered, the encoder's forward, the
reparameterised draws, the decoder's forward, the bound (reconstruction rows
and the KL to N(0, I), from the row functions of ``variational_bounds`` and
``gaussian_kl``, or the importance weights), the backward written out by hand,
and torch's Adam update.

Every matrix product is a BLAS call (``np.dot`` into a preallocated block),
which runs on OpenBLAS's threads.  The passes between the products are
serial on purpose: a Numba parallel region right after a product waits for
OpenBLAS's still-spinning workers (a parallel bias pass took 8.8 ms instead
of 4 us on 2 cores), and splitting the products over Numba's threads with
one-threaded BLAS was slower still.  At D = 64 the serial passes are about a
fifth of the step.  The Adam update is one plain loop, which LLVM
vectorises (split into blocks it stayed scalar: 1.7 against 0.15 ns a
parameter).

Layout: every trained value lives in one flat vector ``theta`` (the torch
modules' parameters are views of it), and so do the gradient and Adam's two
moments: the update is one pass over four flat arrays.  ``layers`` (n_layers,
4) holds each linear layer's weight offset, bias offset, output and input
width, the encoder's layers first.  Weights are torch's (out, in) layout.

The networks are Linear, ReLU, ..., Linear: the encoder's output is (batch,
2 L), mu then logvar; the decoder's the Bernoulli logits or the Gaussian
means.  The loss is -(1/B) sum_b c_b bound_b over k decoder samples z_sb (c_b the
example's sample weight relative to the mean weight, 1 without weights): the ELBO
(1/k) sum_s log p(x_b | z_sb) - KL_b, or the importance-weighted bound
log (1/k) sum_s w_sb (Burda et al. 2016) with the plain, sticking-the-landing
or doubly reparameterised gradient, as :func:`fastlvm.kernels.iwae_bound`
computes them.  Each decoder row's derivatives are scaled by the loss's
derivative in its log-likelihood (-c_b/(B k), or -c_b w_sb / B with the normalised
weights), so one backward pass through the decoder serves every objective;
DReG's extra factor w_sb on the gradient reaching z is applied per row after it.

Compiled per likelihood and kind of bound (``VAE_MLP_STEPS``, four closures
over the two choices): Numba compiles every branch of a kernel it is given,
and the one step for all of them took 8.0 s to compile against 5.5 s for a
Bernoulli ELBO step alone (bench/results/cpu-2core-epyc-vae.md, session 56).

Limits: float32 and float64; C-contiguous arrays; no other layer types,
activations or optimisers.  The passes are serial and BLAS's blocking is
fixed for a fixed thread count, so a step is deterministic for a given
OpenBLAS thread count (its last bits differ between 1 and 2 threads).
"""

import math

import numba
import numpy as np

from .._numba_support import CACHE, FASTMATH, fast_exp, named_kernel
from ..gaussian_kl._numba import standard_kl_row
from ..log_mean_exp._numba import log_mean_exp_column
from ..variational_bounds._numba import _reconstruction_row, _split_sum, latent_log_ratio_row
from . import ELBO, IWAE, IWAE_DREG


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _layer(flat, layers, index):
    """(weight (out, in), bias (out,)) of layer ``index``: views of ``flat``."""
    w_off, b_off = layers[index, 0], layers[index, 1]
    n_out, n_in = layers[index, 2], layers[index, 3]
    return flat[w_off:w_off + n_out * n_in].reshape((n_out, n_in)), flat[b_off:b_off + n_out]


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _add_bias(out, bias, relu):
    """out += bias on every row, then max(out, 0) where ``relu``."""
    zero = out.dtype.type(0)
    for r in range(out.shape[0]):
        for j in range(out.shape[1]):
            v = out[r, j] + bias[j]
            out[r, j] = max(v, zero) if relu else v


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _mask_relu(delta, activation):
    """delta *= (activation > 0): the ReLU's backward (0 where its output is 0)."""
    zero = delta.dtype.type(0)
    for r in range(delta.shape[0]):
        for j in range(delta.shape[1]):
            delta[r, j] = delta[r, j] if activation[r, j] > zero else zero


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _column_sums(a, out):
    """out[j] = sum_r a[r, j], the rows added in order (float64 sums)."""
    acc = np.zeros(a.shape[1])
    for r in range(a.shape[0]):
        for j in range(a.shape[1]):
            acc[j] += a[r, j]
    for j in range(a.shape[1]):
        out[j] = acc[j]


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _gather_rows(X, index, out):
    """out[r] = X[index[r]], element by element: a row assignment (``out[r] =
    X[i]``) compiles Numba's shape-mismatch message, string formatting and all,
    which took 1.4-1.8 s of a first VAE fit."""
    for r in range(index.shape[0]):
        i = index[r]
        for j in range(out.shape[1]):
            out[r, j] = X[i, j]


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _reparameterise(h, eps, z, sd):
    """z[s B + b] = mu_b + sd_b eps[s, b] from h = [mu | logvar], with the standard
    deviations sd = exp(logvar / 2) written to ``sd`` (the backward's too)."""
    k, n_batch, n_latent = eps.shape
    half = h.dtype.type(0.5)
    for b in range(n_batch):
        for j in range(n_latent):
            sd[b, j] = fast_exp(half * h[b, n_latent + j])
        for s in range(k):
            for j in range(n_latent):
                z[s * n_batch + b, j] = h[b, j] + sd[b, j] * eps[s, b, j]


@numba.njit(inline="always", fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _reconstruction_rows(x, dec, dec_logvar, d_dec, d_lv, bernoulli, want_lv, log_p, coef,
                         scale_now):
    """log p(x_b | dec row) of every decoder row and its derivatives in the row (and
    in the log-variance where ``want_lv``); with ``scale_now`` each row's
    derivatives in the decoder's output are scaled by ``coef[row]`` in the pass."""
    terms = np.empty(dec.shape[1] if _split_sum(dec) else 0, dtype=dec.dtype)
    for r in range(dec.shape[0]):
        log_p[r] = _reconstruction_row(x, dec, dec_logvar, d_dec, d_lv, bernoulli, True,
                                       want_lv, r, terms)
        if scale_now:
            _scale_row(d_dec[r], coef[r])


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _scale_row(row, scale):
    g = row.dtype.type(scale)
    for d in range(row.shape[0]):
        row[d] *= g


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _weighted_column_sums(a, coef, out):
    """out[j] = sum_r coef[r] a[r, j], the rows added in order (float64 sums)."""
    acc = np.zeros(a.shape[1])
    for r in range(a.shape[0]):
        c = coef[r]
        for j in range(a.shape[1]):
            acc[j] += c * a[r, j]
    for j in range(a.shape[1]):
        out[j] = acc[j]


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _importance_weights(h, z, log_p, example_scale, bound, weights, coef):
    """The importance-weighted bound of each example and its samples' weights.

    log w_sb = log p(x_b | z_sb) + log N(z_sb; 0, I) - log q(z_sb | x_b) (the
    latent terms from ``variational_bounds``' row function); bound_b =
    log mean_s w_sb and ``weights`` (k, B) = softmax_s log w_sb, from
    ``log_mean_exp``'s column function (its rules for non-finite columns);
    ``coef`` (k B,) gets the loss's derivative in log w_sb, -weights c_b / B
    (``example_scale`` (B,) = c_b / B, c_b the example's relative weight).
    """
    n_rows, n_latent = z.shape
    n_batch = h.shape[0]
    log_w = np.empty((n_rows // n_batch, n_batch))
    unused = np.empty(0, z.dtype)
    for r in range(n_rows):
        b = r % n_batch
        log_w[r // n_batch, b] = log_p[r] + latent_log_ratio_row(
            z[r], h[b, :n_latent], h[b, n_latent:], unused, False)
    for b in range(n_batch):
        bound[b] = log_mean_exp_column(log_w, b, weights)
    for r in range(n_rows):
        coef[r] = -example_scale[r % n_batch] * weights[r // n_batch, r % n_batch]


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _iwae_latent_backward(h, eps, z, sd, d_z, d_h, weights, coef, objective):
    """d loss / d [mu | logvar] into ``d_h`` for the importance-weighted bound.

    ``d_z`` (k B, L) holds the decoder's part of each sample's z-gradient, its
    row already scaled by ``coef``; this adds the latent terms' part,
    coef (u - z) with u = (z - mu) / var, multiplies the total by the sample's
    weight (``weights`` (k, B)) for DReG, and carries it through
    z = mu + sd eps.  The plain estimator adds the score terms (log q's own
    dependence on mu and logvar), which sticking the landing and DReG drop.
    """
    k, n_batch, n_latent = eps.shape
    half = h.dtype.type(0.5)
    one = h.dtype.type(1)
    zero = h.dtype.type(0)
    inv_var = np.empty(n_latent, h.dtype)
    for b in range(n_batch):
        g_mu = d_h[b, :n_latent]
        g_lv = d_h[b, n_latent:]
        for j in range(n_latent):
            g_mu[j] = zero
            g_lv[j] = zero
            inv_var[j] = fast_exp(-h[b, n_latent + j])
        for s in range(k):
            r = s * n_batch + b
            c = h.dtype.type(coef[r])
            w = h.dtype.type(weights[s, b])
            for j in range(n_latent):
                diff = z[r, j] - h[b, j]
                u = diff * inv_var[j]
                g = d_z[r, j] + c * (u - z[r, j])
                if objective == IWAE_DREG:
                    g *= w
                g_mu[j] += g
                g_lv[j] += g * eps[s, b, j] * half * sd[b, j]
                if objective == IWAE:
                    g_mu[j] -= c * u
                    g_lv[j] -= half * c * (u * diff - one)


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _latent_backward(h, eps, sd, d_z, d_h, bound, log_p, example_scale):
    """d loss / d [mu | logvar] into ``d_h`` from d loss / d z and the KL term,
    and each example's bound (1/k) sum_s log p - KL into ``bound``.

    ``d_z`` (k B, L) already carries the reconstruction's scale -c_b / (B k); the
    KL enters the loss as + c_b KL_b / B (``example_scale`` (B,) = c_b / B, c_b
    the example's relative weight).
    """
    k, n_batch, n_latent = eps.shape
    half = h.dtype.type(0.5)
    for b in range(n_batch):
        kl_scale = h.dtype.type(example_scale[b])
        mu = h[b, :n_latent]
        g_mu = d_h[b, :n_latent]
        g_lv = d_h[b, n_latent:]  # d KL / d logvar first, then the whole gradient
        kl = standard_kl_row(mu, h[b, n_latent:], g_lv, True)
        rec = 0.0
        for s in range(k):
            rec += log_p[s * n_batch + b]
        bound[b] = rec / k - kl
        for j in range(n_latent):
            g_mu[j] = kl_scale * mu[j]
            g_lv[j] = kl_scale * g_lv[j]
        for s in range(k):
            r = s * n_batch + b
            for j in range(n_latent):
                g = d_z[r, j]
                g_mu[j] += g
                g_lv[j] += g * eps[s, b, j] * half * sd[b, j]


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _adam_update(theta, grad, m, v, step_size, beta1, beta2, bias2_sqrt, eps):
    """torch.optim.Adam's update (no weight decay, no amsgrad) over flat arrays.

    One plain loop: split into blocks, LLVM left it scalar (1.7 against 0.15 ns
    a parameter).  Moments that decay below the smallest normal number are set
    to 0: a dead unit's first moment shrinks by beta1 every step and turns
    subnormal after about 800 steps, and subnormal arithmetic tripled the
    update's time (digits, D = 64, 100 epochs).  Such a moment moves its
    parameter by less than 1e-30 a step.
    """
    t = theta.dtype.type
    one_minus_b1, b2, one_minus_b2 = t(1.0 - beta1), t(beta2), t(1.0 - beta2)
    lr, root, tiny = t(step_size), t(bias2_sqrt), t(eps)
    normal = t(np.finfo(theta.dtype).tiny)
    zero = t(0)
    for i in range(theta.shape[0]):
        g = grad[i]
        mi = m[i] + (g - m[i]) * one_minus_b1
        vi = b2 * v[i] + one_minus_b2 * g * g
        mi = mi if abs(mi) >= normal else zero
        vi = vi if vi >= normal else zero
        m[i] = mi
        v[i] = vi
        theta[i] -= lr * mi / (np.sqrt(vi) / root + tiny)


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _linear_forward(a, flat, layers, index, out, relu):
    w, b = _layer(flat, layers, index)
    np.dot(a, w.T, out)
    _add_bias(out, b, relu)


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _linear_backward(delta, a_in, theta, grad, layers, index, delta_in, relu_in):
    """Weight and bias gradients of layer ``index`` from its output's ``delta``;
    where ``delta_in`` has rows, the input's delta (masked by the ReLU before
    the layer where ``relu_in``)."""
    w, _ = _layer(theta, layers, index)
    g_w, g_b = _layer(grad, layers, index)
    np.dot(delta.T, a_in, g_w)
    _column_sums(delta, g_b)
    if delta_in.shape[0]:
        np.dot(delta, w, delta_in)
        if relu_in:
            _mask_relu(delta_in, a_in)


# One compiled step per likelihood and kind of bound (``VAE_MLP_STEPS``): the
# step is a closure over the two choices, and the reconstruction rows are
# inlined into it at Numba's level, so Numba prunes the other likelihood's row
# functions, and the ELBO's step the importance weights (or the importance-
# weighted bound's step the KL), before typing them.  A first default fit
# (Bernoulli, ELBO) compiles only what it runs.
def _vae_mlp_step_of(bernoulli, importance):
    """:func:`vae_mlp_step_numba`'s kernel for one likelihood (``bernoulli``) and
    kind of bound (``importance``: the objective is not the ELBO), both
    compile-time constants (closure variables)."""
    def kernel(X, index, example_weight, eps, theta, grad, adam_m, adam_v, layers, n_encoder,
               dec_logvar, lv_offset, objective, lr, beta1, beta2, adam_eps, step):
        dtype = theta.dtype
        k, n_batch, n_latent = eps.shape
        n_rows = k * n_batch
        n_layers = layers.shape[0]
        n_features = X.shape[1]
        x = np.empty((n_batch, n_features), dtype)
        _gather_rows(X, index, x)

        # forward: every layer's output kept for the backward
        acts = []
        a = x
        for i in range(n_layers):
            if i == n_encoder:
                z = np.empty((n_rows, n_latent), dtype)
                sd = np.empty((n_batch, n_latent), dtype)
                _reparameterise(a, eps, z, sd)
                a = z
            out = np.empty((a.shape[0], layers[i, 2]), dtype)
            _linear_forward(a, theta, layers, i, out, i != n_encoder - 1 and i != n_layers - 1)
            acts.append(out)
            a = out
        h = acts[n_encoder - 1]

        # the reconstruction rows and their derivatives, each row scaled by the loss's
        # derivative in its log-likelihood: -c_b / (B k) for the ELBO, -c_b w_sb / B for the
        # importance-weighted bound (known once every sample's log w is)
        want_lv = lv_offset >= 0
        d_dec = np.empty((n_rows, n_features), dtype)
        d_lv = np.empty((n_rows if want_lv else 1, n_features), dtype)
        log_p = np.empty(n_rows)
        coef = np.empty(n_rows)
        example_scale = np.empty(n_batch)
        for b in range(n_batch):
            example_scale[b] = example_weight[b] / n_batch
            for s in range(k):
                coef[s * n_batch + b] = -example_weight[b] / (n_batch * k)
        bound = np.empty(n_batch)
        weights = np.empty((k, n_batch))
        # the ELBO's rows are scaled in the pass; the bound's once its weights are known
        _reconstruction_rows(x, a, dec_logvar, d_dec, d_lv, bernoulli, want_lv, log_p, coef,
                             not importance)
        if importance:
            _importance_weights(h, z, log_p, example_scale, bound, weights, coef)
            for r in range(n_rows):
                _scale_row(d_dec[r], coef[r])
        if bernoulli:  # no variances
            pass
        elif want_lv:
            _weighted_column_sums(d_lv, coef, grad[lv_offset:lv_offset + n_features])

        # backward through the decoder, then the draws, then the encoder
        delta = d_dec
        for i in range(n_layers - 1, n_encoder - 1, -1):
            a_in = acts[i - 1] if i > n_encoder else z
            delta_in = np.empty((a_in.shape[0], layers[i, 3]), dtype)
            _linear_backward(delta, a_in, theta, grad, layers, i, delta_in, i > n_encoder)
            delta = delta_in
        d_h = np.empty((n_batch, 2 * n_latent), dtype)
        if importance:
            _iwae_latent_backward(h, eps, z, sd, delta, d_h, weights, coef, objective)
        else:
            _latent_backward(h, eps, sd, delta, d_h, bound, log_p, example_scale)
        delta = d_h
        for i in range(n_encoder - 1, -1, -1):
            a_in = acts[i - 1] if i > 0 else x
            delta_in = np.empty((a_in.shape[0] if i > 0 else 0, layers[i, 3]), dtype)
            _linear_backward(delta, a_in, theta, grad, layers, i, delta_in, i > 0)
            delta = delta_in

        bias1 = 1.0 - beta1 ** step
        bias2 = 1.0 - beta2 ** step
        _adam_update(theta, grad, adam_m, adam_v, lr / bias1, beta1, beta2, math.sqrt(bias2),
                     adam_eps)
        return (bound * example_weight).sum()

    name = (f"vae_mlp_step_{'bernoulli' if bernoulli else 'gaussian'}_"
            f"{'iwae' if importance else 'elbo'}")
    return named_kernel(kernel, name, error_model="numpy")


VAE_MLP_STEPS = {(bernoulli, importance): _vae_mlp_step_of(bernoulli, importance)
                 for bernoulli in (True, False) for importance in (True, False)}


def vae_mlp_step_numba(X, index, example_weight, eps, theta, grad, adam_m, adam_v, layers,
                       n_encoder, dec_logvar, lv_offset, bernoulli, objective, lr, beta1, beta2,
                       adam_eps, step):
    """One Adam step on the bound of the batch ``X[index]``; the weighted sum of its
    bounds.

    Parameters
    ----------
    X : ndarray of shape (n_samples, D)
    index : int64 ndarray of shape (B,)
        The batch's rows of X.
    example_weight : float64 ndarray of shape (B,)
        c_b, each example's weight relative to the mean weight (ones without
        sample weights): the loss is -(1/B) sum_b c_b bound_b.
    eps : ndarray of shape (k, B, L)
        The standard-normal draws of z = mu + exp(logvar / 2) eps.
    theta, grad, adam_m, adam_v : ndarrays of shape (n_params,)
        The parameters (updated in place), a gradient buffer (overwritten) and
        Adam's first and second moments (updated in place).
    layers : int64 ndarray of shape (n_layers, 4)
        Weight offset, bias offset, output and input width of each linear layer,
        the encoder's ``n_encoder`` first.
    dec_logvar : ndarray of shape (1, D)
        The Gaussian log-variances (a view of ``theta`` when learned); unused
        for the Bernoulli (pass any (1, 1) array).
    lv_offset : int
        The offset of a learned log-variance in ``theta``, or -1 when fixed.
    bernoulli : bool
    objective : int
        ``ELBO``, ``IWAE``, ``IWAE_STL`` or ``IWAE_DREG`` (``OBJECTIVES`` maps
        ``(objective, gradient_estimator)`` to them).
    lr, beta1, beta2, adam_eps : float
        Adam's settings; ``step`` is this update's count, from 1.

    Returns
    -------
    float
        sum_b c_b bound_b over the batch, in float64.
    """
    return VAE_MLP_STEPS[bool(bernoulli), objective != ELBO](
        X, index, example_weight, eps, theta, grad, adam_m, adam_v, layers, n_encoder,
        dec_logvar, lv_offset, objective, lr, beta1, beta2, adam_eps, step)

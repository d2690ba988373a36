"""The fused VAE losses (elbo, iwae_bound, gaussian_kl, log_mean_exp) against
their plain-torch references, on every backend, dtype and odd shape, with
gradients checked by torch.autograd.gradcheck in float64."""

import gc
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fastlvm.kernels import elbo, gaussian_kl, iwae_bound, log_mean_exp  # noqa: E402
from fastlvm.kernels._host_tensors import empty_host, empty_host_like  # noqa: E402
from fastlvm.kernels.variational_bounds import ELBO_IMPLEMENTATIONS  # noqa: E402
from fastlvm.kernels.variational_bounds._reference import (  # noqa: E402
    log_importance_weights_ref)
from tests.conftest import CUDA, HAS_TRITON  # noqa: E402
from tests.tolerances import RTOL  # noqa: E402

BACKENDS = [b for b in sorted(ELBO_IMPLEMENTATIONS) if b != "triton" or HAS_TRITON]
# (batch, D, L, k): one of everything, D across the 64-pixel float32 partial sums
# and the interpreter's 16-wide tiles, batch not a multiple of a row tile (nor of
# the Numba kernels' blocks of 8 rows, which k = 1 with batch 19 crosses twice)
SHAPES = [(1, 1, 1, 1), (3, 17, 2, 1), (7, 37, 5, 3), (5, 130, 3, 2), (19, 37, 3, 1)]
LOGVAR_KINDS = ["scalar", "per_feature", "per_pixel"]


def _device(backend):
    """Where ``backend``'s tests put their tensors: Triton on the GPU when there is
    one (else CPU tensors under the interpreter), the others on the CPU."""
    return "cuda" if CUDA and backend == "triton" else "cpu"


def _problem(shape, dtype, likelihood, logvar_kind="per_feature", seed=0, device="cpu"):
    """Random inputs (float64 leaves) of one call on ``device``; x binary for
    Bernoulli."""
    g = torch.Generator().manual_seed(seed)
    b, d, l, k = shape
    f64 = dict(dtype=torch.float64, generator=g)
    if likelihood == "bernoulli":
        x = (torch.rand(b, d, **f64) > 0.5).double()
        x[0, 0] = 0.25  # a grey level
        dec_logvar = None
    else:
        x = torch.randn(b, d, **f64)
        dec_logvar = {"scalar": lambda: torch.randn((), **f64) * 0.3,
                      "per_feature": lambda: torch.randn(d, **f64) * 0.3,
                      "per_pixel": lambda: torch.randn(k, b, d, **f64) * 0.3}[logvar_kind]()
    dec = torch.randn(k, b, d, **f64) * 3
    mu = torch.randn(b, l, **f64)
    logvar = torch.randn(b, l, **f64) * 0.5
    z = mu + torch.exp(0.5 * logvar) * torch.randn(k, b, l, **f64)
    tensors = dict(x=x, dec=dec, dec_logvar=dec_logvar, mu=mu, logvar=logvar, z=z)
    return {n: None if t is None else t.to(dtype=dtype, device=device).requires_grad_(
        n != "x") for n, t in tensors.items()}


def _run(backend, fn, t, monkeypatch, **kwargs):
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    out = fn(t, **kwargs)
    monkeypatch.delenv("FASTLVM_BACKEND")
    return out


def _call_elbo(t, likelihood):
    return elbo(t["x"], t["dec"], t["mu"], t["logvar"], likelihood, t["dec_logvar"])


def _call_iwae(t, likelihood, gradient="reparam"):
    return iwae_bound(t["x"], t["dec"], t["z"], t["mu"], t["logvar"], likelihood,
                      t["dec_logvar"], gradient=gradient)


def _grads(value, t, names):
    leaves = [t[n] for n in names if t[n] is not None]
    grads = torch.autograd.grad(value.sum(), leaves, allow_unused=True)
    return [None if g is None else g.detach().double().cpu().numpy() for g in grads]


def _assert_close(actual, expected, dtype, what):
    rtol = RTOL[np.dtype(dtype)]
    expected = np.asarray(expected, dtype=np.float64)
    scale = np.max(np.abs(expected)) if expected.size else 0.0
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol,
                               atol=rtol * (scale + 1.0), err_msg=what)


def _compare(backend, dtype, shape, likelihood, fn, names, monkeypatch, logvar_kind,
             **kwargs):
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    t = _problem(shape, dtype, likelihood, logvar_kind, device=_device(backend))
    ref = _problem(shape, torch.float64, likelihood, logvar_kind)  # on the CPU
    value = _run(backend, fn, t, monkeypatch, likelihood=likelihood, **kwargs)
    expected = _run("reference", fn, ref, monkeypatch, likelihood=likelihood, **kwargs)
    assert value.dtype == dtype and tuple(value.shape) == (shape[0],)
    _assert_close(value.detach().double().cpu(), expected.detach().cpu(), np_dtype, "value")
    for name, g, g_ref in zip(names, _grads(value, t, names), _grads(expected, ref, names)):
        if g_ref is None:
            assert g is None or not np.any(g), name
        else:
            _assert_close(g, g_ref, np_dtype, f"d/d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_elbo_matches_reference(backend, dtype, shape, likelihood, monkeypatch):
    _compare(backend, dtype, shape, likelihood, _call_elbo,
             ["dec", "dec_logvar", "mu", "logvar"], monkeypatch, "per_feature")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("gradient", ["reparam", "stl", "dreg"])
def test_iwae_matches_reference(backend, dtype, shape, likelihood, gradient, monkeypatch):
    _compare(backend, dtype, shape, likelihood, _call_iwae,
             ["dec", "dec_logvar", "z", "mu", "logvar"], monkeypatch, "per_pixel",
             gradient=gradient)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logvar_kind", LOGVAR_KINDS)
def test_gaussian_decoder_logvar_shapes(backend, logvar_kind, monkeypatch):
    _compare(backend, torch.float64, (7, 37, 5, 3), "gaussian", _call_elbo,
             ["dec", "dec_logvar", "mu", "logvar"], monkeypatch, logvar_kind)


def test_two_dimensional_decoder_output_is_one_sample():
    t = _problem((4, 9, 2, 1), torch.float64, "bernoulli")
    two_d = elbo(t["x"], t["dec"][0], t["mu"], t["logvar"])
    np.testing.assert_allclose(two_d.detach().cpu(), _call_elbo(t, "bernoulli").detach().cpu())
    fixed = elbo(t["x"], t["dec"], t["mu"], t["logvar"], "gaussian", 0.0)
    learned = elbo(t["x"], t["dec"], t["mu"], t["logvar"], "gaussian",
                   torch.zeros((), dtype=torch.float64, device=t["x"].device))
    np.testing.assert_allclose(fixed.detach().cpu(), learned.detach().cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_elbo_and_iwae(backend, monkeypatch):
    """Every fused kernel's gradient against finite differences, float64.  Under
    Triton's interpreter in gradcheck's fast mode -- a random projection u^T J v of
    the Jacobian, two evaluations per input rather than two per element (the full
    check there took 20-40 s: 944 interpreted launches) -- with tolerances far
    tighter than the full check's (rtol 1e-6 and atol 1e-9 against 1e-3 and 1e-5): a
    projection averages an error over the entries.  It fails the log-variance
    derivative's constant off by 1e-5, which the full check passes."""
    monkeypatch.setenv("FASTLVM_BACKEND", backend)

    def gradcheck(fn, inputs):
        if backend == "triton" and not CUDA:
            return torch.autograd.gradcheck(fn, inputs, fast_mode=True, rtol=1e-6, atol=1e-9)
        return torch.autograd.gradcheck(fn, inputs)

    t = _problem((3, 6, 2, 2), torch.float64, "gaussian", "per_pixel", device=_device(backend))
    ins = (t["dec"], t["dec_logvar"], t["mu"], t["logvar"])
    assert gradcheck(lambda d, v, m, s: elbo(t["x"], d, m, s, "gaussian", v), ins)
    assert gradcheck(lambda d, v, z, m, s: iwae_bound(t["x"], d, z, m, s, "gaussian", v),
                     (t["dec"], t["dec_logvar"], t["z"], t["mu"], t["logvar"]))
    b = _problem((3, 6, 2, 2), torch.float64, "bernoulli", device=_device(backend))
    assert gradcheck(lambda d, z, m, s: iwae_bound(b["x"], d, z, m, s),
                     (b["dec"], b["z"], b["mu"], b["logvar"]))
    assert gradcheck(lambda m, s, mp, sp: gaussian_kl(m, s, mp, sp),
                     (t["mu"], t["logvar"], (t["mu"] * 0.5 + 0.1).detach().requires_grad_(),
                      (t["logvar"] * 0.3).detach().requires_grad_()))
    assert gradcheck(lambda m, s: gaussian_kl(m, s), (t["mu"], t["logvar"]))
    assert gradcheck(log_mean_exp, (t["dec"][:, :, 0],))


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_recomputes_the_buffers(backend, monkeypatch):
    """The first backward scales its buffers in place; a second one (retain_graph)
    must give the same gradient, not a doubly scaled one."""
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    t = _problem((4, 20, 3, 3), torch.float64, "bernoulli", device=_device(backend))
    for value, leaves in ((_call_iwae(t, "bernoulli").sum(), [t["dec"], t["z"]]),
                          (_call_elbo(t, "bernoulli").sum(), [t["dec"], t["logvar"]])):
        first = torch.autograd.grad(value, leaves, retain_graph=True)
        second = torch.autograd.grad(value, leaves)
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("k", [1, 3])
def test_elbo_backward_with_unit_row_gradients(backend, likelihood, k, monkeypatch):
    """The ELBO backward leaves a decoder row's derivatives as the forward wrote
    them where its scale grad / k is 1 (``elbo(...).sum()`` at k = 1); rows of
    other scales, 0 and negative among them, in the same call are scaled."""
    t = _problem((9, 37, 3, k), torch.float64, likelihood, "per_pixel",
                 device=_device(backend))
    ref = _problem((9, 37, 3, k), torch.float64, likelihood, "per_pixel")
    upstream = torch.tensor([1.0, 0.5, float(k), 0.0, 1.0, -1.0, 2.0 * k, 1.0, -k * 0.25],
                            dtype=torch.float64)
    names = ["dec", "dec_logvar", "mu", "logvar"] if likelihood == "gaussian" else [
        "dec", "mu", "logvar"]
    grads = {}
    for which, tensors in ((backend, t), ("reference", ref)):
        value = _run(which, _call_elbo, tensors, monkeypatch, likelihood=likelihood)
        grads[which] = torch.autograd.grad(value, [tensors[n] for n in names],
                                           upstream.to(value.device))
    for name, g, g_ref in zip(names, grads[backend], grads["reference"]):
        np.testing.assert_allclose(g.detach().cpu(), g_ref, rtol=1e-12, atol=1e-12,
                                   err_msg=f"d/d{name}")


def test_dreg_equals_the_two_surrogate_losses():
    """DReG on a linear encoder and decoder: the encoder's gradient is that of
    sum_s stop(w_s^2) log w_s with q's parameters fixed in log q, the decoder's
    is the IWAE gradient (Tucker et al. 2019, eq. 5)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(5, 8, generator=g) > 0.5).double()
    enc = torch.randn(8, 6, dtype=torch.float64, generator=g).requires_grad_()
    dec = torch.randn(3, 8, dtype=torch.float64, generator=g).requires_grad_()
    eps = torch.randn(4, 5, 3, dtype=torch.float64, generator=g)

    def forward(gradient):
        h = x @ enc
        mu, logvar = h[:, :3], h[:, 3:] * 0.3
        z = mu + torch.exp(0.5 * logvar) * eps
        return z, mu, logvar, z @ dec

    z, mu, logvar, logits = forward("dreg")
    grads = torch.autograd.grad(iwae_bound(x, logits, z, mu, logvar, gradient="dreg").sum(),
                                [enc, dec])
    z, mu, logvar, logits = forward("reparam")
    log_w = log_importance_weights_ref(x, logits, None, z, mu, logvar, "bernoulli", "stl")
    w = torch.softmax(log_w, dim=0).detach()
    enc_grad = torch.autograd.grad((w * w * log_w).sum(), enc, retain_graph=True)[0]
    dec_grad = torch.autograd.grad(iwae_bound(x, logits, z, mu, logvar).sum(), dec)[0]
    np.testing.assert_allclose(grads[0], enc_grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads[1], dec_grad, rtol=1e-10, atol=1e-12)


def test_bounds_order_in_expectation_on_a_linear_gaussian_model():
    """ELBO <= IWAE_5 <= IWAE_50 <= log p(x) in expectation (Burda et al. 2016,
    theorem 1), on a linear-Gaussian model whose log p(x) is exact."""
    g = torch.Generator().manual_seed(0)
    d, l, reps = 6, 2, 4000
    W = torch.randn(d, l, dtype=torch.float64, generator=g)
    noise = 0.5
    x1 = torch.randn(1, d, dtype=torch.float64, generator=g)
    cov = W @ W.T + noise * torch.eye(d, dtype=torch.float64)
    log_px = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=torch.float64),
                                                    cov).log_prob(x1[0])
    x = x1.expand(reps, d).contiguous()
    mu = torch.full((reps, l), 0.3, dtype=torch.float64)  # a deliberately poor q
    logvar = torch.full((reps, l), -0.5, dtype=torch.float64)

    def bound(k, fn):
        z = mu + torch.exp(0.5 * logvar) * torch.randn(k, reps, l, dtype=torch.float64,
                                                       generator=g)
        return fn(z, z @ W.T).mean().item()

    gauss = dict(likelihood="gaussian", decoder_logvar=math.log(noise))
    e = bound(1, lambda z, m: elbo(x, m, mu, logvar, **gauss))
    i5 = bound(5, lambda z, m: iwae_bound(x, m, z, mu, logvar, **gauss))
    i50 = bound(50, lambda z, m: iwae_bound(x, m, z, mu, logvar, **gauss))
    assert e < i5 < i50 < log_px.item()
    assert log_px.item() - i50 < 0.5 * (log_px.item() - e)  # and the gap closes


def test_gaussian_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(1)
    mu, logvar = torch.randn(2, 3, dtype=torch.float64, generator=g), torch.randn(
        2, 3, dtype=torch.float64, generator=g) * 0.3
    mp, lp = torch.randn(2, 3, dtype=torch.float64, generator=g), torch.randn(
        2, 3, dtype=torch.float64, generator=g) * 0.3
    z = mu + torch.exp(0.5 * logvar) * torch.randn(200_000, 2, 3, dtype=torch.float64,
                                                   generator=g)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(mp, torch.exp(0.5 * lp))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    np.testing.assert_allclose(gaussian_kl(mu, logvar, mp, lp), mc, atol=0.02)
    np.testing.assert_allclose(gaussian_kl(mu, logvar),
                               gaussian_kl(mu, logvar, torch.zeros((), dtype=torch.float64),
                                           torch.zeros((), dtype=torch.float64)), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log_mean_exp_edge_cases(backend, dtype, monkeypatch):
    big = float(torch.finfo(dtype).max) / 4
    log_w = torch.tensor([[0.0, -math.inf, big, -1000.0, math.nan],
                          [-math.inf, -math.inf, big, 0.0, 0.0],
                          [-2.0, -math.inf, -big, -1000.0, 1.0]], dtype=dtype)
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    out = log_mean_exp(log_w.to(_device(backend))).double().cpu()
    expected = torch.logsumexp(log_w.double(), 0) - math.log(3)
    np.testing.assert_allclose(out[:4], expected[:4], rtol=RTOL[np.dtype(
        np.float32 if dtype == torch.float32 else np.float64)])
    assert out[1] == -math.inf and math.isnan(out[4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_data_off_the_support_raises(backend, monkeypatch):
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    t = _problem((3, 5, 2, 1), torch.float64, "bernoulli", device=_device(backend))
    for bad in (1.5, -0.1, math.nan):
        x = t["x"].clone()
        x[1, 2] = bad
        with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
            elbo(x, t["dec"], t["mu"], t["logvar"])
        with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
            iwae_bound(x, t["dec"], t["z"], t["mu"], t["logvar"])
        # check_input=False: the caller vouches for x; no count is read, no error
        for value in (elbo(x, t["dec"], t["mu"], t["logvar"], check_input=False),
                      iwae_bound(x, t["dec"], t["z"], t["mu"], t["logvar"],
                                 check_input=False)):
            assert value.shape == (3,)
            assert torch.isfinite(value[[0, 2]]).all()  # the rows without the bad entry
    for bad in (math.inf, -math.inf, math.nan):
        x = torch.randn(3, 5, dtype=torch.float64, device=_device(backend))
        x[2, 4] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            iwae_bound(x, t["dec"], t["z"], t["mu"], t["logvar"], "gaussian", 0.0)
        with pytest.raises(ValueError, match="NaN or infinite"):
            elbo(x, t["dec"], t["mu"], t["logvar"], "gaussian", 0.0)


def test_bad_arguments_raise_clear_errors():
    t = _problem((3, 5, 2, 2), torch.float64, "bernoulli")
    x, dec, z, mu, lv = t["x"], t["dec"], t["z"], t["mu"], t["logvar"]
    cases = [
        (lambda: elbo(x.numpy(), dec, mu, lv), TypeError, "x must be a torch tensor"),
        (lambda: elbo(x.float(), dec, mu, lv), TypeError, "dtype"),
        (lambda: elbo(x, dec[:, :2], mu, lv), ValueError, "decoder_out must have shape"),
        (lambda: elbo(x, dec, mu[:, :0], lv[:, :0]), ValueError, "latent size is 0"),
        (lambda: elbo(x, dec, mu, lv[:, :1]), ValueError, "mu and logvar"),
        (lambda: elbo(x, dec, mu, lv, "poisson"), ValueError, "likelihood"),
        (lambda: elbo(x, dec, mu, lv, "gaussian"), ValueError, "needs decoder_logvar"),
        (lambda: elbo(x, dec, mu, lv, "bernoulli", 0.0), ValueError, "leave it None"),
        (lambda: elbo(x, dec, mu, lv, "gaussian", torch.zeros(4, dtype=torch.float64)),
         ValueError, "decoder_logvar must be"),
        (lambda: iwae_bound(x, dec, z[:1], mu, lv), ValueError, "z must have shape"),
        (lambda: iwae_bound(x, dec, z, mu, lv, gradient="vimco"), ValueError, "gradient"),
        (lambda: elbo(x[:0], dec[:, :0], mu[:0], lv[:0]), ValueError, "at least one row"),
        (lambda: gaussian_kl(mu, lv, mu), ValueError, "both mu_prior and logvar_prior"),
        (lambda: gaussian_kl(mu, lv, mu[:, :1].T, lv), ValueError, "does not broadcast"),
        (lambda: log_mean_exp(mu[:0]), ValueError, "at least one sample"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_numba_runs_on_cpu_tensors_without_copying(monkeypatch):
    """The default backend of a CPU tensor is Numba, reading it in place: a
    non-contiguous view gives the same result as its contiguous copy."""
    t = _problem((4, 9, 2, 3), torch.float64, "bernoulli")
    view = t["dec"].detach().transpose(0, 1).contiguous().transpose(0, 1)
    assert not view.is_contiguous()
    np.testing.assert_allclose(
        elbo(t["x"], view, t["mu"], t["logvar"]).detach(),
        elbo(t["x"], t["dec"].detach(), t["mu"], t["logvar"]).detach(), rtol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 2), (7, 4, 37)])
@pytest.mark.parametrize("wants", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("with_dz", [True, False])
def test_numba_latent_backward_matches_torch_ops(dtype, shape, wants, with_dz):
    """The IWAE backward's latent part in one Numba pass against the torch ops it
    replaces (k, batch, L odd; each score term asked for or not; d_z present or
    not): d_z scaled per row in place, the score terms summed over samples."""
    from fastlvm.kernels._vae_autograd import latent_backward_torch
    from fastlvm.kernels.variational_bounds._numba import latent_backward_numba

    g = torch.Generator().manual_seed(3)
    k, b, l = shape
    z, d_z = (torch.randn(k, b, l, generator=g, dtype=dtype) for _ in range(2))
    mu = torch.randn(b, l, generator=g, dtype=dtype)
    logvar = 0.5 * torch.randn(b, l, generator=g, dtype=dtype)
    coef = torch.rand(k, b, generator=g, dtype=dtype) - 0.3
    got = latent_backward_numba(z, mu, logvar, coef, d_z.clone() if with_dz else None, *wants)
    want = latent_backward_torch(z.double(), mu.double(), logvar.double(), coef.double(),
                                 d_z.double() if with_dz else None, *wants)
    rtol = RTOL[np.dtype("float32" if dtype == torch.float32 else "float64")]
    for name, a, e in zip(("d_z", "grad_mu", "grad_logvar"), got, want):
        if e is None:
            assert a is None, name
            continue
        assert a.dtype == dtype and a.shape == e.shape, name
        np.testing.assert_allclose(a.double().numpy(), e.numpy(), rtol=rtol,
                                   atol=rtol * float(e.abs().max()), err_msg=name)


def _close_or_none(actual, expected, dtype, name):
    """``actual`` equals ``expected`` (same dtype and shape) to ``dtype``'s tolerance,
    or both are None."""
    if expected is None:
        assert actual is None, name
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    rtol = RTOL[np.dtype("float32" if dtype == torch.float32 else "float64")]
    np.testing.assert_allclose(actual.double().cpu().numpy(), expected.double().cpu().numpy(),
                               rtol=rtol, atol=rtol * (float(expected.abs().max()) + 1.0),
                               err_msg=name)


def _fused_problem(g, shape, dtype, case):
    """(likelihood, x, dec, dec_logvar, mu, logvar) on the CPU for the fused-route
    tests: ``case`` is 'bernoulli' (x binary but for one entry off the support,
    counted and not raised there), 'shared_logvar' or 'per_pixel_logvar'."""
    b, d, l, k = shape
    likelihood = "bernoulli" if case == "bernoulli" else "gaussian"
    x = torch.randn(b, d, generator=g, dtype=dtype)
    if likelihood == "bernoulli":
        x = (x > 0).to(dtype)
        x[0, 0] = 2.0
    dec = 3 * torch.randn(k, b, d, generator=g, dtype=dtype)
    lv_shape = {"bernoulli": None, "shared_logvar": (1, d), "per_pixel_logvar": (k, b, d)}[case]
    dec_lv = None if lv_shape is None else 0.3 * torch.randn(lv_shape, generator=g, dtype=dtype)
    mu = torch.randn(b, l, generator=g, dtype=dtype)
    logvar = 0.5 * torch.randn(b, l, generator=g, dtype=dtype)
    return likelihood, x, dec, dec_lv, mu, logvar


def _fused_elbo_backend(backend):
    """(kernels, fused forward, fused backward) of a backend's ELBO."""
    if backend == "numba":
        from fastlvm.kernels.variational_bounds import _numba as module

        return module.NUMBA_KERNELS, module.elbo_forward_numba, module.elbo_backward_numba
    from fastlvm.kernels.variational_bounds import _triton as module

    return module.TRITON_KERNELS, module.elbo_forward_triton, module.elbo_backward_triton


@pytest.mark.parametrize("backend, shape", [
    (backend, shape) for backend in ("numba", "triton") if backend in BACKENDS
    # Numba fuses the one-sample ELBO only (k > 1 is the composed route itself)
    for shape in [(1, 1, 1, 1), (5, 37, 3, 1), (4, 9, 37, 1)]
    + ([(4, 9, 37, 3)] if backend == "triton" else [])])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["bernoulli", "shared_logvar", "per_pixel_logvar"])
@pytest.mark.parametrize("wants", [(True, True, True, True), (True, False, False, True),
                                   (False, True, True, False), (False, False, False, False)])
def test_fused_elbo_matches_the_composed_route(backend, dtype, shape, case, wants):
    """The ELBO's forward and backward in one launch each, against the route
    composed from the same backend's reconstruction and KL kernels and torch ops
    (k = 1, and k = 3 for Triton; D and L across the vector width and the
    interpreter's tiles; each output asked for or not): the value, the bad-entry count, the buffers
    as the backward scales them, and the gradients in mu and logvar."""
    from fastlvm.kernels._vae_autograd import elbo_backward_torch, elbo_forward_composed

    kernels, elbo_forward, elbo_backward = _fused_elbo_backend(backend)
    g = torch.Generator().manual_seed(5)
    likelihood, x, dec, dec_lv, mu, logvar = _fused_problem(g, shape, dtype, case)
    b, _, _, k = shape
    grad = torch.rand(b, generator=g, dtype=dtype) - 0.3
    device = _device(backend)
    x, dec, dec_lv, mu, logvar, grad = (None if t is None else t.to(device)
                                        for t in (x, dec, dec_lv, mu, logvar, grad))
    want_dec, want_lv, want_mu, want_logvar = wants
    want_lv = want_lv and likelihood == "gaussian"
    args = (x, dec, dec_lv, mu, logvar, likelihood, want_dec, want_lv, want_logvar)
    fused = elbo_forward(kernels, *args)
    composed = elbo_forward_composed(kernels, *args)

    def close(a, e, name):
        _close_or_none(a, e, dtype, name)

    def count(n_bad):  # Numba: an int; Triton: per-example counts on the device
        return int(n_bad.sum()) if isinstance(n_bad, torch.Tensor) else n_bad

    assert count(fused[1]) == count(composed[1]) == (1 if likelihood == "bernoulli" else 0)
    # a composed route whose KL kernel writes no gradient (Triton's) leaves it to
    # the backward: expm1(logvar) / 2 then
    expected_kl_grad = composed[4] if composed[4] is not None or not want_logvar else (
        0.5 * torch.expm1(logvar))
    for name, a, e in zip(("value", "d_dec", "d_lv", "kl_logvar_grad"),
                          (fused[0], *fused[2:]), (*composed[:1], *composed[2:4],
                                                   expected_kl_grad)):
        close(a, e, name)
    kl_grad = fused[4]
    back = elbo_backward(grad, k, fused[2], fused[3], mu, logvar, kl_grad, want_mu,
                         want_logvar)
    expected = elbo_backward_torch(grad, k, composed[2], composed[3], mu, logvar, composed[4],
                                   want_mu, want_logvar)
    for name, a, e in zip(("d_dec", "d_lv", "grad_mu", "grad_logvar"), back, expected):
        close(a, e, name)
    if kl_grad is not None:  # the backward reads the forward's KL buffer, never changes it
        close(kl_grad, 0.5 * torch.expm1(logvar), "kl_logvar_grad after the backward")


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton package")
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (5, 37, 3, 2), (4, 9, 37, 3), (7, 20, 2, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["bernoulli", "shared_logvar", "per_pixel_logvar"])
@pytest.mark.parametrize("wants", [(True, True, True, True, True),
                                   (True, False, False, True, False),
                                   (False, True, True, False, True),
                                   (False, False, False, False, False)])
@pytest.mark.parametrize("expanded_grad", [False, True])
def test_fused_iwae_matches_the_composed_route(shape, dtype, case, wants, expanded_grad):
    """Triton's IWAE log-weights and backward in one launch each, against the route
    composed from its reconstruction and latent kernels and torch ops (batch
    across the interpreter's row and example tiles, L across its 16-wide latent
    tiles, each output asked for or not; the upstream gradient random, or one
    value expanded with stride 0 as ``.sum()`` gives it): the log-weights, the
    bad-entry count, the buffers as the backward scales them, the score terms."""
    from fastlvm.kernels._vae_autograd import iwae_backward_composed, iwae_log_weights_composed
    from fastlvm.kernels.variational_bounds import _triton as module

    kernels = module.TRITON_KERNELS
    g = torch.Generator().manual_seed(6)
    b, _, l, k = shape
    likelihood, x, dec, dec_lv, mu, logvar = _fused_problem(g, shape, dtype, case)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(k, b, l, generator=g, dtype=dtype)
    grad = torch.rand(b, generator=g, dtype=dtype) - 0.3
    device = _device("triton")
    x, dec, dec_lv, z, mu, logvar, grad = (None if t is None else t.to(device)
                                           for t in (x, dec, dec_lv, z, mu, logvar, grad))
    if expanded_grad:  # made on the device: a copy there would not keep the stride 0
        grad = grad[:1].expand(b)
        assert grad.stride(0) == 0 or b == 1
    want_dec, want_lv, want_z, want_mu, want_logvar = wants
    want_lv = want_lv and likelihood == "gaussian"
    args = (kernels, x, dec, dec_lv, z, mu, logvar, likelihood, want_dec, want_lv, want_z)
    fused = module.iwae_log_weights_triton(*args)
    composed = iwae_log_weights_composed(*args)
    assert int(fused[1].sum()) == int(composed[1].sum()) == (likelihood == "bernoulli")
    for name, a, e in zip(("log_w", "d_dec", "d_lv", "d_z"), (fused[0], *fused[2:]),
                          (composed[0], *composed[2:])):
        _close_or_none(a, e, dtype, name)
    weights = torch.softmax(composed[0], dim=0)
    back = module.iwae_backward_triton(kernels, grad, weights, *fused[2:4], z, mu, logvar,
                                       fused[4], want_mu, want_logvar)
    expected = iwae_backward_composed(kernels, grad, weights, *composed[2:4], z, mu, logvar,
                                      composed[4], want_mu, want_logvar)
    for name, a, e in zip(("d_dec", "d_lv", "d_z", "grad_mu", "grad_logvar"), back, expected):
        _close_or_none(a, e, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_buffers_own_their_memory(dtype):
    """The Numba kernels' output buffers (NumPy blocks seen by torch) are writable,
    C-contiguous CPU tensors of the asked shape and dtype, and keep their memory
    once the NumPy array's name is gone: later buffers do not overwrite them."""
    t = empty_host((3, 1, 5), dtype)
    assert t.shape == (3, 1, 5) and t.dtype == dtype and t.is_contiguous()
    assert t.device.type == "cpu"
    t.fill_(2.5)
    gc.collect()
    others = [empty_host_like(t).fill_(-1.0) for _ in range(4)]
    assert torch.all(t == 2.5)
    assert all(o.shape == t.shape and o.dtype == dtype and torch.all(o == -1) for o in others)
    assert t.data_ptr() not in {o.data_ptr() for o in others}


@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_kl_keeps_its_digits_near_the_prior(backend, monkeypatch):
    """Near q = N(0, I) the KL is ~logvar^2 / 4 per dimension; exp(logvar) - 1 -
    logvar would cancel to ~1e-16 absolute, expm1 keeps it to ~1e-12 relative.
    The fused backends' logvar gradient expm1(logvar) / 2 keeps its digits too
    (the reference's is autograd's, exp(logvar) / 2 - 1 / 2)."""
    lv = np.array([[1e-5, -3e-6, 2e-8, 4e-7], [0.4, -0.45, 0.7, 1e-3]])
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    logvar = torch.tensor(lv, device=_device(backend)).requires_grad_()
    mu = torch.zeros_like(logvar).requires_grad_()
    kl = gaussian_kl(mu, logvar)
    np.testing.assert_allclose(kl.detach().cpu().numpy(), 0.5 * (np.expm1(lv) - lv).sum(1),
                               rtol=1e-10)
    (grad,) = torch.autograd.grad(kl.sum(), [logvar])
    if backend != "reference":
        np.testing.assert_allclose(grad.cpu().numpy(), 0.5 * np.expm1(lv), rtol=1e-12)
    # the same near a general prior: q differs from p by logvar - logvar_p = lv
    lvp = np.array([[0.3, -1.2, 2.0, 0.0], [1.0, 0.5, -0.7, 0.2]])
    mp = np.full_like(lv, 1.5)
    logvar = torch.tensor(lv + lvp, device=_device(backend)).requires_grad_()
    logvar_p = torch.tensor(lvp, device=_device(backend)).requires_grad_()
    mu = torch.tensor(mp + 1e-6, device=_device(backend))
    kl = gaussian_kl(mu, logvar, torch.tensor(mp, device=_device(backend)), logvar_p)
    delta = (lv + lvp) - lvp  # the logvar difference as the inputs hold it
    expected = 0.5 * (np.expm1(delta) - delta + 1e-12 * np.exp(-lvp)).sum(1)
    np.testing.assert_allclose(kl.detach().cpu().numpy(), expected, rtol=1e-9)
    if backend != "reference":
        grads = torch.autograd.grad(kl.sum(), [logvar, logvar_p])
        np.testing.assert_allclose(grads[0].cpu().numpy(), 0.5 * np.expm1(delta), rtol=1e-9)
        np.testing.assert_allclose(grads[1].cpu().numpy(),
                                   -0.5 * (np.expm1(delta) + 1e-12 * np.exp(-lvp)), rtol=1e-9)


def _low_precision_calls(t):
    """Each public loss on the tensors of ``t``, by name."""
    return {
        "elbo": lambda: elbo(t["x"], t["dec"], t["mu"], t["logvar"], "gaussian",
                             t["dec_logvar"]),
        "iwae_bound": lambda: iwae_bound(t["x"], t["dec"], t["z"], t["mu"], t["logvar"],
                                         "gaussian", t["dec_logvar"], gradient="dreg"),
        "gaussian_kl": lambda: gaussian_kl(t["mu"], t["logvar"], t["z"][0], t["logvar"]),
        "log_mean_exp": lambda: log_mean_exp(t["dec"][:, :, 0]),
    }


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("loss", ["elbo", "iwae_bound", "gaussian_kl", "log_mean_exp"])
def test_a_second_order_gradient_is_refused(backend, loss, monkeypatch):
    """The fused backwards are once differentiable (the plain-torch reference is
    not fused): with ``create_graph=True`` and an upstream gradient that itself
    requires grad, the first gradient is the plain one, and differentiating it
    again raises (the backward skips torch's ``no_grad`` wrapper only where grad
    mode is off)."""
    t = _problem((5, 37, 3, 2), torch.float64, "gaussian", device=_device(backend))
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    value = _low_precision_calls(t)[loss]()
    leaves = [t[n] for n in ("dec", "mu", "logvar")]
    upstream = torch.rand(value.shape, dtype=value.dtype, device=value.device,
                          generator=torch.Generator().manual_seed(1) if value.device.type ==
                          "cpu" else None).requires_grad_()
    plain = torch.autograd.grad(value, leaves, upstream.detach(), retain_graph=True,
                                allow_unused=True)
    graphed = torch.autograd.grad(value, leaves, upstream, create_graph=True,
                                  allow_unused=True)
    used = [(p, g) for p, g in zip(plain, graphed) if p is not None]
    assert used
    for p, g in used:
        torch.testing.assert_close(g, p, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        sum(g.sum() for _, g in used).backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["elbo", "iwae_bound", "gaussian_kl", "log_mean_exp"])
def test_under_autocast_low_precision_inputs_run_in_float32(backend, low, loss, monkeypatch):
    """Inside torch.autocast a network's outputs are bfloat16 or float16; the losses
    take them as torch's own losses do: cast to float32, a float32 result, and the
    gradient back in the inputs' dtype.  The result equals the loss of the
    float32 casts, bit for bit; outside autocast the same call raises."""
    device = _device(backend)
    t32 = _problem((5, 37, 3, 2), torch.float32, "gaussian", device=device)
    low_t = {n: None if v is None else v.detach().to(low).requires_grad_(n != "x")
             for n, v in t32.items()}
    low_t["x"] = t32["x"].detach()  # the data stay float32, as a loader gives them
    # float32 copies of the same values, as leaves (fresh ones: DReG hooks its z)
    cast = {n: None if v is None else v.detach().float().requires_grad_(n != "x")
            for n, v in low_t.items()}
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    with torch.autocast(torch.device(device).type, dtype=low):
        value = _low_precision_calls(low_t)[loss]()
    expected = _low_precision_calls(cast)[loss]()
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected, rtol=0, atol=0)
    leaves = [n for n in ("dec", "dec_logvar", "z", "mu", "logvar") if cast[n] is not None]
    grads_ref = torch.autograd.grad(expected.sum(), [cast[n] for n in leaves],
                                    allow_unused=True)
    names = [n for n, g in zip(leaves, grads_ref) if g is not None]
    assert names
    grads = torch.autograd.grad(value.sum(), [low_t[n] for n in names])
    for name, g, g_ref in zip(names, grads, [g for g in grads_ref if g is not None]):
        assert g.dtype == low, name
        torch.testing.assert_close(g, g_ref.to(low), rtol=0, atol=0, msg=name)
    with pytest.raises(TypeError, match="dtype float32 or float64"):
        _low_precision_calls(low_t)[loss]()


def test_autocast_leaves_float64_alone():
    """autocast casts only low-precision tensors: float64 stays float64."""
    t = _problem((4, 9, 2, 2), torch.float64, "bernoulli")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = _call_elbo(t, "bernoulli")
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, _call_elbo(t, "bernoulli"), rtol=0, atol=0)

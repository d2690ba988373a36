"""The fused VAE training step (kernels/vae_mlp_step) against its NumPy float64
reference, over dtypes, likelihoods, depths and odd shapes; and the reference
against torch: autograd's gradient of the same loss and torch.optim.Adam's update."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fastlvm.kernels.vae_mlp_step import IMPLEMENTATIONS, OBJECTIVES  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

# (rows of X, batch, D, hidden widths, L, k): one of everything with no hidden
# layer; two and three hidden layers; a batch of one; a batch of 33 rows of 70
# pixels (vector loops with remainders); the benchmark's D = 64 networks, whose
# products OpenBLAS splits over threads
SHAPES = [(1, 1, 1, (), 1, 1), (20, 9, 13, (7, 5), 3, 2), (12, 12, 5, (3, 4, 6), 2, 3),
          (30, 1, 6, (4,), 2, 2), (40, 33, 70, (17,), 4, 1), (200, 128, 64, (256,), 16, 2)]
LIKELIHOODS = ["bernoulli", "gaussian learned", "gaussian fixed"]
# (objective, gradient estimator)
BOUNDS = [("elbo", "reparam"), ("iwae", "reparam"), ("iwae", "stl"), ("iwae", "dreg")]
ADAM = (1e-3, 0.9, 0.999, 1e-8)


def _problem(shape, likelihood, dtype, bound=("elbo", "reparam"), seed=0, step=3,
             weighted=False):
    """The kernel's arguments for one step (Adam's moments mid-run, so that each
    parameter's update is not just the sign of its gradient); ``weighted``:
    examples of relative weights in [0, 2.5), one of them 0 (ones otherwise)."""
    n, b, d, hidden, n_latent, k = shape
    rng = np.random.default_rng(seed)
    rows, offset = [], 0
    for sizes in ([d, *hidden, 2 * n_latent], [n_latent, *hidden[::-1], d]):
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            rows.append((offset, offset + n_out * n_in, n_out, n_in))
            offset += n_out * n_in + n_out
    bernoulli = likelihood == "bernoulli"
    lv_offset = offset if likelihood == "gaussian learned" else -1
    n_params = offset + (d if lv_offset >= 0 else 0)
    # weights at about torch's initial scale, 1 / sqrt(fan-in), so that activations
    # and gradients stay O(1) at every width (a fixed 0.4 overflowed float32's
    # squared gradients at width 256)
    theta = rng.standard_normal(n_params) * 0.3
    for w_off, b_off, n_out, n_in in rows:
        theta[w_off:b_off] *= 3 / np.sqrt(n_in)
    theta = theta.astype(dtype)
    X = rng.random((n, d))
    X = (X > 0.5).astype(dtype) if bernoulli else (3 * X - 1).astype(dtype)
    if lv_offset >= 0:
        dec_logvar = theta[lv_offset:].reshape(1, d)
    elif bernoulli:
        dec_logvar = np.zeros((1, 1), dtype)
    else:
        dec_logvar = np.full((1, d), -0.7, dtype)
    example_weight = np.ones(b)
    if weighted:
        example_weight = rng.random(b) * 2.5
        example_weight[0] = 0.0
    return dict(
        X=X, index=rng.choice(n, size=b, replace=False).astype(np.int64),
        example_weight=example_weight,
        eps=rng.standard_normal((k, b, n_latent)).astype(dtype), theta=theta,
        grad=np.full(n_params, np.nan, dtype),
        adam_m=(rng.standard_normal(n_params) * 1e-2).astype(dtype),
        adam_v=(rng.random(n_params) * 1e-3 + 1e-4).astype(dtype),
        layers=np.array(rows, np.int64), n_encoder=len(hidden) + 1, dec_logvar=dec_logvar,
        lv_offset=lv_offset, bernoulli=bernoulli, objective=OBJECTIVES[bound], step=step)


def _step(impl, p):
    args = [p[name] for name in ("X", "index", "example_weight", "eps", "theta", "grad",
                                 "adam_m", "adam_v", "layers", "n_encoder", "dec_logvar",
                                 "lv_offset", "bernoulli", "objective")]
    return IMPLEMENTATIONS[impl](*args, *ADAM, p["step"])


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_numba_step_matches_the_reference(shape, likelihood, dtype, bound, weighted):
    """The bound, the gradient, Adam's moments and the updated parameters."""
    ours = _problem(shape, likelihood, dtype, bound, weighted=weighted)
    ref = _problem(shape, likelihood, dtype, bound, weighted=weighted)
    value = _step("numba", ours)
    expected = _step("reference", ref)
    assert_close(value, expected, dtype, scale=abs(expected) + 1.0)
    for name in ("grad", "adam_m", "adam_v", "theta"):
        assert ours[name].dtype == dtype
        assert_close(ours[name], ref[name], dtype, err_msg=name)
    assert np.isfinite(ours["grad"]).all()  # every entry written (it started as NaN)


def _torch_networks(p, dtype=torch.float64):
    """The kernel's layers as torch Linear layers with ReLU between, on theta's values."""
    theta = torch.from_numpy(p["theta"].astype(np.float64))
    linears = []
    for w_off, b_off, n_out, n_in in p["layers"]:
        layer = torch.nn.Linear(int(n_in), int(n_out), dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(theta[w_off:w_off + n_out * n_in].view(n_out, n_in))
            layer.bias.copy_(theta[b_off:b_off + n_out])
        linears.append(layer)
    ne = p["n_encoder"]

    def stack(layers):
        out = []
        for i, layer in enumerate(layers):
            out += [torch.nn.ReLU(), layer] if i else [layer]
        return torch.nn.Sequential(*out)

    return stack(linears[:ne]), stack(linears[ne:]), linears


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_reference_is_autograd_and_torch_adam(shape, likelihood, bound, weighted):
    """The reference's gradient is autograd's of -mean(c * bound) (c the relative
    sample weights) through the same networks, the bound from
    fastlvm.kernels.elbo or iwae_bound with the same gradient estimator (each
    checked against plain torch), and its update is torch.optim.Adam's from the
    same moments and step count."""
    from fastlvm.kernels import elbo, iwae_bound

    p = _problem(shape, likelihood, np.float64, bound, weighted=weighted)
    encoder, decoder, linears = _torch_networks(p)
    params = [t for layer in linears for t in (layer.weight, layer.bias)]
    d = p["X"].shape[1]
    dec_logvar = None
    if likelihood != "bernoulli":
        dec_logvar = torch.nn.Parameter(torch.from_numpy(p["dec_logvar"].reshape(d).copy()))
        if p["lv_offset"] >= 0:
            params.append(dec_logvar)
    x = torch.from_numpy(p["X"][p["index"]])
    eps = torch.from_numpy(p["eps"])
    n_latent = eps.shape[-1]
    h = encoder(x)
    mu, logvar = h[:, :n_latent], h[:, n_latent:]
    z = mu + torch.exp(0.5 * logvar) * eps
    dec = decoder(z)
    if bound[0] == "elbo":
        value = elbo(x, dec, mu, logvar, likelihood.split()[0], dec_logvar)
    else:
        value = iwae_bound(x, dec, z, mu, logvar, likelihood.split()[0], dec_logvar,
                           gradient=bound[1])
    c = torch.from_numpy(p["example_weight"])
    (-(c * value).mean()).backward()
    expected_grad = torch.cat([t.grad.reshape(-1) for t in params]).numpy()

    optimizer = torch.optim.Adam(params, lr=ADAM[0], betas=ADAM[1:3], eps=ADAM[3],
                                 foreach=False)
    offset = 0
    for t in params:
        sl = slice(offset, offset + t.numel())
        optimizer.state[t] = {
            "step": torch.tensor(float(p["step"] - 1), dtype=torch.float64),
            "exp_avg": torch.from_numpy(p["adam_m"][sl].copy()).view_as(t),
            "exp_avg_sq": torch.from_numpy(p["adam_v"][sl].copy()).view_as(t)}
        offset += t.numel()
    optimizer.step()
    expected_theta = torch.cat([t.detach().reshape(-1) for t in params]).numpy()

    total = _step("reference", p)
    np.testing.assert_allclose(total, float((c * value.detach()).sum()), rtol=1e-12)
    np.testing.assert_allclose(p["grad"], expected_grad, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(p["theta"], expected_theta, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_moments_that_decay_below_normal_numbers_are_zeroed(dtype):
    """A dead unit's Adam moments shrink each step; once below the smallest normal
    number they become 0 (subnormal arithmetic tripled the update's time), in the
    kernel and the reference alike; larger moments keep decaying."""
    tiny = np.finfo(dtype).tiny
    for impl in ("numba", "reference"):
        p = _problem(SHAPES[1], "bernoulli", dtype)
        n_enc_w = int(p["layers"][0, 2] * p["layers"][0, 3])
        # rows of X that are all zero give the first layer's weights zero gradients
        p["X"][:] = 0
        dead = slice(0, n_enc_w - 1)
        p["adam_m"][dead] = 1.05 * tiny  # decays to 0.945 tiny: below normal
        p["adam_v"][dead] = 1.0005 * tiny
        p["adam_m"][n_enc_w - 1] = 100 * tiny
        _step(impl, p)
        assert (p["grad"][:n_enc_w] == 0).all()
        assert (p["adam_m"][dead] == 0).all() and (p["adam_v"][dead] == 0).all()
        np.testing.assert_allclose(p["adam_m"][n_enc_w - 1], 90 * tiny, rtol=1e-5)

"""fastlvm.VAE: training, inference, reproducibility, devices and errors."""

import sys
from copy import deepcopy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402

from fastlvm import VAE  # noqa: E402
from fastlvm.vae import _row_noise  # noqa: E402
from fastlvm.vae._row_noise import row_keys, row_normals  # noqa: E402
from fastlvm.vae._training_step import EagerStep  # noqa: E402
from fastlvm.vae._vae import _seed  # noqa: E402
from tests.conftest import HAS_TRITON  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    X = (load_digits().data / 16.0).astype(np.float32)
    return X[:1200], X[1200:1400]


def _fit(X, **kw):
    params = dict(n_components=4, hidden_layer_sizes=(32,), max_epochs=4, batch_size=64,
                  random_state=0)
    params.update(kw)
    return VAE(**params).fit(X)


def test_training_raises_the_bound_and_the_bounds_order(digits):
    train, test = digits
    vae = _fit(train, max_epochs=15, learning_rate=3e-3)
    assert vae.n_iter_ == 15 and len(vae.loss_curve_) == 15
    assert vae.loss_curve_[-1] < vae.loss_curve_[0] - 5  # nats per digit
    elbo = vae.elbo(test, n_samples=4)
    ll_10 = vae.score(test, n_samples=10)
    ll_200 = vae.score(test, n_samples=200)
    assert elbo < ll_10 < ll_200 < 0


def test_same_seed_same_fit_and_different_seed_differs(digits):
    train, test = digits
    a, b = _fit(train), _fit(train)
    assert a.loss_curve_ == b.loss_curve_
    np.testing.assert_array_equal(a.transform(test), b.transform(test))
    np.testing.assert_array_equal(a.score_samples(test, n_samples=20),
                                  b.score_samples(test, n_samples=20))
    assert _fit(train, random_state=1).loss_curve_ != a.loss_curve_


def test_transform_inverse_transform_and_sample(digits):
    train, test = digits
    vae = _fit(train)
    Z = vae.transform(test)
    assert isinstance(Z, np.ndarray) and Z.shape == (len(test), 4) and Z.dtype == np.float32
    X_mean = vae.inverse_transform(Z)
    assert X_mean.shape == test.shape and (X_mean >= 0).all() and (X_mean <= 1).all()
    X_new, Z_new = vae.sample(7)
    assert X_new.shape == (7, 64) and Z_new.shape == (7, 4)
    assert set(np.unique(X_new)) <= {0.0, 1.0}


def test_score_samples_combines_sample_chunks_exactly(digits):
    """More importance samples than one chunk (256 + 256 + 88): the chunks'
    log-means combine into the log-mean over all samples, as one chunk of the
    same draws gives it; the estimate rises with the samples, on average."""
    train, test = digits
    vae = _fit(train)
    x = torch.as_tensor(test[:20])
    eps = row_normals(row_keys(x, _seed(0)), 0, 600, vae.n_components, x.dtype)
    with torch.no_grad():
        one_chunk = vae._bound(x, 600, None, "iwae", eps=eps).double().numpy()
    np.testing.assert_allclose(vae.score_samples(test[:20], n_samples=600), one_chunk,
                               rtol=1e-6)
    assert vae.score_samples(test, n_samples=600).mean() > vae.score_samples(
        test, n_samples=5).mean()


def test_row_noise_is_splitmix64_and_standard_normal():
    """The row-keyed draws: SplitMix64's bits, normal moments, no correlation
    across latents, samples or rows, and a row's draws wherever it appears."""
    mask = (1 << 64) - 1

    def splitmix64(x):
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    values = [0, 1, 12345, (1 << 63) + 7, mask]
    got = _row_noise._splitmix64(torch.tensor([_row_noise._signed(v) for v in values]))
    assert [g & mask for g in got.tolist()] == [splitmix64(v) for v in values]
    X = torch.randn(2000, 5, generator=torch.Generator().manual_seed(0))
    keys = row_keys(X, 7)
    z = row_normals(keys, 0, 100, 16, torch.float64)
    assert abs(float(z.mean())) < 0.005 and abs(float(z.var()) - 1) < 0.005
    for a, b in ((z[..., :-1], z[..., 1:]), (z[:-1], z[1:]), (z[:, :-1], z[:, 1:])):
        assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.005
    perm = torch.randperm(2000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(row_normals(row_keys(X[perm], 7), 30, 5, 16, torch.float32),
                               row_normals(keys, 30, 5, 16, torch.float32)[:, perm],
                               rtol=0, atol=0)
    assert keys.unique().numel() == 2000 and not torch.equal(row_keys(X, 8), keys)


@pytest.mark.parametrize("objective, k, estimator", [("iwae", 5, "reparam"),
                                                     ("iwae", 5, "stl"), ("iwae", 5, "dreg"),
                                                     ("iwae", 1, "stl"), ("elbo", 3, "reparam")])
def test_objectives_and_gradient_estimators_train(digits, objective, k, estimator):
    train, _ = digits
    vae = _fit(train, objective=objective, n_samples=k, gradient_estimator=estimator,
               max_epochs=3)
    assert np.isfinite(vae.loss_curve_).all()
    assert vae.loss_curve_[-1] < vae.loss_curve_[0]


@pytest.mark.parametrize("variance", ["learned", 0.05])
def test_gaussian_likelihood(digits, variance):
    train, test = digits
    vae = _fit(train * 4 - 2, likelihood="gaussian", decoder_variance=variance, max_epochs=5)
    assert vae.decoder_logvar_.shape == (64,)
    if variance == "learned":
        assert vae.decoder_logvar_.requires_grad and vae.decoder_logvar_.abs().sum() > 0
    else:
        np.testing.assert_allclose(vae.decoder_logvar_.exp().numpy(), 0.05, rtol=1e-6)
    assert vae.loss_curve_[-1] < vae.loss_curve_[0]
    assert np.isfinite(vae.score_samples(test * 4 - 2, n_samples=10)).all()
    X_new, _ = vae.sample(3)
    assert X_new.shape == (3, 64)


def test_user_modules_are_used_and_left_untouched(digits):
    train, _ = digits

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mu = torch.nn.Linear(64, 3)
            self.logvar = torch.nn.Linear(64, 3)

        def forward(self, x):
            return self.mu(x), self.logvar(x)

    encoder, decoder = Encoder(), torch.nn.Linear(3, 64)
    before = [p.detach().clone() for p in encoder.parameters()]
    vae = VAE(3, encoder=encoder, decoder=decoder, max_epochs=2, random_state=0).fit(train)
    assert isinstance(vae.encoder_, Encoder) and vae.encoder_ is not encoder
    for p, q in zip(before, encoder.parameters()):
        torch.testing.assert_close(p, q.detach())
    assert vae.transform(train[:5]).shape == (5, 3)


def test_torch_input_gives_torch_output_and_float64_stays(digits):
    train, test = digits
    vae = _fit(torch.from_numpy(train.astype(np.float64)), max_epochs=1)
    assert next(vae.encoder_.parameters()).dtype == torch.float64
    Z = vae.transform(torch.from_numpy(test))
    assert isinstance(Z, torch.Tensor) and Z.dtype == torch.float64
    assert isinstance(vae.score_samples(torch.from_numpy(test), n_samples=3), torch.Tensor)
    assert isinstance(vae.sample(2)[0], torch.Tensor)
    # a tensor that requires grad trains too (the data is read, never differentiated)
    leaf = torch.from_numpy(train[:200]).requires_grad_()
    for step in ("fused", "autograd"):
        assert len(_fit(leaf, max_epochs=1, training_step=step).loss_curve_) == 1


def test_adam_is_fused_where_the_device_has_it(digits, monkeypatch):
    """fit steps with torch's fused Adam on the CPU and falls back to the foreach
    update where the constructor refuses fused=True; both train the same model up
    to float32 rounding."""
    train, test = digits
    fused = _fit(train[:256], max_epochs=2, training_step="autograd")
    assert fused._optimizer.defaults["fused"]
    real = torch.optim.Adam

    def adam_without_fused(params, **kw):
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires params on a supported device")
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "Adam", adam_without_fused)
    plain = _fit(train[:256], max_epochs=2, training_step="autograd")
    assert not plain._optimizer.defaults["fused"] and plain._optimizer.defaults["foreach"]
    np.testing.assert_allclose(plain.loss_curve_, fused.loss_curve_, rtol=1e-5)
    np.testing.assert_allclose(plain.transform(test), fused.transform(test), atol=1e-4)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_backend_trains_like_another_backend(digits, monkeypatch):
    """The estimator on the Triton kernels follows the same fit on another backend:
    same seed, same data, same bound to float32 noise.  On a GPU: a CUDA tensor,
    against the plain-torch reference on the same device (the same random
    stream); in CI: CPU tensors under Triton's interpreter, against Numba."""
    X = digits[0][:128]
    if torch.cuda.is_available():
        X, other = torch.as_tensor(X, device="cuda"), "reference"
    else:
        import os
        assert os.environ.get("TRITON_INTERPRET") == "1"
        other = "numba"
    kw = dict(max_epochs=1, objective="iwae", n_samples=2,
              training_step="autograd")  # the bound's kernels, not the fused CPU step
    monkeypatch.setenv("FASTLVM_BACKEND", other)
    ref = _fit(X, **kw)
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    vae = _fit(X, **kw)
    np.testing.assert_allclose(vae.loss_curve_, ref.loss_curve_, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(), dict(objective="iwae", n_samples=3,
                                              gradient_estimator="dreg"),
                                dict(likelihood="gaussian", early_stopping=True)])
def test_cuda_graph_step_on_the_cpu_is_the_plain_step(digits, kw):
    """cuda_graph=True runs the step on static buffers (batch gathered, draws made
    into a buffer before the encoder runs); on the CPU, with no graph, the fit is
    the plain step's value for value: every batch, the short last one (1200 rows
    = 18 x 64 + 48), partial_fit after fit, and a pickled copy that trains on."""
    import pickle

    train, test = digits
    kw = dict(kw, training_step="autograd")  # on the CPU 'auto' trains the ELBO fused
    plain = _fit(train, **kw)
    graphed = _fit(train, cuda_graph=True, **kw)
    assert graphed._step.graph is None and graphed._step.steps == 4 * 18 - (
        4 * 2 if kw.get("early_stopping") else 0)  # full batches: 120 validation rows out
    assert graphed.loss_curve_ == plain.loss_curve_
    np.testing.assert_array_equal(graphed.transform(test), plain.transform(test))
    plain.partial_fit(train)
    graphed.partial_fit(train)
    assert graphed.loss_curve_ == plain.loss_curve_
    copy = pickle.loads(pickle.dumps(graphed)).partial_fit(train)
    assert copy.loss_curve_ == plain.partial_fit(train).loss_curve_


def _graphs_off_a_gpu(monkeypatch):
    """The graphed step's GPU course on CPU tensors: ``torch.cuda``'s graphs,
    streams and events stood in for (``tests/torch_graphs.py``), the bound on the
    Triton kernels (their launches recorded), the step told it is on a GPU."""
    from fastlvm.vae import _training_step

    from tests import torch_graphs

    torch_graphs.install(monkeypatch)
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")  # CPU tensors take the kernels
    made = _training_step.GraphedStep.__init__

    def on_a_gpu(step, *args):
        made(step, *args)
        step.on_gpu = True

    monkeypatch.setattr(_training_step.GraphedStep, "__init__", on_a_gpu)


GRAPH_OPTIONS = [dict(), dict(objective="iwae", n_samples=3, gradient_estimator="dreg"),
                 dict(objective="iwae", n_samples=2, gradient_estimator="stl",
                      likelihood="gaussian", early_stopping=True)]


@pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(),
                    reason="off a GPU, with Triton's interpreter (a GPU records itself)")
@pytest.mark.parametrize("kw", GRAPH_OPTIONS)
def test_cuda_graph_step_recorded_and_replayed_off_a_gpu(digits, kw, monkeypatch,
                                                         torch_device_path):
    """The graphed step's course on a GPU, on CPU tensors: three warm-up steps, one
    recording of forward, backward, Adam and the loss sum (``tests/torch_graphs.py``
    keeps their torch operations and Triton launches, the bound's kernels through
    the interpreter), and replays on each new batch gathered into the static
    buffers.  The fit is the plain step's bit for bit, through the short last
    batch of each epoch (run eagerly) and a partial_fit that replays on."""
    from fastlvm.vae import _training_step

    _graphs_off_a_gpu(monkeypatch)
    # 5 batches of 32 and one of 16 (early stopping holds rows out: 4), a tensor that
    # stands for a CUDA one (and keeps CUDA's rules on host data: torch_device_path)
    X = torch.as_tensor(digits[0][:176], device="cpu")
    kw = dict(kw, training_step="autograd", max_epochs=1, batch_size=32)
    plain = _fit(X, cuda_graph=False, **kw)
    graphed = _fit(X, cuda_graph=True, **kw)
    full = 4 if kw.get("early_stopping") else 5
    assert graphed._step.graph.replays == full - _training_step.WARMUP_STEPS
    assert graphed.loss_curve_ == plain.loss_curve_
    plain.partial_fit(X)
    graphed.partial_fit(X)  # an epoch over all the rows
    assert graphed.loss_curve_ == plain.loss_curve_
    assert graphed._step.graph.replays == full - _training_step.WARMUP_STEPS + 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("kw", GRAPH_OPTIONS)
def test_cuda_graph_replays_the_step_on_a_gpu(digits, kw):
    """On a GPU the step is recorded once (after three warm-up steps) and replayed,
    by default ('auto') as with True, for every objective; the fit follows the plain
    step's to float32 noise (Adam's capturable form keeps its step count on the
    device)."""
    X = torch.as_tensor(digits[0], device="cuda")
    plain = _fit(X, cuda_graph=False, **kw)
    assert type(plain._step) is EagerStep
    for graphed in (_fit(X, **kw), _fit(X, cuda_graph=True, **kw)):
        assert graphed._step.graph is not None and graphed._optimizer.defaults["capturable"]
        np.testing.assert_allclose(graphed.loss_curve_, plain.loss_curve_, rtol=1e-4)
        torch.testing.assert_close(graphed.transform(X), plain.transform(X), atol=1e-3,
                                   rtol=1e-3)


@pytest.mark.skipif(not HAS_TRITON and not torch.cuda.is_available(),
                    reason="off a GPU the graph's course needs Triton's interpreter")
def test_cuda_graph_of_your_own_networks(digits, monkeypatch):
    """'auto' does not record networks of your own, and with True those that read
    back to the host get an error that names the option (on a GPU, or off one
    through :func:`_graphs_off_a_gpu`)."""
    if torch.cuda.is_available():
        X = torch.as_tensor(digits[0], device="cuda")
    else:
        _graphs_off_a_gpu(monkeypatch)
        X = digits[0][:320]  # five batches: three warm-up steps, then the recording

    class Syncing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 64)

        def forward(self, z):
            if float(z.abs().sum()) < 0:  # a read back to the host
                raise AssertionError
            return self.linear(z)

    encoder = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                  torch.nn.Linear(32, 8))
    with pytest.raises(RuntimeError, match="could not record the training step .* fit with "
                                           "cuda_graph=False"):
        _fit(X, cuda_graph=True, encoder=encoder, decoder=Syncing())
    assert type(_fit(X, encoder=encoder, decoder=Syncing())._step) is EagerStep  # 'auto'


@pytest.mark.parametrize("kw", [dict(), dict(likelihood="gaussian"),
                                dict(likelihood="gaussian", decoder_variance=0.1),
                                dict(n_samples=3, hidden_layer_sizes=(24, 16)),
                                dict(early_stopping=True, X_dtype=np.float64),
                                dict(objective="iwae", n_samples=4),
                                dict(objective="iwae", n_samples=3, gradient_estimator="stl",
                                     likelihood="gaussian"),
                                dict(objective="iwae", n_samples=5, gradient_estimator="dreg",
                                     X_dtype=np.float64)])
def test_fused_step_trains_like_the_autograd_step(digits, kw):
    """training_step='fused' (one Numba call a step) and 'autograd' (torch modules,
    the fused bound through autograd, torch's fused Adam) draw the same random
    stream, so their fits agree to rounding: every epoch's loss, the networks,
    the held-out scores; partial_fit continues both alike, and so does a pickled
    copy of the fused one (its modules rebound to the flat parameter vector)."""
    import pickle

    train, test = digits
    kw = dict(kw)
    dtype = kw.pop("X_dtype", np.float32)
    train, test = train.astype(dtype), test.astype(dtype)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    fused = _fit(train, training_step="fused", **kw)
    plain = _fit(train, training_step="autograd", **kw)
    assert type(fused._step).__name__ == "FusedStep" and fused._optimizer is None
    assert type(plain._step).__name__ == "EagerStep"
    np.testing.assert_allclose(fused.loss_curve_, plain.loss_curve_, rtol=rtol)
    np.testing.assert_allclose(fused.transform(test), plain.transform(test),
                               rtol=rtol * 100, atol=rtol * 10)
    if kw.get("early_stopping"):
        np.testing.assert_allclose(fused.validation_scores_, plain.validation_scores_,
                                   rtol=rtol)
    if fused.decoder_logvar_ is not None:
        np.testing.assert_allclose(fused.decoder_logvar_.detach(),
                                   plain.decoder_logvar_.detach(), rtol=rtol * 100,
                                   atol=rtol * 10)
    copy = pickle.loads(pickle.dumps(fused))
    for model in (fused, plain, copy):
        model.partial_fit(train)
    np.testing.assert_allclose(fused.loss_curve_, plain.loss_curve_, rtol=rtol)
    assert copy.loss_curve_ == fused.loss_curve_
    np.testing.assert_array_equal(copy.transform(test), fused.transform(test))
    if not kw:  # networks swapped for others after fit: partial_fit refuses them
        copy.decoder_ = torch.nn.Sequential(torch.nn.Linear(4, 64))
        with pytest.raises(ValueError, match="call fit again"):
            copy.partial_fit(train)


def test_your_plain_mlps_train_fused_and_other_modules_do_not(digits):
    """nn.Sequential(Linear, ReLU, ..., Linear) of your own trains on the fused step
    (as the autograd step does, to rounding; your modules left as they were);
    other layers, a Linear without bias, a hook, a frozen parameter or the wrong
    widths keep the autograd step under 'auto'."""
    train, test = digits
    n_latent = 4

    def mlps(width=24, out=2 * n_latent):
        torch.manual_seed(3)
        return (torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(),
                                    torch.nn.Linear(width, out)),
                torch.nn.Sequential(torch.nn.Linear(n_latent, width), torch.nn.ReLU(),
                                    torch.nn.Linear(width, 64)))

    encoder, decoder = mlps()
    before = [p.detach().clone() for p in encoder.parameters()]
    fused = _fit(train, encoder=encoder, decoder=decoder)
    plain = _fit(train, encoder=encoder, decoder=decoder, training_step="autograd")
    assert type(fused._step).__name__ == "FusedStep"
    np.testing.assert_allclose(fused.loss_curve_, plain.loss_curve_, rtol=1e-5)
    np.testing.assert_allclose(fused.transform(test), plain.transform(test), atol=1e-4)
    for p, q in zip(before, encoder.parameters()):
        torch.testing.assert_close(p, q.detach())

    encoder, decoder = mlps()
    others = {"tanh": (torch.nn.Sequential(encoder[0], torch.nn.Tanh(), encoder[2]), decoder),
              "no bias": (torch.nn.Sequential(torch.nn.Linear(64, 8, bias=False)), decoder),
              "split output": mlps(out=n_latent)}
    hooked, _ = mlps()
    hooked[2].register_forward_hook(lambda module, args, out: out * 0.5)
    others["hook"] = (hooked, decoder)
    frozen, _ = mlps()
    frozen[0].weight.requires_grad_(False)
    others["frozen"] = (frozen, decoder)
    for name, (enc, dec) in others.items():
        if name == "split output":  # (batch, L): not an encoder; the autograd step says so
            with pytest.raises(ValueError, match="encoder must return"):
                _fit(train, encoder=enc, decoder=dec, max_epochs=1)
            continue
        vae = _fit(train[:200], encoder=enc, decoder=dec, max_epochs=1)
        assert type(vae._step).__name__ == "EagerStep", name
        with pytest.raises(ValueError, match="multilayer perceptrons"):
            _fit(train[:200], encoder=enc, decoder=dec, max_epochs=1, training_step="fused")


def test_auto_training_step_is_fused_where_it_applies(digits):
    """'auto' trains the default networks on CPU data fused (every objective); other
    networks take autograd's step; the fused fit is 'fused''s, bit for bit."""
    train, _ = digits
    auto = _fit(train[:200], max_epochs=2)
    assert type(auto._step).__name__ == "FusedStep"
    assert auto.loss_curve_ == _fit(train[:200], max_epochs=2,
                                    training_step="fused").loss_curve_
    assert type(_fit(train[:200], max_epochs=1, objective="iwae")._step).__name__ == \
        "FusedStep"
    encoder = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(),
                                  torch.nn.Linear(16, 8))
    own = _fit(train[:200], max_epochs=1, encoder=encoder, decoder=torch.nn.Linear(4, 64))
    assert type(own._step).__name__ == "EagerStep"


def test_partial_fit_is_one_epoch_of_fit(digits):
    """partial_fit continues fit's training stream: two calls equal fit with two
    epochs, and fit for one epoch then partial_fit equals the same."""
    train, test = digits
    two = _fit(train, max_epochs=2)
    streamed = VAE(n_components=4, hidden_layer_sizes=(32,), batch_size=64, random_state=0)
    streamed.partial_fit(train).partial_fit(train)
    assert streamed.n_iter_ == 2 and streamed.loss_curve_ == two.loss_curve_
    np.testing.assert_array_equal(streamed.transform(test), two.transform(test))
    resumed = _fit(train, max_epochs=1).partial_fit(train)
    assert resumed.loss_curve_ == two.loss_curve_
    np.testing.assert_array_equal(resumed.transform(test), two.transform(test))
    with pytest.raises(ValueError, match="has 10 features"):
        resumed.partial_fit(train[:, :10])
    with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\)"):
        resumed.partial_fit(train[:0])


def test_early_stopping_stops_and_keeps_the_best_epoch(digits):
    train, _ = digits
    kw = dict(early_stopping=True, validation_fraction=0.2, learning_rate=3e-3)
    # a tolerance no epoch can beat: the first epoch is the best that counts, and
    # training stops once n_iter_no_change + 1 epochs after it failed to beat it
    vae = _fit(train, max_epochs=30, n_iter_no_change=2, tol=1e6, **kw)
    assert vae.n_iter_ == 4 and len(vae.validation_scores_) == 4
    assert vae.best_validation_score_ == max(vae.validation_scores_)
    best = int(np.argmax(vae.validation_scores_))
    # the kept networks are that epoch's: a run stopped right there has them too
    # (same split and random stream up to that epoch)
    there = _fit(train, max_epochs=best + 1, n_iter_no_change=50, tol=1e6, **kw)
    assert there.validation_scores_ == vae.validation_scores_[:best + 1]
    for a, b in zip(vae.encoder_.parameters(), there.encoder_.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # with a reachable tolerance training runs on while the held-out bound rises
    patient = _fit(train, max_epochs=6, n_iter_no_change=10, **kw)
    assert patient.n_iter_ == 6 and patient.validation_scores_[-1] > patient.validation_scores_[0]
    assert _fit(train, max_epochs=2).validation_scores_ is None


class _BatchMean(torch.nn.Linear):
    """An encoder that returns one row for the whole batch (a broadcasting bug)."""

    def forward(self, x):
        return super().forward(x).mean(0, keepdim=True)


def test_bad_input_and_parameters(digits):
    train, test = digits
    cases = [
        (dict(n_components=0), ValueError, "n_components must be a positive integer"),
        (dict(objective="vi"), ValueError, "objective"),
        (dict(gradient_estimator="dreg"), ValueError, "applies to objective='iwae'"),
        (dict(likelihood="poisson"), ValueError, "likelihood"),
        (dict(decoder_variance=-1.0, likelihood="gaussian"), ValueError, "decoder_variance"),
        (dict(learning_rate=0), ValueError, "learning_rate"),
        (dict(max_epochs=-1), ValueError, "max_epochs"),
        (dict(validation_fraction=1.0), ValueError, "validation_fraction must be in"),
        (dict(n_iter_no_change=0), ValueError, "n_iter_no_change must be a positive"),
        (dict(tol=-1.0), ValueError, "tol must be a non-negative"),
        (dict(cuda_graph="yes"), ValueError, "cuda_graph must be 'auto', True or False"),
        (dict(training_step="numba"), ValueError, "training_step must be one of"),
        (dict(training_step="fused", n_components=4, encoder=torch.nn.Linear(64, 8),
              decoder=torch.nn.Linear(4, 64)), ValueError, "multilayer perceptrons"),
        (dict(encoder=torch.nn.Linear(64, 8)), ValueError, "both encoder and decoder"),
        (dict(encoder=lambda x: x, decoder=torch.nn.Linear(4, 64)), ValueError,
         "encoder must be a torch.nn.Module; got function"),
        (dict(hidden_layer_sizes=(0,)), ValueError, r"hidden_layer_sizes must hold positive "
                                                    r"integers.*got \(0,\)"),
        (dict(hidden_layer_sizes=(8.5,)), ValueError, "hidden_layer_sizes must hold"),
        (dict(hidden_layer_sizes=True), ValueError, "hidden_layer_sizes must hold"),
        # your networks checked on two rows before training, named with the shapes
        (dict(n_components=4, encoder=torch.nn.Linear(60, 8), decoder=torch.nn.Linear(4, 64)),
         ValueError, r"The encoder fails on rows of X of shape \(2, 64\): mat1 and mat2.*It "
                     r"must map \(batch, n_features=64\)"),
        (dict(n_components=4, encoder=torch.nn.Linear(64, 8), decoder=torch.nn.Linear(3, 64)),
         ValueError, r"The decoder fails on latent codes of shape \(1, 2, 4\).*It must map "
                     r"\(\.\.\., n_components=4\) to \(\.\.\., n_features=64\)"),
        (dict(n_components=4, encoder=torch.nn.Linear(64, 8), decoder=torch.nn.Linear(4, 60)),
         ValueError, r"The decoder maps latent codes of shape \(1, 2, 4\) \(samples, batch, "
                     r"n_components\) to \(1, 2, 60\)"),
        (dict(n_components=4, encoder=torch.nn.Linear(64, 6), decoder=torch.nn.Linear(4, 64)),
         ValueError, r"encoder must return \(mu, logvar\).*one \(batch, 8\) tensor; got "
                     r"\(2, 6\)"),
        (dict(n_components=4, encoder=_BatchMean(64, 8), decoder=torch.nn.Linear(4, 64)),
         ValueError, r"mu and logvar must have shape \(batch, n_components\) = \(2, 4\) for "
                     r"a batch of 2 rows; got \(1, 4\)"),
    ]
    for params, exc, match in cases:
        with pytest.raises(exc, match=match):
            VAE(**params).fit(train)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        VAE().fit(train * 2)
    bad = train.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        VAE().fit(bad)
    for rows in (train, torch.as_tensor(train)):  # sklearn's messages, for tensors too
        with pytest.raises(ValueError, match="Reshape your data"):
            VAE().fit(rows[0])
        with pytest.raises(ValueError, match=r"0 sample\(s\)"):
            VAE().fit(rows[:0])
        with pytest.raises(ValueError, match=r"0 feature\(s\)"):
            VAE().fit(rows[:, :0])
    with pytest.raises(ValueError, match="Complex data not supported"):
        VAE().fit(train + 0j)
    with pytest.raises(ValueError, match="Complex data not supported"):
        VAE().fit(torch.as_tensor(train + 0j))
    with pytest.raises(ValueError, match="leaving none to train on"):
        VAE(early_stopping=True, validation_fraction=0.6).fit(train[:1])
    with pytest.raises(NotFittedError):
        VAE().transform(test)
    vae = _fit(train, max_epochs=1)
    with pytest.raises(ValueError, match="has 10 features"):
        vae.transform(test[:, :10])
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        vae.score_samples(test, n_samples=0)
    with pytest.raises(ValueError, match="Z must have shape"):
        vae.inverse_transform(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="Z contains NaN or infinity"):
        vae.inverse_transform(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="0 sample"):
        vae.inverse_transform(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="encoder must return"):
        VAE(3, encoder=torch.nn.Linear(64, 5), decoder=torch.nn.Linear(3, 64),
            max_epochs=1).fit(train)


def test_passes_sklearn_check_estimator():
    """sklearn's estimator checks, on the Gaussian likelihood: their data is not in
    [0, 1], which the (default) Bernoulli likelihood refuses by design.  Among them:
    score_samples of a row does not depend on the other rows, their order or the
    chunking (every row uses the same importance-sampling draws).  One check is
    expected to fail, as it does for sklearn's MLPRegressor: mini-batch training
    on shuffled rows makes integer weights equal to repeated rows only in
    expectation (test_sample_weight_is_relative_and_weights_the_loss tests them)."""
    from sklearn.utils.estimator_checks import check_estimator

    check_estimator(VAE(2, likelihood="gaussian", hidden_layer_sizes=(8,), max_epochs=2,
                        random_state=0), on_fail="raise",
                    expected_failed_checks={
                        "check_sample_weight_equivalence_on_dense_data":
                        "stochastic gradients: repeated rows only in expectation"})


def test_score_samples_of_a_row_depends_on_the_row_alone(digits):
    train, test = digits
    vae = _fit(train, max_epochs=1)
    full = vae.score_samples(test, n_samples=300)
    perm = np.random.default_rng(0).permutation(len(test))
    np.testing.assert_array_equal(vae.score_samples(test[perm], n_samples=300), full[perm])
    np.testing.assert_array_equal(vae.score_samples(test[5:9], n_samples=300), full[5:9])
    assert not np.array_equal(vae.score_samples(test, n_samples=300, random_state=1), full)
    assert vae.elbo(test[perm], n_samples=3) == pytest.approx(vae.elbo(test, n_samples=3),
                                                             rel=1e-12)


def test_mixed_precision_under_autocast(digits):
    """Inside torch.autocast(bfloat16), 'auto' takes the autograd step (its layers
    run in bfloat16; parameters and Adam stay float32) and every method returns
    the model's dtype; 'fused' ignores autocast and fits as in float32."""
    train, test = digits
    plain = _fit(train, training_step="fused")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _fit(train)
        autograd = _fit(train, training_step="autograd")
        fused = _fit(train, training_step="fused")
        Z = mixed.transform(test)
        X_mean = mixed.inverse_transform(Z)
        X_new, Z_new = mixed.sample(5)
        log_p = mixed.score_samples(test, n_samples=10)
        bound = mixed.elbo(test, n_samples=2)
    assert mixed.loss_curve_ == autograd.loss_curve_
    assert fused.loss_curve_ == plain.loss_curve_
    # bfloat16 layers: the same training to within their 8 bits, not bit for bit
    np.testing.assert_allclose(mixed.loss_curve_, plain.loss_curve_, rtol=0.02)
    assert mixed.loss_curve_ != plain.loss_curve_
    assert all(p.dtype == torch.float32 for p in mixed.encoder_.parameters())
    for out in (Z, X_mean, X_new, Z_new):
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert log_p.dtype == np.float64 and np.isfinite(log_p).all() and np.isfinite(bound)
    np.testing.assert_allclose(Z, mixed.transform(test), atol=0.05)


def test_transform_and_inverse_transform_run_the_networks_in_chunks(digits, monkeypatch):
    """A million rows' hidden activations are never held at once: the networks see
    chunks of at most _rows_per_chunk(1) rows, and the results are the whole pass's."""
    from fastlvm.vae import _vae

    train, test = digits
    vae = _fit(train)
    whole_Z, whole_X = vae.transform(test), vae.inverse_transform(vae.transform(test))
    monkeypatch.setattr(_vae, "_SCORE_ELEMENTS", 37 * train.shape[1])  # 37-row chunks
    seen = []
    for net in (vae.encoder_, vae.decoder_):
        net.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    Z = vae.transform(test)
    X_mean = vae.inverse_transform(Z)
    assert max(seen) == 37 and sum(seen) == 2 * len(test)
    np.testing.assert_allclose(Z, whole_Z, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(X_mean, whole_X, rtol=1e-6, atol=1e-6)


def test_input_checks_run_over_chunks_of_rows_and_find_every_bad_entry(digits, monkeypatch):
    """X's NaN / [0, 1] checks take chunks of rows (no (n, D) masks of a large X held
    at once), and still find a bad entry in any chunk, the last one too."""
    from fastlvm.vae import _vae

    train, _ = digits
    monkeypatch.setattr(_vae, "_SCORE_ELEMENTS", 37 * train.shape[1])  # 37-row chunks
    for row, value, match in ((len(train) - 1, np.nan, "NaN or infinity"),
                              (500, 1.5, "outside \\[0, 1\\]")):
        bad = train.copy()
        bad[row, 3] = value
        with pytest.raises(ValueError, match=match):
            _fit(bad, max_epochs=1)


def _far_from_unit_scale(X):
    return (X - 0.5) * 1e4  # the encoder's log-variances overflow float32


@pytest.mark.parametrize("kw", [dict(training_step="fused"), dict(training_step="autograd"),
                                dict(training_step="autograd", cuda_graph=True)],
                         ids=["fused", "autograd", "graphed"])
def test_a_diverging_fit_raises_and_leaves_the_model_as_it_was(digits, kw):
    train, test = digits
    kw = dict(likelihood="gaussian", **kw)
    diverged = "Training diverged: the mean loss of epoch 1 is nan.*StandardScaler.*learning_rate"
    vae = VAE(n_components=4, hidden_layer_sizes=(32,), batch_size=64, random_state=0, **kw)
    with pytest.raises(ValueError, match=diverged):
        vae.fit(_far_from_unit_scale(train))
    assert not hasattr(vae, "encoder_") and not hasattr(vae, "n_features_in_")

    vae.set_params(max_epochs=2).fit(train)
    Z, curve = vae.transform(test), list(vae.loss_curve_)
    with pytest.raises(ValueError, match=diverged):
        vae.fit(_far_from_unit_scale(train))
    np.testing.assert_array_equal(vae.transform(test), Z)
    assert vae.loss_curve_ == curve and vae.n_iter_ == 2

    # partial_fit puts back the networks, the optimiser's state and the random
    # stream: the next call continues as if the diverged one never ran
    with pytest.raises(ValueError, match="the mean loss of partial_fit call 3 is nan"):
        vae.partial_fit(_far_from_unit_scale(train[:300]))
    np.testing.assert_array_equal(vae.transform(test), Z)
    assert vae.loss_curve_ == curve and vae.n_iter_ == 2
    vae.partial_fit(train)
    reference = _fit(train, max_epochs=2, **kw).partial_fit(train)
    assert vae.loss_curve_ == reference.loss_curve_
    np.testing.assert_array_equal(vae.transform(test), reference.transform(test))


def test_a_diverging_bernoulli_fit_names_the_learning_rate(digits):
    train, _ = digits
    with pytest.raises(ValueError, match=r"too large a step: lower learning_rate \(now 100"):
        _fit(train, learning_rate=100.0)


def test_a_held_out_bound_that_is_not_finite_raises(digits, monkeypatch):
    train, _ = digits
    vae = VAE(n_components=4, hidden_layer_sizes=(32,), early_stopping=True, max_epochs=3,
              random_state=0)
    monkeypatch.setattr(VAE, "_mean_bound", lambda *args, **kw: float("-inf"))
    with pytest.raises(ValueError, match="held-out rows' mean bound after epoch 1 is -inf"):
        vae.fit(train)
    assert not hasattr(vae, "encoder_")


class _InterruptingDecoder(torch.nn.Module):
    """A decoder that raises KeyboardInterrupt on its ``at``-th forward pass."""

    def __init__(self, at):
        super().__init__()
        self.linear, self.at, self.calls = torch.nn.Linear(4, 64), at, 0

    def forward(self, z):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.linear(z)


def test_an_interrupted_fit_keeps_its_finished_epochs(digits):
    """As sklearn's MLPClassifier: a warning, the epochs run so far, and a usable
    model; an interrupted partial_fit leaves the model as it was."""
    train, test = digits
    encoder = torch.nn.Linear(64, 8)
    steps = -(-len(train) // 64)  # decoder calls per epoch
    with pytest.warns(UserWarning, match="Training interrupted by user"):
        vae = _fit(train, max_epochs=5, encoder=encoder,
                   decoder=_InterruptingDecoder(2 * steps + 3))
    assert vae.n_iter_ == 2 and len(vae.loss_curve_) == 2
    assert not vae.encoder_.training and vae.transform(test).shape == (len(test), 4)

    Z, curve = vae.transform(test), list(vae.loss_curve_)
    vae.decoder_.calls, vae.decoder_.at = 0, 5
    with pytest.raises(KeyboardInterrupt):
        vae.partial_fit(train)
    np.testing.assert_array_equal(vae.transform(test), Z)
    assert vae.loss_curve_ == curve and not vae.decoder_.training


@pytest.mark.parametrize("kw", [dict(training_step="fused"), dict(training_step="autograd"),
                                dict(training_step="autograd", cuda_graph=True)],
                         ids=["fused", "autograd", "graphed"])
def test_partial_fit_takes_a_new_learning_rate(digits, kw):
    """Every step reads learning_rate at each call (the autograd steps kept the
    one their Adam was built with): a changed rate trains as a fresh fit with
    that rate continued from the same state would."""
    train, test = digits
    changed = _fit(train, max_epochs=1, **kw).set_params(learning_rate=1e-2)
    changed.partial_fit(train)
    fused = _fit(train, max_epochs=1, training_step="fused").set_params(learning_rate=1e-2)
    fused.partial_fit(train)
    np.testing.assert_allclose(changed.loss_curve_, fused.loss_curve_, rtol=1e-5)
    np.testing.assert_allclose(changed.transform(test), fused.transform(test), rtol=1e-3,
                               atol=1e-4)
    kept = _fit(train, max_epochs=1, **kw).partial_fit(train)
    assert not np.allclose(kept.transform(test), changed.transform(test), rtol=1e-3)


@pytest.mark.parametrize("change", [dict(n_components=3), dict(likelihood="gaussian"),
                                    dict(hidden_layer_sizes=(16,)), dict(objective="iwae"),
                                    dict(n_samples=2), dict(decoder_variance=0.5),
                                    dict(training_step="autograd")])
def test_partial_fit_refuses_a_changed_structure(digits, change):
    """The networks and the training step are built for these parameters: the
    fused step went on training the old objective and likelihood (a Gaussian
    likelihood read a placeholder log-variance), a new latent size died in
    np.dot."""
    train, _ = digits
    vae = _fit(train, max_epochs=1)
    before = deepcopy(vae.encoder_.state_dict())
    (name, value), = change.items()
    with pytest.raises(ValueError, match=f"{name} changed from .* since the model was fitted"):
        vae.set_params(**change).partial_fit(train)
    after = vae.encoder_.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and vae.n_iter_ == 1
    vae.fit(train).partial_fit(train)  # a fit for the new value continues
    assert vae.n_iter_ == 2


@pytest.mark.parametrize("kw", [dict(training_step="fused"), dict(training_step="autograd"),
                                dict(training_step="autograd", cuda_graph=True)],
                         ids=["fused", "autograd", "graphed"])
def test_a_warm_start_continues_the_training(digits, kw):
    """fit with warm_start continues the networks, Adam's moments and the random
    stream: fits of 3 and 2 epochs train as one fit of 5, bit for bit."""
    train, test = digits
    five = _fit(train, max_epochs=5, **kw)
    warm = _fit(train, max_epochs=3, warm_start=True, **kw)
    warm.set_params(max_epochs=2).fit(train)
    assert warm.n_iter_ == 5 and warm.loss_curve_ == five.loss_curve_
    np.testing.assert_array_equal(warm.transform(test), five.transform(test))
    cold = _fit(train, max_epochs=3, **kw).set_params(max_epochs=2).fit(train)
    assert cold.n_iter_ == 2 and cold.loss_curve_ == five.loss_curve_[:2]


def test_a_warm_start_holds_out_the_first_fits_rows(digits):
    """early_stopping in a warm start holds out the rows the first fit held out:
    its held-out scores go on from the first fit's (the best epoch being the
    last, no network was put back in between)."""
    train, _ = digits
    kw = dict(early_stopping=True, n_iter_no_change=50, learning_rate=3e-3)
    five = _fit(train, max_epochs=5, **kw)
    warm = _fit(train, max_epochs=3, warm_start=True, **kw)
    assert warm.best_validation_score_ == warm.validation_scores_[-1]
    warm.set_params(max_epochs=2).fit(train)
    assert warm.n_iter_ == 5 and warm.loss_curve_ == five.loss_curve_
    assert warm.validation_scores_ == five.validation_scores_[3:]
    assert warm.best_validation_score_ == max(five.validation_scores_[3:])


def test_a_warm_start_puts_the_networks_in_training_mode():
    """The first fit leaves the networks in eval mode; a warm start's epochs run
    them in training mode again (dropout, batch norm)."""
    modes = []

    class Recording(torch.nn.Linear):
        def forward(self, x):
            modes.append(self.training)
            return super().forward(x)

    X = (np.random.default_rng(0).random((64, 6)) > 0.5).astype(np.float32)
    vae = VAE(2, encoder=Recording(6, 4), decoder=torch.nn.Linear(2, 6), max_epochs=1,
              batch_size=64, warm_start=True, random_state=0).fit(X)
    vae.transform(X)
    assert modes == [False, True, False]  # fit's check of the shapes, its epoch, transform
    vae.fit(X)
    assert modes[3] is True and not vae.encoder_.training


def test_a_warm_start_refuses_a_changed_structure_and_bad_input(digits):
    train, test = digits
    vae = _fit(train, max_epochs=1, warm_start=True)
    Z = vae.transform(test)
    with pytest.raises(ValueError, match="n_components changed from 4 to 3 since the model "
                                         "was fitted.*Call fit with warm_start=False"):
        vae.set_params(n_components=3).fit(train)
    with pytest.raises(ValueError, match="has 10 features"):
        vae.set_params(n_components=4).fit(train[:, :10])
    with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\)"):
        vae.fit(train[:0])
    with pytest.raises(ValueError, match="warm_start must be True or False; got 'yes'"):
        vae.set_params(warm_start="yes").fit(train)
    np.testing.assert_array_equal(vae.transform(test), Z)
    assert vae.n_iter_ == 1
    afresh = vae.set_params(warm_start=False, n_components=3).fit(train)
    assert afresh.n_iter_ == 1 and afresh.transform(test).shape == (len(test), 3)


@pytest.mark.parametrize("kw", [dict(training_step="fused"), dict(training_step="autograd")],
                         ids=["fused", "autograd"])
def test_a_diverging_warm_start_leaves_the_model_as_it_was(digits, kw):
    """A warm start changes the networks and Adam's state in place: a call that
    raises puts them back, so the next one continues as if it never ran."""
    train, test = digits
    kw = dict(likelihood="gaussian", **kw)
    vae = _fit(train, max_epochs=2, warm_start=True, **kw)
    Z, curve = vae.transform(test), list(vae.loss_curve_)
    with pytest.raises(ValueError, match="the mean loss of epoch 1 is nan"):
        vae.fit(_far_from_unit_scale(train))
    np.testing.assert_array_equal(vae.transform(test), Z)
    assert vae.loss_curve_ == curve and vae.n_iter_ == 2
    vae.fit(train)
    assert vae.loss_curve_ == _fit(train, max_epochs=4, **kw).loss_curve_


@pytest.mark.parametrize("kw", [dict(training_step="fused"), dict(training_step="autograd"),
                                dict(training_step="autograd", cuda_graph=True),
                                dict(objective="iwae", n_samples=3, gradient_estimator="dreg",
                                     likelihood="gaussian")],
                         ids=["fused", "autograd", "graphed", "iwae-dreg"])
def test_sample_weight_is_relative_and_weights_the_loss(digits, kw):
    """Weights count relative to their mean: equal weights train exactly as none.
    Unequal ones weight each example's bound in the loss alike in the fused and
    the autograd steps (the kernels' weighted gradients are checked against
    autograd in tests/kernels/test_vae_mlp_step.py), and loss_curve_ is the
    weighted mean."""
    train, test = digits
    plain = _fit(train, **kw)
    equal = _fit_weighted(train, np.full(len(train), 2.0), **kw)
    assert equal.loss_curve_ == plain.loss_curve_
    np.testing.assert_array_equal(equal.transform(test), plain.transform(test))

    weights = np.random.default_rng(1).random(len(train)) * 3
    weights[:100] = 0.0
    weighted = _fit_weighted(train, weights, **kw)
    assert not np.allclose(weighted.transform(test), plain.transform(test), rtol=1e-3)
    other = dict(kw, training_step="autograd" if kw.get("training_step") == "fused"
                 else "fused")
    other.pop("cuda_graph", None)
    twin = _fit_weighted(train, torch.from_numpy(weights), **other)
    np.testing.assert_allclose(twin.loss_curve_, weighted.loss_curve_, rtol=1e-5)
    np.testing.assert_allclose(twin.transform(test), weighted.transform(test), rtol=1e-3,
                               atol=1e-4)
    streamed = VAE(n_components=4, hidden_layer_sizes=(32,), batch_size=64, random_state=0,
                   **kw).partial_fit(train, sample_weight=weights)
    assert streamed.loss_curve_ == weighted.loss_curve_[:1]


def _fit_weighted(X, sample_weight, **kw):
    params = dict(n_components=4, hidden_layer_sizes=(32,), max_epochs=4, batch_size=64,
                  random_state=0)
    params.update(kw)
    return VAE(**params).fit(X, sample_weight=sample_weight)


def test_sample_weight_with_early_stopping_and_bad_weights(digits):
    train, _ = digits
    n = len(train)
    weights = np.random.default_rng(2).random(n) + 0.5
    stopped = _fit_weighted(train, weights, early_stopping=True, max_epochs=3)
    assert len(stopped.validation_scores_) == 3
    unweighted = _fit(train, early_stopping=True, max_epochs=3)
    assert stopped.validation_scores_ != unweighted.validation_scores_
    for bad, message in [(np.ones(n - 1), r"sample_weight.shape == \(1199,\), expected"),
                         (np.r_[-1.0, np.ones(n - 1)], "finite and non-negative"),
                         (np.r_[np.nan, np.ones(n - 1)], "finite and non-negative"),
                         (np.zeros(n), "at least one positive weight")]:
        with pytest.raises(ValueError, match=message):
            _fit_weighted(train, bad)
    one_row = np.r_[1.0, np.zeros(n - 1)]  # early stopping's split leaves it on one side
    with pytest.raises(ValueError, match="sample_weight is zero on every (training|held-out)"):
        _fit_weighted(train, one_row, early_stopping=True)


def test_verbose_shows_a_progress_bar_over_the_epochs(digits, capsys, monkeypatch):
    """tqdm's bar over the epochs with the loss, drawn once an epoch (and as it
    closes) at most; without tqdm, an ImportError that says how to get it."""
    pytest.importorskip("tqdm")
    train, _ = digits
    vae = _fit(train[:256], max_epochs=3, verbose=True)
    err = capsys.readouterr().err
    assert "VAE:" in err and "3/3" in err and f"loss={vae.loss_curve_[-1]:.4g}" in err
    assert err.count("loss=") <= 3 + 1
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    with pytest.raises(ImportError, match=r"verbose=True shows a tqdm progress bar: pip "
                                          r"install tqdm"):
        _fit(train[:256], max_epochs=1, verbose=True)


def test_an_int_hidden_layer_size_is_one_layer(digits):
    """As in sklearn's MLP: hidden_layer_sizes=32 is (32,)."""
    train, test = digits
    one = _fit(train[:300], max_epochs=1, hidden_layer_sizes=32)
    np.testing.assert_array_equal(one.transform(test),
                                  _fit(train[:300], max_epochs=1).transform(test))
    assert [m.out_features for m in one.encoder_ if hasattr(m, "out_features")] == [32, 8]
    # the same structure spelt either way: a continuation goes on
    one.set_params(hidden_layer_sizes=[32]).partial_fit(train[:300])
    assert one.n_iter_ == 2


def test_lazy_modules_draw_their_weights_from_random_state(digits):
    """A LazyLinear draws its weights at its first forward pass: fit's check of the
    networks makes that pass under the seed, so the same random_state gives the
    same fit, and the modules passed in stay uninitialised."""
    train, test = digits
    encoder = torch.nn.Sequential(torch.nn.LazyLinear(16), torch.nn.ReLU(),
                                  torch.nn.Linear(16, 8))
    decoder = torch.nn.Linear(4, 64)
    a, b, c = (_fit(train[:300], max_epochs=1, encoder=encoder, decoder=decoder,
                    random_state=seed) for seed in (0, 0, 1))
    assert a.loss_curve_ == b.loss_curve_ != c.loss_curve_
    np.testing.assert_array_equal(a.transform(test), b.transform(test))
    assert isinstance(encoder[0], torch.nn.LazyLinear)


def test_inference_on_no_rows_gives_sklearns_error(digits):
    """Every method that reads X refuses empty input with sklearn's message, as
    the other estimators do (score_samples died in torch.cat, elbo divided by
    zero, transform returned an empty array)."""
    train, _ = digits
    vae = _fit(train[:200], max_epochs=1)
    for rows in (train[:0], torch.as_tensor(train[:0])):
        for method in (vae.transform, vae.score_samples, vae.score, vae.elbo,
                       vae.partial_fit):
            with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\) "
                                                 r"\(shape=\(0, 64\)\) while a minimum of 1 "
                                                 r"is required by VAE"):
                method(rows)

"""``fastlvm.VAE``: a variational autoencoder as a scikit-learn-style estimator.

Amortized variational inference (Kingma & Welling 2014): q(z | x, phi) is an
encoder network, p(x | z, theta) a decoder network, and both are trained
together by stochastic gradients of a bound on log p(x) -- the ELBO with its
KL term in closed form, or the importance-weighted bound of Burda et al.
(2016) with k samples and the plain, sticking-the-landing or doubly
reparameterised gradient.  The bound, its KL and log-mean-exp terms and their
gradients are the fused kernels of :mod:`fastlvm.kernels` (Numba on CPU
tensors, Triton on CUDA tensors); the networks are ordinary torch modules.  On
CPU data multilayer perceptrons (the default networks, or your own of that
form) train by a fused step instead: the whole Adam step in one Numba call
(:mod:`fastlvm.vae._fused_step`).
"""

import contextlib
import copy
import math
import sys
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from fastlvm._continuation import ContinuationMixin
from fastlvm._arrays import numpy_readable
from fastlvm._restore import restored_on_error
from fastlvm._sample_weight import check_sample_weight
from fastlvm.kernels import elbo as elbo_kernel
from fastlvm.kernels import iwae_bound
from fastlvm.kernels._vae_checks import autocast_enabled

from ._fused_step import FusedStep, fused_step_applies
from ._networks import check_networks, default_networks, hidden_widths, split_posterior
from ._row_noise import row_keys, row_normals
from ._training_step import EagerStep, GraphedStep

_OBJECTIVES = ("elbo", "iwae")
_ESTIMATORS = ("reparam", "stl", "dreg")
_LIKELIHOODS = ("bernoulli", "gaussian")
_TRAINING_STEPS = ("auto", "fused", "autograd")
# elements of one (k, batch, D) decoder output while scoring (bounds the memory)
_SCORE_ELEMENTS = 1 << 23


def _rows_within(elements_per_row):
    """Rows per chunk of the passes over X that hold a few (rows, elements_per_row)
    arrays: _SCORE_ELEMENTS elements, at least one row."""
    return max(1, _SCORE_ELEMENTS // max(1, elements_per_row))


def _seed(random_state):
    """A 31-bit seed drawn from a sklearn-style random_state."""
    return int(check_random_state(random_state).randint(2**31 - 1))


def _relative(weights):
    """Sample weights divided by their mean (None stays None)."""
    return None if weights is None else weights / weights.mean()


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)


def _adam(params, lr, capturable=False):
    """Adam with torch's fused update (one pass over each parameter, moments
    included) where the parameters' device has it -- CPU and CUDA -- else the
    multi-tensor (foreach) update.  On the CPU the fused step takes a third of the
    foreach step's time, a sixth to a fifth of a training step of the default
    networks (bench/results/cpu-2core-epyc-vae.md).  ``capturable`` keeps the
    step count on the device, as a CUDA graph of the step needs."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, capturable=capturable)
    except RuntimeError:  # a device (or parameter dtype) without the fused kernel
        return torch.optim.Adam(params, lr=lr, foreach=True, capturable=capturable)


def _tensor_view(array):
    """torch.from_numpy(array), without torch's warning for a read-only array (a
    memmap opened 'r', a pandas 3 frame's values): the VAE never writes into X."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _generator(seed, device):
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


class VAE(ContinuationMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Variational autoencoder, fitted by stochastic gradients of the ELBO or IWAE bound.

    z ~ N(0, I) in R^L, x | z ~ p(x | decoder(z)), q(z | x) = N(mu(x), diag
    exp(logvar(x))) from the encoder.  ``fit`` runs mini-batch Adam on the
    chosen bound; the loss and its gradient come from fused kernels that never
    store the (k x batch x D) per-pixel log-probabilities.

    Parameters
    ----------
    n_components : int, default=16
        The latent dimension L.
    likelihood : {'bernoulli', 'gaussian'}, default='bernoulli'
        p(x | z): Bernoulli on decoder logits (data in [0, 1], binary or grey
        levels), or Gaussian around the decoder's output.
    decoder_variance : 'learned' or float, default='learned'
        Gaussian only: 'learned' fits one variance per feature (a parameter
        trained with the networks); a float fixes the variance.
    objective : {'elbo', 'iwae'}, default='elbo'
        'elbo': the evidence lower bound with the KL in closed form, averaged
        over ``n_samples`` decoder samples.  'iwae': the importance-weighted
        bound log mean_s w_s with ``n_samples`` samples (Burda et al. 2016).
    n_samples : int, default=1
        k, the samples per example in training.
    gradient_estimator : {'reparam', 'stl', 'dreg'}, default='reparam'
        'iwae' only: the plain reparameterised gradient, sticking the landing
        (Roeder et al. 2017) or the doubly reparameterised gradient (Tucker et
        al. 2019); see :func:`fastlvm.kernels.iwae_bound`.
    hidden_layer_sizes : tuple of int, or int, default=(256,)
        Hidden widths of the default encoder (the decoder mirrors them); an int
        is one hidden layer, () none.
    encoder, decoder : torch.nn.Module, optional
        Your own networks instead of the defaults.  The encoder maps (batch, D)
        to ``(mu, logvar)`` of shape (batch, L) or one (batch, 2 L) tensor; the
        decoder maps (..., L) to (..., D).  ``fit`` trains deep copies, so the
        modules you pass are left as they are; it runs the copies once on two
        rows (in eval mode, without gradients) to check those shapes first.
    batch_size : int, default=128
    max_epochs : int, default=30
        Passes over the training data.
    learning_rate : float, default=1e-3
        Adam's step size.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the rows (drawn by ``random_state``),
        score them after every epoch by the training bound, stop when that score
        has not risen by more than ``tol`` for ``n_iter_no_change`` epochs in a
        row, and keep the networks of the best epoch (sklearn's
        ``MLPClassifier`` rule).  ``partial_fit`` ignores it, as sklearn's does.
    validation_fraction : float, default=0.1
        Share of the rows held out with ``early_stopping``, in (0, 1).
    n_iter_no_change : int, default=10
        Epochs without improvement before ``early_stopping`` stops.
    tol : float, default=1e-4
        The improvement, in nats per example, that counts for ``early_stopping``.
    random_state : int, RandomState instance or None, default=None
        Seeds the network initialisation, the shuffling and every sample drawn.
    verbose : bool, default=False
        Show a progress bar over the epochs (tqdm when installed).
    warm_start : bool, default=False
        When the model is fitted, ``fit`` continues its training for
        ``max_epochs`` more epochs instead of building new networks: the
        networks, Adam's moments and the random stream go on from where the
        last call left them, so two warm fits of 10 epochs train as one fit of
        20 (sklearn's ``MLPClassifier`` keeps the weights and restarts Adam).
        ``loss_curve_`` and ``n_iter_`` go on counting; ``early_stopping``
        draws its split from ``random_state`` as the first fit did (with an int
        seed and the same X, the same held-out rows) and judges this call's
        epochs only.
        The parameters the networks were built for (see :meth:`partial_fit`)
        may not change in between.
    cuda_graph : 'auto' or bool, default='auto'
        On CUDA tensors, record one training step (forward, backward, Adam) as
        a CUDA graph after three warm-up steps and replay it for every full
        batch: one launch instead of the step's dozens of kernels and
        autograd's host work, which is most of a step at small batch sizes.
        The networks must be capturable (no values read back to the host, no
        data-dependent shapes; the default networks are); a capture that fails
        raises.  On an H200 (binarised digits, batch 128) it trained 13x-21x
        Pyro's examples per second against the plain step's 2.5x-3x, to the
        same test ELBO (``bench/results/gpu-h200.md``, session 59).  'auto'
        records for the default networks on CUDA data, and not for networks of
        your own (set True where they are capturable).  True on CPU data applies
        to the autograd step (there the same step runs without a graph and
        gives the same fit as ``cuda_graph=False``), not to the fused one.
    training_step : {'auto', 'fused', 'autograd'}, default='auto'
        'fused': each Adam step -- the default networks' forward, the bound,
        the backward and the update -- is one Numba kernel call
        (:mod:`fastlvm.vae._fused_step`), for CPU data and the default
        networks, or your own if each is exactly ``nn.Sequential(Linear,
        ReLU, ..., Linear)`` with biases, no frozen parameters and no hooks
        (every objective and gradient estimator); on two cores it
        trained the default D = 64 networks' ELBO two to three times as fast
        as 'autograd' (bench/results/cpu-2core-epyc-vae.md).  'autograd':
        the networks run as torch modules, the bound's kernels through
        autograd, and torch's Adam updates them (any networks, objective and
        device).  'auto': 'fused' where it applies, else 'autograd'.  Both
        follow the same random stream, so their fits agree to rounding.

        Mixed precision: call ``fit`` (and the other methods) inside
        ``torch.autocast(device_type, dtype=torch.bfloat16)``.  'auto' then
        takes the autograd step, whose layers run in bfloat16 while the
        parameters, the bound's kernels and Adam stay in float32, as in any
        autocast training loop; 'fused' ignores autocast and runs float32.
        Results come back in the model's dtype.

    Attributes
    ----------
    encoder_, decoder_ : torch.nn.Module
        The trained networks, on the training data's device and dtype.
    decoder_logvar_ : torch.Tensor of shape (n_features,) or None
        The Gaussian log-variances (learned or fixed); None for Bernoulli.
    loss_curve_ : list of float
        The mean negative bound per example in each epoch (weighted by
        ``sample_weight``).
    validation_scores_ : list of float or None
        With ``early_stopping``: the (weighted) mean bound per held-out example
        after each epoch; None otherwise.
    best_validation_score_ : float or None
        The largest of ``validation_scores_``: the kept networks' score.
    n_iter_ : int
        Epochs run, over every call that continued the fit (with
        ``partial_fit``: calls, each one epoch over its batch).
    n_features_in_ : int

    Notes
    -----
    Input follows the usual fastlvm rules: NumPy arrays run on the CPU and
    results come back as NumPy arrays; torch tensors stay on their device
    (CPU tensors use the Numba kernels, CUDA tensors the Triton kernels) and
    results come back as tensors.  float32 and float64 are kept; other dtypes
    are converted to float32.
    """

    # what the networks and the training step are built for: partial_fit and
    # warm_start continue only while these are unchanged (learning_rate and
    # batch_size are read at every call)
    _STRUCTURE = ("n_components", "likelihood", "decoder_variance", "objective", "n_samples",
                  "gradient_estimator", "hidden_layer_sizes", "encoder", "decoder",
                  "training_step", "cuda_graph")

    def _structure_value(self, name):
        """``hidden_layer_sizes`` as its widths: 8 is (8,), as the networks read it."""
        if name == "hidden_layer_sizes":
            return tuple(hidden_widths(self.hidden_layer_sizes))
        return getattr(self, name)

    def __init__(self, n_components=16, *, likelihood="bernoulli", decoder_variance="learned",
                 objective="elbo", n_samples=1, gradient_estimator="reparam",
                 hidden_layer_sizes=(256,), encoder=None, decoder=None, batch_size=128,
                 max_epochs=30, learning_rate=1e-3, early_stopping=False,
                 validation_fraction=0.1, n_iter_no_change=10, tol=1e-4, random_state=None,
                 verbose=False, warm_start=False, cuda_graph="auto", training_step="auto"):
        self.n_components = n_components
        self.likelihood = likelihood
        self.decoder_variance = decoder_variance
        self.objective = objective
        self.n_samples = n_samples
        self.gradient_estimator = gradient_estimator
        self.hidden_layer_sizes = hidden_layer_sizes
        self.encoder = encoder
        self.decoder = decoder
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.learning_rate = learning_rate
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start
        self.cuda_graph = cuda_graph
        self.training_step = training_step

    # ------------------------------------------------------------------ checks
    def _check_params(self):
        _positive_int(self.n_components, "n_components")
        _positive_int(self.n_samples, "n_samples")
        _positive_int(self.batch_size, "batch_size")
        if isinstance(self.max_epochs, bool) or not isinstance(
                self.max_epochs, (int, np.integer)) or self.max_epochs < 0:
            raise ValueError(f"max_epochs must be a non-negative integer; got "
                             f"{self.max_epochs!r}.")
        for value, name, choices in ((self.likelihood, "likelihood", _LIKELIHOODS),
                                     (self.objective, "objective", _OBJECTIVES),
                                     (self.gradient_estimator, "gradient_estimator",
                                      _ESTIMATORS),
                                     (self.training_step, "training_step", _TRAINING_STEPS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; "
                                 f"got {value!r}.")
        if self.objective == "elbo" and self.gradient_estimator != "reparam":
            raise ValueError(
                f"gradient_estimator={self.gradient_estimator!r} applies to "
                "objective='iwae' (the ELBO's KL is in closed form, so there is no score "
                "term to drop); use objective='iwae' (n_samples=1 gives the single-sample "
                "bound).")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive float; got "
                             f"{self.learning_rate!r}.")
        if self.decoder_variance != "learned":
            try:
                variance = float(self.decoder_variance)
            except (TypeError, ValueError):
                variance = float("nan")
            if not (variance > 0 and math.isfinite(variance)):
                raise ValueError(f"decoder_variance must be 'learned' or a positive float; "
                                 f"got {self.decoder_variance!r}.")
        hidden_widths(self.hidden_layer_sizes)
        _positive_int(self.n_iter_no_change, "n_iter_no_change")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1); got "
                             f"{self.validation_fraction!r}.")
        if not (self.tol >= 0 and math.isfinite(self.tol)):
            raise ValueError(f"tol must be a non-negative float; got {self.tol!r}.")
        if not isinstance(self.warm_start, (bool, np.bool_)):
            raise ValueError(f"warm_start must be True or False; got {self.warm_start!r}.")
        if not (isinstance(self.cuda_graph, (bool, np.bool_))
                or (isinstance(self.cuda_graph, str) and self.cuda_graph == "auto")):
            raise ValueError(f"cuda_graph must be 'auto', True or False; got "
                             f"{self.cuda_graph!r}.")
        if (self.encoder is None) != (self.decoder is None):
            raise ValueError("pass both encoder and decoder, or neither (for the default "
                             "networks).")
        for network, name in ((self.encoder, "encoder"), (self.decoder, "decoder")):
            if network is not None and not isinstance(network, torch.nn.Module):
                raise ValueError(f"{name} must be a torch.nn.Module; got "
                                 f"{type(network).__name__}. Wrap a function in an "
                                 "nn.Module whose forward calls it.")

    def _check_X(self, X, fitting=False, name="X"):
        """X as a 2-D float tensor (zero-copy for NumPy), and whether it came as NumPy.

        Host data goes through sklearn's ``validate_data`` (its messages for sparse,
        complex, object, 1-D and empty input, the number of features, and the
        column names of a DataFrame); tensors get the same checks here.  Integer
        and boolean data become float32.
        """
        from_numpy = not isinstance(X, torch.Tensor)
        if not fitting:
            check_is_fitted(self, "encoder_")
        if from_numpy:
            X = validate_data(self, X, reset=fitting, dtype=[np.float32, np.float64],
                              ensure_all_finite=False)
            X = _tensor_view(np.ascontiguousarray(X))
        else:
            X = self._check_tensor(X, fitting, name)
        if not fitting:
            if X.device != self._device:
                raise ValueError(f"{name} is on {X.device} but the model is on "
                                 f"{self._device}; move it with {name}.to('{self._device}').")
            X = X.to(self._dtype)
        self._check_values(X, name)
        return X.contiguous(), from_numpy

    def _check_values(self, X, name):
        """NaN and infinity (and values off [0, 1] for the Bernoulli likelihood),
        refused; checked over chunks of rows, so that the (rows, D) masks of a
        large X are never held at once."""
        bernoulli = self.likelihood == "bernoulli" and name == "X"
        rows = _rows_within(X.shape[1])
        for start in range(0, X.shape[0], rows):
            x = X[start:start + rows]
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} contains NaN or infinity; remove or impute "
                                 "those entries first.")
            if bernoulli and not bool(((x >= 0) & (x <= 1)).all()):
                raise ValueError(f"{name} has values outside [0, 1]; the Bernoulli "
                                 "likelihood needs data in [0, 1]. Scale it (e.g. "
                                 "X / X.max()) or use likelihood='gaussian'.")

    def _check_tensor(self, X, fitting, name):
        """The shape checks of ``validate_data``, with its messages, for a tensor."""
        if X.dtype not in (torch.float32, torch.float64):
            if X.is_complex():
                raise ValueError(f"Complex data not supported: {name} has dtype {X.dtype}.")
            X = X.to(torch.float32)
        if X.ndim != 2:
            raise ValueError(f"Expected a 2D tensor, got shape {tuple(X.shape)} instead. "
                             "Reshape your data either using X.reshape(-1, 1) if your data "
                             "has a single feature or X.reshape(1, -1) if it contains a "
                             "single sample.")
        by = type(self).__name__
        if X.shape[0] < 1:
            raise ValueError(f"Found array with 0 sample(s) (shape={tuple(X.shape)}) while "
                             f"a minimum of 1 is required by {by}.")
        if X.shape[1] < 1:
            raise ValueError(f"Found array with 0 feature(s) (shape={tuple(X.shape)}) while "
                             f"a minimum of 1 is required by {by}.")
        if not fitting and X.shape[1] != self.n_features_in_:
            raise ValueError(f"{name} has {X.shape[1]} features, but {type(self).__name__} "
                             f"is expecting {self.n_features_in_} features as input.")
        return X

    def _out(self, t, as_numpy):
        """A result as NumPy or as a tensor; a network's output in bfloat16 or float16
        (under torch.autocast) in the model's dtype."""
        t = t.detach()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.to(self._dtype)
        return t.cpu().numpy() if as_numpy else t

    # --------------------------------------------------------------- the model
    def _build(self, X, seed):
        n_features = X.shape[1]
        devices = [X.device.index or 0] if X.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if self.encoder is None:
                encoder, decoder = default_networks(n_features, self.n_components,
                                                    self.hidden_layer_sizes)
            else:
                encoder, decoder = copy.deepcopy(self.encoder), copy.deepcopy(self.decoder)
            self.encoder_ = encoder.to(device=X.device, dtype=X.dtype)
            self.decoder_ = decoder.to(device=X.device, dtype=X.dtype)
            if self.encoder is not None:  # (lazy modules draw their weights here, seeded)
                check_networks(self.encoder_, self.decoder_, X[:2], self.n_components)
        params = list(self.encoder_.parameters()) + list(self.decoder_.parameters())
        self.decoder_logvar_ = None
        if self.likelihood == "gaussian":
            if self.decoder_variance == "learned":
                self.decoder_logvar_ = torch.nn.Parameter(
                    torch.zeros(n_features, dtype=X.dtype, device=X.device))
                params.append(self.decoder_logvar_)
            else:
                self.decoder_logvar_ = torch.full(
                    (n_features,), math.log(float(self.decoder_variance)), dtype=X.dtype,
                    device=X.device)
        self._device, self._dtype = X.device, X.dtype
        self.n_features_in_ = n_features
        self._n_features_out = self.n_components  # for get_feature_names_out
        return params

    def _posterior(self, x):
        return split_posterior(self.encoder_(x), self.n_components, x.shape[0])

    def _bound(self, x, k, gen, objective, gradient="reparam", eps=None):
        """The per-example bound (batch,) with k samples of z ~ q(z | x): standard
        normal draws from ``gen``, or the given ``eps`` (k, batch, L)."""
        mu, logvar = self._posterior(x)
        if eps is None:
            eps = torch.randn((k, *mu.shape), generator=gen, device=x.device, dtype=x.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        dec = self.decoder_(z)
        # X passed _check_X (finite, and in [0, 1] for the Bernoulli) once for the
        # whole call: the kernels need not count bad entries per batch, a wait for
        # the device each time on a GPU
        if objective == "elbo":
            return elbo_kernel(x, dec, mu, logvar, self.likelihood, self.decoder_logvar_,
                               check_input=False)
        return iwae_bound(x, dec, z, mu, logvar, self.likelihood, self.decoder_logvar_,
                          gradient=gradient, check_input=False)

    # -------------------------------------------------------------- training
    def fit(self, X, y=None, sample_weight=None):
        """Train the encoder and decoder on X by mini-batch Adam on the bound.

        With ``warm_start`` and a fitted model, the training continues (see
        ``warm_start``).  A run whose loss (or held-out bound) stops being
        finite raises a ValueError and leaves the model as it was before the
        call; a KeyboardInterrupt stops training with a warning and keeps the
        epochs run so far, as sklearn's MLPClassifier does.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
        y : ignored
        sample_weight : array-like or torch.Tensor of shape (n_samples,), default=None
            Non-negative weights: each batch's loss is -mean_b(c_b bound_b), c
            the weights divided by their mean over the training rows, so that
            ``loss_curve_`` and the held-out scores of ``early_stopping`` are
            weighted means (integer weights are repeated rows in expectation).

        Returns
        -------
        self
        """
        self._check_params()
        if self.warm_start and hasattr(self, "encoder_"):
            return self._continue_fit(X, sample_weight)
        with restored_on_error(self):  # fit builds new networks: a shallow restore
            X, self._fitted_on_numpy = self._check_X(X, fitting=True)
            weights = self._sample_weight(sample_weight, X)
            gen = self._start(X)
            self.loss_curve_ = []
            self._fit_epochs(X, weights, gen, gen)
        self._record_structure()
        return self

    def _continue_fit(self, X, sample_weight):
        """``fit`` with ``warm_start`` on a fitted model: ``max_epochs`` more epochs
        from the current networks, optimiser state and random stream.  The
        networks and the optimiser change in place, so a call that raises puts
        back copies of them (as ``partial_fit`` does) besides the attributes."""
        self._check_structure()
        X, _ = self._check_X(X)
        weights = self._sample_weight(sample_weight, X)
        with self._restored_training_on_error():
            self.loss_curve_ = list(self.loss_curve_)
            # the held-out rows of the first fit: its split was the first draw of a
            # generator seeded as this one is
            split = _generator(_seed(self.random_state), X.device)
            self._fit_epochs(X, weights, split, self._generator)
        return self

    def _fit_epochs(self, X, weights, split, gen):
        """``fit``'s training: the ``early_stopping`` split drawn from the generator
        ``split``, then ``max_epochs`` epochs appended to ``loss_curve_`` with
        draws from ``gen``, and the best held-out epoch's networks kept."""
        (X_train, w_train), (X_val, w_val) = self._validation_split(X, weights, split)
        self.validation_scores_ = [] if X_val is not None else None
        self.best_validation_score_ = None
        best_state = self._train_epochs(X_train, X_val, gen, w_train, w_val)
        if best_state is not None:  # early stopping keeps the best epoch's networks
            self._load_network_state(best_state)
        self.n_iter_ = len(self.loss_curve_)

    def _train_epochs(self, X_train, X_val, gen, w_train, w_val):
        """``fit``'s epochs; with ``early_stopping``, the best epoch's network state.
        ``w_train`` and ``w_val``: the rows' relative weights, or None.

        A KeyboardInterrupt stops training with a warning and keeps the epochs
        run so far, as sklearn's MLPClassifier does.
        """
        best_state, no_change = None, 0
        bar = self._progress_bar()
        self.encoder_.train()  # a warm start's networks were left in eval mode
        self.decoder_.train()
        try:
            for epoch in range(1, self.max_epochs + 1):
                self.loss_curve_.append(self._finite(self._epoch(X_train, gen, w_train),
                                                     f"the mean loss of epoch {epoch}"))
                if bar is not None:
                    bar.set_postfix(loss=f"{self.loss_curve_[-1]:.4g}", refresh=False)
                    bar.update(1)  # redraws the bar with the loss, once
                if X_val is None:
                    continue
                score = self._finite(
                    self._mean_bound(X_val, self.n_samples, gen, self.objective,
                                     self.gradient_estimator, self.batch_size,
                                     weights=w_val),
                    f"the held-out rows' mean bound after epoch {epoch}")
                self.validation_scores_.append(score)
                best = self.best_validation_score_
                no_change = no_change + 1 if best is not None and score < best + self.tol else 0
                if best is None or score > best:
                    self.best_validation_score_ = score
                    best_state = self._network_state()
                if no_change > self.n_iter_no_change:
                    break
        except KeyboardInterrupt:
            warnings.warn("Training interrupted by user.", stacklevel=3)
        finally:
            if bar is not None:
                bar.close()
            self.encoder_.eval()
            self.decoder_.eval()
        return best_state

    def _finite(self, value, what):
        """``value``, or the error of a diverged training run when it is not finite."""
        if math.isfinite(value):
            return value
        if self.likelihood == "gaussian":
            cause = ("on data far from unit scale or with too large a step: scale the data "
                     "first (for instance with sklearn.preprocessing.StandardScaler) or")
        else:  # the data are in [0, 1]
            cause = "with too large a step:"
        raise ValueError(
            f"Training diverged: {what} is {value}. The networks' outputs overflowed "
            f"{str(self._dtype).removeprefix('torch.')}, as they do {cause} lower "
            f"learning_rate (now {self.learning_rate!r}). The model is left as it was "
            "before this call.")

    def partial_fit(self, X, y=None, sample_weight=None):
        """One epoch of mini-batch Adam over X, continuing from the current state.

        The first call on an unfitted model builds the networks and the
        optimiser; later calls keep both (Adam's moments included) and the
        random stream, so ``fit`` followed by ``partial_fit`` continues ``fit``'s
        training.  Each call appends one entry to ``loss_curve_``.
        ``early_stopping`` does not apply.  A call that raises (a diverged
        epoch, an interrupt) leaves the model as it was: each call copies the
        networks, the optimiser's state and the random stream first.
        ``learning_rate`` and ``batch_size`` may change between calls (a
        schedule by hand); the parameters the networks and the step were built
        for (``n_components``, the likelihood, the objective and its samples,
        the networks, ``training_step``, ``cuda_graph``) may not: a call after
        ``set_params`` changed one raises, naming it (``fit`` with
        ``warm_start=False`` starts afresh).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
        y : ignored
        sample_weight : array-like or torch.Tensor of shape (n_samples,), default=None
            Non-negative weights, relative within the call (see :meth:`fit`).

        Returns
        -------
        self
        """
        if not hasattr(self, "encoder_"):
            self._check_params()
            with restored_on_error(self):
                X, self._fitted_on_numpy = self._check_X(X, fitting=True)
                weights = self._sample_weight(sample_weight, X)
                self._start(X)
                self.loss_curve_, self.n_iter_ = [], 0
                self.validation_scores_ = self.best_validation_score_ = None
                self._partial_epoch(X, _relative(weights))
                self._record_structure()
            return self
        self._check_params()
        self._check_structure()
        X, _ = self._check_X(X)
        weights = _relative(self._sample_weight(sample_weight, X))
        with self._restored_training_on_error():
            self._partial_epoch(X, weights)
        return self

    def _partial_epoch(self, X, weights):
        """``partial_fit``'s epoch over X (rows' relative weights, or None)."""
        self.encoder_.train()
        self.decoder_.train()
        try:
            loss = self._finite(self._epoch(X, self._generator, weights),
                                f"the mean loss of partial_fit call {self.n_iter_ + 1}")
        finally:
            self.encoder_.eval()
            self.decoder_.eval()
        self.loss_curve_.append(loss)
        self.n_iter_ += 1

    @contextlib.contextmanager
    def _restored_training_on_error(self):
        """Continue a fit so that an exception (a diverged epoch, an interrupt)
        leaves the model as it was: the attributes (``restored_on_error``) and
        what the epochs change in place (:meth:`_training_state`)."""
        saved = self._training_state()
        with restored_on_error(self):
            try:
                yield
            except BaseException:
                self._load_training_state(saved)
                raise

    def _training_state(self):
        """Copies of everything an epoch changes in place, for a continued fit
        that raises: the networks, the step's optimiser state and the random
        stream (about three times the parameters' memory, copied once a call)."""
        return (self._network_state(), self._step.saved_state(),
                self._generator.get_state())

    def _load_training_state(self, state):
        networks, step, generator = state
        self._load_network_state(networks)
        self._step.load_state(step)
        self._generator.set_state(generator)

    def _start(self, X):
        """Networks, optimiser and random stream for a fresh training run."""
        seed = _seed(self.random_state)
        params = self._build(X, seed)
        if self._fused(X):
            self._optimizer = None  # FusedStep keeps Adam's moments itself
            self._step = FusedStep(self)
        else:
            graphed = self._records_graph(X)
            self._optimizer = _adam(params, self.learning_rate,
                                    capturable=graphed and X.device.type == "cuda")
            self._step = (GraphedStep(self, min(self.batch_size, X.shape[0]), X.shape[1])
                          if graphed else EagerStep(self))
        self._generator = _generator(seed, X.device)
        return self._generator

    def _records_graph(self, X):
        """Whether the step runs through :class:`GraphedStep` (``cuda_graph``)."""
        if isinstance(self.cuda_graph, str):  # 'auto'
            return X.device.type == "cuda" and self.encoder is None
        return bool(self.cuda_graph)

    def _fused(self, X):
        """Whether to train with :class:`FusedStep` (``training_step``)."""
        if self.training_step == "autograd":
            return False
        applies = fused_step_applies(self, X)
        if self.training_step == "fused" and not applies:
            raise ValueError(
                "training_step='fused' trains multilayer perceptrons on CPU data: the "
                "default networks, or nn.Sequential(Linear, ReLU, ..., Linear) of your own "
                "with biases, no frozen parameters and no hooks; got "
                f"{X.device.type} data and "
                f"{'the default' if self.encoder is None else 'your own'} networks. Use "
                "training_step='auto' or 'autograd'.")
        # under torch.autocast the autograd step runs the layers in low precision,
        # which is what autocast asks for; the fused step is float32 throughout
        return applies and (self.training_step == "fused"
                            or not autocast_enabled(X.device.type))

    def _validation_split(self, X, weights, gen):
        """((training rows, their relative weights), (held-out rows, their
        weights)) for ``early_stopping``; the held-out pair is (None, None)
        without it, and the weights are None without ``sample_weight``."""
        if not self.early_stopping:
            return (X, _relative(weights)), (None, None)
        n = X.shape[0]
        n_val = max(1, int(round(self.validation_fraction * n)))
        if n - n_val < 1:
            raise ValueError(f"early_stopping holds out {n_val} of {n} rows "
                             f"(validation_fraction={self.validation_fraction}), leaving none "
                             "to train on; pass more rows or set early_stopping=False.")
        order = torch.randperm(n, generator=gen, device=X.device)
        train, held_out = order[n_val:], order[:n_val]
        if weights is None:
            return (X[train], None), (X[held_out], None)
        for part, name in ((train, "training"), (held_out, "held-out")):
            if not bool((weights[part] > 0).any()):
                raise ValueError(
                    f"sample_weight is zero on every {name} row of early_stopping's "
                    f"split ({n_val} of {n} rows held out); give more rows a positive "
                    "weight, change validation_fraction or random_state, or set "
                    "early_stopping=False.")
        return (X[train], _relative(weights[train])), (X[held_out], weights[held_out])

    def _sample_weight(self, sample_weight, X):
        """``sample_weight`` checked (:func:`fastlvm._sample_weight.check_sample_weight`:
        sklearn's messages, a scalar for every row), as a float64 tensor on X's
        device, or None.  Weights given as a tensor must be on X's device."""
        if sample_weight is None:
            return None
        if isinstance(sample_weight, torch.Tensor):
            if sample_weight.device != X.device:
                raise ValueError(f"sample_weight is on {sample_weight.device} but X is on "
                                 f"{X.device}; move it with .to('{X.device}').")
            sample_weight = numpy_readable(sample_weight.cpu())  # n numbers
        weights = check_sample_weight(sample_weight, X.shape[0])
        return torch.as_tensor(weights, device=X.device)

    def _epoch(self, X, gen, weights=None):
        """One shuffled pass of Adam steps over X; the mean negative bound, weighted
        by ``weights`` (the rows' weights relative to their mean, or None)."""
        n = X.shape[0]
        order = torch.randperm(n, generator=gen, device=X.device)
        step = self._step
        step.start_epoch(X)
        for start in range(0, n, self.batch_size):
            step(X, order[start:start + self.batch_size], gen, weights)
        return -float(step.total) / n

    def _mean_bound(self, X, k, gen, objective, gradient, rows, seed=None, weights=None):
        """The bound's mean over the rows of X with k samples (weighted by
        ``weights``, (n_samples,) float64), without gradients, in chunks of
        ``rows`` rows: draws from ``gen``, or with ``seed`` each row's draws
        keyed by the seed and the row (as :meth:`score_samples` draws them)."""
        total = 0.0
        with torch.no_grad():
            for start in range(0, X.shape[0], rows):
                x = X[start:start + rows]
                eps = None if seed is None else row_normals(row_keys(x, seed), 0, k,
                                                            self.n_components, x.dtype)
                bound = self._bound(x, k, gen, objective, gradient, eps=eps).double()
                if weights is not None:
                    bound = bound * weights[start:start + rows]
                total += float(bound.sum())
        return total / (X.shape[0] if weights is None else float(weights.sum()))

    def _network_state(self):
        """Copies of every trained tensor (networks and a learned variance), made
        by one deep copy so that views of one buffer (the fused step's) copy it
        once."""
        state = {"encoder": self.encoder_.state_dict(), "decoder": self.decoder_.state_dict()}
        if isinstance(self.decoder_logvar_, torch.nn.Parameter):
            state["decoder_logvar"] = self.decoder_logvar_.detach()
        return copy.deepcopy(state)

    def _load_network_state(self, state):
        self.encoder_.load_state_dict(state["encoder"])
        self.decoder_.load_state_dict(state["decoder"])
        if "decoder_logvar" in state:
            with torch.no_grad():
                self.decoder_logvar_.copy_(state["decoder_logvar"])

    def _progress_bar(self):
        if not self.verbose:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            raise ImportError("verbose=True shows a tqdm progress bar: pip install tqdm "
                              "(or pip install 'fastlvm[progress]').") from None
        return tqdm(total=self.max_epochs, desc="VAE", unit="epoch", file=sys.stderr)

    # ------------------------------------------------------------ inference
    def transform(self, X):
        """Posterior means E[z | x] = mu(x).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)

        Returns
        -------
        Z : ndarray or torch.Tensor of shape (n_samples, n_components)
        """
        X, as_numpy = self._check_X(X)
        with torch.no_grad():
            mu = self._by_rows(lambda x: self._posterior(x)[0], X)
        return self._out(mu, as_numpy)

    def _by_rows(self, network, X):
        """``network`` (rows -> rows) over chunks of X's rows, concatenated: the
        hidden layers' activations of a million rows are never held at once."""
        rows = self._rows_per_chunk(1)
        if X.shape[0] <= rows:
            return network(X)
        return torch.cat([network(X[start:start + rows])
                          for start in range(0, X.shape[0], rows)])

    def _mean(self, dec):
        return torch.sigmoid(dec) if self.likelihood == "bernoulli" else dec

    def inverse_transform(self, Z):
        """The decoder's mean E[x | z]: sigmoid(logits) or the Gaussian mean.

        Parameters
        ----------
        Z : array-like or torch.Tensor of shape (n_samples, n_components)

        Returns
        -------
        X : ndarray or torch.Tensor of shape (n_samples, n_features)
        """
        check_is_fitted(self, "encoder_")
        as_numpy = not isinstance(Z, torch.Tensor)
        Z = torch.as_tensor(np.asarray(Z) if as_numpy else Z)
        if Z.ndim != 2 or Z.shape[1] != self.n_components:
            raise ValueError(f"Z must have shape (n_samples, n_components={self.n_components});"
                             f" got {tuple(Z.shape)}.")
        if Z.device != self._device:
            raise ValueError(f"Z is on {Z.device} but the model is on {self._device}; move "
                             f"it with Z.to('{self._device}').")
        if Z.shape[0] < 1:
            raise ValueError(f"Found array with 0 sample(s) (shape={tuple(Z.shape)}) while a "
                             "minimum of 1 is required.")
        if not bool(torch.isfinite(Z).all()):
            raise ValueError("Z contains NaN or infinity; latent codes must be finite.")
        with torch.no_grad():
            return self._out(self._by_rows(lambda z: self._mean(self.decoder_(z)),
                                           Z.to(self._dtype)), as_numpy)

    def sample(self, n_samples=1):
        """Draw x ~ p(x) = integral p(x | z) N(z; 0, I) dz.

        Parameters
        ----------
        n_samples : int, default=1

        Returns
        -------
        X : ndarray (fitted on NumPy) or torch.Tensor of shape (n_samples, n_features)
            Draws from the likelihood (0/1 for Bernoulli).
        Z : same type, shape (n_samples, n_components)
            The latent draws.
        """
        check_is_fitted(self, "encoder_")
        _positive_int(n_samples, "n_samples")
        gen = _generator(_seed(self.random_state), self._device)
        opts = dict(generator=gen, device=self._device, dtype=self._dtype)
        with torch.no_grad():
            z = torch.randn((n_samples, self.n_components), **opts)
            mean = self._mean(self.decoder_(z))
            if self.likelihood == "bernoulli":
                x = (torch.rand(mean.shape, **opts) < mean).to(self._dtype)
            else:
                x = mean + torch.exp(0.5 * self.decoder_logvar_) * torch.randn(mean.shape,
                                                                                **opts)
        as_numpy = self._device.type == "cpu" and self._fitted_on_numpy
        return self._out(x, as_numpy), self._out(z, as_numpy)

    def _rows_per_chunk(self, k):
        return _rows_within(k * self.n_features_in_)

    def score_samples(self, X, n_samples=1000, random_state=None):
        """Importance-sampled estimate of log p(x) for each row.

        log p(x) ~ log (1/K) sum_s p(x | z_s) p(z_s) / q(z_s | x), z_s ~ q(z | x):
        the IWAE bound with K samples, which rises to log p(x) as K grows
        (Burda et al. 2016).  Samples are drawn in chunks and combined exactly,
        so K is not limited by memory.  A row's standard-normal draws
        (z_s = mu(x) + sigma(x) eps_s) are keyed by the seed and the row's own
        values (:mod:`fastlvm.vae._row_noise`): its estimate does not depend on
        the other rows passed, their order or the chunking, and different rows
        get independent draws.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
        n_samples : int, default=1000
            K, importance samples per row (5000 for the figures in the docs).
        random_state : int, RandomState instance or None, default=None
            Seeds the samples; None uses the estimator's ``random_state``.

        Returns
        -------
        log_prob : ndarray or torch.Tensor of shape (n_rows,)
        """
        X, as_numpy = self._check_X(X)
        _positive_int(n_samples, "n_samples")
        seed = _seed(self.random_state if random_state is None else random_state)
        k_chunk = min(n_samples, 256)
        rows = self._rows_per_chunk(k_chunk)
        out = []
        with torch.no_grad():
            for start in range(0, X.shape[0], rows):
                x = X[start:start + rows]
                keys = row_keys(x, seed)
                parts, sizes = [], []
                for s0 in range(0, n_samples, k_chunk):
                    k = min(k_chunk, n_samples - s0)
                    eps = row_normals(keys, s0, k, self.n_components, x.dtype)
                    parts.append(self._bound(x, k, None, "iwae", eps=eps).to(torch.float64))
                    sizes.append(k)
                # log mean over all samples = logsumexp_c(lme_c + log k_c) - log K
                stacked = torch.stack(parts) + torch.log(
                    torch.tensor(sizes, dtype=torch.float64, device=x.device))[:, None]
                out.append(torch.logsumexp(stacked, dim=0) - math.log(n_samples))
        return self._out(torch.cat(out), as_numpy)

    def score(self, X, y=None, n_samples=1000):
        """Mean importance-sampled log-likelihood per row (see :meth:`score_samples`)."""
        return float(self.score_samples(X, n_samples=n_samples).mean())

    def elbo(self, X, n_samples=1, random_state=None):
        """Mean ELBO per row, KL in closed form, n_samples decoder samples per row.

        A row's draws are keyed by the seed and the row, as in
        :meth:`score_samples`: the mean does not depend on the order of the rows.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
        n_samples : int, default=1
        random_state : int, RandomState instance or None, default=None

        Returns
        -------
        float
        """
        X, _ = self._check_X(X)
        _positive_int(n_samples, "n_samples")
        seed = _seed(self.random_state if random_state is None else random_state)
        return self._mean_bound(X, n_samples, None, "elbo", "reparam",
                                self._rows_per_chunk(n_samples), seed=seed)

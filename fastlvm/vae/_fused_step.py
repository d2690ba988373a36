"""``fastlvm.VAE``'s training step on the CPU as one Numba call (``training_step='fused'``).

:class:`FusedStep` runs :func:`fastlvm.kernels.vae_mlp_step._numba.vae_mlp_step_numba`:
the batch's forward, the bound (the ELBO or the importance-weighted bound), the
backward and Adam's update in one kernel call, for the default networks
(or your own of the same form: Linear and ReLU layers) on CPU tensors.  The
networks stay ordinary torch modules: their parameters (and a learned
Gaussian log-variance) are views of one flat vector that the kernel updates
in place, so ``transform``, ``score_samples``, early stopping's saved states
and pickling all see the trained values.  Adam's moments live in two flat
vectors of the same layout.

The draws come from the training generator with the same call, in the same
order of the random stream, as in the autograd step, so a fit follows the
autograd fit to rounding (tests/models/test_vae.py).
"""

import numpy as np
import torch

from fastlvm.kernels.vae_mlp_step import IMPLEMENTATIONS, OBJECTIVES

# torch.optim.Adam's defaults, which the autograd step uses
_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8


def fused_step_applies(vae, X):
    """Whether :class:`FusedStep` can train ``vae`` on X: CPU data and multilayer
    perceptrons -- the default networks, or your own of the same form (any
    objective and gradient estimator)."""
    if X.device.type != "cpu":
        return False
    if vae.encoder is None:
        return True
    return (_is_plain_mlp(vae.encoder, X.shape[1], 2 * vae.n_components)
            and _is_plain_mlp(vae.decoder, vae.n_components, X.shape[1]))


def _is_plain_mlp(module, n_in, n_out):
    """Whether ``module`` is exactly nn.Sequential(Linear, ReLU, Linear, ..., Linear)
    from n_in to n_out features, with biases, every parameter trained and no
    hooks: what the fused step computes.  Anything else (subclasses, other
    layers, frozen parameters, hooks that could change a forward pass the fused
    step never runs) keeps the autograd step."""
    if type(module) is not torch.nn.Sequential or len(module) % 2 == 0:
        return False
    width = n_in
    for i, layer in enumerate(module):
        if layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks:
            return False
        if i % 2:
            if type(layer) is not torch.nn.ReLU:
                return False
        elif (type(layer) is not torch.nn.Linear or layer.bias is None
              or layer.in_features != width
              or not (layer.weight.requires_grad and layer.bias.requires_grad)):
            return False
        else:
            width = layer.out_features
    return width == n_out and not (module._forward_hooks or module._forward_pre_hooks)


def _linear_layers(module):
    """The nn.Linear layers of a network of Linear and ReLU layers."""
    layers = []
    for layer in module:
        if isinstance(layer, torch.nn.Linear):
            layers.append(layer)
        elif not isinstance(layer, torch.nn.ReLU):
            raise TypeError(f"training_step='fused' runs Linear and ReLU layers only; "
                            f"got {type(layer).__name__}.")
    return layers


class FusedStep:
    """Adam steps of the default networks' bound, each one kernel call.

    Parameters
    ----------
    vae : fastlvm.VAE
        Built (default networks) on CPU data.
    """

    def __init__(self, vae):
        self.vae = vae
        self.total = 0.0
        self.steps = 0
        self._params = None
        self._ones = np.ones(0)  # the examples' weights without sample_weight
        self.layers, offset = self._layout()
        self.n_encoder = len(_linear_layers(vae.encoder_))
        self.objective = OBJECTIVES[vae.objective, vae.gradient_estimator]
        self.lv_offset = offset if isinstance(vae.decoder_logvar_, torch.nn.Parameter) else -1
        n_params = offset + (vae.n_features_in_ if self.lv_offset >= 0 else 0)
        dtype = {torch.float32: np.float32, torch.float64: np.float64}[vae._dtype]
        self.theta = np.empty(n_params, dtype)
        self.grad = np.empty(n_params, dtype)
        self.adam_m = np.zeros(n_params, dtype)
        self.adam_v = np.zeros(n_params, dtype)

    def _layout(self):
        """(layers (n_layers, 4): weight offset, bias offset, output and input width
        of each linear layer, encoder first; the offset past the last bias)."""
        rows, offset = [], 0
        for layer in _linear_layers(self.vae.encoder_) + _linear_layers(self.vae.decoder_):
            n_out, n_in = layer.weight.shape
            rows.append((offset, offset + n_out * n_in, n_out, n_in))
            offset += n_out * n_in + n_out
        return np.array(rows, dtype=np.int64).reshape(-1, 4), offset

    def _trained(self):
        """The trained tensors in ``theta``'s order."""
        vae = self.vae
        params = []
        for layer in _linear_layers(vae.encoder_) + _linear_layers(vae.decoder_):
            params += [layer.weight, layer.bias]
        if self.lv_offset >= 0:
            params.append(vae.decoder_logvar_)
        return params

    def _bind(self):
        """Make the trained tensors views of ``theta`` (their values kept).

        Done at the start of each epoch: the modules may have been replaced
        since (a pickled copy, ``load_state_dict`` is in place and keeps them).
        """
        params = self._trained()
        layers, _ = self._layout()
        if not np.array_equal(layers, self.layers) or any(
                p.dtype != self.vae._dtype for p in params):
            raise ValueError("the VAE's networks changed shape or dtype since training "
                             "started; call fit again to train them afresh.")
        flat = torch.from_numpy(self.theta)
        base = flat.data_ptr()
        offset, aliased = 0, True
        for p in params:
            aliased &= p.data_ptr() == base + offset * flat.element_size()
            offset += p.numel()
        if aliased and self._params is not None and all(
                a is b for a, b in zip(params, self._params)):
            return
        offset = 0
        with torch.no_grad():
            for p in params:
                view = flat[offset:offset + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view
                offset += p.numel()
        self._params = params

    def start_epoch(self, X):
        """Zero the epoch's running sum of the bound; bind the tensors to ``theta``."""
        self._bind()
        self.total = 0.0

    def saved_state(self):
        """A copy of what the steps change besides the networks: Adam's moments and
        step count (the parameters, ``theta``, are the networks' tensors)."""
        return self.adam_m.copy(), self.adam_v.copy(), self.steps

    def load_state(self, state):
        """Put back :meth:`saved_state`'s copy."""
        m, v, self.steps = state
        self.adam_m[...] = m
        self.adam_v[...] = v

    def __call__(self, X, index, gen, weights=None):
        """One step on the rows ``index`` of X; ``weights`` (n_samples,) float64, the
        rows' weights relative to their mean, or None."""
        vae = self.vae
        if weights is None:
            if self._ones.shape[0] != index.shape[0]:
                self._ones = np.ones(index.shape[0])
            example_weight = self._ones
        else:
            example_weight = weights[index].numpy()
        eps = torch.randn((vae.n_samples, index.shape[0], vae.n_components), generator=gen,
                          dtype=X.dtype)
        lv = vae.decoder_logvar_
        if lv is None:
            dec_logvar = self.theta[:1].reshape(1, 1)  # unused by the Bernoulli rows
        else:
            dec_logvar = lv.detach().numpy().reshape(1, -1)
        self.steps += 1
        self.total += IMPLEMENTATIONS["numba"](
            X.detach().numpy(), index.numpy(), example_weight, eps.numpy(), self.theta,
            self.grad, self.adam_m, self.adam_v, self.layers, self.n_encoder, dec_logvar,
            self.lv_offset, vae.likelihood == "bernoulli", self.objective, vae.learning_rate,
            _BETA1, _BETA2, _ADAM_EPS, self.steps)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_params"] = None  # rebound (and the views remade) after unpickling
        return state

"""Input checks of the VAE loss kernels (torch tensors only).

The checks here look at types, dtypes, devices and shapes, never at values, so
they cost nothing per call; the data's values (NaN, the [0, 1] support of the
Bernoulli likelihood) are checked inside the reconstruction kernel's own pass.
Decoder and encoder outputs are not checked: NaN there propagates to the loss.
"""

import functools
import sys

LIKELIHOODS = ("bernoulli", "gaussian")
GRADIENTS = ("reparam", "stl", "dreg")
# the VAE losses' references are plain torch: they run on any device a tensor is
# on (fastlvm._dispatch.resolve's any_device), a CUDA one too
TORCH_REFERENCE = ("reference",)


def _torch():
    torch = sys.modules.get("torch")
    if torch is None:
        raise TypeError("the VAE loss kernels take torch tensors; import torch and pass "
                        "torch.as_tensor(x).")
    return torch


def autocast_enabled(device_type):
    """Whether a torch.autocast region is on for ``device_type`` ('cpu', 'cuda'...);
    False for device types autocast does not know ('meta'), where torch raises."""
    torch = _torch()
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # a torch that takes no device type (before 2.4)
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()
    except RuntimeError:
        return False


def autocast_to_float32(loss):
    """Run ``loss`` (a public VAE loss) in float32 under ``torch.autocast``.

    Inside an autocast region a network's layers give bfloat16 or float16
    outputs; torch's own losses (``binary_cross_entropy_with_logits``,
    ``log_softmax``, ``logsumexp``...) are on autocast's float32 list, so they cast
    such inputs to float32 and return float32.  These losses do the same (as
    ``torch.amp.custom_fwd(cast_inputs=torch.float32)`` would, for either
    device): where autocast is on for the device of a tensor argument, every
    bfloat16 or float16 tensor argument is cast to float32 (the gradient flows
    back through the cast in the original dtype) and the loss runs with autocast
    off.  float32 and float64 arguments are left alone, as autocast leaves them.
    Outside autocast, low-precision tensors still raise (``check_tensor``).
    """
    @functools.wraps(loss)
    def run(*args, **kwargs):
        torch = sys.modules.get("torch")
        any_on = getattr(getattr(torch, "_C", None), "_is_any_autocast_enabled", None)
        if torch is None or (any_on is not None and not any_on()):
            return loss(*args, **kwargs)  # no autocast region anywhere: one C call
        device = next((a.device.type for a in (*args, *kwargs.values())
                       if torch is not None and isinstance(a, torch.Tensor)), None)
        if device is None or not autocast_enabled(device):
            return loss(*args, **kwargs)
        low = (torch.bfloat16, torch.float16)

        def widened(a):
            return a.float() if isinstance(a, torch.Tensor) and a.dtype in low else a

        with torch.autocast(device, enabled=False):
            return loss(*map(widened, args), **{k: widened(v) for k, v in kwargs.items()})
    return run


def check_tensor(t, name, like=None, ndim=None):
    """``t`` as a float32/float64 torch tensor, with ``like``'s dtype and device."""
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor; got {type(t).__name__}. "
                        f"Convert it with torch.as_tensor({name}).")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must have dtype float32 or float64; got {t.dtype}. "
                        f"Convert it with {name}.float() (or .double()).")
    if like is not None and t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {like.dtype}; pass every "
                        f"tensor in one dtype ({name}.to(x.dtype)).")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but x is on {like.device}; fastlvm never "
                         f"copies between devices silently: move {name} with "
                         f"{name}.to(x.device).")
    if ndim is not None and t.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must be {ndim}-D; got shape {tuple(t.shape)}.")
    return t


def check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; "
                         f"got {value!r}.")
    return value


def check_posterior(x, mu, logvar, n_batch):
    """q's (batch, L) mean and log-variance."""
    for t, name in ((mu, "mu"), (logvar, "logvar")):
        check_tensor(t, name, like=x, ndim=2)
    if mu.shape != logvar.shape or mu.shape[0] != n_batch:
        raise ValueError(f"mu and logvar must both have shape (batch, latent) = "
                         f"({n_batch}, L); got {tuple(mu.shape)} and {tuple(logvar.shape)}.")
    if mu.shape[1] == 0:
        raise ValueError("the latent size is 0: mu and logvar need at least one column.")
    return mu.contiguous(), logvar.contiguous()


def check_decoder(x, decoder_out, likelihood, decoder_logvar):
    """(x, dec (k, batch, D), dec_logvar None | (1, D) | (k, batch, D)), contiguous."""
    check_choice(likelihood, "likelihood", LIKELIHOODS)
    check_tensor(x, "x", ndim=2)
    n_batch, n_features = x.shape
    if n_batch == 0 or n_features == 0:
        raise ValueError(f"x must have at least one row and one column; got shape "
                         f"{tuple(x.shape)}.")
    check_tensor(decoder_out, "decoder_out", like=x, ndim=(2, 3))
    dec = decoder_out if decoder_out.ndim == 3 else decoder_out[None]
    if dec.shape[1:] != x.shape or dec.shape[0] == 0:
        raise ValueError(f"decoder_out must have shape (batch, D) = {tuple(x.shape)} or "
                         f"(k, batch, D) with k >= 1; got {tuple(decoder_out.shape)}.")
    return x.contiguous(), dec.contiguous(), _decoder_logvar(x, dec, likelihood,
                                                             decoder_logvar)


def _decoder_logvar(x, dec, likelihood, decoder_logvar):
    torch = _torch()
    if likelihood == "bernoulli":
        if decoder_logvar is not None:
            raise ValueError("decoder_logvar is for likelihood='gaussian'; leave it None "
                             "for 'bernoulli'.")
        return None
    if decoder_logvar is None:
        raise ValueError("likelihood='gaussian' needs decoder_logvar: a float (fixed "
                         "variance, 0.0 for unit variance), a (D,) tensor, or one of "
                         "decoder_out's shape.")
    n_features = x.shape[1]
    if not isinstance(decoder_logvar, torch.Tensor):
        return torch.full((1, n_features), float(decoder_logvar), dtype=x.dtype,
                          device=x.device)
    lv = check_tensor(decoder_logvar, "decoder_logvar", like=x)
    if lv.ndim == 0 or tuple(lv.shape) == (1,):
        return lv.reshape(1, 1).expand(1, n_features).contiguous()
    if tuple(lv.shape) == (n_features,):
        return lv.reshape(1, n_features).contiguous()
    if lv.shape == dec.shape:
        return lv.contiguous()
    if lv.ndim == 2 and lv.shape == dec.shape[1:]:
        return lv.expand_as(dec).contiguous() if dec.shape[0] > 1 else lv[None].contiguous()
    raise ValueError(f"decoder_logvar must be a float, a () or (D,) = ({n_features},) "
                     f"tensor, or have decoder_out's shape {tuple(dec.shape)}; got shape "
                     f"{tuple(lv.shape)}.")


def check_samples(z, x, dec, mu):
    """z of shape (k, batch, L), matching the decoder's k and q's (batch, L)."""
    check_tensor(z, "z", like=x, ndim=3)
    if z.shape[0] != dec.shape[0] or z.shape[1:] != mu.shape:
        raise ValueError(f"z must have shape (k, batch, L) = ({dec.shape[0]}, "
                         f"{mu.shape[0]}, {mu.shape[1]}) to match decoder_out and mu; got "
                         f"{tuple(z.shape)}.")
    return z.contiguous()

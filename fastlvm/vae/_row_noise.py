"""Standard-normal draws keyed by a row's content, for per-row Monte Carlo estimates.

``VAE.score_samples`` estimates log p(x) for each row with K importance samples
(and ``VAE.elbo`` averages per-row ELBOs).
With draws from one stream in row order, a row's estimate would depend on the
rows before it, their number and the chunking; with one set of draws shared by
every row, the rows' errors would be correlated and a mean over rows would not
average them out.  Here each row's draws are a function of (seed, the row's
bits, sample index, latent index) alone: independent-looking across rows and
samples, and the same for a row wherever it appears.

Design: a counter-based generator.  The row's key is SplitMix64 (Steele, Lea
and Flood 2014) folded over its values' bits; draw (s, j) of a row hashes the
key with the counter s L + j twice more, and the two 53-bit uniforms feed a
Box-Muller transform (cosine branch) in float64.  All of it is integer and
float tensor arithmetic on the rows' device, vectorised over (k, rows, L).
On the CPU the draws are made in blocks of rows whose int64 temporaries stay in
cache: one (k, rows, L) block for a whole score_samples chunk streamed each of
its some twenty passes from memory, 100 ns a draw against 11-15 ns in blocks of
about 2^17 draws (torch.randn: 3.5 ns; the decoder's products for one draw cost
far more).  Limits: the rows must be float32 or float64; equal rows (bit for
bit) get equal draws; -0.0 and 0.0 differ.
"""

import math

import torch

_MASK = (1 << 64) - 1


def _signed(value):
    """A 64-bit constant as the int64 with the same bits."""
    value &= _MASK
    return value - (1 << 64) if value >> 63 else value


# draws per block on the CPU (see the module doc)
_CPU_BLOCK_DRAWS = 1 << 17
_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(x, s):
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(x):
    """SplitMix64's output function of x + golden ratio (int64 bits, wrapping)."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def row_keys(X, seed):
    """One int64 key per row of X, from the seed and the row's bits.

    Parameters
    ----------
    X : torch.Tensor of shape (n, D), float32 or float64
    seed : int

    Returns
    -------
    torch.Tensor of shape (n,), int64, on X's device
    """
    bits = X.contiguous().view(torch.int32 if X.dtype == torch.float32 else torch.int64)
    bits = bits.to(torch.int64)
    columns = torch.arange(X.shape[1], device=X.device, dtype=torch.int64) * _MIX1
    folded = _splitmix64(bits ^ columns).sum(dim=1)  # wrapping sum over the columns
    return _splitmix64(folded + _splitmix64(torch.tensor(_signed(seed), device=X.device)))


def row_normals(keys, first, k, n_latent, dtype):
    """Draws first .. first + k - 1 of each row: standard normals (k, n, L).

    Parameters
    ----------
    keys : torch.Tensor of shape (n,), int64 (:func:`row_keys`)
    first, k : int
        The sample indices first, ..., first + k - 1.
    n_latent : int
    dtype : torch.dtype of the result

    Returns
    -------
    torch.Tensor of shape (k, n, n_latent)
    """
    device, n_rows = keys.device, keys.shape[0]
    counters = (torch.arange(first, first + k, device=device, dtype=torch.int64)[:, None]
                * n_latent + torch.arange(n_latent, device=device, dtype=torch.int64))
    offsets = counters[:, None, :] * _GOLDEN
    out = torch.empty((k, n_rows, n_latent), dtype=dtype, device=device)
    step = n_rows if device.type != "cpu" else max(1, _CPU_BLOCK_DRAWS // (k * n_latent))
    for r0 in range(0, n_rows, step):
        a = _splitmix64(keys[None, r0:r0 + step, None] + offsets)
        b = _splitmix64(a)
        u1 = (_shift_right(a, 11).to(torch.float64) + 0.5) * 2.0**-53  # in (0, 1)
        u2 = _shift_right(b, 11).to(torch.float64) * 2.0**-53
        out[:, r0:r0 + step] = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return out

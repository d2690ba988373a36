"""Triton building blocks shared by the Gaussian-mixture GPU kernels.

Design
------
Rows are shifted by one centre ``c0`` (the weighted mean of the means, rounded
to the data's dtype) as they are loaded, so every product below works on
``x' = x - c0``.  The log-density of a tile of BLOCK_N rows against a tile of
BLOCK_K components is then GEMM-shaped and runs on ``tl.dot``:

- 'spherical':  x' . A_k^T + s_k |x'|^2 + b_k,       A_k = p_k^2 mu'_k, s_k = -p_k^2 / 2
- 'diag':       x' . A_k^T + (x' * x') . B_k^T + b_k, A_k = P_k^2 * mu'_k, B_k = -P_k^2 / 2
- 'tied':       x' . A_k^T - |x' U|^2 / 2 + b_k,      A_k = U U^T mu'_k
- 'full':       -|(x' - mu'_k) U_k|^2 / 2 + b_k, one component at a time (a D x D
  product per component), the difference taken directly.

The quadratic forms |v U|^2 run over column blocks of U (BLOCK_J wide), so a
factor never has to fit in shared memory whole.

``b_k`` folds the log-weight, log|U_k|, -D/2 log 2 pi and the |mu'|^2 terms; it is
computed in float64 on the host side of the launch and rounded once.  The
expanded forms lose digits in proportion to |x - c0|^2 / sigma^2, which the shift
keeps small while the means lie close together; 'full' takes differences directly
and loses nothing.  Where float32 means lie far apart (more than about 40
deviations from c0), the parameters are float64 (``GaussianTileParams.dtype``)
and every kernel computes in its parameters' dtype: float32 rows are converted
as they are loaded (:func:`load_shifted_rows`), accumulators and scratch take
``c0_ptr``'s dtype, so nothing of X is copied.

Feature columns are padded to BLOCK_D (a power of two, at least 16, which
``tl.dot`` needs) with zeros in every parameter buffer, so no product needs a
column mask; components past K get log-density -inf.  float32 products use
``input_precision`` 'tf32x3' (float32 accuracy on tensor cores) unless the
caller chooses plain TF32 or IEEE (see :func:`dot_precision`); float64 is IEEE.

Limits: BLOCK_D = next power of two >= D, and a tile of rows holds all BLOCK_D
columns in registers: D up to 256 runs well, beyond that registers spill, so
wider rows take the chunked E-step's kernels, which step through the features
(``estep_stats/_triton_chunked.py``).
"""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# the covariance codes, one definition with the Numba kernels' (tests and bench
# scripts read them from this module too)
from ._covariance import COVARIANCE_CODE, DIAG, FULL, SPHERICAL, TIED  # noqa: F401
from ._dot_precision import PRECISIONS, requested_precision  # noqa: F401
from ._expanded_gaussian import computes_in_float64, expanded_terms, shift_weights
from ._triton_launch import cdiv, interpreting, launch_kernel, next_power_of_2


def block_d(n_features):
    """Padded feature width: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, next_power_of_2(int(n_features)))


def dot_precision(dtype):
    """``input_precision`` for float32 ``tl.dot``: 'tf32x3' unless told otherwise.

    'tf32x3' splits each float32 operand into two TF32 parts and runs three
    tensor-core products: float32 accuracy (relative error ~1e-6 here) at
    tensor-core speed.  Plain 'tf32' (10-bit mantissa, ~3x faster again) is
    opted in the way PyTorch users opt in,
    ``torch.backends.cuda.matmul.allow_tf32 = True``, or with
    ``FASTLVM_TRITON_PRECISION=tf32``; 'ieee' (FMA units only, far slower on
    Hopper) with ``FASTLVM_TRITON_PRECISION=ieee``.  float64 is always IEEE.
    """
    if dtype != torch.float32:
        return "ieee"
    requested = requested_precision("FASTLVM_TRITON_PRECISION")
    if requested is not None:
        return requested
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


# rows a kernel takes: its row indices are int32 (program id x tile + lane), so a
# tile past the last row must stay below 2^31 too
MAX_ROWS = 2**31 - 2**16


def require_int32_rows(n_rows, name="X"):
    """Refuse an array of more rows than the kernels' int32 row indices reach."""
    if n_rows > MAX_ROWS:
        raise ValueError(
            f"{name} has {n_rows:,} rows; the Triton kernels index rows in int32 and take "
            f"at most {MAX_ROWS:,}. Pass it in parts of fewer rows (partial_fit for an "
            f"estimator), or stream a host array with device='cuda'.")


# row splits of a reduction kernel per SM (divided among its other programs)
SPLITS_PER_SM = 4


def n_splits(n_rows, n_programs_other, block_rows=128, per_sm=SPLITS_PER_SM):
    """How many row ranges a reduction kernel splits N into (fills the device).

    Each split is a whole number of ``block_rows`` rows; the count depends only
    on the shapes and the device, never on timing, so sums stay deterministic.
    ``per_sm`` other than the default is for ``bench/triton_tiles.py``.
    """
    if n_rows == 0:
        return 1
    if interpreting() or not torch.cuda.is_available():
        sms = 2
    else:
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    want = max(1, -(-per_sm * sms // max(1, n_programs_other)))
    return max(1, min(want, -(-n_rows // block_rows), 1024))


class GaussianTileParams:
    """Padded, shifted device parameters for the tile log-density.

    Attributes (torch tensors on X's device, in ``dtype``, contiguous)
    ----------
    dtype : torch.dtype, the dtype the kernels compute in: X's, or float64 for
        float32 rows whose parameters the expanded form would lose digits of
        (:func:`fastlvm.kernels._expanded_gaussian.computes_in_float64`); the
        kernels then convert each float32 tile of rows as they load it
    code : int, FULL | TIED | DIAG | SPHERICAL
    block_d : int, padded feature width
    c0 : (BLOCK_D,) the shift, zero past D
    a : (K, BLOCK_D) linear coefficients ('full': mu'_k)
    b : (K, BLOCK_D) 'diag' quadratic coefficients; else a 1-element dummy
    s : (K,) coefficient of |x'|^2 or |z|^2 ('full': unused zeros)
    c : (K,) constants b_k (log-weight included; -inf for zero weights)
    u : (BLOCK_D, BLOCK_D) 'tied', (K, BLOCK_D, BLOCK_D) 'full'; else a dummy
    c0_64 : (D,) float64 value of the shift as used (for the statistics)
    mu_64 : (K, D) float64 value of mu'_k as used ('full' centres)
    """

    def __init__(self, X, means, precisions_cholesky, covariance_type, log_weights=None,
                 in_float64=None):
        """``in_float64``: whether float32 rows are computed in float64; None
        decides from the parameters (reading device parameters once), callers
        that decided it already pass it."""
        require_int32_rows(X.shape[0])
        dev = X.device
        f64 = dict(device=dev, dtype=torch.float64)
        means = torch.as_tensor(means, **f64)
        pc = torch.as_tensor(precisions_cholesky, **f64)
        k, d = means.shape
        bd = block_d(d)
        self.code, self.block_d = COVARIANCE_CODE[covariance_type], bd
        if log_weights is None:
            log_w = torch.zeros(k, **f64)
        else:
            log_w = torch.as_tensor(log_weights, **f64)
        if in_float64 is None:  # decided on the device: one number read
            in_float64 = computes_in_float64(X.dtype == torch.float32, log_w, means, pc,
                                             covariance_type)
        dt = self.dtype = torch.float64 if in_float64 else X.dtype
        c0 = (shift_weights(log_w, torch)[:, None] * means).sum(0)
        c0 = c0.to(dt).to(torch.float64)  # the shift as the kernel applies it
        mu = (means - c0).to(dt).to(torch.float64)
        self.c0_64, self.mu_64 = c0, mu
        terms = expanded_terms(mu, pc, covariance_type, log_w, torch)
        dummy = torch.zeros(1, device=dev, dtype=dt)
        features, square = (0, bd - d), (0, bd - d, 0, bd - d)  # zero padding to BLOCK_D
        a = F.pad(terms.a, features)
        b = dummy if terms.b is None else F.pad(terms.b, features)
        if terms.s is None:
            s = torch.zeros(k, **f64)
        elif isinstance(terms.s, torch.Tensor):
            s = terms.s.expand(k)
        else:  # 'tied''s -1/2: filled on the device, not copied behind the work queued
            s = torch.full((k,), float(terms.s), **f64)
        c = terms.c
        u = F.pad(pc, square) if covariance_type in ("tied", "full") else dummy
        self.c0 = F.pad(c0, features).to(dt).contiguous()
        self.a = a.to(dt).contiguous()
        self.b = b.to(dt).contiguous()
        self.s = s.to(dt).contiguous()
        self.c = c.to(dt).contiguous()
        self.u = u.to(dt).contiguous()
        self.n_components, self.n_features = k, d

    @classmethod
    def from_terms(cls, code, n_features, c0, a, b, s, c, u):
        """Parameters from buffers already padded and in the data's dtype (the
        fused M-step's, ``kernels/gaussian_mstep``), with no work on the host
        beyond the float64 views of the shift (and of mu'_k, which is 'full''s a)."""
        self = cls.__new__(cls)
        self.code, self.block_d, self.dtype = code, c0.shape[0], c0.dtype
        self.c0, self.a, self.b, self.s, self.c, self.u = c0, a, b, s, c, u
        self.c0_64 = c0[:n_features].to(torch.float64)
        self.mu_64 = a[:, :n_features].to(torch.float64) if code == FULL else None
        self.n_components, self.n_features = a.shape[0], n_features
        return self


@triton.jit
def load_rows(x_ptr, rows, n_rows, n_feat, stride_n, stride_d, col0, WIDTH: tl.constexpr):
    """(BLOCK_N, WIDTH) tile of X, columns col0..col0+WIDTH; zero outside the rows
    and features of X."""
    cols = col0 + tl.arange(0, WIDTH)
    mask = (rows < n_rows)[:, None] & (cols[None, :] < n_feat)
    # row offsets in int64: rows * stride_n passes 2^31 at 17M rows of 128 features
    return tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_d,
                   mask=mask, other=0.0)


@triton.jit
def load_shifted_rows(x_ptr, c0_ptr, rows, n_rows, n_feat, stride_n, stride_d, col0,
                      WIDTH: tl.constexpr):
    """(BLOCK_N, WIDTH) tile of x - c0 in c0's dtype (the compute dtype: float32
    rows are converted to float64 where the parameters are), columns
    col0..col0+WIDTH; zero outside the rows and features of X."""
    cols = col0 + tl.arange(0, WIDTH)
    mask = (rows < n_rows)[:, None] & (cols[None, :] < n_feat)
    x = load_rows(x_ptr, rows, n_rows, n_feat, stride_n, stride_d, col0, WIDTH)
    c0 = tl.load(c0_ptr + cols)
    return tl.where(mask, x.to(c0.dtype) - c0[None, :], 0.0)


@triton.jit
def quadratic_form(v, u_ptr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                   PRECISION: tl.constexpr):
    """|v U|^2 per row of v (BLOCK_N, BLOCK_D), U (BLOCK_D, BLOCK_D) row-major,
    one BLOCK_J-wide column block of U at a time."""
    rows_u = tl.arange(0, BLOCK_D)
    cols_u = tl.arange(0, BLOCK_J)
    acc = tl.sum(v * 0.0, axis=1)
    for j0 in range(0, BLOCK_D, BLOCK_J):
        u = tl.load(u_ptr + rows_u[:, None] * BLOCK_D + (j0 + cols_u)[None, :])
        y = tl.dot(v, u, input_precision=PRECISION)
        acc += tl.sum(y * y, axis=1)
    return acc


@triton.jit
def row_quadratic(x, u_ptr, COV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                  PRECISION: tl.constexpr):
    """The per-row quadratic term: |x' U|^2 for 'tied', |x'|^2 otherwise."""
    if COV == 1:
        return quadratic_form(x, u_ptr, BLOCK_D, BLOCK_J, PRECISION)
    else:
        return tl.sum(x * x, axis=1)


@triton.jit
def tile_log_prob(x, q, a_ptr, b_ptr, s_ptr, c_ptr, k0, n_comp, COV: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_K) log-densities (+ log-weights) for 'tied', 'diag', 'spherical'.

    ``x`` is the shifted rows and ``q`` their :func:`row_quadratic`; components
    k0 + j >= n_comp get -inf.
    """
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < n_comp
    cols = tl.arange(0, BLOCK_D)
    a_t = tl.load(a_ptr + ks[None, :] * BLOCK_D + cols[:, None], mask=k_ok[None, :],
                  other=0.0)
    logp = tl.dot(x, a_t, input_precision=PRECISION)
    if COV == 2:
        b_t = tl.load(b_ptr + ks[None, :] * BLOCK_D + cols[:, None], mask=k_ok[None, :],
                      other=0.0)
        logp += tl.dot(x * x, b_t, input_precision=PRECISION)
    else:
        s = tl.load(s_ptr + ks, mask=k_ok, other=0.0)
        logp += q[:, None] * s[None, :]
    c = tl.load(c_ptr + ks, mask=k_ok, other=0.0)
    logp += c[None, :]
    return tl.where(k_ok[None, :], logp, float("-inf"))


@triton.jit
def full_log_prob(x, k, a_ptr, u_ptr, c_ptr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                  PRECISION: tl.constexpr):
    """(x' - mu'_k, log-density + log-weight) of the rows under 'full' component k."""
    cols = tl.arange(0, BLOCK_D)
    mu = tl.load(a_ptr + k * BLOCK_D + cols)
    diff = x - mu[None, :]
    q = quadratic_form(diff, u_ptr + k * BLOCK_D * BLOCK_D, BLOCK_D, BLOCK_J, PRECISION)
    return diff, tl.load(c_ptr + k) - 0.5 * q


@triton.jit
def moment_accumulators(c0_ptr, BLOCK_K: tl.constexpr, WIDTH: tl.constexpr):
    """Zeroed sums of a statistics program, in the compute dtype (``c0_ptr``'s):
    N_k (BLOCK_K,), the first and 'diag''s second moments (BLOCK_K, WIDTH) each,
    'spherical''s second moment (BLOCK_K,)."""
    dt = c0_ptr.dtype.element_ty
    return (tl.zeros((BLOCK_K,), dtype=dt), tl.zeros((BLOCK_K, WIDTH), dtype=dt),
            tl.zeros((BLOCK_K, WIDTH), dtype=dt), tl.zeros((BLOCK_K,), dtype=dt))


@triton.jit
def online_logsumexp(m, s, logp):
    """Fold a (BLOCK_N, BLOCK_K) tile into the running row max ``m`` and sum ``s``."""
    m_new = tl.maximum(m, tl.max(logp, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(logp - m_safe[:, None]), axis=1)
    return m_new, s


@triton.jit
def online_logsumexp_column(m, s, logp):
    """Fold one column (BLOCK_N,) of log-densities into the running max and sum."""
    m_new = tl.maximum(m, logp)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.exp(logp - m_safe)
    return m_new, s


@triton.jit
def finish_logsumexp(m, s):
    """log sum exp from the running max and sum (-inf for an all -inf row)."""
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return tl.where(m == float("-inf"), float("-inf"), m_safe + tl.log(s))


@triton.jit
def _log_norm_kernel(x_ptr, sw_ptr, c0_ptr, a_ptr, b_ptr, s_ptr, c_ptr, u_ptr,
                     log_norm_ptr, ll_part_ptr, n_rows, n_feat, n_comp, stride_n, stride_d,
                     COV: tl.constexpr, HAS_SW: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                     PRECISION: tl.constexpr):
    """log sum_k w_k N(x_n | k) for one block of rows, online over component tiles.

    Writes the (BLOCK_N,) log-normalisers and this block's partial
    sum_n sw_n log p(x_n); nothing of size n x K is stored.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    x = load_shifted_rows(x_ptr, c0_ptr, rows, n_rows, n_feat, stride_n, stride_d, 0, BLOCK_D)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=x.dtype)
    s = tl.zeros((BLOCK_N,), dtype=x.dtype)
    if COV == 0:
        for k in range(0, n_comp):
            _, logp = full_log_prob(x, k, a_ptr, u_ptr, c_ptr, BLOCK_D, BLOCK_J, PRECISION)
            m, s = online_logsumexp_column(m, s, logp)
    else:
        q = row_quadratic(x, u_ptr, COV, BLOCK_D, BLOCK_J, PRECISION)
        for k0 in range(0, n_comp, BLOCK_K):
            logp = tile_log_prob(x, q, a_ptr, b_ptr, s_ptr, c_ptr, k0, n_comp, COV,
                                 BLOCK_K, BLOCK_D, PRECISION)
            m, s = online_logsumexp(m, s, logp)
    store_log_norm(finish_logsumexp(m, s), rows, row_ok, sw_ptr, log_norm_ptr, ll_part_ptr,
                   pid, HAS_SW)


@triton.jit
def store_log_norm(lse, rows, row_ok, sw_ptr, log_norm_ptr, ll_part_ptr, pid,
                   HAS_SW: tl.constexpr):
    """Write a block's log-normalisers and its partial sum_n w_n lse_n."""
    tl.store(log_norm_ptr + rows, lse, mask=row_ok)
    tl.store(ll_part_ptr + pid,
             block_log_likelihood(lse, row_weights(sw_ptr, rows, row_ok, HAS_SW)))


@triton.jit
def row_weights(sw_ptr, rows, row_ok, HAS_SW: tl.constexpr):
    """The rows' sample weights (1 without them), 0 outside ``row_ok``."""
    if HAS_SW:
        return tl.load(sw_ptr + rows, mask=row_ok, other=0.0)
    else:
        return tl.where(row_ok, 1.0, 0.0)


@triton.jit
def block_log_likelihood(lse, w):
    """sum_n w_n lse_n over a block's rows (``w`` from :func:`row_weights`), in
    the data's dtype; rows of weight zero (and rows outside the block) add
    nothing, even where lse_n is infinite."""
    return tl.sum(tl.where(w != 0.0, w * lse, 0.0), axis=0)


@triton.jit
def responsibilities(logp, log_norm_ptr, sw_ptr, rows, row_ok, HAS_SW: tl.constexpr):
    """w_n exp(logp - log_norm_n) for a (BLOCK_N, BLOCK_K) tile or a (BLOCK_N,)
    column of weighted log-densities, the log-normalisers read from memory;
    zero on rows outside ``row_ok``."""
    lse = tl.load(log_norm_ptr + rows, mask=row_ok, other=0.0)
    return responsibilities_given(logp, lse, row_weights(sw_ptr, rows, row_ok, HAS_SW), row_ok)


@triton.jit
def responsibilities_given(logp, lse, w, row_ok):
    """:func:`responsibilities` with the rows' log-normalisers ``lse`` and
    weights ``w`` (:func:`row_weights`), (BLOCK_N,) each, in registers."""
    if len(logp.shape) == 2:
        r = tl.exp(logp - lse[:, None]) * w[:, None]
        return tl.where(row_ok[:, None], r, 0.0)
    else:
        return tl.where(row_ok, tl.exp(logp - lse) * w, 0.0)


@triton.jit
def split_bounds(split, rows_per_split, n_rows):
    """First and one-past-last row of a split."""
    start = split * rows_per_split
    return start, tl.minimum(start + rows_per_split, n_rows)


def split_rows(n, n_other, block_rows, per_sm=SPLITS_PER_SM):
    """(splits, rows per split) for a reduction over n rows beside ``n_other``
    programs: every split a whole number of ``block_rows`` blocks."""
    splits = n_splits(n, n_other, block_rows, per_sm)
    per = cdiv(max(n, 1), splits)
    per = cdiv(per, block_rows) * block_rows
    return cdiv(max(n, 1), per), per


class TileConfig(NamedTuple):
    """Tile sizes and launch options of the Gaussian kernels for one problem shape."""

    block_n: int  # rows per tile
    block_k: int  # components per tile ('full': unused)
    block_j: int  # column block of U in quadratic forms and D x D moments
    num_warps: int
    num_stages: int
    # a cap on registers a thread (Triton's maxnreg), for more programs an SM; the
    # table sets none (bench/triton_tiles.py times caps)
    maxnreg: Optional[int] = None

    def launch(self):
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            options["maxnreg"] = self.maxnreg
        return options

    def smaller(self):
        """The next config down when this one needs more shared memory than the
        device has (fewer stages, then smaller K, row and column tiles); None
        at the floor."""
        if self.num_stages > 1:
            return self._replace(num_stages=1)
        for field in ("block_k", "block_n", "block_j"):
            if getattr(self, field) > 16:
                return self._replace(**{field: getattr(self, field) // 2})
        return None


_FITTING = {}  # (kernel, shape key) -> the TileConfig that fitted this device


def launch_fitted(name, key, cfg, launch):
    """``launch(cfg)``, shrinking ``cfg`` until the kernel fits the device's shared memory.

    The table in :func:`tile_config` fits an H100; smaller GPUs (an A100 has
    164 KiB of shared memory per block, not 227) step down here.  The choice
    depends only on the device and the shapes, and is remembered, so results
    stay reproducible run to run on one device.  Where even the smallest tiles
    do not fit (rows of many features: the kernels hold whole rows, or 'full''s
    D x D factors), the error says so and names the ways round it
    (:class:`TritonTilesDoNotFit`) instead of Triton's advice to shrink blocks.
    """
    from triton.runtime.errors import OutOfResources

    full_key = (name, key, torch.cuda.current_device() if torch.cuda.is_available() else -1)
    cfg = _FITTING.get(full_key, cfg)
    while True:
        try:
            result = launch(cfg)
        except OutOfResources as exc:
            smaller = cfg.smaller()
            if smaller is None:
                raise TritonTilesDoNotFit(name, exc) from exc
            cfg = smaller
            continue
        _FITTING[full_key] = cfg
        return result


# the widest rows the Gaussian and mixture-of-PPCA kernels stream in feature blocks
# (``estep_stats/_triton_chunked.MAX_BLOCK_D`` and ``_triton_low_rank_wide.py`` read it)
WIDEST_STREAMED_ROWS = 16384


class TritonTilesDoNotFit(ValueError):
    """A Triton kernel that needs more of a GPU resource than the device has, even
    at its smallest tiles (raised by :func:`launch_fitted`)."""

    def __init__(self, kernel, exc):
        super().__init__(
            f"the Triton kernel '{kernel}' needs {exc.required:,} bytes of {exc.name} at "
            f"its smallest tiles, and this GPU gives a thread block {exc.limit:,}: its tiles "
            f"hold whole rows of X, and these rows have too many features for it. Fit on "
            f"the CPU backend (NumPy arrays or CPU tensors) or the CuPy backend (cupy "
            f"arrays), or reduce n_features (PCA first); a GaussianMixture (any "
            f"covariance_type; 'diag' or 'spherical' keep the least per component) and a "
            f"MixtureOfPPCA stream the features of rows up to {WIDEST_STREAMED_ROWS:,} wide "
            f"in blocks and fit here.")


def tile_config(code, dtype, bd, precision="ieee", n_components=None):
    """The :class:`TileConfig` for a covariance code, dtype, padded D and dot precision.

    A fixed table rather than a run-time autotuner: the tile sizes fix the order
    of every sum, so choosing them by timing would make results depend on the
    run.  Candidates were timed on an H100 (``bench/triton_check.py``, K = 1024);
    shared memory bounds BLOCK_J and the stage count for wide rows.  With
    ``n_components`` the component tile is cut to the smallest power of two
    (at least 16, ``tl.dot``'s least width) that holds them: a K = 16 mixture
    in the table's 64-wide tile spent three quarters of its products and
    exponentials on masked components.
    """
    if interpreting():
        return TileConfig(16, 16, min(bd, 64), 4, 1)
    f64 = dtype == torch.float64
    cfg = _table_config(code, f64, bd, precision)
    if n_components is not None:
        cfg = cfg._replace(block_k=min(cfg.block_k,
                                       max(16, next_power_of_2(n_components))))
        if not f64 and n_components <= 64 and bd <= 64:
            cfg = _small_k_config(code, bd, cfg)
    return cfg


def _small_k_config(code, bd, cfg):
    """float32 at K <= 64 and D <= 64: the H200's sweep (``bench/triton_tiles.py``,
    2026-11-30, ``bench/results/gpu-h200.md``) against the K = 1024 table.

    'diag' and 'spherical' take 64-row tiles: the statistics kernel 0.373 -> 0.258
    ms (D = 32, K = 16) and 0.583 -> 0.377 ms (D = 32, K = 64), the log-normaliser
    0.220 -> 0.193 and 0.194 -> 0.177 ms.  'full' at D <= 32 takes one stage (with
    8 row splits per SM, :func:`moment_splits_per_sm`): 0.939 -> 0.665 ms at D = 16,
    K = 32.  'tied' keeps the table's: its 64-row tiles were slower (log-normaliser
    0.113 -> 0.163 ms).
    """
    if code in (DIAG, SPHERICAL):
        return cfg._replace(block_n=64)
    if code == FULL and bd <= 32:
        return cfg._replace(num_stages=1)
    return cfg


def moment_splits_per_sm(code, dtype):
    """Row splits per SM of the statistics kernel: 8 for float32 'full' (the H200's
    sweep: 0.809 -> 0.665 ms at D = 16, K = 32, one stage), :data:`SPLITS_PER_SM`
    otherwise (more splits made no difference for the others, and each split adds
    a partial to the fixed-order merge)."""
    return 8 if code == FULL and dtype == torch.float32 else SPLITS_PER_SM


def _table_config(code, f64, bd, precision):
    """:func:`tile_config`'s table, for the largest K.

    Rows of 256 padded features (D = 129 to 256) go 16 to a tile, for every type
    and dtype.  With 32, Triton's sm_90 builds (3.9) of the float32 tf32x3 kernels
    kept 32 registers and 6-8.4 KB per thread in local memory ('full''s
    log-densities and normalisers, 'tied''s log-densities and statistics, 'diag''s
    statistics), and float64 'full' 112-840 bytes; with 16, 0-984 and 0-176
    (``bench/results/sm90-spills.md``).  float32 tf32x3 'tied' there takes 64
    columns of U a step, not 32: its one-pass statistics at 32 still built with 32
    registers and 3.2 KB of local memory (Triton 3.6; 3.9 with sample weights), at
    64 with 255 registers and 0.9-1.1 KB.  A compile-time measure, not yet timed.
    """
    split = precision == "tf32x3"  # operands held twice (high and low parts)
    bj = (64 if code == TIED and split and not f64 else 32) if bd >= 256 else min(bd, 64)
    stages = 1 if bd >= 128 else 2
    warps = 4 if bd <= 32 else 8
    if code == FULL:
        return TileConfig(16 if bd >= 256 else (32 if f64 else 64), 16, bj, warps, stages)
    if bd <= 64:
        bn, bk = (64, 32) if f64 else (128, 64)
    elif bd <= 128:
        bn, bk = (32, 16) if f64 else ((64, 32) if split else (64, 64))
    else:
        bn, bk = 16, (16 if f64 or split else 32)
    return TileConfig(bn, bk, bj, warps, stages)


def log_norm(X, params, sample_weight=None, cfg=None):
    """Per-row log-normaliser and the weighted log-likelihood, on X's device.

    :func:`log_norm_parts`, its per-block partials summed in float64 in a fixed order;
    the log-normalisers come back in X's dtype.
    """
    out, part = log_norm_parts(X, params, sample_weight, cfg)
    return out.to(X.dtype), part.to(torch.float64).sum()


def log_norm_parts(X, params, sample_weight=None, cfg=None):
    """Per-row log-normaliser and the per-block partial log-likelihoods, on X's device.

    Parameters
    ----------
    X : torch.Tensor (n, D), float32/float64
    params : GaussianTileParams built with the log-weights
    sample_weight : torch.Tensor (n,) of X's or the compute dtype, or None
    cfg : TileConfig or None
        Launch at this config as it is (``bench/triton_tiles.py`` times
        candidates); by default :func:`tile_config`'s, stepped down by
        :func:`launch_fitted` until it fits the device, or, for rows past 256
        padded features, the chunked E-step's kernels, which step through the
        features (``_triton_chunked.wide_rows``).

    Returns
    -------
    log_norm : torch.Tensor (n,), the compute dtype (``params.dtype``)
    ll_parts : torch.Tensor, the compute dtype: the blocks' sum_n w_n log p(x_n)
        (cdiv(n, BLOCK_N) of them; the chunks' blocks for wide rows)
    """
    n, dt = X.shape[0], params.dtype
    precision = dot_precision(dt)
    if cfg is None:
        from .estep_stats._triton_chunked import chunked_log_norm, wide_rows

        if wide_rows(params.block_d):  # features in steps, chunk by chunk
            return chunked_log_norm(X, params, precision, sample_weight)
    out = torch.empty(n, device=X.device, dtype=dt)
    sw = sample_weight if sample_weight is not None else params.s

    def launch(cfg):
        n_blocks = max(1, cdiv(n, cfg.block_n))
        part = torch.empty(n_blocks, device=X.device, dtype=dt)
        launch_kernel(_log_norm_kernel, (n_blocks,),
            X, sw, params.c0, params.a, params.b, params.s, params.c, params.u, out, part, n,
            params.n_features, params.n_components, X.stride(0), X.stride(1),
            COV=params.code, HAS_SW=sample_weight is not None, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, BLOCK_D=params.block_d, BLOCK_J=cfg.block_j,
            PRECISION=precision, **cfg.launch())
        return part

    if cfg is None:
        cfg = tile_config(params.code, dt, params.block_d, precision, params.n_components)
        key = (params.code, X.dtype, dt, params.block_d, precision, cfg.block_k)
        part = launch_fitted("log_norm", key, cfg, launch)
    else:
        part = launch(cfg)
    return out, part

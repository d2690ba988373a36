"""The fused M-step (``kernels/gaussian_mstep``): Triton and CuPy (its CUDA kernels on
the CPU emulator) against the NumPy reference, and the reference against the
estimator's own M-step and E-step coefficients."""

import numpy as np
import pytest

from fastlvm.kernels.gaussian_mstep import gaussian_mstep_ref
from fastlvm.mixture import _gaussian_params as gp
from tests.conftest import CUDA, DTYPES, HAS_TRITON, make_params, to_numpy
from tests.tolerances import assert_close

torch = pytest.importorskip("torch")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if CUDA else "cpu"
FUSED_TYPES = ["full", "tied", "diag", "spherical"]
# (splits, K, D): one of each; splits past one BLOCK_S (64 at D <= 32) and K past one
# BLOCK_K (32 at D = 33, 128 at D <= 16); D = 33 pads to 64 columns; D = 150: the
# covariance kernels' 32 x 64 blocks, three columns of them, those wholly above the
# diagonal skipped
PARTIAL_SHAPES = [(1, 1, 1), (3, 7, 3), (70, 16, 32), (2, 70, 33), (5, 130, 5), (2, 3, 150)]


def _partials(rng, shape, covariance_type, dtype, n_ll=9):
    """Partials as the statistics kernel lays them out, from a real weighted scatter:
    second moments around the centres that are consistent with N_k and sum r x'
    ('tied': sum_n w_n x' x'^T over every component, in S + 3 splits of its own)."""
    s, k, d = shape
    bd = max(16, 1 << (d - 1).bit_length())
    nk = rng.uniform(0.5, 20.0, (s, k))
    mean_off = rng.standard_normal((k, d)) * 3.0
    s1 = np.zeros((s, k, bd))
    s1[:, :, :d] = nk[:, :, None] * (mean_off + 0.1 * rng.standard_normal((s, k, d)))
    m = s1[:, :, :d] / nk[:, :, None]
    if covariance_type in ("full", "tied"):
        b = rng.standard_normal((s, k, d, d)) / np.sqrt(d)
        spread = b @ b.swapaxes(-1, -2) + 0.5 * np.eye(d)
        second = nk[:, :, None, None] * (spread + m[..., :, None] * m[..., None, :])
        if covariance_type == "full":
            s2 = np.zeros((s, k, bd, bd))
            s2[:, :, :d, :d] = second
        else:
            s2 = np.zeros((s + 3, bd, bd))
            s2[:, :d, :d] = second.sum((0, 1)) / (s + 3)
    else:
        spread = rng.uniform(0.5, 2.0, (s, k, d))
        second = nk[:, :, None] * (spread + m**2)
        if covariance_type == "diag":
            s2 = np.zeros((s, k, bd))
            s2[:, :, :d] = second
        else:
            s2 = second.sum(2)
    ll = rng.standard_normal(n_ll) * 100
    # far from the origin: the new shift's rounding to the dtype then shows in mu - c0
    center = rng.standard_normal((k, d) if covariance_type == "full" else d) * 5 + 1e3
    return [a.astype(dtype) for a in (nk, s1, s2, ll)] + [center]


def _summed(nk, s1, s2, ll, center, covariance_type):
    """The partials summed over their splits in float64 and unpadded: the CuPy
    E-step's sums."""
    d = center.shape[-1]
    s2 = s2.astype(np.float64).sum(0)
    s2 = {"full": lambda a: a[:, :d, :d], "tied": lambda a: a[:d, :d],
          "diag": lambda a: a[:, :d]}.get(covariance_type, lambda a: a)(s2)
    return (nk.astype(np.float64).sum(0), s1.astype(np.float64).sum(0)[:, :d], s2,
            ll.astype(np.float64), center)


def _cupy_summed(cupy_backend, parts, covariance_type):
    """The summed partials (:func:`_summed`) as device arrays of the fake cupy."""
    return [cupy_backend.cupy.asarray(a) for a in _summed(*parts, covariance_type)]


def _run_cupy(cupy_backend, parts, covariance_type, reg_covar, eps, dtype):
    """gaussian_mstep_cupy on the summed partials, read back as NumPy arrays;
    'diag' coefficients cut to the [a] half of the [a, b] block."""
    got = cupy_backend.mstep.gaussian_mstep_cupy(
        *_cupy_summed(cupy_backend, parts, covariance_type), covariance_type, reg_covar,
        eps, dtype)
    got = got._replace(**{name: to_numpy(a) for name, a in zip(got._fields, got)
                          if a is not None})
    if covariance_type == "diag":
        d = parts[4].shape[-1]
        np.testing.assert_array_equal(got.linear[:, d:], got.quadratic)
        got = got._replace(linear=got.linear[:, :d])
    return got


def _check_against_reference(got, ref, d, dtype, covariance_type):
    got = [np.asarray(a.cpu()) if hasattr(a, "cpu") else np.asarray(a) for a in got]
    for name in ("weights", "means", "covariances", "precisions_cholesky"):
        value = got[ref._fields.index(name)]
        assert value.dtype == np.float64, name
        assert_close(value, getattr(ref, name), np.float64 if dtype == np.float64 else
                     np.float32, err_msg=name)
    summary = got[0]
    np.testing.assert_allclose(summary[0], ref.summary[0], rtol=1e-12)
    np.testing.assert_array_equal(summary[1:3], ref.summary[1:3])
    # then kappa_k, how far each mean lies from the next shift (0 for 'full'), by
    # which the fused iteration sees float32 coefficients that must become float64
    assert summary.shape == ref.summary.shape == (3 + ref.weights.shape[0],)
    np.testing.assert_allclose(summary[3:], ref.summary[3:], rtol=1e-10, atol=1e-300)
    if covariance_type == "full":
        np.testing.assert_array_equal(summary[3:], 0.0)
    elif summary.shape[0] > 4:  # one component lies on the shift itself
        assert (summary[3:] > 0).any()
    shift, linear, quadratic, constant = got[5:]
    for name, value in (("shift", shift), ("linear", linear), ("constant", constant)):
        assert value.dtype == dtype, name
    np.testing.assert_array_equal(shift[d:], 0.0)
    np.testing.assert_array_equal(linear[:, d:], 0.0)
    if covariance_type in ("full", "tied"):  # the factors U, padded in both axes
        np.testing.assert_array_equal(quadratic[..., d:, :], 0.0)
        np.testing.assert_array_equal(quadratic[..., :, d:], 0.0)
        quadratic = quadratic[..., :d, :d]
    elif covariance_type == "diag":
        np.testing.assert_array_equal(quadratic[:, d:], 0.0)
        quadratic = quadratic[:, :d]
    # float64 formulas rounded once to the dtype: a few units in the last place of
    # float32, which a shift left unrounded (mu off by eps |c0|) exceeds.  float64
    # output on a GPU: contracted multiply-adds and cuSOLVER's Cholesky against
    # NumPy's, 1.9e-12 of the scale at most on an H200 (2026-12-04)
    rtol = 1e-6 if dtype == np.float32 else 1e-11
    for name, value in (("shift", shift[:d]), ("linear", linear[:, :d]),
                        ("quadratic", quadratic), ("constant", constant)):
        expected = getattr(ref, name)
        np.testing.assert_allclose(value, expected, rtol=rtol,
                                   atol=rtol * (np.abs(expected).max() + 1.0), err_msg=name)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PARTIAL_SHAPES)
@pytest.mark.parametrize("covariance_type", FUSED_TYPES)
def test_triton_matches_reference(covariance_type, shape, dtype, rng):
    from fastlvm.kernels.gaussian_mstep._triton import gaussian_mstep_triton

    nk, s1, s2, ll, center = _partials(rng, shape, covariance_type, dtype, n_ll=1500)
    eps = float(np.finfo(dtype).eps)
    ref = gaussian_mstep_ref(nk, s1, s2, ll, center, covariance_type, 1e-6, eps, dtype)
    assert ref.summary[1:3].tolist() == [0, 0]
    t = [torch.as_tensor(a, device=DEVICE) for a in (nk, s1, s2, ll, center)]
    got = gaussian_mstep_triton(*t, covariance_type, 1e-6, eps)
    _check_against_reference(got, ref, shape[2], dtype, covariance_type)


# (K, D): one of each; K past a block of 8 warps and past a warp's 32 lanes, D past
# 32 lanes (the Cholesky's columns two and three to a lane)
CUPY_SHAPES = [(1, 1), (3, 5), (9, 33), (40, 3), (2, 70)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CUPY_SHAPES)
@pytest.mark.parametrize("covariance_type", FUSED_TYPES)
def test_cupy_matches_reference(covariance_type, shape, dtype, rng, cupy_backend):
    k, d = shape
    parts = _partials(rng, (3, k, d), covariance_type, dtype, n_ll=40)
    eps = float(np.finfo(dtype).eps)
    nk, s1, s2, ll, center = _summed(*parts, covariance_type)
    ref = gaussian_mstep_ref(nk[None], s1[None], s2[None], ll, center, covariance_type, 1e-6,
                             eps, dtype)  # the sums as one split
    assert ref.summary[1:3].tolist() == [0, 0]
    got = _run_cupy(cupy_backend, parts, covariance_type, 1e-6, eps, dtype)
    _check_against_reference(got, ref, d, dtype, covariance_type)
    if covariance_type in ("full", "tied"):  # sklearn's upper factors: zeros below
        assert not np.tril(got.precisions_cholesky, -1).any()


@pytest.mark.parametrize("backend", ["triton", "cupy"])
@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical"])
def test_coefficients_take_mu_rounded_as_the_estep_applies_it(covariance_type, backend, rng,
                                                              request):
    """mu'_k = m_k - c0 rounded to float32 first, then the coefficient in float64 rounded
    once: the same bits as NumPy's on the CPU (Triton's interpreter and the CUDA
    emulator contract no multiply-add).  A mu' left in float64 moves some
    coefficients by an ulp, which the tolerances against the reference cannot see."""
    parts = _partials(rng, (3, 20, 9), covariance_type, np.float32)
    if backend == "triton":
        if not HAS_TRITON or CUDA:
            pytest.skip("Triton's interpreter (a GPU may fuse multiply-adds)")
        from fastlvm.kernels.gaussian_mstep._triton import gaussian_mstep_triton

        got = gaussian_mstep_triton(*(torch.as_tensor(a) for a in parts), covariance_type,
                                    1e-6, 1e-7)
        got = got._replace(**{name: getattr(got, name).numpy() for name in got._fields})
        got = got._replace(shift=got.shift[:9], linear=got.linear[:, :9])
    else:
        got = _run_cupy(request.getfixturevalue("cupy_backend"), parts, covariance_type,
                        1e-6, 1e-7, np.float32)
    shift64 = got.shift.astype(np.float64)
    mu = (got.means - shift64).astype(np.float32).astype(np.float64)
    if covariance_type == "full":
        want = mu.astype(np.float32)
    elif covariance_type == "diag":
        want = (got.precisions_cholesky * got.precisions_cholesky * mu).astype(np.float32)
    else:
        p2 = got.precisions_cholesky * got.precisions_cholesky
        want = (p2[:, None] * mu).astype(np.float32)
    np.testing.assert_array_equal(got.linear, want)


@pytest.mark.parametrize("backend", ["triton", "cupy"])
@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_covariances_are_exactly_symmetric(covariance_type, backend, rng, request):
    """Entry (i, j) and (j, i) are the same number: the factorisation reads one
    triangle, the user gets the matrix."""
    parts = _partials(rng, (3, 6, 21), covariance_type, np.float32)
    if backend == "triton":
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        from fastlvm.kernels.gaussian_mstep._triton import gaussian_mstep_triton

        cov = gaussian_mstep_triton(*(torch.as_tensor(a, device=DEVICE) for a in parts),
                                    covariance_type, 1e-6, 1e-7).covariances.cpu().numpy()
    else:
        cov = _run_cupy(request.getfixturevalue("cupy_backend"), parts, covariance_type, 1e-6,
                        1e-7, np.float32).covariances
    np.testing.assert_array_equal(cov, np.swapaxes(cov, -1, -2))


@needs_triton
@pytest.mark.parametrize("covariance_type", FUSED_TYPES)
def test_triton_is_bitwise_reproducible(covariance_type, rng):
    from fastlvm.kernels.gaussian_mstep._triton import gaussian_mstep_triton

    nk, s1, s2, ll, center = _partials(rng, (70, 16, 32), covariance_type, np.float32)
    t = [torch.as_tensor(a, device=DEVICE) for a in (nk, s1, s2, ll, center)]
    first = gaussian_mstep_triton(*t, covariance_type, 1e-6, 1e-7)
    again = gaussian_mstep_triton(*t, covariance_type, 1e-6, 1e-7)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "cupy"])
@pytest.mark.parametrize("covariance_type", FUSED_TYPES)
@pytest.mark.parametrize("flaw", ["negative", "nan", "inf"])
def test_bad_covariances_are_counted(covariance_type, flaw, backend, rng, request):
    """One flawed entry of one component's second moment ('tied': of the shared one).
    'diag'/'spherical': an entry that is not finite counts in both tallies (NaN is
    not positive), a negative one only as not positive.  'full'/'tied': the entry
    not finite counts once; a negative one fails one factorisation (what a failed
    factorisation of a non-finite matrix reports is the solver's business)."""
    nk, s1, s2, ll, center = parts = _partials(rng, (3, 5, 4), covariance_type, np.float64)
    value = {"negative": -1e3, "nan": np.nan, "inf": np.inf}[flaw]
    if covariance_type == "tied":
        s2[:, 0, 0] = value
    else:
        s2.reshape(3, 5, -1)[:, 2, 1 if covariance_type == "diag" else 0] = value
    ref = gaussian_mstep_ref(nk, s1, s2, ll, center, covariance_type, 1e-6, 1e-16,
                             np.float64)
    got = _fused_mstep(backend, parts, covariance_type, request).summary[1:3].tolist()
    if covariance_type in ("diag", "spherical"):
        expected = [0, 1] if flaw == "negative" else [1, 1 if flaw == "nan" else 0]
        assert ref.summary[1:3].tolist() == got == expected
    elif flaw == "negative":
        assert ref.summary[1:3].tolist() == got == [0, 1]
    else:
        assert ref.summary[1] == got[0] == 1


@pytest.mark.parametrize("backend", ["triton", "cupy"])
@pytest.mark.parametrize("covariance_type", ["full", "tied"])
@pytest.mark.parametrize("flaw", [np.nan, np.inf])
def test_bad_entries_off_the_diagonal_count_twice(covariance_type, flaw, backend, rng,
                                                  request):
    """A flawed moment below the diagonal makes two entries of the symmetric
    covariance not finite, and the count says 2 as the reference's does, at D = 150,
    where the Triton kernels take the matrix in blocks and compute only those on or
    below the diagonal (the flaw's mirror lies in a block above it)."""
    nk, s1, s2, ll, center = parts = _partials(rng, (2, 3, 150), covariance_type,
                                               np.float64)
    (s2[:, 140, 3] if covariance_type == "tied" else s2[:, 1, 140, 3])[...] = flaw
    ref = gaussian_mstep_ref(nk, s1, s2, ll, center, covariance_type, 1e-6, 1e-16,
                             np.float64)
    got = _fused_mstep(backend, parts, covariance_type, request)
    assert ref.summary[1] == float(got.summary[1]) == 2


def _fused_mstep(backend, parts, covariance_type, request):
    """The fused M-step of ``backend`` ('triton', or 'cupy' through the
    ``cupy_backend`` fixture) on float64 partials, reg_covar 1e-6, eps 1e-16."""
    if backend == "cupy":
        return _run_cupy(request.getfixturevalue("cupy_backend"), parts, covariance_type,
                         1e-6, 1e-16, np.float64)
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from fastlvm.kernels.gaussian_mstep._triton import gaussian_mstep_triton

    t = [torch.as_tensor(a, device=DEVICE) for a in parts]
    return gaussian_mstep_triton(*t, covariance_type, 1e-6, 1e-16)


@pytest.mark.parametrize("backend", ["triton", "cupy"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("covariance_type", FUSED_TYPES)
def test_outputs_given_are_written_with_the_same_bits(covariance_type, dtype, backend, rng,
                                                      request):
    """``out`` (a CUDA graph's static buffers): every result but the summary is written
    into the tensors given, NaN-filled beforehand, and holds the bits of the call
    that allocates its own (CuPy: also the float64 shift, ``shift64``)."""
    parts = _partials(rng, (3, 5, 7), covariance_type, dtype)
    if backend == "cupy":
        cupy_backend = request.getfixturevalue("cupy_backend")
        cp = cupy_backend.cupy
        summed = _cupy_summed(cupy_backend, parts, covariance_type)
        run = lambda **kw: cupy_backend.mstep.gaussian_mstep_cupy(  # noqa: E731
            *summed, covariance_type, 1e-6, 1e-7, dtype, **kw)
        empty, flag = (lambda a: cp.full_like(a, np.nan)), {"shift64": cp.full(7, np.nan)}
    else:
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        from fastlvm.kernels.gaussian_mstep._triton import gaussian_mstep_triton

        t = [torch.as_tensor(a, device=DEVICE) for a in parts]
        run = lambda **kw: gaussian_mstep_triton(*t, covariance_type, 1e-6, 1e-7,  # noqa: E731
                                                 **kw)
        empty, flag = (lambda a: torch.full_like(a, float("nan"))), {}
    plain = run()
    given = plain._replace(summary=None, **{name: empty(getattr(plain, name)) for name in
                                            plain._fields[1:]})
    if backend == "cupy" and covariance_type == "diag":
        given = given._replace(quadratic=None)  # a view of linear
    got = run(out=given, **flag)
    for name in plain._fields:
        a, b = getattr(got, name), getattr(plain, name)
        if name != "summary" and getattr(given, name) is not None:
            assert a is getattr(given, name), name
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=name)
    if flag:
        np.testing.assert_array_equal(to_numpy(flag["shift64"]),
                                      to_numpy(plain.shift).astype(np.float64))


def test_refuses_other_covariance_types(rng):
    nk, s1, s2, ll, center = _partials(rng, (2, 3, 4), "diag", np.float64)
    with pytest.raises(ValueError, match="use 'full', 'tied', 'diag' or 'spherical'"):
        gaussian_mstep_ref(nk, s1, s2, ll, center, "banana", 1e-6, 1e-16, np.float64)
    if HAS_TRITON:
        from fastlvm.kernels.gaussian_mstep._triton import gaussian_mstep_triton

        with pytest.raises(ValueError, match="use 'full', 'tied', 'diag' or 'spherical'"):
            gaussian_mstep_triton(*(torch.as_tensor(a) for a in (nk, s1, s2, ll, center)),
                                  "banana", 1e-6, 1e-16)


def test_cupy_refuses_other_covariance_types(rng, cupy_backend):
    parts = _cupy_summed(cupy_backend, _partials(rng, (2, 3, 4), "diag", np.float64), "diag")
    with pytest.raises(ValueError, match="use 'full', 'tied', 'diag' or 'spherical'"):
        cupy_backend.mstep.gaussian_mstep_cupy(*parts, "banana", 1e-6, 1e-16, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("covariance_type", FUSED_TYPES)
def test_reference_is_the_estimators_m_step_and_coefficients(covariance_type, dtype, rng):
    """The reference composes what the unfused iteration does: the summed partials,
    parameters_from_stats, precision_cholesky and the expanded coefficients around
    the weighted mean of the means."""
    from fastlvm.kernels._expanded_gaussian import expanded_terms, shift_weights

    nk, s1, s2, ll, center = _partials(rng, (4, 6, 5), covariance_type, dtype)
    eps = float(np.finfo(dtype).eps)
    ref = gaussian_mstep_ref(nk, s1, s2, ll, center, covariance_type, 1e-3, eps, dtype)
    centers = np.broadcast_to(center, (6, 5))
    n = nk.astype(np.float64).sum(0)
    sum_x = s1[:, :, :5].astype(np.float64).sum(0) + n[:, None] * centers
    second = s2.astype(np.float64).sum(0)
    second = second[..., :5, :5] if covariance_type in ("full", "tied") else (
        second[:, :5] if covariance_type == "diag" else second)
    weights, _, means, cov = gp.parameters_from_stats(n, sum_x, second, centers,
                                                      covariance_type, 1e-3, eps)
    pc = gp.precision_cholesky(cov, covariance_type)
    for name, expected in (("weights", weights), ("means", means), ("covariances", cov),
                           ("precisions_cholesky", pc)):
        np.testing.assert_allclose(getattr(ref, name), expected, rtol=1e-13, err_msg=name)
    c0 = (shift_weights(np.log(weights), np)[:, None] * means).sum(0)
    c0 = c0.astype(dtype).astype(np.float64)
    np.testing.assert_allclose(ref.shift, c0, rtol=1e-6 if dtype == np.float32 else 1e-14)
    terms = expanded_terms((means - ref.shift).astype(dtype).astype(np.float64), pc,
                           covariance_type, np.log(weights), np)
    quadratic = {"diag": terms.b, "spherical": terms.s}.get(covariance_type, pc)
    for name, expected in (("linear", terms.a), ("quadratic", quadratic),
                           ("constant", terms.c)):
        np.testing.assert_allclose(getattr(ref, name), expected, rtol=1e-12, err_msg=name)
    assert ref.summary[0] == pytest.approx(ll.astype(np.float64).sum(), rel=1e-14)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("covariance_type", FUSED_TYPES)
@pytest.mark.parametrize("n_components", [3, 20])
def test_estep_partials_then_mstep_equal_the_unfused_step(covariance_type, dtype,
                                                          n_components, rng):
    """From the statistics kernel's real partials (one pass at K = 3, 'full' aside; two
    passes with log_norm's partials at K = 20, beyond the interpreter's 16-wide tile) to the
    parameters and coefficients: the same as estep_stats_triton, the host M-step
    and GaussianTileParams built from its output."""
    from fastlvm.kernels._triton_gaussian import GaussianTileParams
    from fastlvm.kernels.estep_stats._triton import estep_partials, estep_stats_triton
    from fastlvm.kernels.gaussian_mstep._triton import (
        gaussian_mstep_triton,
        next_tile_params,
    )

    n, d, k = 300, 4, n_components
    X = (rng.standard_normal((n, d)) * 2 + 7).astype(dtype)
    means = X[rng.choice(n, k, replace=False)].astype(np.float64)
    pc = make_params(rng, covariance_type, k, d)
    weights = rng.random(k) + 0.2
    weights /= weights.sum()
    sw = (rng.random(n) + 0.5).astype(dtype)
    Xt, swt = torch.as_tensor(X, device=DEVICE), torch.as_tensor(sw, device=DEVICE)
    w_t = torch.as_tensor(weights, device=DEVICE)
    params = GaussianTileParams(Xt, torch.as_tensor(means, device=DEVICE),
                                torch.as_tensor(pc, device=DEVICE), covariance_type,
                                torch.log(w_t))
    eps = float(np.finfo(dtype).eps)
    parts = estep_partials(Xt, params, swt)
    center = params.c0_64 + params.mu_64 if covariance_type == "full" else params.c0_64
    got = gaussian_mstep_triton(*parts, center, covariance_type, 1e-6, eps)
    ll, nk, sum_x, second, center = estep_stats_triton(Xt, weights, means, pc,
                                                      covariance_type, swt)
    w_exp, _, m_exp, cov_exp = gp.parameters_from_stats(
        nk.cpu().numpy(), sum_x.cpu().numpy(), second.cpu().numpy(), center.cpu().numpy(),
        covariance_type, 1e-6, eps)
    for name, expected in (("weights", w_exp), ("means", m_exp), ("covariances", cov_exp)):
        np.testing.assert_allclose(getattr(got, name).cpu().numpy(), expected, rtol=1e-12,
                                   err_msg=name)
    assert got.summary[0].item() == pytest.approx(ll, rel=1e-13)
    nxt = next_tile_params(got, params)
    expected = GaussianTileParams(Xt, got.means, got.precisions_cholesky, covariance_type,
                                  torch.log(got.weights))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-6, atol=2e-6)
    names = ("c0", "a", "b", "s", "c", "u", "c0_64") + (("mu_64",) if covariance_type == "full"
                                                        else ())
    for name in names:
        a, b = getattr(nxt, name), getattr(expected, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        scale = float(b.abs().max()) + 1.0
        np.testing.assert_allclose(a.cpu().numpy(), b.cpu().numpy(), rtol=tol["rtol"],
                                   atol=tol["atol"] * scale, err_msg=name)
    assert (nxt.code, nxt.block_d, nxt.n_components, nxt.n_features) == (
        expected.code, expected.block_d, expected.n_components, expected.n_features)

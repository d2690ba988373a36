"""The Triton kernels at the tiles a GPU takes, run under the interpreter with
every load and store bounds-checked (``tests/triton_bounds.py``) and every
launch checked for program-order hazards (``tests/triton_races.py``).

Under the interpreter the tile tables give 16-wide tiles (they cross the tile
edges of the tests' small shapes, and keep the interpreter quick), so the tiles
a GPU takes -- 32 to 128 rows, 64 to 128 components, 32- and 64-feature steps,
loss tiles of 256 and 1024 columns -- ran only on a GPU, where an access past a
buffer faults or reads a neighbour's numbers unnoticed, and GPU sessions are
rare.  Here the modules that choose tiles are told they are not interpreting,
so each kernel takes its GPU table for the shapes given; the outputs are
compared with the float64 references, and the launches are recorded to show
the GPU's tiles were taken.

What this cannot check: warps and stages (the interpreter runs a program as a
whole), shared memory and registers (``test_triton_compiles.py`` compiles for
sm_90), and the GPU's rounding.
"""

import importlib
import re
from pathlib import Path

import numpy as np
import pytest

from fastlvm.kernels import (estep_stats, gaussian_kl, gaussian_log_prob,
                             gaussian_log_prob_ref, log_mean_exp, log_responsibilities,
                             log_responsibilities_ref, mppca_log_prob, mppca_log_prob_ref,
                             mppca_stats, mppca_stats_ref)
from tests import triton_bounds
from tests.conftest import (CUDA, DTYPES, HAS_TRITON, assert_estep_matches_reference,
                            assert_mppca_stats_close, make_params, mppca_problem, to_numpy)
from tests.tolerances import assert_close

pytestmark = pytest.mark.skipif(not HAS_TRITON or CUDA,
                                reason="the GPU's tiles run on the GPU itself there; here "
                                       "they need Triton's interpreter")
torch = pytest.importorskip("torch")

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
# the kernel modules whose tile tables ask whether the interpreter runs
TILE_MODULES = ("_triton_gaussian", "_triton_low_rank", "_triton_low_rank_wide",
                "estep_stats._triton", "estep_stats._triton_chunked",
                "estep_stats._triton_square_blocks", "log_responsibilities._triton",
                "gaussian_kl._triton", "log_mean_exp._triton", "variational_bounds._triton")


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The GPU's tile tables under the interpreter (with the suite's checks:
    bounds, program order, NaN in fresh allocations); returns the list the
    launches are recorded in, as (kernel name, {BLOCK_*: size}), in order."""
    from triton.runtime.interpreter import GridExecutor

    from fastlvm.kernels import _triton_gaussian as tg

    assert triton_bounds.installed()
    for name in TILE_MODULES:
        module = importlib.import_module(f"fastlvm.kernels.{name}")
        monkeypatch.setattr(module, "interpreting", lambda: False)
    monkeypatch.setattr(tg, "_FITTING", {})  # no tiles remembered from interpreter tables
    launches = []
    run = GridExecutor.__call__

    def recorded(self, *args, **kwargs):
        launches.append((self.fn.__name__,
                         {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(GridExecutor, "__call__", recorded)
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    return launches


def _widest(launches, *blocks):
    """The largest of the ``blocks`` constexprs (BLOCK_N, ...) among the launches."""
    sizes = [b[block] for _, b in launches for block in blocks if block in b]
    assert sizes, f"no launch took any of {blocks}"
    return max(sizes)


def test_every_module_that_asks_is_listed():
    asking = {str(p.relative_to(KERNELS).with_suffix("")).replace("/", ".")
              for p in KERNELS.rglob("*.py")
              if re.search(r"(?<!def )\binterpreting\(\)", p.read_text())}  # calls it
    assert asking == set(TILE_MODULES), "list the module in TILE_MODULES"


def _gaussian_problem(rng, n, d, k, covariance_type, dtype):
    X = (rng.standard_normal((n, d)) + 3.0).astype(dtype)
    means = (X[rng.integers(0, n, k)].astype(np.float64)
             + rng.standard_normal((k, d)) * 0.5).astype(dtype).astype(np.float64)
    weights = rng.random(k) + 0.1
    sw = rng.random(n) * 2
    sw[::7] = 0.0
    return X, weights / weights.sum(), means, make_params(rng, covariance_type, k, d), sw


# (covariance type, D, K, what it takes at the GPU's tables): one pass (K within
# one component tile), log-normalisers first ('full'), K past one tile (the
# chunks, in two chunks), rows past 128 padded features (the wide kernels)
ESTEP_CASES = [("diag", 37, 5, "one pass"), ("spherical", 20, 16, "one pass"),
               ("tied", 37, 5, "one pass"), ("full", 37, 5, "two passes"),
               ("diag", 20, 69, "chunks"), ("spherical", 37, 130, "chunks"),
               ("tied", 20, 69, "chunks"), ("full", 300, 3, "wide"),
               ("tied", 300, 3, "wide"), ("diag", 300, 3, "wide")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("covariance_type, d, k, path", ESTEP_CASES)
def test_estep_stats_at_gpu_tiles(covariance_type, d, k, path, dtype, rng, gpu_tiles,
                                  monkeypatch):
    from fastlvm.kernels.estep_stats import _triton_chunked as ch

    n = 70 if path == "wide" else 203  # a ragged last row tile
    X, w, means, pc, sw = _gaussian_problem(rng, n, d, k, covariance_type, dtype)
    monkeypatch.setattr(ch, "CHUNK_ELEMENTS", k * 128)  # two chunks of up to 128 rows
    got = estep_stats(torch.as_tensor(X), w, means, pc, covariance_type,
                      sample_weight=torch.as_tensor(sw))
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, sw, dtype)
    assert _widest(gpu_tiles, "BLOCK_N", "BLOCK_M", "BLOCK_R") >= 32
    if path == "chunks":
        assert any(name.startswith("_chunk") for name, _ in gpu_tiles), gpu_tiles


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("covariance_type, d, k", [("full", 37, 69), ("diag", 300, 5),
                                                   ("spherical", 5, 130)])
def test_gaussian_log_prob_at_gpu_tiles(covariance_type, d, k, dtype, rng, gpu_tiles):
    X, _, means, pc, _ = _gaussian_problem(rng, 150, d, k, covariance_type, dtype)
    got = to_numpy(gaussian_log_prob(torch.as_tensor(X), means, pc, covariance_type))
    assert_close(got, gaussian_log_prob_ref(X, means, pc, covariance_type), dtype)
    assert _widest(gpu_tiles, "BLOCK_N", "BLOCK_M") >= 32


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_responsibilities_at_gpu_tiles(dtype, rng, gpu_tiles):
    log_prob = (rng.standard_normal((203, 69)) * 30).astype(dtype)
    log_prob[5, 3:] = -np.inf
    resp, lse = log_responsibilities(torch.as_tensor(log_prob))
    ref_resp, ref_lse = log_responsibilities_ref(log_prob)
    assert_close(to_numpy(resp), ref_resp, dtype)
    assert_close(to_numpy(lse), ref_lse, dtype)
    assert _widest(gpu_tiles, "BLOCK_K") == 128 and _widest(gpu_tiles, "BLOCK_N") == 32


# (n, D, K, q): the fused kernels at 64 rows (D = 17, 64 -> 64 padded features),
# at 16 rows (128 padded features with 32 latent), and the wide rows' kernels in
# feature steps (D = 150, q = 4 and 20)
MPPCA_CASES = [(203, 17, 3, 4), (150, 100, 2, 20), (90, 150, 3, 4), (70, 150, 2, 20)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MPPCA_CASES)
def test_mppca_kernels_at_gpu_tiles(shape, dtype, rng, gpu_tiles):
    X, weights, means, comp, noise = mppca_problem(rng, shape, dtype)
    sw = rng.random(shape[0]) * 2
    Xt = torch.as_tensor(X)
    got = mppca_stats(Xt, weights, means, comp, noise, sample_weight=torch.as_tensor(sw))
    ref = mppca_stats_ref(X, weights, means, comp, noise, sample_weight=sw)
    assert_mppca_stats_close(got, ref, dtype)
    assert_close(to_numpy(mppca_log_prob(Xt, means, comp, noise)),
                 mppca_log_prob_ref(X, means, comp, noise), dtype)
    assert _widest(gpu_tiles, "BLOCK_N", "BLOCK_M", "BLOCK_R") >= (16 if shape[1] == 100
                                                                    else 32)


def _losses_problem(dtype, b=5, d=1100, latent=300, k=3):
    """Loss inputs crossing the GPU's 1024-column (float32) and 256-column
    (float64) tiles, a latent past the KL's 256, and k samples."""
    from tests.kernels.test_vae_losses import _problem

    return _problem((b, d, latent, k), dtype, "gaussian", "per_feature")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vae_losses_at_gpu_tiles(dtype, gpu_tiles, monkeypatch):
    from fastlvm.kernels import elbo, iwae_bound
    from tests.kernels.test_vae_losses import _assert_close, _grads

    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    names = ["dec", "dec_logvar", "z", "mu", "logvar"]
    for bound in ("elbo", "iwae"):
        values = {}
        for backend in ("triton", "reference"):
            t = _losses_problem(dtype if backend == "triton" else torch.float64)
            monkeypatch.setenv("FASTLVM_BACKEND", backend)
            if bound == "elbo":
                value = elbo(t["x"], t["dec"][:1], t["mu"], t["logvar"], "gaussian",
                             t["dec_logvar"])
            else:
                value = iwae_bound(t["x"], t["dec"], t["z"], t["mu"], t["logvar"],
                                   "gaussian", t["dec_logvar"], gradient="dreg")
            values[backend] = (value.detach().double().numpy(), _grads(value, t, names))
        _assert_close(values["triton"][0], values["reference"][0], np_dtype, bound)
        for name, g, g_ref in zip(names, values["triton"][1], values["reference"][1]):
            if g_ref is not None:
                _assert_close(g, g_ref, np_dtype, f"{bound}: d/d{name}")
    assert _widest(gpu_tiles, "BLOCK_D") == (1024 if dtype == torch.float32 else 256)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gaussian_kl_and_log_mean_exp_at_gpu_tiles(dtype, gpu_tiles, monkeypatch):
    g = torch.Generator().manual_seed(1)
    mu, logvar = (torch.randn(37, 300, generator=g, dtype=torch.float64) for _ in range(2))
    log_w = torch.randn(70, 90, generator=g, dtype=torch.float64) * 5
    got = {}
    for backend in ("triton", "reference"):
        cast = dtype if backend == "triton" else torch.float64
        monkeypatch.setenv("FASTLVM_BACKEND", backend)
        got[backend] = (gaussian_kl(mu.to(cast), logvar.to(cast)).double(),
                        log_mean_exp(log_w.to(cast)).double())
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    for a, b in zip(got["triton"], got["reference"]):
        assert_close(a.numpy(), b.numpy(), np_dtype)
    assert _widest(gpu_tiles, "BLOCK_L") == 256
    assert _widest(gpu_tiles, "BLOCK_B") == 64

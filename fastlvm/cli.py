"""The ``fastlvm`` console command: ``fastlvm fit [FILE]`` and ``fastlvm bench``."""

import argparse
import sys
import time

import numpy as np


def load_data(path):
    """Rows from a .npy (memory-mapped) or .csv file (a header line is skipped);
    sklearn's digits when None.

    Raises
    ------
    ValueError
        For another file type, or a .csv field that is not a number.
    OSError
        For a file that cannot be read.
    """
    if path is None:
        from sklearn.datasets import load_digits

        return load_digits().data, "sklearn digits (1797 x 64)"
    if path.endswith(".npy"):
        X = np.load(path, mmap_mode="r")
    elif path.endswith(".csv"):
        X = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=int(_has_header(path)))
    else:
        raise ValueError(f"{path}: expected a .npy or .csv file")
    return X, path


def _has_header(path):
    """Whether the first line of a .csv file holds a field that is not a number."""
    with open(path) as f:
        first = f.readline()
    try:
        [float(field) for field in first.split(",") if field.strip()]
    except ValueError:
        return True
    return False


def _fit_dtype(X, float32):
    """float32 when asked; else the file's float dtype (a memory-mapped .npy is
    then read in place, never copied), float64 for any other."""
    if float32:
        return np.float32
    return X.dtype if X.dtype in (np.float32, np.float64) else np.float64


class _Progress:
    """A progress bar over EM iterations (tqdm when installed, else a text line)."""

    def __init__(self, total, n_init, enabled):
        self.enabled, self.total, self.n_init = enabled, total, n_init
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total * n_init, desc="EM", unit="it", file=sys.stderr)
            except ImportError:
                self.bar = None

    def __call__(self, init, n_iter, lower_bound, change):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = init * self.total + n_iter
            self.bar.set_postfix(init=init, bound=f"{lower_bound:.5f}", change=f"{change:.2e}",
                                 refresh=False)  # one redraw an iteration, below
            self.bar.refresh()
        else:
            width = 30
            done = int(width * n_iter / self.total)
            sys.stderr.write(f"\rinit {init + 1}/{self.n_init} [{'#' * done}{'.' * (width - done)}]"
                             f" iter {n_iter}/{self.total} bound {lower_bound:.5f}")
            sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


def fit_main(argv):
    parser = argparse.ArgumentParser(prog="fastlvm fit",
                                     description="Fit a GaussianMixture and save it.")
    parser.add_argument("file", nargs="?", help=".npy or .csv data (default: sklearn digits)")
    parser.add_argument("-k", "--n-components", type=int, default=10)
    parser.add_argument("--covariance-type", default="full",
                        choices=["full", "tied", "diag", "spherical"])
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--reg-covar", type=float, default=1e-6)
    parser.add_argument("--n-init", type=int, default=1)
    parser.add_argument("--init-params", default="kmeans",
                        choices=["kmeans", "k-means++", "random", "random_from_data"])
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument("--float32", action="store_true",
                        help="fit in float32 (default: the file's float dtype)")
    parser.add_argument("-o", "--output", default="fastlvm_model.joblib",
                        help="where to save the fitted model (joblib)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        return _fit(args)
    except (OSError, ValueError) as exc:  # the data or the parameters: no traceback
        print(f"fastlvm fit: error: {exc}", file=sys.stderr)
        return 1


def _fit(args):
    import joblib

    from fastlvm import GaussianMixture

    X, name = load_data(args.file)
    X = np.asarray(X, dtype=_fit_dtype(X, args.float32))
    gm = GaussianMixture(args.n_components, covariance_type=args.covariance_type,
                         max_iter=args.max_iter, tol=args.tol, reg_covar=args.reg_covar,
                         n_init=args.n_init, init_params=args.init_params,
                         random_state=args.random_state)
    progress = _Progress(args.max_iter, args.n_init, not args.no_progress)
    start = time.perf_counter()
    try:
        gm.fit(X, callback=progress)
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    joblib.dump(gm, args.output)
    print(f"data         {name}: {X.shape[0]} rows x {X.shape[1]} features, {X.dtype}")
    print(f"model        GaussianMixture(n_components={args.n_components}, "
          f"covariance_type={args.covariance_type!r})")
    print(f"lower bound  {gm.lower_bound_:.6f} (mean log-likelihood per row)")
    print(f"iterations   {gm.n_iter_} ({'converged' if gm.converged_ else 'not converged'})")
    print(f"BIC          {gm.bic(X):.2f}")
    print(f"time         {seconds:.2f} s")
    print(f"saved        {args.output}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fastlvm {fit,bench} ...\n\n"
              "  fit [FILE]   fit a GaussianMixture (.npy/.csv; default sklearn digits)\n"
              "  bench        side-by-side speed against sklearn (see fastlvm bench -h)")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "fit":
        return fit_main(rest)
    if command == "bench":
        from fastlvm.benchmarks import main as bench_main

        return bench_main(rest)
    print(f"fastlvm: unknown command {command!r}; use 'fit' or 'bench'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

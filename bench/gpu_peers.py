"""GaussianMixture on the GPU against its GPU peers, torchgmm and pomegranate,
per EM iteration, in one process, on the same device and the same float32 data.

Issue 3's comparison.  Each library fits from its own start (torchgmm and
fastlvm from the same means; pomegranate initialises itself with three k-means
steps), so the figure is the cost of one more iteration:

    (fit with ``many`` iterations - fit with ``few``) / (many - few),

each fit timed with the device synchronised, the median of ``--repeat`` such
differences.  Set-up that both fits share (compilation, trainer construction,
initialisation) cancels.  No convergence test stops a fit early (fastlvm
``tol=0``, torchgmm ``convergence_tolerance=0``, pomegranate ``tol=-inf``).
pomegranate has no 'tied' covariance; a peer that is not installed, or fails,
gets a dash and its error is printed.

    python bench/gpu_peers.py [--quick] [--large] [--repeat 3] [--device cuda]
        [--out bench/results/gpu-<device>-peers.md]

Data is generated; nothing is downloaded.  Needs torch; torchgmm (which needs
pytorch-lightning) and pomegranate are optional.
"""

import argparse
import time
import warnings

import numpy as np

# asv imports every module of bench/ to find its benchmarks, in an environment
# without torch: there the imports below fail and a run of the script re-raises
_MISSING = None
try:
    import torch
except ImportError as exc:
    _MISSING = exc
    torch = None

# (covariance, N, D, K): issue 2's EM-iteration workloads
WORKLOADS = (("diag", 1_000_000, 32, 16), ("full", 200_000, 16, 32),
             ("spherical", 1_000_000, 32, 64), ("tied", 200_000, 32, 16))
# --large: more components and features, where torchgmm's N x K (and N x K x D)
# intermediates and pomegranate's per-component loops grow (a peer that runs
# out of memory is reported as such)
LARGE_WORKLOADS = (("diag", 1_000_000, 64, 256), ("spherical", 1_000_000, 128, 1024),
                   ("full", 1_000_000, 32, 128), ("tied", 1_000_000, 64, 256))


def _synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_iteration(fit, device, few, many, repeat, budget_s=20.0):
    """Median over ``repeat`` of (time of fit(many) - time of fit(few)) / (many - few).

    ``many`` shrinks (to few + 3 at least) where the warm-up says one fit(many)
    would take more than ``budget_s``: a slow peer at a large size still gets a
    figure without holding the device for minutes."""
    fit(few)  # warm-up: compilation, library set-up
    _synchronize(device)
    t = time.perf_counter()
    fit(few)
    _synchronize(device)
    per_iteration = (time.perf_counter() - t) / few  # an upper bound: set-up included
    many = few + max(3, min(many - few, int(budget_s / max(per_iteration, 1e-9))))
    diffs = []
    for _ in range(repeat):
        spans = []
        for iters in (few, many):
            # an untimed fit right before each timed one, so neither starts on an
            # idle device (an H200 idles at 345 MHz); in the first H200 run, without
            # it, fastlvm's fit(12) - fit(2) came out negative for 'full' (the cause
            # not established; the clock ramp is the suspect)
            fit(few)
            _synchronize(device)
            t = time.perf_counter()
            fit(iters)
            _synchronize(device)
            spans.append(time.perf_counter() - t)
        diffs.append((spans[1] - spans[0]) / (many - few))
    return float(np.median(diffs))


def fastlvm_start(cov, k, means, mean_variance):
    """GaussianMixture's arguments for the whole start fastlvm is given: equal
    weights, the peers' ``means`` (K, D), precisions of the data's mean variance.
    A fit from it runs no initialisation: with means_init alone, init_params='kmeans'
    ran k-means (up to 300 iterations, a read each) to set the starting covariances,
    as in sklearn, the likely noise in the 2026-12-04 H200 run's differences (0.14 ms
    for 'diag', whose fused iteration alone takes 0.45 in cupy_vs_triton.py, and
    -1.43 ms for 'tied' with a graph).  ``bench/gpu_profile.py peers`` starts there too."""
    d = means.shape[1]
    precision = 1.0 / mean_variance
    precisions = {"full": np.broadcast_to(np.eye(d) * precision, (k, d, d)).copy(),
                  "tied": np.eye(d) * precision, "diag": np.full((k, d), precision),
                  "spherical": np.full(k, precision)}[cov]
    return dict(n_components=k, covariance_type=cov, weights_init=np.full(k, 1.0 / k),
                means_init=means, precisions_init=precisions)


def fastlvm_fit(X, cov, k, means, cuda_graph=False):
    from fastlvm import GaussianMixture

    start = fastlvm_start(cov, k, means, float(X.double().var(0).mean()))

    def fit(iters):
        GaussianMixture(**start, max_iter=iters, tol=0.0, random_state=0,
                        cuda_graph=cuda_graph).fit(X)
    return fit


def fastlvm_graph_fit(X, cov, k, means):
    """fastlvm with ``cuda_graph=True``: the iterations past the warm-up and the
    recording are replays (``table`` gives it GRAPH_OFFSET more iterations in both
    fits, so that the difference counts replays alone)."""
    return fastlvm_fit(X, cov, k, means, cuda_graph=True)


GRAPH_OFFSET = 4  # fastlvm's eager warm-up iterations and the recording one
# fastlvm's longer fit: its iterations take about a millisecond, so 30 of them are
# within the noise of a fit's set-up; 200 span a few hundred milliseconds
FASTLVM_MANY = 202


def torchgmm_fit(X, cov, k, means):
    import logging

    from torchgmm.bayes import GaussianMixture as TorchGMM

    for name in ("lightning.pytorch", "pytorch_lightning"):  # one line per fit otherwise
        logging.getLogger(name).setLevel(logging.ERROR)
    accelerator = "gpu" if X.is_cuda else "cpu"

    def fit(iters):
        TorchGMM(k, covariance_type=cov, init_means=torch.as_tensor(means, dtype=X.dtype,
                                                                      device=X.device),
                 convergence_tolerance=0.0,
                 trainer_params=dict(accelerator=accelerator, devices=1, max_epochs=iters,
                                     enable_progress_bar=False, logger=False,
                                     enable_checkpointing=False,
                                     enable_model_summary=False)).fit(X)
    return fit


def pomegranate_fit(X, cov, k, means):
    from pomegranate.distributions import Normal
    from pomegranate.gmm import GeneralMixtureModel

    kind = {"full": "full", "diag": "diag", "spherical": "sphere"}[cov]

    def fit(iters):
        model = GeneralMixtureModel([Normal(covariance_type=kind) for _ in range(k)],
                                    max_iter=iters, tol=-np.inf, random_state=0)
        model.to(X.device).fit(X)
    return fit


def table(device, quick, repeat, workloads=WORKLOADS, only=None):
    peers = (("fastlvm", fastlvm_fit), ("fastlvm graph", fastlvm_graph_fit),
             ("torchgmm", torchgmm_fit), ("pomegranate", pomegranate_fit))
    if only is not None:
        unknown = set(only) - {name for name, _ in peers}
        if unknown:
            raise SystemExit(f"--only: unknown {sorted(unknown)}; use names of "
                             f"{[name for name, _ in peers]}")
        peers = tuple(p for p in peers if p[0] in only)
    rows = []
    for cov, n, d, k in workloads:
        if quick:
            n //= 10
        rng = np.random.default_rng(0)
        Xh = (rng.standard_normal((n, d)) + rng.integers(0, 4, (n, 1))).astype(np.float32)
        X = torch.as_tensor(Xh, device=device)
        means = Xh[rng.choice(n, k, replace=False)].astype(np.float64)
        times = {}
        for name, make in peers:
            if name == "pomegranate" and cov == "tied":
                continue
            try:
                few, many = (1, 6) if quick else (2, FASTLVM_MANY if name.startswith(
                    "fastlvm") else 32)
                if name == "fastlvm graph":
                    few, many = few + GRAPH_OFFSET, many + GRAPH_OFFSET
                times[name] = seconds_per_iteration(make(X, cov, k, means), device, few,
                                                    many, repeat)
            except Exception as exc:  # one table for the whole run: report and go on
                print(f"{name} {cov}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()  # after an out-of-memory, for the next peer
            else:
                print(f"{name:12s} {cov:9s} N={n} D={d} K={k}: "
                      f"{1e3 * times[name]:.2f} ms/iteration", flush=True)
        rows.append((f"{cov} N={n:,} D={d} K={k}", times))
    return rows


def markdown(rows, device, repeat):
    name = (torch.cuda.get_device_name(device) if torch.device(device).type == "cuda"
            else "CPU")
    lines = [f"# GaussianMixture per EM iteration on {name}: fastlvm, torchgmm, "
             "pomegranate", "",
             f"float32, one process, same data; ms per iteration, median of {repeat} "
             "(fit(many) - fit(few)) / (many - few), few = 2 and many up to 32 for the "
             f"peers (fewer for a slow one), {FASTLVM_MANY} for fastlvm; ratio = peer / "
             "fastlvm.", "",
             "fastlvm: `cuda_graph=False`, the plain fused iteration; fastlvm graph: "
             "`cuda_graph=True`, the iterations replayed from a CUDA graph, which is what "
             "the default ('auto') does on CUDA tensors.", "",
             "| workload | fastlvm ms | fastlvm graph ms | torchgmm ms | pomegranate ms "
             "| torchgmm / fastlvm | torchgmm / fastlvm graph | pomegranate / fastlvm |",
             "|---|---|---|---|---|---|---|---|"]

    def ms(t):
        return "-" if t is None else f"{1e3 * t:.2f}"

    def ratio(t, ours):
        return "-" if t is None or ours is None else f"{t / ours:.1f}x"

    for label, t in rows:
        ours = t.get("fastlvm")
        graph = t.get("fastlvm graph")
        lines.append(f"| {label} | {ms(ours)} | {ms(graph)} | {ms(t.get('torchgmm'))} | "
                     f"{ms(t.get('pomegranate'))} | {ratio(t.get('torchgmm'), ours)} | "
                     f"{ratio(t.get('torchgmm'), graph)} | "
                     f"{ratio(t.get('pomegranate'), ours)} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N / 10, fewer iterations")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--large", action="store_true",
                    help="larger K and D (LARGE_WORKLOADS) instead of issue 2's sizes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="also write the table to this markdown file")
    ap.add_argument("--only", help="comma-separated libraries to time, '-' for a space "
                    "(default: all of fastlvm, fastlvm-graph, torchgmm, pomegranate)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    rows = table(args.device, args.quick, args.repeat,
                 LARGE_WORKLOADS if args.large else WORKLOADS,
                 None if args.only is None else args.only.replace("-", " ").split(","))
    text = markdown(rows, args.device, args.repeat)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    if _MISSING is not None:
        raise _MISSING
    main()

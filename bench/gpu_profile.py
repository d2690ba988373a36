"""Where the GPU time goes: torch.profiler (CUPTI, so CuPy's kernels show too)
over the GPU paths whose figures fell short, one table per target.

    python bench/gpu_profile.py [cupy] [vae] [mppca-wide] [flash] [peers] [launch]
                                [--out DIR]

- ``cupy``: one CuPy E-step per covariance type at N=1M, D=32, K=16 (the EM
  iteration rows of bench/cupy_vs_triton.py: the tile kernels), the chunked
  path's 'full' (K=64) and 'diag' (K=1024) E-steps at D=128 over chunk budgets
  around the default (``CHUNK_ELEMENTS``), one whole 'diag' EM iteration
  (E-step and the device M-step), and the mixture-of-PPCA statistics at N=1M,
  D=64, K=16, q=4, beside the Triton kernels on the same data;
- ``vae``: the fused ELBO's forward + backward at batch 1024, D=784, latent 32
  (k=1 and k=50) beside the same loss in eager PyTorch, and five Adam steps of
  fastlvm.VAE at D=784;
- ``mppca-wide``: the mixture-of-PPCA statistics at N=250k, D=784, K=16, q=4,
  CuPy's beside Triton's kernels for wide rows (5.4x slower on an H200 in session
  59, level with CuPy's since session 60);
- ``flash``: Flash-GMM's E-step (N=1M, D=128, K=1024, float32; issue 3's 10 ms),
  Triton's chunked path per covariance type ('spherical', 'diag', 'tied') at both
  precisions (``FASTLVM_TRITON_PRECISION`` tf32x3 and tf32), and CuPy's on the same
  data: which of the chunk's kernels (log-density GEMM, log-normalisers, moments)
  holds the 19-43 ms that ``triton_check.py`` times (session 59), 'spherical'
  with the rows shifted in the kernels (before session 62's shifted chunk rows),
  and CuPy's 'spherical' with its chunks' moments product over 1, 4 and 16 slabs of
  rows (``_cupy_gaussian.MOMENT_SLABS``, session 63; wall time only);
- ``peers``: one GaussianMixture EM iteration at each of ``gpu_peers.py``'s
  workloads (issue 3's 20x torchgmm: 'diag', 'full', 'spherical', 'tied'), the
  Triton iteration replayed from its CUDA graph (the default) and eager, and
  CuPy's replayed (``cuda_graph=True``): how much of each iteration is its
  kernels, and which, against the graph's replay and the one read;
- ``launch``: the host's time per launch of the fused ELBO kernel (batch 4, so the
  device keeps up) by Triton's ``kernel[grid]`` and by ``launch_kernel``'s direct
  relaunch (session 64; 11.2 and 6.6 us on the 2-core VM with the C launcher
  stubbed), and the fused loss's forward + backward with each: what the direct
  launches take off issue 7's host-bound loss on this host.

Each table lists the CUDA kernels by total device time and the host (CPU) time
of the whole region, so launch-bound and kernel-bound cases tell apart.  A
diagnostic: prints tables, asserts nothing.
"""

import argparse
import os
import sys
import time

import numpy as np

# asv imports every module of bench/ to find its benchmarks, in an environment
# without torch: there the imports below fail and a run of the script re-raises
_MISSING = None
try:
    import torch
    from torch.profiler import ProfilerActivity, profile
except ImportError as exc:
    _MISSING = exc
    torch = ProfilerActivity = profile = None


def _emit(text, out_dir):
    """Print a table, and append it to DIR/gpu-profile.txt when there is a DIR."""
    print(text, flush=True)
    if out_dir:
        with open(os.path.join(out_dir, "gpu-profile.txt"), "a") as f:
            f.write(text)


def _wall(fn, sync, reps):
    """Seconds per call of ``fn`` over ``reps`` calls, after one warm-up call
    (compilation) and with the device synchronised at both ends."""
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


def _profiled(label, fn, sync, reps, out_dir, rows=14, device="cuda"):
    """One table: ``fn``'s wall time, and under the profiler its kernels by device
    time (``device='cpu'``: the host's operations only, a dry run of the script)."""
    wall = _wall(fn, sync, reps)  # compile and warm up outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            fn()
        sync()
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) / reps
    table = events.table(sort_by="self_device_time_total", row_limit=rows,
                         max_name_column_width=60)
    text = (f"\n## {label}\n\nwall {1e3 * wall:.3f} ms per call (unprofiled), device kernels "
            f"{device_us / 1e3:.3f} ms per call\n\n{table}\n")
    _emit(text, out_dir)


def chunk_budget_sweep(cases, sync, budgets=(1 << 24, 3 << 23, 1 << 25, 1 << 26), reps=5):
    """Wall time per call of each ``(label, fn)`` in ``cases`` at each CuPy chunk
    budget (``_cupy_gaussian.CHUNK_ELEMENTS``, restored afterwards).

    The lever for the mixtures that still take the chunked path (K > 64, or a
    tile over the kernels' limits): a 'full' E-step at N=1M, K=64, D=128 runs
    165 chunks of about 20 launches each at the default budget (x
    FULL_CHUNK_FACTOR for 'full'), so host time, not device time, may set its
    pace.  Returns rows (label, budget, seconds).
    """
    from _patched import attributes_set  # bench/, the script's directory

    from fastlvm.kernels import _cupy_gaussian

    rows = []
    for budget in budgets:
        with attributes_set(_cupy_gaussian, CHUNK_ELEMENTS=budget):
            rows += [(label, budget, _wall(fn, sync, reps)) for label, fn in cases]
    return rows


def _report_sweep(rows, out_dir):
    from fastlvm.kernels import _cupy_gaussian

    lines = ["", "## CuPy E-step by chunk budget (CHUNK_ELEMENTS; default "
             f"{_cupy_gaussian.CHUNK_ELEMENTS:,})", "",
             "| call | budget (elements) | wall ms |", "|---|---:|---:|"]
    lines += [f"| {label} | {budget:,} | {1e3 * sec:.3f} |" for label, budget, sec in rows]
    text = "\n".join(lines) + "\n"
    _emit(text, out_dir)


def profile_cupy(out_dir):
    import cupy

    sys.path.insert(0, os.path.dirname(__file__))
    from benchmarks_gpu import identity_precisions

    from fastlvm.kernels.estep_stats._cupy import estep_stats_cupy
    from fastlvm.kernels.estep_stats._triton import estep_stats_triton
    from fastlvm.kernels.mppca_stats._cupy import mppca_stats_cupy
    from fastlvm.kernels.mppca_stats._triton import mppca_stats_triton

    rng = np.random.default_rng(0)
    sync_c, sync_t = cupy.cuda.Device().synchronize, torch.cuda.synchronize
    n, d, k = 1_000_000, 32, 16
    X = (rng.standard_normal((n, d)) + rng.integers(0, 4, (n, 1))).astype(np.float32)
    Xc, Xt = cupy.asarray(X), torch.as_tensor(X, device="cuda")
    means = X[rng.choice(n, k, replace=False)].astype(np.float64)
    w = np.full(k, 1.0 / k)
    for cov in ("diag", "full", "tied", "spherical"):
        args = (w, means, identity_precisions(cov, k, d), cov)
        _profiled(f"CuPy estep_stats {cov} N={n} D={d} K={k} float32",
                  lambda: estep_stats_cupy(Xc, *args), sync_c, 5, out_dir)
        _profiled(f"Triton estep_stats {cov} N={n} D={d} K={k} float32",
                  lambda: estep_stats_triton(Xt, *args), sync_t, 5, out_dir, rows=6)
    try:  # a diagnostic: a failure here must not cost the tables below
        # the chunked path's workloads (K = 16 takes the tile kernels now)
        wide = cupy.asarray(rng.standard_normal((n, 128)).astype(np.float32))
        cases = [(f"{cov} N={n} D=128 K={kk} float32",
                  lambda a=(np.full(kk, 1.0 / kk), cupy.asnumpy(wide[:kk]).astype(np.float64),
                            identity_precisions(cov, kk, 128), cov):
                      estep_stats_cupy(wide, *a))
                 for cov, kk in (("full", 64), ("diag", 1024))]
        _report_sweep(chunk_budget_sweep(cases, sync_c), out_dir)
    except Exception as exc:  # noqa: BLE001
        print(f"chunk budget sweep failed: {exc!r}", flush=True)
    from fastlvm import GaussianMixture

    for data, sync, name in ((Xc, sync_c, "CuPy"), (Xt, sync_t, "Triton")):
        gm = GaussianMixture(k, covariance_type="diag", init_params="random_from_data",
                             random_state=0, max_iter=1, cuda_graph=False).fit(data)
        _profiled(f"{name} GaussianMixture EM iteration (E-step + M-step) diag N={n} "
                  f"D={d} K={k} float32", lambda: gm._em_iteration(data, None), sync, 5,
                  out_dir, rows=20)
    d, q = 64, 4
    X = rng.standard_normal((n, d)).astype(np.float32)
    Xc, Xt = cupy.asarray(X), torch.as_tensor(X, device="cuda")
    args = (w, X[:k].astype(np.float64), rng.standard_normal((k, q, d)), np.ones(k))
    _profiled(f"CuPy mppca_stats N={n} D={d} K={k} q={q} float32",
              lambda: mppca_stats_cupy(Xc, *args), sync_c, 5, out_dir)
    _profiled(f"Triton mppca_stats N={n} D={d} K={k} q={q} float32",
              lambda: mppca_stats_triton(Xt, *args), sync_t, 5, out_dir, rows=6)


def profile_mppca_wide(out_dir):
    """The mixture of PPCA's E-step on rows of MNIST's width (N = 250k, D = 784,
    K = 16, q = 4, float32), CuPy's and Triton's: on an H200 Triton's kernels for
    wide rows (``_triton_low_rank_wide.py``) took 102 ms against CuPy's 18.9 in
    session 59; this profile took them apart in session 60 (the log-densities 49 ms
    a call, the statistics 28.5), and they now take 18.8 against 18.0
    (``bench/results/gpu-h200.md``)."""
    import cupy

    from fastlvm.kernels.mppca_stats._cupy import mppca_stats_cupy
    from fastlvm.kernels.mppca_stats._triton import mppca_stats_triton

    rng = np.random.default_rng(0)
    n, d, k, q = 250_000, 784, 16, 4
    X = rng.standard_normal((n, d)).astype(np.float32)
    Xc, Xt = cupy.asarray(X), torch.as_tensor(X, device="cuda")
    args = (np.full(k, 1.0 / k), X[:k].astype(np.float64), rng.standard_normal((k, q, d)),
            np.ones(k))
    del X
    _profiled(f"CuPy mppca_stats N={n} D={d} K={k} q={q} float32",
              lambda: mppca_stats_cupy(Xc, *args), cupy.cuda.Device().synchronize, 3,
              out_dir)
    _profiled(f"Triton mppca_stats N={n} D={d} K={k} q={q} float32",
              lambda: mppca_stats_triton(Xt, *args), torch.cuda.synchronize, 3, out_dir,
              rows=10)


def profile_flash(out_dir, n=1_000_000, d=128, k=1024, reps=3, device="cuda"):
    """Flash-GMM's E-step workload (module doc), on both backends (``device='cpu'``:
    Triton's interpreter and the CUDA emulator, a dry run at a small ``n, d, k``)."""
    import cupy

    sys.path.insert(0, os.path.dirname(__file__))
    from _patched import attributes_set, environ_set
    from benchmarks_gpu import identity_precisions
    from cupy_vs_triton import syncs

    from fastlvm.kernels import _cupy_gaussian
    from fastlvm.kernels.estep_stats import _triton_chunked as ch
    from fastlvm.kernels.estep_stats._cupy import estep_stats_cupy
    from fastlvm.kernels.estep_stats._triton import estep_stats_triton

    rng = np.random.default_rng(0)
    sync_t, sync_c = syncs(torch, cupy, device)
    X = rng.standard_normal((n, d)).astype(np.float32)
    Xt, Xc = torch.as_tensor(X, device=device), cupy.asarray(X)
    means = X[rng.choice(n, k, replace=False)].astype(np.float64)
    w = np.full(k, 1.0 / k)
    del X
    for cov in ("spherical", "diag", "tied"):
        args = (w, means, identity_precisions(cov, k, d), cov)
        for precision in ("tf32x3", "tf32"):
            with environ_set(FASTLVM_TRITON_PRECISION=precision):
                _profiled(f"Triton estep_stats {cov} N={n} D={d} K={k} float32 {precision}",
                          lambda: estep_stats_triton(Xt, *args), sync_t, reps, out_dir,
                          rows=8, device=device)
        if cov == "spherical":  # the rows shifted in the kernels, as before session 62
            with environ_set(FASTLVM_TRITON_PRECISION="tf32x3"), attributes_set(
                    ch, SHIFTED_ELEMENTS=0):
                _profiled(f"Triton estep_stats {cov} N={n} D={d} K={k} float32 tf32x3, "
                          "rows shifted in the kernels", lambda: estep_stats_triton(Xt, *args),
                          sync_t, reps, out_dir, rows=8, device=device)
        _profiled(f"CuPy estep_stats {cov} N={n} D={d} K={k} float32",
                  lambda: estep_stats_cupy(Xc, *args), sync_c, reps, out_dir, rows=8,
                  device=device)
        if cov == "spherical":  # the chunks' moments product over slabs of rows
            lines = [f"\n## CuPy estep_stats {cov} N={n} D={d} K={k} float32 by "
                     "MOMENT_SLABS\n", "| slabs | wall ms |", "|---|---|"]
            for slabs in (1, 4, 16):
                with attributes_set(_cupy_gaussian, MOMENT_SLABS=slabs):
                    wall = _wall(lambda: estep_stats_cupy(Xc, *args), sync_c, reps)
                lines.append(f"| {slabs} | {1e3 * wall:.2f} |")
            _emit("\n".join(lines) + "\n", out_dir)


def profile_vae(out_dir):
    sys.path.insert(0, os.path.dirname(__file__))
    from vae_vs_peers import _digits, eager_elbo, eager_iwae

    from fastlvm import VAE
    from fastlvm.kernels import elbo, iwae_bound

    g = torch.Generator(device="cuda").manual_seed(0)
    opts = dict(device="cuda", generator=g)
    batch, d, latent = 1024, 784, 32
    x = (torch.rand(batch, d, **opts) > 0.5).float()
    mu = torch.randn(batch, latent, **opts).requires_grad_()
    logvar = (0.1 * torch.randn(batch, latent, **opts)).requires_grad_()
    for k in (1, 50):
        logits = torch.randn(k, batch, d, **opts).requires_grad_()
        z = (mu.detach() + torch.randn(k, batch, latent, **opts)).requires_grad_()
        if k == 1:
            ins = [logits, mu, logvar]
            fused = lambda: elbo(x, logits, mu, logvar)  # noqa: E731
            eager = lambda: eager_elbo(x, logits, mu, logvar)  # noqa: E731
        else:
            ins = [logits, z, mu, logvar]
            fused = lambda: iwae_bound(x, logits, z, mu, logvar)  # noqa: E731
            eager = lambda: eager_iwae(x, logits, z, mu, logvar)  # noqa: E731
        for name, fn in (("fused", fused), ("eager", eager)):
            _profiled(f"{name} loss forward + backward, batch {batch}, D={d}, latent {latent}, "
                      f"k={k}", lambda fn=fn: torch.autograd.grad(fn().sum(), ins),
                      torch.cuda.synchronize, 20, out_dir)
    train, _ = _digits(binarise=True, size=28)
    rows = torch.as_tensor(train, device="cuda")
    vae = VAE(32, hidden_layer_sizes=(400,), batch_size=128, max_epochs=1,
              random_state=0, cuda_graph=False).fit(rows)  # the eager step's kernels
    _profiled("fastlvm.VAE: one epoch (12 Adam steps, batch 128) at D=784",
              lambda: vae.partial_fit(rows), torch.cuda.synchronize, 3, out_dir, rows=20)


def profile_peers(out_dir, reps=10, device="cuda", workloads=None):
    """The EM iteration at gpu_peers.py's workloads (module doc), from the same start
    as gpu_peers.py gives fastlvm (equal weights, means from the data, precisions of
    its mean variance): no initialisation inside the profile.  ``device='cpu'`` and
    small ``workloads`` ((cov, N, D, K), ...): a dry run (Triton's interpreter, the
    CUDA emulator)."""
    import cupy

    sys.path.insert(0, os.path.dirname(__file__))
    from cupy_vs_triton import caller, syncs
    from gpu_peers import WORKLOADS, fastlvm_start

    from fastlvm import GaussianMixture
    from fastlvm.mixture._device_em_step import GRAPH_WARMUP_STEPS

    rng = np.random.default_rng(0)
    sync_t, sync_c = syncs(torch, cupy, device)
    for cov, n, d, k in workloads or WORKLOADS:
        X = (rng.standard_normal((n, d)) + rng.integers(0, 4, (n, 1))).astype(np.float32)
        means = X[rng.choice(n, k, replace=False)].astype(np.float64)
        start = fastlvm_start(cov, k, means, float(X.astype(np.float64).var(0).mean()))
        for name, data, sync, graph in (("Triton", torch.as_tensor(X, device=device), sync_t,
                                         "auto"),
                                        ("Triton", torch.as_tensor(X, device=device), sync_t,
                                         False),
                                        ("CuPy", cupy.asarray(X), sync_c, True)):
            call = caller(name, device)  # Triton's calls on CPU tensors ask for Triton
            try:  # a diagnostic: one failure must not cost the other tables
                gm = call(GaussianMixture(**start, max_iter=1, random_state=0,
                                          cuda_graph=graph).fit, data)
                for _ in range(GRAPH_WARMUP_STEPS + 1 if graph else 0):
                    call(gm._em_iteration, data, None)  # the warm-up and the recording
                how = {"auto": "graph (default)", True: "graph", False: "eager"}[graph]
                _profiled(f"{name} EM iteration, {how}, {cov} N={n} D={d} K={k} float32",
                          lambda gm=gm, data=data, call=call: call(gm._em_iteration, data,
                                                                   None),
                          sync, reps, out_dir, rows=16, device=device)
            except Exception as exc:  # noqa: BLE001
                print(f"{name} {cov} cuda_graph={graph!r} failed: {exc!r}", flush=True)
            del data


def profile_launch(out_dir, reps=2000, device="cuda"):
    """The module doc's ``launch`` target: wall time per call, no profiler (``device``
    'cpu' runs it on a host whose Triton driver is a stand-in, as a dry run)."""
    from fastlvm.kernels import _triton_launch, elbo
    from fastlvm.kernels.variational_bounds import _triton as vb

    g = torch.Generator(device=device).manual_seed(0)
    opts = dict(device=device, generator=g)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    lines = ["", "## Host time per Triton launch (the fused ELBO kernel), us", ""]
    for batch in (4, 1024):
        x = (torch.rand(batch, 784, **opts) > 0.5).float()
        logits = torch.randn(1, batch, 784, **opts).requires_grad_()
        mu = torch.randn(batch, 32, **opts).requires_grad_()
        logvar = (0.1 * torch.randn(batch, 32, **opts)).requires_grad_()
        out = torch.empty(batch, device=device)
        bad = torch.empty(batch, dtype=torch.int32, device=device)
        d_dec, d_kl = torch.empty_like(logits), torch.empty_like(mu)
        block_r, block_d = vb._tiles(784, torch.float32)
        args = (x, logits, logits, mu, logvar, out, d_dec, out, d_kl, bad, batch, 784, 32, 1)
        constexprs = dict(BERNOULLI=True, PER_ELEMENT=False, WANT_DEC=True, WANT_LV=False,
                          BLOCK_R=block_r, BLOCK_D=block_d, WANT_KL=True, BLOCK_L=32)
        grid = (-(-batch // block_r),)
        kernel = vb._elbo_kernel
        ins = [logits, mu, logvar]

        def loss():
            torch.autograd.grad(elbo(x, logits, mu, logvar, check_input=False).sum(), ins)

        for direct in (False, True):
            _triton_launch.DIRECT_LAUNCHES = direct and _triton_launch.DIRECT_SUPPORTED
            how = ("launch_kernel (direct)" if _triton_launch.DIRECT_LAUNCHES
                   else "kernel[grid] (Triton's run)")
            if batch == 4:
                per = _wall(lambda: _triton_launch.launch_kernel(kernel, grid, *args,
                                                                 **constexprs),
                            sync, reps)
                lines.append(f"- batch {batch}, one launch, {how}: {1e6 * per:.1f}")
            per = _wall(loss, sync, reps // 10)
            lines.append(f"- batch {batch}, fused loss forward + backward, {how}: "
                         f"{1e6 * per:.1f}")
    _triton_launch.DIRECT_LAUNCHES = _triton_launch.DIRECT_SUPPORTED
    _emit("\n".join(lines) + "\n", out_dir)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", default=["cupy", "vae"],
                    help=f"any of {', '.join(sorted(TARGETS))} (module doc)")
    ap.add_argument("--out", help="append the tables to DIR/gpu-profile.txt")
    args = ap.parse_args()
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:  # before any target runs: a typo must not cost a device call's tables
        ap.error(f"unknown targets {unknown}; choose from {sorted(TARGETS)}")
    for target in args.targets:
        TARGETS[target](args.out)


TARGETS = {"cupy": profile_cupy, "vae": profile_vae, "mppca-wide": profile_mppca_wide,
           "flash": profile_flash, "peers": profile_peers, "launch": profile_launch}


if __name__ == "__main__":
    if _MISSING is not None:
        raise _MISSING
    main()

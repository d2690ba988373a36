"""The host's time in Triton's launches, on a machine without a GPU.

    python bench/triton_launch_host.py [--rounds 40] [--calls 20] [--harness]

Triton's driver is replaced by ``tests/kernels/sm90_launches.py``'s stand-in for an
sm_90 GPU, and each compiled kernel's C launcher by a no-op, so what is timed is the
host's Python, on CPU tensors:

- the fused ELBO (k = 1) and IWAE (k = 50) forward + backward at batch 1024, D = 784,
  latent 32 (issue 7's loss table);
- the eager fused EM iteration's launches (``_TritonStep.launch``: the E-step's
  statistics and the fused M-step, nothing read back) for each covariance type, at
  100k rows of 32 features ('full': 20k of 16, K = 32; 'spherical' K = 64; else K
  = 16). 'tied' and 'full' include torch's Cholesky, computed on the CPU here.

with the launches

- ``stub``: skipped (``JITFunction.run`` returns at once): the caller's own host work;
- ``before``: as before session 64: through Triton's ``JITFunction.run`` (binding,
  specialisation, cache key, globals check), with the grids and tiles from Triton's
  ``triton.cdiv`` and ``triton.next_power_of_2`` (constexpr functions in Triton
  3.9, about 2 us a host call);
- ``triton``: through ``JITFunction.run``, with the plain-Python ``cdiv`` and
  ``next_power_of_2`` of ``fastlvm.kernels._triton_launch``;
- ``direct``: through ``launch_kernel``'s relaunch, with those helpers (now).

The modes alternate round by round in one process (this VM's pace drifts). Each
prints its median microseconds per call; then the launches' share over ``stub``, and
``direct`` over ``before``.

``--harness`` times instead, at batch 2, D = 8, latent 4 (where every op's arithmetic
is negligible, so each figure is host work), in ``vae_vs_peers.py``'s harness
(``torch.autograd.grad(loss().sum(), inputs)``): the fused loss with its launches
stubbed and direct, the eager loss, and ``vae_vs_peers.floor_loss`` (one autograd
node that runs nothing). Where a GPU call is host-bound, eager / floor bounds what
any fused loss can gain over eager. Both tables stand a lambda in for the dispatch
(``resolve``), which would send CPU tensors to Numba.

Nothing runs on a device; the GPU's own figure is ``gpu_profile.py launch``.
"""

import argparse
import os
import statistics
import sys
import time

# asv imports every module of bench/ to find its benchmarks, in an environment
# without torch or triton: there the imports below fail and a run re-raises
_MISSING = None
try:
    import torch
    import triton  # noqa: F401
except ImportError as exc:
    _MISSING = exc

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stand_in_driver():
    """Install the sm_90 stand-in; return the switch that makes launches return at once."""
    sys.path.insert(0, _ROOT)
    from triton.runtime.jit import JITFunction

    from tests.kernels.sm90_launches import _fake_sm90, stand_in_launchers

    triton_run = JITFunction.run  # Triton's own, before the stand-in replaces it
    _fake_sm90(quiet=True)
    compile_only = JITFunction.run  # the stand-in's: compile and check, launch nothing
    stub, compiled = [False], set()

    def run(self, *args, grid, warmup, **kwargs):
        if self not in compiled:
            compiled.add(self)
            compile_only(self, *args, grid=grid, warmup=True, **kwargs)
        if stub[0]:
            return None
        return triton_run(self, *args, grid=grid, warmup=False, **kwargs)

    JITFunction.run = run
    stand_in_launchers(lambda *call: None)
    return stub


def _interleaved_us(fn, use, modes, rounds, calls):
    """Median microseconds per ``fn()`` in each mode, the modes alternating by round."""
    for mode in modes:  # compile, and warm up
        use(mode)
        for _ in range(3):
            fn()
    times = {mode: [] for mode in modes}
    for round_ in range(rounds):
        turn = round_ % len(modes)
        for mode in modes[turn:] + modes[:turn]:
            use(mode)
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            times[mode].append((time.perf_counter() - t) / calls)
    return {mode: 1e6 * statistics.median(t) for mode, t in times.items()}


def _report(label, us):
    print(f"{label}: " + ", ".join(f"{mode} {v:.1f} us" for mode, v in us.items())
          + f"; the launches: Triton's run {us['triton'] - us['stub']:.1f} us, "
          f"direct {us['direct'] - us['stub']:.1f} us; direct / before "
          f"{us['direct'] / us['before']:.2f}", flush=True)


def loss_modules():
    """Import every Triton kernel module the two tables launch."""
    import fastlvm.kernels.estep_stats._triton  # noqa: F401
    import fastlvm.kernels.gaussian_mstep._triton  # noqa: F401
    import fastlvm.kernels.variational_bounds._triton  # noqa: F401


def _loss_problems(batch, d, latent):
    """(bounds module, k, x, logits, mu, logvar, z, the gradients' inputs) at k = 1 and
    50: the losses' inputs, with CPU tensors sent to the Triton kernels (the dispatch
    would take Numba's)."""
    import fastlvm.kernels.variational_bounds as bounds
    from fastlvm.kernels.variational_bounds._triton import elbo_triton, iwae_bound_triton

    bounds.resolve = lambda op, impls, *a, **k: ("triton", elbo_triton if op == "elbo"
                                                 else iwae_bound_triton)
    g = torch.Generator().manual_seed(0)
    for k in (1, 50):
        x = (torch.rand(batch, d, generator=g) > 0.5).float()
        logits = torch.randn(k, batch, d, generator=g).requires_grad_()
        mu = torch.randn(batch, latent, generator=g).requires_grad_()
        logvar = (0.1 * torch.randn(batch, latent, generator=g)).requires_grad_()
        z = (mu.detach() + torch.randn(k, batch, latent, generator=g)).requires_grad_()
        ins = [logits, mu, logvar] if k == 1 else [logits, z, mu, logvar]
        yield bounds, k, x, logits, mu, logvar, z, ins


def loss_rows(use, modes, rounds, calls):
    for bounds, k, x, logits, mu, logvar, z, ins in _loss_problems(1024, 784, 32):
        if k == 1:
            def loss():
                return bounds.elbo(x, logits, mu, logvar, check_input=False)
        else:
            def loss():
                return bounds.iwae_bound(x, logits, z, mu, logvar, check_input=False)
        us = _interleaved_us(lambda: torch.autograd.grad(loss().sum(), ins), use, modes,
                             rounds, calls)
        _report(f"loss, k = {k}", us)


def harness_rows(use, rounds, calls):
    """Host time of the fused, eager and no-op losses at tiny shapes (``--harness``)."""
    sys.path.insert(0, os.path.join(_ROOT, "bench"))
    from vae_vs_peers import eager_elbo, eager_iwae, floor_loss

    batch, d = 2, 8
    for bounds, k, x, logits, mu, logvar, z, ins in _loss_problems(batch, d, 4):
        if k == 1:
            losses = {"fused": lambda: bounds.elbo(x, logits, mu, logvar, check_input=False),
                      "eager": lambda: eager_elbo(x, logits, mu, logvar),
                      "floor": lambda: floor_loss(x, logits, mu, logvar)}
        else:
            losses = {"fused": lambda: bounds.iwae_bound(x, logits, z, mu, logvar,
                                                         check_input=False),
                      "eager": lambda: eager_iwae(x, logits, z, mu, logvar),
                      "floor": lambda: floor_loss(x, logits, mu, logvar, z)}
        # a mode is a (loss, launch) pair; only the fused loss launches anything
        modes = ("fused, stub", "fused, direct", "eager", "floor")
        current = [None]

        def pick(mode):
            current[0] = losses[mode.split(",")[0]]
            use("stub" if mode == "fused, stub" else "direct")

        us = _interleaved_us(lambda: torch.autograd.grad(current[0]().sum(), ins), pick,
                             modes, rounds, calls)
        print(f"harness, k = {k}, batch {batch}, D {d}: "
              + ", ".join(f"{mode} {v:.1f} us" for mode, v in us.items())
              + f"; eager / fused (direct) {us['eager'] / us['fused, direct']:.2f}, "
              f"eager / floor {us['eager'] / us['floor']:.2f}", flush=True)


def em_rows(use, modes, rounds, calls):
    import types

    import numpy as np

    from fastlvm import GaussianMixture
    from fastlvm.mixture._device_em_step import _TritonStep

    rng = np.random.default_rng(0)
    for cov, n, d, k in (("diag", 100_000, 32, 16), ("spherical", 100_000, 32, 64),
                         ("tied", 100_000, 32, 16), ("full", 20_000, 16, 32)):
        X = rng.standard_normal((n, d)).astype(np.float32)
        gm = GaussianMixture(k, covariance_type=cov, max_iter=2, random_state=0).fit(X[:2000])
        model = types.SimpleNamespace(
            means_=torch.as_tensor(gm.means_), weights_=torch.as_tensor(gm.weights_),
            precisions_cholesky_=torch.as_tensor(gm.precisions_cholesky_),
            covariance_type=cov, reg_covar=gm.reg_covar)
        Xt = torch.as_tensor(X)
        params = _TritonStep.params(model, Xt, in_float64=False)
        us = _interleaved_us(lambda: _TritonStep.launch(model, Xt, params, None), use, modes,
                             rounds, calls)
        _report(f"EM iteration's launches, {cov}", us)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--calls", type=int, default=20, help="calls per round and mode")
    ap.add_argument("--harness", action="store_true",
                    help="the losses' host time at tiny shapes against eager and a no-op")
    args = ap.parse_args()
    stub = _stand_in_driver()

    import triton

    import fastlvm.kernels._triton_launch as launches

    loss_modules()  # imported, so that use() finds every module that took cdiv
    helpers = ("cdiv", "next_power_of_2")
    takers = [m for name, m in sorted(sys.modules.items())
              if name.startswith("fastlvm.kernels") and m is not launches
              and any(getattr(m, h, None) is getattr(launches, h) for h in helpers)]

    def use(mode):
        stub[0] = mode == "stub"
        launches.DIRECT_LAUNCHES = mode == "direct" and launches.DIRECT_SUPPORTED
        # before: Triton's own host helpers too (constexpr functions in Triton 3.9)
        for module in takers:
            for h in helpers:
                if hasattr(module, h):
                    setattr(module, h, getattr(triton if mode == "before" else launches, h))

    if args.harness:
        harness_rows(use, args.rounds, args.calls)
        return
    modes = ("stub", "before", "triton", "direct")
    loss_rows(use, modes, args.rounds, args.calls)
    em_rows(use, modes, args.rounds, args.calls)


if __name__ == "__main__":
    if _MISSING is not None:
        raise _MISSING
    main()

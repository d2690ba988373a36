"""Launch the Triton mixture kernels as on an sm_90 GPU, on a machine without one.

The Gaussian log-densities, E-step statistics and fused M-step of the four
covariance types, and the mixture of PPCA's log-densities and statistics, at
D = 130 by default (BLOCK_D = 256, the widest rows the fused Gaussian kernels take;
the mixture of PPCA's step through the features past 128), float32 and float64.

Run as a script (``tests/kernels/test_triton_compiles.py`` does, in a subprocess):
Triton's active driver is replaced by one that names an sm_90 target, and every
``kernel[grid](...)`` becomes a warm-up compile with the launch's own
specialisation (16-byte aligned pointers, ints equal to 1 or divisible by 16),
then a refusal where the compiled kernel needs more shared memory than an H100
or H200 gives a block (227 KiB), raised as the launcher raises it
(``OutOfResources``).  No kernel runs: outputs stay as allocated.  The launchers
that size their tiles through ``launch_fitted`` step down; one that launches a
fixed config past the limit fails the run, as on the device.  ('tied' at D = 130
did on an H200, 2026-12-04: the row quadratic kernel took Triton's default
three stages, 384 KiB.)

What it cannot check: anything a kernel computes, and limits other than shared
memory and (``--max-stack``) stack.  It prints each launch's kernel, shared memory,
registers and stack (spills), and tiles: ``python tests/kernels/sm90_launches.py D``
takes another width, ``--only mppca`` one family (``bench/results/sm90-spills.md``
lists the spills so found).
"""

import os
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple, Optional, Tuple

import numpy as np

SMEM = 232448  # sm_90's most shared memory per thread block


def registers_and_stack(cubin):
    """(registers, stack bytes) of a cubin by cuobjdump's resource usage (Triton's
    own copy), or None where it is missing; an error where its report has no such
    line.  Stack above a few bytes is spilled registers or an array in local memory."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], check=True, capture_output=True,
                               text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no registers and stack: {usage!r}")
    return int(found.group(1)), int(found.group(2))


class Launch(NamedTuple):
    """One launch turned into a compile: the kernel's name, its shared memory, its
    (registers, stack bytes) or None without cuobjdump, and its tiles (the launch's
    upper-case constexprs and num_* options)."""

    kernel: str
    shared: int
    usage: Optional[Tuple[int, int]]
    tiles: dict


def _fake_sm90(max_stack=None, quiet=False):
    """Make Triton compile for sm_90 and turn launches into checked compiles;
    with ``max_stack`` (bytes), a launch whose build keeps more stack fails too.
    Returns the list each launch is appended to (:class:`Launch`), which
    ``quiet`` leaves unprinted."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.errors import OutOfResources
    from triton.runtime.jit import JITFunction

    class Sm90Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(Sm90Driver())
    # launches here only compile: every one goes through JITFunction.run below
    import fastlvm.kernels._triton_launch as triton_launch

    triton_launch.DIRECT_LAUNCHES = False
    compile_only = JITFunction.run
    launches = []

    def run(self, *args, grid, warmup, **kwargs):
        kernel = compile_only(self, *args, grid=grid, warmup=True, **kwargs)
        kernel = kernel.result() if hasattr(kernel, "result") else kernel
        launch = Launch(self.fn.__name__, kernel.metadata.shared,
                        registers_and_stack(kernel.asm["cubin"]),
                        {n: v for n, v in kwargs.items() if n.isupper() or n.startswith("num_")})
        launches.append(launch)
        usage = ("" if launch.usage is None
                 else f" regs {launch.usage[0]:3d} stack {launch.usage[1]:5d}")
        if not quiet:
            print(f"{launch.kernel:28s} shared {launch.shared:7d}{usage} {launch.tiles}",
                  flush=True)
        if launch.shared > SMEM:
            raise OutOfResources(launch.shared, SMEM, "shared memory")
        if max_stack is not None and launch.usage is not None and launch.usage[1] > max_stack:
            raise AssertionError(f"{launch.kernel} {launch.tiles} keeps more than {max_stack} "
                                 f"bytes of stack:{usage}")
        return kernel

    JITFunction.run = run
    return launches


def stand_in_launchers(launcher, function=None):
    """Give every compiled kernel ``launcher`` as its C launcher and ``function`` as
    its handle, in place of loading it on a device (``CompiledKernel._init_handles``):
    Triton's ``run`` is a property over ``_run`` since Triton 3.5, an attribute
    before.  With :func:`_fake_sm90`, a launch that goes past ``kernel[grid]`` (a
    direct relaunch) reaches ``launcher``."""
    import triton.compiler.compiler as compiler

    run_is_property = isinstance(getattr(compiler.CompiledKernel, "run", None), property)

    def init_handles(self):
        self.function = function
        if run_is_property:
            self._run = launcher
        else:
            self.run = launcher

    compiler.CompiledKernel._init_handles = init_handles


def main(d=130, families=("gaussian", "mppca"), max_stack=None):
    """Launch the ``families`` ('gaussian', 'mppca') at width ``d``; ``max_stack``:
    see :func:`_fake_sm90`."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    _fake_sm90(max_stack)
    from fastlvm.kernels._triton_gaussian import GaussianTileParams
    from fastlvm.kernels.estep_stats._triton import estep_partials, estep_stats_triton
    from fastlvm.kernels.gaussian_log_prob._triton import gaussian_log_prob_triton
    from fastlvm.kernels.gaussian_mstep._triton import gaussian_mstep_triton
    from fastlvm.kernels.mppca_log_prob._triton import mppca_log_prob_triton
    from fastlvm.kernels.mppca_stats._triton import mppca_stats_triton

    rng = np.random.default_rng(0)
    # D = 130 by default: BLOCK_D = 256, the widest rows the fused kernels take (wider
    # ones take the chunked path); K = 5 within one component tile, 19 past float64's
    # and tf32x3's 16 at that width (the chunked path)
    for cov in ("full", "tied", "diag", "spherical") if "gaussian" in families else ():
        for dtype in (np.float32, np.float64):
            for n, k in ((300, 5), (300, 19)):
                X = torch.from_numpy((rng.standard_normal((n, d)) + 5).astype(dtype))
                means = X[:k].double().numpy() + 0.3
                pc = {"full": np.broadcast_to(np.eye(d), (k, d, d)).copy(),
                      "tied": np.eye(d), "diag": np.ones((k, d)),
                      "spherical": np.ones(k)}[cov]
                sw = torch.from_numpy(rng.random(n) * 2)
                print(f"# {cov} {dtype.__name__} n={n} d={d} k={k}", flush=True)
                gaussian_log_prob_triton(X, means, pc, cov)
                estep_stats_triton(X, np.full(k, 1.0 / k), means, pc, cov, sw)
                # the fused M-step on the E-step's partials (as allocated: nothing ran)
                params = GaussianTileParams(X, means, pc, cov,
                                            torch.full((k,), -np.log(k), dtype=torch.float64))
                parts = estep_partials(X, params, sw.to(params.dtype))
                center = torch.from_numpy(means if cov == "full" else means[0])
                gaussian_mstep_triton(parts.nk, parts.s1, parts.s2, parts.ll_parts, center, cov,
                                      1e-6, float(np.finfo(dtype).eps))
    for dtype in (np.float32, np.float64) if "mppca" in families else ():
        # the mixture of PPCA, q = 4 and 20 latent dimensions
        for q in (4, 20):
            print(f"# mppca {dtype.__name__} n=300 d={d} k=5 q={q}", flush=True)
            X = torch.from_numpy(rng.standard_normal((300, d)).astype(dtype))
            means = rng.standard_normal((5, d))
            components = rng.standard_normal((5, q, d)) * 0.3
            mppca_log_prob_triton(X, means, components, np.ones(5))
            mppca_stats_triton(X, np.full(5, 0.2), means, components, np.ones(5))
    print("launched")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("d", type=int, nargs="?", default=130, help="the feature count")
    parser.add_argument("--only", choices=("gaussian", "mppca"),
                        help="launch one family of kernels")
    parser.add_argument("--max-stack", type=int,
                        help="fail a launch whose build keeps more bytes of stack")
    args = parser.parse_args()
    sys.exit(main(args.d, (args.only,) if args.only else ("gaussian", "mppca"),
                  args.max_stack))

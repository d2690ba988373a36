"""The VAE bounds' Triton kernels compile for a GPU (sm_90, Hopper) on a machine
without one.

CI runs Triton through its interpreter, which executes the kernels' Python
and so never meets the compiler's rules (types of scalar arguments, constexpr
branches, casts to the output's element type).  Here each kernel is compiled
ahead of time to a cubin with Triton's bundled ptxas, in a process without
TRITON_INTERPRET (the interpreter replaces @triton.jit at import).
"""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

_SCRIPT = textwrap.dedent('''
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastlvm.kernels.gaussian_kl import _triton as kl
    from fastlvm.kernels.variational_bounds import _triton as vb

    def build(fn, types, constexprs):
        names = list(inspect.signature(fn.fn).parameters)
        signature = {n: types.get(n, "constexpr") for n in names}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm.get("cubin"), fn.fn.__name__

    for dt in ("fp32", "fp64"):
        p = "*" + dt
        ints = dict(n_batch="i32", n_features="i32", n_latent="i32", k="i32", n_rows="i32")
        ptrs = {n: p for n in ("x_ptr", "v_ptr", "lv_ptr", "mu_ptr", "qlv_ptr", "out_ptr",
                               "dv_ptr", "dlv_ptr", "dkl_ptr", "g_ptr", "gmu_ptr", "glv_ptr",
                               "mp_ptr", "lvp_ptr")}
        types = {**ptrs, **ints, "bad_ptr": "*i32", "logp_ptr": "*fp64"}
        for bernoulli, per_element in ((True, False), (False, True)):
            flags = dict(BERNOULLI=bernoulli, PER_ELEMENT=per_element, WANT_DEC=True,
                         WANT_LV=not bernoulli, BLOCK_R=4, BLOCK_D=1024)
            build(vb._elbo_kernel, types, {**flags, "WANT_KL": True, "BLOCK_L": 32})
            build(vb._reconstruction_rows_kernel, types, flags)
        build(vb._elbo_backward_kernel, types,
              dict(WANT_DEC=True, WANT_LV=True, WANT_MU=True, WANT_LOGVAR=True, BLOCK_R=4,
                   BLOCK_D=1024, BLOCK_L=32))
        build(kl._gaussian_kl_kernel, {**types, "out_ptr": "*fp64"},
              dict(HAS_PRIOR=True, BLOCK_R=16, BLOCK_L=32))
    print("compiled")
''')


@pytest.mark.slow
def test_vae_bound_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    if run.returncode and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("Triton's CUDA backend has no ptxas here")
    assert run.returncode == 0, run.stderr[-4000:]
    assert "compiled" in run.stdout

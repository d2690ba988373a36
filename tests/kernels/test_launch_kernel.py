"""``fastlvm.kernels._triton_launch.launch_kernel``: the direct relaunch of a compiled
Triton kernel picks the kernel Triton would and passes the arguments Triton would.

The first two checks run in a subprocess with the interpreter off (``@triton.jit``
gives real ``JITFunction``s there), as the sm_90 compile checks do:

- the launch key against Triton's own binder: the VAE kernels' arguments changed one
  at a time (tensors aligned and not, two dtypes; ints at 0, 1, 2, 16, 17, 32, -16,
  2^31 - 16, 2^31, 2^32 + 16 and 2^32 + 17; each constexpr flag), and every two draws
  with one launch key must have one Triton specialisation;
- the direct launch under ``sm90_launches._fake_sm90`` (launches compile, and the
  compiled kernel's launcher is a recorder): a probe kernel with a defaulted
  constexpr, launched twice, must reach the launcher the second time with the
  current stream, the compiled function and Triton's bound arguments in signature
  order; a misaligned tensor or a set launch hook must go through ``kernel[grid]``
  again; a runtime argument given by keyword is refused.  Under a Triton outside
  ``VERIFIED_TRITON`` every launch must go through ``kernel[grid]``.

The third runs in CI's own process: the interpreter's launches refuse a runtime
argument given by keyword too.
"""

import textwrap

import pytest

from tests.conftest import CUDA, HAS_TRITON
from tests.kernels.test_triton_compiles import _run_compiler

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

_KEY_SCRIPT = textwrap.dedent('''
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature

    from fastlvm.kernels import _triton_launch as launcher
    from fastlvm.kernels.variational_bounds import _triton as vb

    backend = CUDABackend(GPUTarget("cuda", 90, 32))


    def triton_key(kernel, args, kwargs):
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        _, specialization, options = binder(*args, **kwargs)
        return repr(specialization), repr(sorted(options.items()))


    base = torch.zeros(64, dtype=torch.float64)
    tensors = [base.float(), base.float()[4:], base.float()[1:], base, base[2:], base[1:],
               base.int()]
    ints = [0, 1, 2, 16, 17, 32, -16, 2**31 - 16, 2**31, 2**32 + 16, 2**32 + 17]
    for kernel, n_ptr, n_int in ((vb._elbo_kernel, 10, 4), (vb._latent_rows_kernel, 5, 3)):
        constexprs = {p.name: (16 if p.name.startswith("BLOCK") else True)
                      for p in kernel.params if p.is_constexpr}
        first = [tensors[0]] * n_ptr + [2] * n_int
        # one argument or constexpr at a time off the first draw: draws that Triton
        # tells apart (1 and 17, aligned and not, i32 and i64) share a position, so
        # a launch key that merged them would hold two specialisations
        draws = [(first[:i] + [v] + first[i + 1:], constexprs)
                 for i in range(len(first))
                 for v in (tensors if i < n_ptr else ints)]
        draws += [(first, {**constexprs, name: not value})
                  for name, value in constexprs.items() if value is True]
        seen = {}
        for args, kwargs in draws:
            key = launcher.launch_key(kernel, 0, args, kwargs)
            seen.setdefault(key, set()).add(triton_key(kernel, args, kwargs))
        coarse = {k: v for k, v in seen.items() if len(v) > 1}
        assert not coarse, (kernel.fn.__name__, next(iter(coarse.values())))
        assert len(seen) < len(draws), "no two draws share a key: the check checks nothing"
        print(kernel.fn.__name__, len(draws), "draws", len(seen), "keys",
              len(set().union(*seen.values())), "specialisations")
    print("keys checked")
''')

_PROBE = textwrap.dedent('''
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature

    from tests.kernels.sm90_launches import _fake_sm90, stand_in_launchers


    @triton.jit
    def _probe_kernel(x_ptr, y_ptr, n, scale, FLAG: tl.constexpr, BLOCK: tl.constexpr = 32):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs, mask=offs < n, other=0.0) * scale
        if FLAG:
            v = v + 1.0
        tl.store(y_ptr + offs, v, mask=offs < n)


    compiles = _fake_sm90(quiet=True)
    from triton.runtime import driver  # noqa: E402

    from fastlvm.kernels import _triton_launch as launcher  # noqa: E402

    driver.active.get_current_stream = lambda device=None: 777  # the stream to launch on

    # the fake turns them off (its launches only compile); outside the Triton versions
    # checked, every launch must take kernel[grid]
    launcher.DIRECT_LAUNCHES = launcher.DIRECT_SUPPORTED
    relaunched = []
    stand_in_launchers(lambda *call: relaunched.append(call), function=1234)
    x, y = torch.zeros(100), torch.zeros(100)

    launcher.launch_kernel(_probe_kernel, (4,), x, y, 100, 0.5, FLAG=True)
    assert len(compiles) == 1 and not relaunched
    launcher.launch_kernel(_probe_kernel, (4,), x, y, 100, 0.5, FLAG=True)
    if not launcher.DIRECT_SUPPORTED:
        assert len(compiles) == 2 and not relaunched and not launcher._COMPILED
        print("launches checked: Triton", triton.__version__, "takes kernel[grid] only")
        raise SystemExit(0)
    assert len(compiles) == 1 and len(relaunched) == 1, (compiles, relaunched)
    compiled, tail = next(iter(launcher._COMPILED.values()))
    grid_x, grid_y, grid_z, stream, function, packed, meta, enter, leave, *args = relaunched[0]
    assert (grid_x, grid_y, grid_z, stream, function) == (4, 1, 1, 777, 1234)
    assert packed is compiled.packed_metadata and (meta, enter, leave) == (None, None, None)
    binder = create_function_from_signature(_probe_kernel.signature, _probe_kernel.params,
                                            CUDABackend(GPUTarget("cuda", 90, 32)))
    bound = list(binder(x, y, 100, 0.5, FLAG=True)[0].values())
    assert len(args) == len(bound) == 6 and args[4:] == [True, 32], args
    assert all(a is b for a, b in zip(args, bound)), (args, bound)

    # another specialisation (a misaligned pointer) and a set hook go through kernel[grid]
    launcher.launch_kernel(_probe_kernel, (4,), x[1:], y, 99, 0.5, FLAG=True)
    assert len(compiles) == 2 and len(relaunched) == 1
    hook, knobs = (lambda metadata: None), triton.knobs.runtime
    chain = knobs.launch_enter_hook  # a HookChain since Triton 3.5, None or a function before
    if hasattr(chain, "add"):
        chain.add(hook)
    else:
        knobs.launch_enter_hook = hook
    launcher.launch_kernel(_probe_kernel, (4,), x, y, 100, 0.5, FLAG=True)
    assert len(compiles) == 3 and len(relaunched) == 1
    if hasattr(chain, "add"):
        chain.remove(hook)
    else:
        knobs.launch_enter_hook = chain
    launcher.launch_kernel(_probe_kernel, (4,), x, y, 100, 0.5, BLOCK=64, FLAG=True)
    launcher.launch_kernel(_probe_kernel, (4,), x, y, 100, 0.5, BLOCK=64, FLAG=True)
    assert len(compiles) == 4 and len(relaunched) == 2 and relaunched[1][-1] == 64
    try:
        launcher.launch_kernel(_probe_kernel, (4,), x, y, 100, scale=0.5, FLAG=False)
    except TypeError as exc:
        assert "scale" in str(exc) and "positionally" in str(exc), exc
    else:
        raise AssertionError("a runtime argument by keyword was taken")
    print("launches checked")
''')


@pytest.mark.slow
def test_launch_key_is_at_least_as_fine_as_tritons_specialisation():
    _run_compiler(["-c", _KEY_SCRIPT], "keys checked")


@pytest.mark.slow
def test_direct_launch_passes_what_triton_passes(tmp_path):
    probe = tmp_path / "probe.py"  # @triton.jit reads its kernel's source from a file
    probe.write_text(_PROBE)
    _run_compiler([str(probe)], "launches checked")


def test_a_runtime_argument_by_keyword_is_refused_on_every_path():
    """The interpreter's launches go through ``kernel[grid]``, and still refuse what
    a GPU's direct launch would (a runtime value in the cache key)."""
    import torch

    from fastlvm.kernels._triton_launch import launch_kernel
    from fastlvm.kernels.gaussian_kl._triton import _gaussian_kl_kernel

    mu = torch.zeros(2, 3)
    out = torch.full((2,), float("nan"), dtype=torch.float64)
    with pytest.raises(TypeError, match="'n_latent' positionally"):
        launch_kernel(_gaussian_kl_kernel, (1,), mu, mu, mu, mu, out, 2, n_latent=3,
                      HAS_PRIOR=False, BLOCK_R=4, BLOCK_L=16)
    launch_kernel(_gaussian_kl_kernel, (1,), mu, mu, mu, mu, out, 2, 3, HAS_PRIOR=False,
                  BLOCK_R=4, BLOCK_L=16)
    assert torch.equal(out, torch.zeros(2, dtype=torch.float64))  # KL(N(0, I) || N(0, I))


@pytest.mark.skipif(not CUDA, reason="direct launches need a CUDA GPU (the interpreter "
                                     "takes kernel[grid])")
def test_direct_launches_give_the_bits_of_tritons_launches_on_a_gpu(monkeypatch):
    """The fused ELBO's value and gradients, and an eager 'diag' fit, the same bits with
    every launch through Triton's ``kernel[grid]`` as with the direct relaunches, which
    the second and later calls take."""
    import numpy as np
    import torch

    from fastlvm import GaussianMixture
    from fastlvm.kernels import _triton_launch, elbo

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.rand(300, 70, device="cuda", generator=g) > 0.5).float()
    logits = torch.randn(1, 300, 70, device="cuda", generator=g).requires_grad_()
    mu = torch.randn(300, 5, device="cuda", generator=g).requires_grad_()
    logvar = (0.1 * torch.randn(300, 5, device="cuda", generator=g)).requires_grad_()
    X = torch.as_tensor(np.random.default_rng(0).standard_normal((2000, 6)), device="cuda",
                        dtype=torch.float32)

    def run():
        bound = elbo(x, logits, mu, logvar)
        grads = torch.autograd.grad(bound.sum(), [logits, mu, logvar])
        gm = GaussianMixture(3, covariance_type="diag", max_iter=5, tol=0, random_state=0,
                             cuda_graph=False).fit(X)
        return [bound.detach(), *grads, gm.means_, gm.covariances_, gm.weights_]

    monkeypatch.setattr(_triton_launch, "DIRECT_LAUNCHES", False)
    tritons = run()
    monkeypatch.setattr(_triton_launch, "DIRECT_LAUNCHES", _triton_launch.DIRECT_SUPPORTED)
    _triton_launch._COMPILED.clear()
    run()  # each specialisation's first launch: kernel[grid]
    direct = run()
    assert not _triton_launch.DIRECT_SUPPORTED or _triton_launch._COMPILED
    for a, b in zip(tritons, direct):
        assert torch.equal(a, b)


def test_host_grid_arithmetic_gives_tritons_values():
    """``cdiv`` and ``next_power_of_2`` (plain Python; Triton 3.9's are constexpr
    functions at about 2 us a host call) against Triton's own."""
    import numpy as np
    import triton

    from fastlvm.kernels._triton_launch import cdiv, next_power_of_2

    for n in [*range(-5, 1100), 2**31 - 1, 2**31, 2**31 + 1, 2**40 + 3]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 17, 64, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert next_power_of_2(np.int64(300)) == 512 and cdiv(np.int64(300), 16) == 19


def test_interpreting_is_what_the_kernels_were_decorated_as():
    """The tile tables' question is asked of a kernel, not of the environment: it is
    what ``triton.jit`` gave the kernel modules (interpreted here without a GPU),
    and a variable changed since does not move it."""
    from triton.runtime.jit import JITFunction

    from fastlvm._dispatch import triton_interpreter_on
    from fastlvm.kernels import _triton_launch
    from fastlvm.kernels.variational_bounds import _triton as vb

    assert _triton_launch.interpreting() == (not isinstance(vb._elbo_kernel, JITFunction))
    assert _triton_launch.interpreting() == (not CUDA) == triton_interpreter_on()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0" if not CUDA else "1")
        assert _triton_launch.interpreting() == (not CUDA)

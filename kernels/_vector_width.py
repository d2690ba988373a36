# Per-function vector width for Numba kernels: an intrinsic that marks the
# function calling it for 512-bit vectors.
#
# Design: LLVM prefers 256-bit vectors on x86 even where the CPU has AVX-512
# (its `prefer-256-bit` tuning, against the clock drop wide code can bring),
# and Numba compiles every function for one process-wide target.  The loops of
# the 'diag' and 'spherical' E-step (distances, exponentials, responsibilities,
# moments over an L1-resident tile) are bound by their arithmetic, and ran
# 10-15% faster at 512 bits on the Xeon measured, and 'full''s Mahalanobis blocks
# 3-6%, while 'full' ran 5% slower with the whole process switched and 'tied''s
# transform lost 5-10% (bench/results/cpu-2core-epyc-em-iteration.md, session
# 23); the VAE's Bernoulli pixel rows gained 7-17%, and the KL row to N(0, I)
# (four lanes wide beside its float64 sum at the default, eight at 512 bits)
# took 7-13% off the fused ELBO forward.  So the functions that gain opt in, one
# by one, through LLVM's per-function string attributes; everything else keeps
# the target's default.
# Limits: the hint covers the function whose body calls it, not its callees
# (each njit helper is vectorised when it is compiled, before it is inlined);
# it does nothing on a CPU without AVX-512; Numba's cache keys on the CPU and
# its features, so code compiled wide is never loaded on another CPU.
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


class _WideVectorAttributes(ir.values.FunctionAttributes):
    """A function's attributes plus LLVM's per-function vector-width hints.

    llvmlite writes only the attributes it knows; these two are LLVM string
    attributes.  ``prefer-vector-width`` lets the loop vectoriser pick 512-bit
    vectors where the target's default prefers 256; ``min-legal-vector-width``
    keeps the X86 back end from splitting them again (it merges into any
    function this one is inlined into).  On a target without AVX-512 both are
    no-ops: the vectoriser never goes wider than the target's registers.
    """

    _HINTS = ('"prefer-vector-width"="512"', '"min-legal-vector-width"="512"')

    def __bool__(self):  # llvmlite omits an empty attribute set
        return True

    def _to_list(self, ret_type):
        return super()._to_list(ret_type) + list(self._HINTS)


@intrinsic
def prefer_wide_vectors(typingctx):
    """Compile the calling function's loops for 512-bit vectors where the CPU has them.

    Called anywhere in a compiled function, it marks that whole function
    (not its callees: each helper is vectorised when it is compiled, before it
    is inlined, and a function inlined at Numba's level marks its caller).
    It emits no code.  See the module header for when it pays.
    """
    def codegen(context, builder, signature, args):
        fn = builder.function
        if not isinstance(fn.attributes, _WideVectorAttributes):
            wide = _WideVectorAttributes()
            for name in fn.attributes:
                wide.add(name)
            wide.alignstack = fn.attributes.alignstack
            wide.personality = fn.attributes.personality
            fn.attributes = wide
        return context.get_dummy_value()

    return types.none(), codegen

"""The precisions of the GPU backends' float32 products, and the environment
switches that choose them (``FASTLVM_TRITON_PRECISION``, ``FASTLVM_CUPY_PRECISION``).

'tf32x3': float32 accuracy on TF32 tensor cores (each operand split into a TF32
part and its remainder, three products); 'tf32': one TF32 product (10-bit
inputs); 'ieee': the FMA units.  Each backend chooses its default
(``_triton_gaussian.dot_precision``, ``_cupy_tf32.dot_precision``).
"""

import os

PRECISIONS = ("tf32x3", "tf32", "ieee")


def requested_precision(env_var):
    """The precision the environment variable ``env_var`` asks for, or None where
    it is unset or empty; any other value is refused, naming the choices."""
    value = os.environ.get(env_var, "").strip().lower()
    if not value:
        return None
    if value not in PRECISIONS:
        raise ValueError(f"{env_var}={value!r}; use one of {PRECISIONS}.")
    return value

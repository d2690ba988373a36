"""The whole Adam step of a VAE with multilayer-perceptron networks, on the CPU.

Internal: :class:`fastlvm.VAE` runs it for its default networks on CPU data
(``training_step='fused'``, see :mod:`fastlvm.vae._fused_step`).  Both
implementations take the same arguments and update ``theta``, the gradient
buffer and Adam's moments in place; see ``_numba.vae_mlp_step_numba``.
"""

from fastlvm._dispatch import lazy

IMPLEMENTATIONS = {
    "reference": lazy("fastlvm.kernels.vae_mlp_step._reference", "vae_mlp_step_ref"),
    "numba": lazy("fastlvm.kernels.vae_mlp_step._numba", "vae_mlp_step_numba"),
}

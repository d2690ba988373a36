"""The whole Adam step of a VAE with multilayer-perceptron networks, on the CPU.

Internal: :class:`fastlvm.VAE` runs it for its default networks on CPU data
(``training_step='fused'``, see :mod:`fastlvm.vae._fused_step`), for the
ELBO and the importance-weighted bound.  Both
implementations take the same arguments and update ``theta``, the gradient
buffer and Adam's moments in place; see ``_numba.vae_mlp_step_numba``.
"""

from fastlvm._dispatch import lazy

# the objectives: the ELBO (KL in closed form), and the importance-weighted bound
# with the plain reparameterised, sticking-the-landing or doubly reparameterised
# gradient (see ``fastlvm.kernels.iwae_bound``)
ELBO, IWAE, IWAE_STL, IWAE_DREG = 0, 1, 2, 3
OBJECTIVES = {("elbo", "reparam"): ELBO, ("iwae", "reparam"): IWAE, ("iwae", "stl"): IWAE_STL,
              ("iwae", "dreg"): IWAE_DREG}

IMPLEMENTATIONS = {
    "reference": lazy("fastlvm.kernels.vae_mlp_step._reference", "vae_mlp_step_ref"),
    "numba": lazy("fastlvm.kernels.vae_mlp_step._numba", "vae_mlp_step_numba"),
}

"""One Adam step of ``fastlvm.VAE``'s training, eagerly or replayed from a CUDA graph.

At the batch sizes VAEs train with (around 128 rows), a step on a GPU is host
work: dozens of kernel launches for the networks, the fused bound and the
optimiser, and autograd's bookkeeping around them, for little device time (an
H200 trained 40,000 examples a second, 3.2 ms a step of 128 rows:
bench/results/gpu-h200.md).  A CUDA graph records
the step's kernels once and replays them with one launch.

``GraphedStep`` keeps every tensor a step reads in static buffers (the batch,
the standard-normal draws, the running loss), so that the recorded kernels
can be replayed on new data:

1. the batch is gathered into ``x`` and the draws are made into ``eps`` from
   the training generator, outside the graph, with the same calls and in the
   same order of the random stream as the eager step;
2. the first ``WARMUP_STEPS`` steps of a run are real training steps, run
   eagerly on a side stream, as PyTorch's whole-network capture asks (they
   build the optimiser's state, compile the Triton kernels and settle the
   caching allocator before recording);
3. the next step records forward, backward, Adam and the loss sum, then
   replays them; every later full batch is a replay.

A batch of another size (the short last one of an epoch) runs eagerly on the
same buffers' code.  On a CPU tensor there is no graph: every step runs
eagerly on the static buffers, which is what the tests compare with the plain
step, value for value (they also run the GPU course on CPU tensors, the recording
and its replays stood in for by ``tests/torch_graphs.py``).  Limits: the networks
must be capturable (no reads back to the host, no shapes that depend on data); Adam
must be built with ``capturable=True`` on a GPU; a capture that fails raises, naming
the option.
"""

import copy

import torch

from fastlvm.kernels._vae_checks import autocast_enabled

WARMUP_STEPS = 3


class EagerStep:
    """The plain step: gather the batch, draw inside the bound, backward, Adam."""

    def __init__(self, vae):
        self.vae = vae
        self.total = None

    def start_epoch(self, X):
        """Zero the epoch's running sum of the bound (float64, on X's device); take
        up a ``learning_rate`` set since the last epoch."""
        self.total = torch.zeros((), dtype=torch.float64, device=X.device)
        self._follow_learning_rate()

    def _follow_learning_rate(self):
        """Give Adam the model's ``learning_rate``; whether it changed."""
        lr = float(self.vae.learning_rate)
        changed = False
        for group in self.vae._optimizer.param_groups:
            changed |= group["lr"] != lr
            group["lr"] = lr
        return changed

    def saved_state(self):
        """A copy of what the steps change besides the networks: Adam's state."""
        return copy.deepcopy(self.vae._optimizer.state_dict())

    def load_state(self, state):
        """Put back :meth:`saved_state`'s copy."""
        self.vae._optimizer.load_state_dict(state)

    def __call__(self, X, index, gen, weights=None):
        """One step on the rows ``index`` of X; ``weights`` (n_samples,) float64, the
        rows' weights relative to their mean, or None."""
        self.vae._optimizer.zero_grad(set_to_none=True)
        self._train(X[index], gen, weights=None if weights is None else weights[index])

    def _train(self, x, gen, eps=None, weights=None):
        """Forward (draws from ``gen``, or the given ``eps``), backward, Adam and
        the loss sum: the step itself, with gradients already cleared.  The loss
        is -mean_b(c_b bound_b), c the batch's relative weights (``weights``)."""
        vae = self.vae
        bound = vae._bound(x, vae.n_samples, gen, vae.objective, vae.gradient_estimator,
                           eps=eps)
        if weights is not None:
            bound = bound * weights.to(bound.dtype)
        (-bound.mean()).backward()
        vae._optimizer.step()
        if autocast_enabled(x.device.type):
            # autocast keeps its low-precision copies of the parameters until its
            # outermost region exits, which a fit inside one never does: without
            # this, every step would run the first step's weights
            torch.clear_autocast_cache()
        self.total += bound.detach().sum()


class GraphedStep(EagerStep):
    """The step on static buffers, captured as a CUDA graph on a GPU (see module doc).

    Parameters
    ----------
    vae : fastlvm.VAE
        Built (networks, optimiser) on the training data's device and dtype.
    n_rows : int
        The full batch size: the shape the buffers, and the graph, are for.
    n_features : int
    """

    def __init__(self, vae, n_rows, n_features):
        super().__init__(vae)
        device, dtype = vae._device, vae._dtype
        self.on_gpu = device.type == "cuda"
        self.x = torch.empty((n_rows, n_features), device=device, dtype=dtype)
        self.eps = torch.empty((vae.n_samples, n_rows, vae.n_components), device=device,
                               dtype=dtype)
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.weights = None  # the batch's relative sample weights, with sample_weight
        self.graph = None
        self.steps = 0

    def start_epoch(self, X):
        self.total.zero_()
        if self._follow_learning_rate():  # a recorded graph holds the old step size
            self.graph, self.steps = None, 0

    def load_state(self, state):
        """Put back Adam's state; the graph, which read the replaced state tensors,
        is dropped and recorded anew after the warm-up steps."""
        super().load_state(state)
        self.graph, self.steps = None, 0

    def __getstate__(self):
        """A graph cannot be pickled or copied: a copy warms up and records anew."""
        state = self.__dict__.copy()
        state["graph"], state["steps"] = None, 0
        return state

    def _body(self):
        """The step on the static buffers."""
        self._train(self.x, None, self.eps, self.weights)

    def __call__(self, X, index, gen, weights=None):
        if index.shape[0] != self.x.shape[0]:  # a short batch: the plain step
            return super().__call__(X, index, gen, weights)
        if (weights is None) != (self.weights is None):  # the graph has no such buffer
            self.weights = None if weights is None else torch.empty(
                self.x.shape[0], dtype=torch.float64, device=self.x.device)
            self.graph, self.steps = None, 0
        if weights is not None:
            torch.index_select(weights, 0, index, out=self.weights)
        torch.index_select(X, 0, index, out=self.x)
        # the eager step draws (k, batch, L) from gen after the encoder, which
        # draws nothing: the same numbers in the same order
        torch.randn(self.eps.shape, generator=gen, out=self.eps)
        optimizer = self.vae._optimizer
        if self.graph is not None:
            self.graph.replay()
        elif not self.on_gpu:
            optimizer.zero_grad(set_to_none=True)
            self._body()
        elif self.steps < WARMUP_STEPS:
            self._warm_up(optimizer)
        else:
            self._capture(optimizer)
            self.graph.replay()
        self.steps += 1

    def _warm_up(self, optimizer):
        side = torch.cuda.Stream(device=self.x.device)
        side.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(side):
            optimizer.zero_grad(set_to_none=True)
            self._body()
        torch.cuda.current_stream(self.x.device).wait_stream(side)

    def _capture(self, optimizer):
        graph = torch.cuda.CUDAGraph()
        # gradients recorded as fresh tensors in the graph's own memory, so that
        # each replay writes them rather than adding to the last step's
        optimizer.zero_grad(set_to_none=True)
        try:
            with torch.cuda.graph(graph):
                self._body()
        except RuntimeError as exc:
            raise RuntimeError(
                f"cuda_graph={self.vae.cuda_graph!r} could not record the training step "
                f"as a CUDA graph ({exc}). Networks that read values back to the host or "
                "change shape with the data cannot be captured; fit with "
                "cuda_graph=False.") from exc
        self.graph = graph

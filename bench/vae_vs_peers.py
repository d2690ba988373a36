"""Issue 7's side-by-side figures: the fused VAE losses and VAE training.

    python bench/vae_vs_peers.py [--quick] [--device cpu|cuda]

1. The loss with its gradient (forward + backward) at batch 1024, D=784,
   latent 32 and 128, k=1 (the ELBO, KL in closed form) and k=50 (the IWAE
   bound): fastlvm's fused kernels against the same loss in eager PyTorch and
   under ``torch.compile``.  Medians of timings taken in turn (fused, eager,
   compiled, fused, ...), gradients taken with ``torch.autograd.grad``
   (nothing accumulates).  The fused loss is timed as called by default (it
   checks x's support, which on a GPU reads a count back: one wait per call)
   and with ``check_input=False`` (x checked once beforehand, as fastlvm.VAE
   does; eager and compiled check nothing).
2. Training throughput (examples per second) of the same VAE -- MLP encoder and
   decoder, Adam, batch 128, ELBO with the KL in closed form -- written with
   fastlvm.VAE and with Pyro (SVI + TraceMeanField_ELBO), on binarised digits
   resampled to 28 x 28 (D = 784, MNIST's size), and the final test ELBO of
   both (evaluated by the same code).  fastlvm.VAE runs its default step (on the
   CPU the fused one, a Numba call a step) and, beside it, the autograd step
   (torch modules, the fused bound through autograd, torch's Adam); on a GPU
   also the autograd step replayed from a CUDA graph.  The last columns are the
   rate of the networks' forward, backward and Adam alone in eager torch, the
   ceiling of any eager implementation.
3. The importance-sampled test log-likelihood (5000 samples) of fastlvm.VAE on
   sklearn's digits: binarised (Bernoulli) and continuous grey levels
   (Gaussian, learned variance).

Prints markdown tables; ratios come from one run on one machine.
"""

import argparse
import math
import platform
import time

import numpy as np
from sklearn.datasets import load_digits

# asv imports every module of bench/ to find its benchmarks, in an environment
# without torch: there the imports below fail and a run of the script re-raises
_MISSING = None
try:
    import torch
    import torch.nn.functional as F

    from fastlvm import VAE
    from fastlvm.kernels import elbo, iwae_bound
except ImportError as exc:
    _MISSING = exc
    torch = F = VAE = elbo = iwae_bound = None


def _interleaved_median_ms(fns, repeat, device):
    """Median milliseconds of each function in ``fns`` (a dict), timed in turn.

    Each round times every function once, so drift of a shared machine (other
    tenants, clock changes) falls on all of them alike; timing one function
    after another let the same eager loss move by 1.7x between neighbouring
    rows.  The order rotates from round to round: a call finds the caches as
    the one before it left them (on the 2-core VM the first fastlvm call after
    eager's passes over its temporaries took 10-15% longer than the same call
    right after it), and rotating spreads that over every function alike.
    Two untimed rounds warm up first.
    """
    times = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(repeat + 2):
        turn = round_ % len(names)
        for name in names[turn:] + names[:turn]:
            fn = fns[name]
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if round_ >= 2:
                times[name].append(time.perf_counter() - t)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def eager_elbo(x, logits, mu, logvar):
    recon = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits),
                                                reduction="none").sum(-1).mean(0)
    return recon - 0.5 * (logvar.exp() + mu * mu - 1.0 - logvar).sum(-1)


def eager_iwae(x, logits, z, mu, logvar):
    recon = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits),
                                                reduction="none").sum(-1)
    log_q = (-0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar)).sum(-1)
    log_p = (-0.5 * z * z).sum(-1)
    return torch.logsumexp(recon + log_p - log_q, 0) - math.log(z.shape[0])


class _HarnessFloor(torch.autograd.Function if torch is not None else object):
    """The harness with a loss of one autograd node that does nothing: its forward
    returns an unfilled (batch,) tensor and its backward unfilled gradients, so no
    kernel runs inside the loss.  What is left is the harness's own cost (the
    autograd call, ``.sum()`` and its backward's fill, the synchronisation), the
    least any fused loss (itself one node) takes in it: eager / floor is the most
    such a loss can gain over eager here.  A loss built of torch ops costs more:
    on the 2-core VM at batch 2, D = 8, where every op's arithmetic is negligible,
    ``logits.sum(-1).mean(0) + (mu + logvar).sum(-1)`` took 74 us in this
    harness against this node's 52 (``bench/triton_launch_host.py --harness``)."""

    @staticmethod
    def forward(ctx, x, *inputs):
        ctx.shapes = [t.shape for t in inputs]
        return x.new_empty(x.shape[0])

    @staticmethod
    def backward(ctx, grad):
        return (None, *(grad.new_empty(shape) for shape in ctx.shapes))


def floor_loss(x, logits, mu, logvar, z=None):
    """:class:`_HarnessFloor` on the inputs the losses' gradients go to."""
    return _HarnessFloor.apply(x, logits, mu, logvar, *(() if z is None else (z,)))


def _warm_allocator():
    """Put glibc's allocator in the state a long-running process reaches.

    glibc serves a block above its mmap threshold with fresh pages, and raises
    the threshold (up to 32 MB) when such a block is freed.  Before that, every
    eager loss call at batch 1024 paid page faults for its 3 MB temporaries;
    after the k = 50 rows had freed larger blocks, the same call took 2.2 ms
    instead of 3.3-5 ms, so rows timed before and after differed by their
    place in the table.  Freeing one 30 MB block first gives every row the
    faster state (eager PyTorch's best case; the fused loss's buffers gain
    too)."""
    block = np.ones(30 << 20, dtype=np.uint8)
    del block


def loss_table(device, quick):
    if device == "cpu":
        _warm_allocator()
    g = torch.Generator(device=device).manual_seed(0)
    batch, d = 1024, 784
    rows = []
    for latent in (32, 128):
        for k in (1, 50):
            opts = dict(device=device, generator=g)
            x = (torch.rand(batch, d, **opts) > 0.5).float()
            logits = torch.randn(k, batch, d, **opts).requires_grad_()
            mu = torch.randn(batch, latent, **opts).requires_grad_()
            logvar = (0.1 * torch.randn(batch, latent, **opts)).requires_grad_()
            z = (mu.detach() + torch.randn(k, batch, latent, **opts)).requires_grad_()
            if k == 1:
                ins = [logits, mu, logvar]
                fused = lambda: elbo(x, logits, mu, logvar)  # noqa: E731
                unchecked = lambda: elbo(x, logits, mu, logvar, check_input=False)  # noqa: E731
                eager = lambda: eager_elbo(x, logits, mu, logvar)  # noqa: E731
                compiled_fn = torch.compile(eager_elbo)
                compiled = lambda: compiled_fn(x, logits, mu, logvar)  # noqa: E731
                floor = lambda: floor_loss(x, logits, mu, logvar)  # noqa: E731
            else:
                ins = [logits, z, mu, logvar]
                fused = lambda: iwae_bound(x, logits, z, mu, logvar)  # noqa: E731
                unchecked = lambda: iwae_bound(x, logits, z, mu, logvar,  # noqa: E731
                                               check_input=False)
                eager = lambda: eager_iwae(x, logits, z, mu, logvar)  # noqa: E731
                compiled_fn = torch.compile(eager_iwae)
                compiled = lambda: compiled_fn(x, logits, z, mu, logvar)  # noqa: E731
                floor = lambda: floor_loss(x, logits, mu, logvar, z)  # noqa: E731
            # quick: few rounds of the slow k = 50 calls; a 1 ms call can afford 21
            repeat = (7 if k > 1 else 41) if not quick else (3 if k > 1 else 21)
            times = _interleaved_median_ms(
                {name: lambda fn=fn: torch.autograd.grad(fn().sum(), ins)
                 for name, fn in (("fused", fused), ("unchecked", unchecked), ("eager", eager),
                                  ("compile", compiled), ("floor", floor))},
                repeat, device)
            check = (fused() - eager()).abs().max().item()
            rows.append((latent, k, times, check))
    print(f"\n### Loss forward + backward, batch {batch}, D={d}, float32, {device}\n")
    print("| latent | k | objective | fastlvm (ms) | fastlvm, check_input=False (ms) "
          "| eager (ms) | torch.compile (ms) | floor (ms) | eager / fastlvm "
          "| eager / unchecked | eager / floor | compile / fastlvm | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for latent, k, t, check in rows:
        obj = "ELBO" if k == 1 else "IWAE"
        print(f"| {latent} | {k} | {obj} | {t['fused']:.2f} | {t['unchecked']:.2f} | "
              f"{t['eager']:.2f} | {t['compile']:.2f} | {t['floor']:.2f} | "
              f"{t['eager'] / t['fused']:.2f}x | {t['eager'] / t['unchecked']:.2f}x | "
              f"{t['eager'] / t['floor']:.2f}x | {t['compile'] / t['fused']:.2f}x | "
              f"{check:.1e} |")
    print("\n(floor: a loss of one autograd node that runs no kernel, timed in the same "
          "harness; eager / floor is the most a fused loss can gain over eager here.)")


def _digits(binarise, size=8):
    """sklearn's digits, 1500 train / 297 test rows; ``size=28`` resamples the 8 x 8
    images to MNIST's 28 x 28 (bilinear), for MNIST-scale D = 784 on offline data."""
    X = load_digits().data / 16.0
    if size != 8:
        from scipy.ndimage import zoom

        X = zoom(X.reshape(-1, 8, 8), (1, size / 8, size / 8), order=1).reshape(len(X), -1)
        X = np.clip(X, 0.0, 1.0)
    if binarise:
        X = (X > 0.5).astype(np.float64)
    X = X.astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(X))
    return X[perm[:1500]], X[perm[1500:]]


def pyro_vae(train, latent, hidden, epochs, batch, seed, device="cpu", autocast=None):
    """The same VAE in Pyro: (encoder, decoder, examples per second).  ``autocast``
    (a dtype): each step runs inside its own ``torch.autocast`` region, as a
    mixed-precision training loop does."""
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, TraceMeanField_ELBO

    from fastlvm.vae._networks import default_networks

    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    encoder, decoder = default_networks(train.shape[1], latent, hidden)
    encoder, decoder = encoder.to(device), decoder.to(device)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z), validate_args=False)
                        .to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            h = encoder(x)
            pyro.sample("z", dist.Normal(h[:, :latent], torch.exp(0.5 * h[:, latent:]))
                        .to_event(1))

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=TraceMeanField_ELBO())
    X = torch.from_numpy(train).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    _synchronize(device)
    t = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=gen, device=device)
        for start in range(0, len(X), batch):
            with torch.autocast(torch.device(device).type, dtype=autocast,
                                enabled=autocast is not None):
                svi.step(X[order[start:start + batch]])
    _synchronize(device)
    rate = epochs * len(X) / (time.perf_counter() - t)
    return encoder, decoder, rate


def _test_elbo(encoder, decoder, test, latent, samples=10):
    device = next(encoder.parameters()).device
    x = torch.from_numpy(test).to(device)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        h = encoder(x)
        mu, logvar = h[:, :latent], h[:, latent:]
        eps = torch.randn(samples, *mu.shape, generator=g).to(device)
        return float(elbo(x, decoder(mu + torch.exp(0.5 * logvar) * eps), mu, logvar).mean())


def _synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def networks_floor_rate(rows, latent, hidden, batch, epochs, device, seed=0):
    """examples/s of the same networks' forward and backward and fused Adam alone.

    Each step gathers a shuffled batch, draws z = mu + sigma eps by the
    reparameterisation and back-propagates the sum of the decoder's output and
    of logvar (a loss that costs nothing), so no implementation of this VAE --
    fastlvm's, Pyro's, hand-written torch -- trains faster on this device with
    eager torch: its rate over Pyro's is the highest ratio eager training can
    reach here.  One untimed epoch warms up first.
    """
    from fastlvm.vae._networks import default_networks
    from fastlvm.vae._vae import _adam

    torch.manual_seed(seed)
    encoder, decoder = default_networks(rows.shape[1], latent, hidden)
    encoder, decoder = encoder.to(device), decoder.to(device)
    optimizer = _adam(list(encoder.parameters()) + list(decoder.parameters()), 1e-3)
    gen = torch.Generator(device=device).manual_seed(seed)

    def epoch():
        order = torch.randperm(len(rows), generator=gen, device=device)
        for start in range(0, len(rows), batch):
            h = encoder(rows[order[start:start + batch]])
            mu, logvar = h[:, :latent], h[:, latent:]
            eps = torch.randn(mu.shape, generator=gen, device=device)
            loss = decoder(mu + torch.exp(0.5 * logvar) * eps).sum() + logvar.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    epoch()
    _synchronize(device)
    t = time.perf_counter()
    for _ in range(epochs):
        epoch()
    _synchronize(device)
    return epochs * len(rows) / (time.perf_counter() - t)


def _fit_rate(rows, latent, hidden, batch, epochs, device, warm_up=True, autocast=None,
              **options):
    """(examples per second of a timed fit, the fitted VAE), after a one-epoch warm-up
    (``warm_up``) over the same batches, the short last one too, so that every
    kernel shape (Triton compiles one per shape class) is built before timing.
    ``options``: ``training_step`` and ``cuda_graph``; ``autocast`` (a dtype):
    the fits run inside ``torch.autocast``."""
    params = dict(hidden_layer_sizes=hidden, batch_size=batch, random_state=0, **options)
    with torch.autocast(torch.device(device).type, dtype=autocast,
                        enabled=autocast is not None):
        if warm_up:
            VAE(latent, max_epochs=1, **params).fit(rows)
        _synchronize(device)
        t = time.perf_counter()
        vae = VAE(latent, max_epochs=epochs, **params).fit(rows)
        _synchronize(device)
    return epochs * rows.shape[0] / (time.perf_counter() - t), vae


def training_table(quick, device="cpu"):
    """examples/s of fastlvm.VAE and Pyro on the same data and networks: fastlvm's
    default step (fused on the CPU) and its autograd step; on a GPU the default
    (``cuda_graph='auto'``: the autograd step replayed from a CUDA graph, its
    warm-up and capture inside the timed fit) and the plain autograd step.  The
    "networks alone" column is :func:`networks_floor_rate`: its ratio to Pyro
    bounds what any eager implementation of the same VAE can reach here.

    Each implementation trains from the same seed once per round, in turn, for
    several rounds; the table gives each one's median rate and the median over
    rounds of its rate over Pyro's in the same round, so a slow spell of a
    shared machine lands on every column alike.
    """
    variants = [("fastlvm.VAE", {}), ("autograd step", {"training_step": "autograd"})]
    if torch.device(device).type == "cuda":  # the default: the graphed autograd step
        variants = [("fastlvm.VAE, cuda_graph=False", {"cuda_graph": False}),
                    ("fastlvm.VAE", {})]
    rounds = 3 if quick else 5
    print("\n### Training throughput, binarised digits (1500 train rows), batch 128, Adam, "
          f"ELBO (closed-form KL), {device} float32; medians of {rounds} interleaved "
          "rounds\n")
    names = [name for name, _ in variants]
    print("| D | latent, hidden | epochs | "
          + " | ".join(f"{name} (examples/s)" for name in names) + " | Pyro (examples/s) | "
          + " | ".join(f"{name} / Pyro" for name in names)
          + " | networks alone (examples/s) | networks alone / Pyro | "
          + " | ".join(f"test ELBO {name}" for name in names) + " | test ELBO Pyro |")
    print("|---" * (7 + 3 * len(variants)) + "|")
    for size, latent, hidden in ((8, 16, (256,)), (28, 32, (400,))):
        train, test = _digits(binarise=True, size=size)
        rows = torch.as_tensor(train, device=device)  # fastlvm.VAE trains where X is
        batch = 128
        epochs = (10 if size == 28 else 20) if quick else (30 if size == 28 else 100)
        pyro_vae(train, latent, hidden, 1, batch, seed=0, device=device)  # warm-up
        fits, pyro_fit = [], None
        rates = [[] for _ in range(len(variants) + 2)]  # variants, Pyro, networks alone
        for r in range(rounds):
            for i, (_, options) in enumerate(variants):
                rate, fitted = _fit_rate(rows, latent, hidden, batch, epochs, device,
                                         warm_up=r == 0, **options)
                rates[i].append(rate)
                fits.append(fitted)
            enc, dec, theirs = pyro_vae(train, latent, hidden, epochs, batch, seed=0,
                                        device=device)
            pyro_fit = pyro_fit or (enc, dec)
            rates[-2].append(theirs)
            rates[-1].append(networks_floor_rate(rows, latent, hidden, batch, epochs,
                                                 device))
        rates = np.array(rates)
        median = np.median(rates, axis=1)
        over_pyro = np.median(rates / rates[-2], axis=1)
        # each variant's test ELBO from its first round's fit (every round's is equal)
        elbos = [_test_elbo(vae.encoder_, vae.decoder_, test, latent)
                 for vae in fits[:len(variants)]]
        print(f"| {size * size} | {latent}, {hidden} | {epochs} | "
              + " | ".join(f"{m:,.0f}" for m in median[:-2]) + f" | {median[-2]:,.0f} | "
              + " | ".join(f"{q:.2f}x" for q in over_pyro[:-2])
              + f" | {median[-1]:,.0f} | {over_pyro[-1]:.2f}x | "
              + " | ".join(f"{e:.3f}" for e in elbos)
              + f" | {_test_elbo(*pyro_fit, test, latent):.3f} |")


def mixed_precision_table(quick, device="cpu"):
    """Training throughput in bfloat16 mixed precision (torch.autocast) against
    float32, for fastlvm.VAE and Pyro alike, at D = 784: both libraries' layers
    then run in bfloat16 (AMX on a recent Xeon, tensor cores on a GPU) while
    their parameters, losses and Adam stay in float32.  fastlvm.VAE fits inside
    one autocast region, as a user would call it; Pyro's loop opens one a step.
    Interleaved rounds and medians as in :func:`training_table`; ratios are to
    Pyro in float32 and, for the bfloat16 rows, to Pyro in bfloat16 too."""
    rounds = 3 if quick else 5
    epochs = 10 if quick else 30
    latent, hidden, batch = 32, (400,), 128
    train, test = _digits(binarise=True, size=28)
    rows = torch.as_tensor(train, device=device)
    bf16 = torch.bfloat16
    runs = [("fastlvm.VAE, float32", "fastlvm", None), ("Pyro, float32", "pyro", None),
            ("fastlvm.VAE, bfloat16 autocast", "fastlvm", bf16),
            ("Pyro, bfloat16 autocast", "pyro", bf16)]
    for _, lib, autocast in runs:  # warm-up (the fits warm themselves up)
        if lib == "pyro":
            pyro_vae(train, latent, hidden, 1, batch, seed=0, device=device,
                     autocast=autocast)
    rates, elbos = [[] for _ in runs], [None] * len(runs)
    for r in range(rounds):
        for i, (_, lib, autocast) in enumerate(runs):
            if lib == "fastlvm":
                rate, vae = _fit_rate(rows, latent, hidden, batch, epochs, device,
                                      warm_up=r == 0, autocast=autocast)
                nets = (vae.encoder_, vae.decoder_)
            else:
                *nets, rate = pyro_vae(train, latent, hidden, epochs, batch, seed=0,
                                       device=device, autocast=autocast)
            rates[i].append(rate)
            elbos[i] = elbos[i] or _test_elbo(*nets, test, latent)
    rates = np.array(rates)
    over_pyro32 = np.median(rates / rates[1], axis=1)
    over_pyro16 = np.median(rates / rates[3], axis=1)
    print(f"\n### Mixed precision, binarised digits at D = 784 (1500 train rows), latent "
          f"{latent}, hidden {hidden}, batch {batch}, {epochs} epochs, {device}; medians of "
          f"{rounds} interleaved rounds\n")
    print("| run | examples/s | / Pyro float32 | / Pyro bfloat16 | test ELBO |")
    print("|---|---|---|---|---|")
    for i, (name, _, autocast) in enumerate(runs):
        same = f"{over_pyro16[i]:.2f}x" if autocast is not None else ""
        print(f"| {name} | {np.median(rates[i]):,.0f} | {over_pyro32[i]:.2f}x | {same} | "
              f"{elbos[i]:.3f} |")


def likelihood_table(quick):
    epochs = 30 if quick else 300
    samples = 500 if quick else 5000
    print(f"\n### Test log-likelihood on sklearn's digits (297 test rows), "
          f"{samples} importance samples, {epochs} epochs\n")
    print("| data | likelihood | objective | test ELBO | test log p(x) (IS) |")
    print("|---|---|---|---|---|")
    for binarise, likelihood in ((True, "bernoulli"), (False, "gaussian")):
        train, test = _digits(binarise)
        for objective, k, estimator in (("elbo", 1, "reparam"), ("iwae", 10, "dreg")):
            vae = VAE(16, likelihood=likelihood, objective=objective, n_samples=k,
                      gradient_estimator=estimator, hidden_layer_sizes=(256,),
                      max_epochs=epochs, random_state=0).fit(train)
            data = "binarised" if binarise else "grey levels"
            print(f"| {data} | {likelihood} | {objective} k={k} ({estimator}) | "
                  f"{vae.elbo(test, n_samples=10):.3f} | "
                  f"{vae.score(test, n_samples=samples):.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    loss_table(args.device, args.quick)
    training_table(args.quick, args.device)
    mixed_precision_table(args.quick, args.device)
    if args.device == "cpu":
        likelihood_table(args.quick)


if __name__ == "__main__":
    if _MISSING is not None:
        raise _MISSING
    main()

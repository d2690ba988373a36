"""k-means++ seeding and Lloyd's k-means on a torch tensor's device.

The same algorithms as ``_initialization.kmeans_plusplus`` / ``kmeans`` (greedy
k-means++ with 2 + log(K) trials, then Lloyd with sklearn's stopping rule), for
data that lives on a GPU: distances are formed chunk by chunk with
``torch.mm`` around one shift (the first row), so memory stays
O(chunk x K); cluster sums are one-hot products (cuBLAS, no atomics), so
results are deterministic.  The random draws come from the caller's NumPy
``random_state`` (a few numbers per centre), so a seed fixes the result.
"""

import math

import torch

from ._initialization import mean_variance

_CHUNK_ELEMENTS = 1 << 25  # rows x clusters per distance chunk (128 MiB in float32)


def _chunks(n, width):
    step = max(1, _CHUNK_ELEMENTS // max(1, width))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _sq_dist(Xc, centers, shift):
    """(rows, C) squared distances, float64, of shifted rows to shifted centres."""
    x = Xc.to(torch.float64) - shift
    c = centers - shift
    d = (x * x).sum(1)[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]
    return d.clamp_min_(0.0)


def min_sq_dist(X, center, closest=None):
    """min(closest, |x - center|^2) for every row: (n,) float64 on X's device."""
    shift = X[0].to(torch.float64)
    out = torch.empty(X.shape[0], dtype=torch.float64, device=X.device)
    for a, b in _chunks(X.shape[0], 1):
        d = _sq_dist(X[a:b], center[None, :].to(torch.float64), shift)[:, 0]
        out[a:b] = d if closest is None else torch.minimum(d, closest[a:b])
    return out


def kmeans_plusplus(X, n_clusters, random_state, sample_weight=None):
    """Greedy k-means++ on the device.

    Returns
    -------
    centers : torch.Tensor (n_clusters, D), float64
    indices : torch.Tensor (n_clusters,), int64, rows of X chosen
    """
    n = X.shape[0]
    dev = X.device
    w = (torch.ones(n, dtype=torch.float64, device=dev) if sample_weight is None
         else sample_weight.to(torch.float64))
    n_trials = 2 + int(math.log(n_clusters))
    cum_w = torch.cumsum(w, 0)
    first = torch.searchsorted(cum_w, cum_w[-1] * float(random_state.uniform()))
    indices = [int(first.clamp(max=n - 1))]
    closest = min_sq_dist(X, X[indices[0]])
    shift = X[0].to(torch.float64)
    for _ in range(1, n_clusters):
        cum = torch.cumsum(w * closest, 0)
        if float(cum[-1]) > 0:
            rand = torch.as_tensor(random_state.uniform(size=n_trials), device=dev) * cum[-1]
            cand = torch.searchsorted(cum, rand).clamp(max=n - 1)
        else:  # every row coincides with a chosen centre: any row will do
            cand = torch.as_tensor(random_state.choice(n, size=n_trials), device=dev)
        pots = torch.zeros(n_trials, dtype=torch.float64, device=dev)
        centers = X[cand].to(torch.float64)
        for a, b in _chunks(n, n_trials):
            pots += w[a:b] @ torch.minimum(_sq_dist(X[a:b], centers, shift),
                                           closest[a:b, None])
        best = int(torch.argmin(pots))
        indices.append(int(cand[best]))
        closest = min_sq_dist(X, X[indices[-1]], closest)
    idx = torch.as_tensor(indices, device=dev)
    return X[idx].to(torch.float64), idx


def lloyd_step(X, centers, sample_weight=None):
    """Labels (n,), per-cluster weights (C,) and sums (C, D) under ``centers``."""
    k = centers.shape[0]
    shift = X[0].to(torch.float64)
    labels = torch.empty(X.shape[0], dtype=torch.int64, device=X.device)
    counts = torch.zeros(k, dtype=torch.float64, device=X.device)
    sums = torch.zeros(k, X.shape[1], dtype=torch.float64, device=X.device)
    for a, b in _chunks(X.shape[0], k):
        lab = torch.argmin(_sq_dist(X[a:b], centers, shift), 1)
        labels[a:b] = lab
        onehot = torch.nn.functional.one_hot(lab, k).to(torch.float64)
        if sample_weight is not None:
            onehot *= sample_weight[a:b, None].to(torch.float64)
        counts += onehot.sum(0)
        sums += onehot.T @ X[a:b].to(torch.float64)
    return labels, counts, sums


def kmeans(X, n_clusters, random_state, sample_weight=None, max_iter=300, tol=1e-4):
    """Lloyd's k-means from a k-means++ seeding, on the device.

    Returns
    -------
    labels : torch.Tensor (n,), int64
    centers : torch.Tensor (n_clusters, D), float64
    """
    centers, _ = kmeans_plusplus(X, n_clusters, random_state, sample_weight)
    var = mean_variance(X, _CHUNK_ELEMENTS // max(1, X.shape[1]))
    labels = None
    for _ in range(max_iter):
        new_labels, counts, sums = lloyd_step(X, centers, sample_weight)
        nonempty = counts > 0
        new_centers = torch.where(nonempty[:, None], sums / counts.clamp_min(1e-300)[:, None],
                                  centers)
        shift = float(((new_centers - centers) ** 2).sum())
        unchanged = labels is not None and bool(torch.equal(labels, new_labels))
        centers, labels = new_centers, new_labels
        if unchanged or shift <= tol * var:
            break
    labels, _, _ = lloyd_step(X, centers, sample_weight)
    return labels, centers

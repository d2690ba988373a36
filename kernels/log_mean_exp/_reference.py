"""Plain-torch reference of the log-mean-exp over importance samples."""

import math

import torch


def log_mean_exp_ref(log_w):
    """log mean_s exp(log_w[s, b]): (batch,) from (k, batch)."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])

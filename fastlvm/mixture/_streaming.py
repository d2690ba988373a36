"""Rows of a host array streamed to a GPU in pinned chunks, copies overlapped with compute.

For data larger than GPU memory: ``GaussianMixture(device="cuda").fit(X)`` with X
a NumPy array (or memory map).  Each chunk is copied into one of two pinned
host buffers and sent to one of two device buffers on a side stream; the
compute stream waits for that copy only, so the copy of chunk i + 1 runs while
chunk i is being computed.  Device memory: two chunks of rows, whatever n is
(by default within ``_config.STREAM_CHUNK_BYTES`` each).

Limits: the host-side copy into the pinned buffer runs on the calling thread;
on a CPU "device" (tests) chunks are plain zero-copy tensor views.
"""

import numpy as np
import torch

from fastlvm import _config


class HostRowStream:
    """A host array seen as a sequence of device chunks.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features), float32/float64, on the host
    sample_weight : ndarray of shape (n_samples,) or None
    device : str or torch.device
    chunk_rows : int or None
        Rows per chunk; None: as many as keep each buffer within
        ``_config.STREAM_CHUNK_BYTES`` (at most ``_config.DEFAULT_CHUNK_ROWS``).

    Attributes
    ----------
    host : the array itself; shape, dtype : X's
    template : a 0-element tensor of X's dtype on the device (for allocating there)
    """

    def __init__(self, X, sample_weight, device, chunk_rows):
        self.host, self.sample_weight = X, sample_weight
        self.shape, self.dtype = X.shape, X.dtype
        self.device = stream_device(device)
        chunk_rows = _config.chunk_rows(X.shape[1], chunk_rows, _config.STREAM_CHUNK_BYTES,
                                        X.dtype.itemsize)
        self.chunk_rows = int(min(chunk_rows, max(1, X.shape[0])))
        self.torch_dtype = torch.float32 if X.dtype == np.float32 else torch.float64
        self.template = torch.empty(0, dtype=self.torch_dtype, device=self.device)
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            shape = (self.chunk_rows, X.shape[1])
            self._pinned = [torch.empty(shape, dtype=self.torch_dtype, pin_memory=True)
                            for _ in range(2)]
            self._on_device = [torch.empty(shape, dtype=self.torch_dtype, device=self.device)
                               for _ in range(2)]
            self._copy_stream = torch.cuda.Stream(self.device)

    def _weights(self, start, stop):
        if self.sample_weight is None:
            return None
        return torch.as_tensor(self.sample_weight[start:stop], device=self.device).to(
            self.torch_dtype)

    def chunks(self):
        """Yield ``(start, X_chunk, sample_weight_chunk)`` with tensors on the device.

        A yielded chunk is valid until the consumer asks for the next-but-one:
        work queued on the current stream before then is waited for before its
        buffer is refilled.
        """
        n = self.shape[0]
        starts = list(range(0, n, self.chunk_rows))
        if not self._cuda:
            for start in starts:
                stop = min(n, start + self.chunk_rows)
                # made on the device (zero-copy on the CPU)
                yield (start, torch.as_tensor(np.ascontiguousarray(self.host[start:stop]),
                                              device=self.device),
                       self._weights(start, stop))
            return
        compute = torch.cuda.current_stream(self.device)
        copied = [torch.cuda.Event() for _ in range(2)]
        consumed = [None, None]

        def stage(i):
            slot, start = i % 2, starts[i]
            rows = min(n, start + self.chunk_rows) - start
            if consumed[slot] is not None:  # the device buffer's last reader is done ...
                self._copy_stream.wait_event(consumed[slot])
                copied[slot].synchronize()  # ... and so is the pinned buffer's last copy
            self._pinned[slot][:rows].copy_(torch.from_numpy(
                np.ascontiguousarray(self.host[start:start + rows])))
            with torch.cuda.stream(self._copy_stream):
                self._on_device[slot][:rows].copy_(self._pinned[slot][:rows],
                                                   non_blocking=True)
                copied[slot].record(self._copy_stream)
            return rows

        rows = stage(0)
        for i, start in enumerate(starts):
            next_rows = stage(i + 1) if i + 1 < len(starts) else 0
            slot = i % 2
            compute.wait_event(copied[slot])
            yield start, self._on_device[slot][:rows], self._weights(start, start + rows)
            consumed[slot] = torch.cuda.Event()
            consumed[slot].record(compute)
            rows = next_rows
        torch.cuda.current_stream(self.device).synchronize()


def stream_device(device):
    """``device`` (an estimator's parameter) as a torch.device that can take the
    stream, or a ValueError that names it and the remedy.

    Parameters
    ----------
    device : str, int or torch.device

    Returns
    -------
    torch.device
    """
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ValueError(f"device must be a str, an int or a torch.device; got "
                         f"{type(device).__name__} {device!r}. Pass 'cuda' or 'cuda:N', or "
                         "leave device=None to fit on the host.")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a torch device ({error}); pass 'cuda', "
                         "'cuda:N' or a torch.device, or leave device=None to fit on the "
                         "host.") from error
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={device!r}: no CUDA GPU is available to this process "
                             "(torch.cuda.is_available() is False, or this torch build has "
                             "no CUDA); leave device=None to fit on the host.")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device={device!r}: this process sees {count} CUDA "
                             f"device(s), numbered from 0; pass one of them.")
    return parsed

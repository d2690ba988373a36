"""Rows of a host array streamed to a GPU in pinned chunks, copies overlapped with compute.

For data larger than GPU memory: ``GaussianMixture(device="cuda").fit(X)`` with X
a NumPy array (or memory map).  Each chunk is copied into one of two pinned
host buffers and sent to one of two device buffers on a side stream; the
compute stream waits for that copy only, so the copy of chunk i + 1 runs while
chunk i is being computed.  Sample weights go the same way, beside their rows.
Device memory: two chunks of rows (and weights), whatever n is (by default
within ``_config.STREAM_CHUNK_BYTES`` each).

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
        self._cuda = _stages_through_pinned_buffers(self.device)
        if self._cuda:
            # the weights are staged as the rows are: a copy from pageable host
            # memory would wait for the chunks' work queued, a wait a chunk
            shapes = [(self.chunk_rows, X.shape[1])]
            if sample_weight is not None:
                shapes.append((self.chunk_rows,))
            self._pinned = [[_pinned_empty(shape, self.torch_dtype) for shape in shapes]
                            for _ in range(2)]
            self._on_device = [[torch.empty(shape, dtype=self.torch_dtype, device=self.device)
                                for shape in shapes] for _ in range(2)]
            self._copy_stream = torch.cuda.Stream(self.device)

    def _host_parts(self, start, stop):
        """The rows (and weights) ``start:stop`` on the host, contiguous."""
        parts = [self.host[start:stop]]
        if self.sample_weight is not None:
            parts.append(self.sample_weight[start:stop])
        return [np.ascontiguousarray(p) for p in parts]

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
                rows, *weights = (torch.as_tensor(p, device=self.device)
                                  for p in self._host_parts(start, stop))
                yield start, rows, (weights[0].to(self.torch_dtype) if weights else None)
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
            parts = self._host_parts(start, start + rows)
            for pinned, part in zip(self._pinned[slot], parts):
                pinned[:rows].copy_(torch.from_numpy(part))
            with torch.cuda.stream(self._copy_stream):
                for on_device, pinned in zip(self._on_device[slot], self._pinned[slot]):
                    on_device[:rows].copy_(pinned[:rows], non_blocking=True)
                copied[slot].record(self._copy_stream)
            return rows

        rows = stage(0)
        for i, start in enumerate(starts):
            next_rows = stage(i + 1) if i + 1 < len(starts) else 0
            slot = i % 2
            compute.wait_event(copied[slot])
            rows_on_device, *weights = (a[:rows] for a in self._on_device[slot])
            yield start, rows_on_device, (weights[0] if weights else None)
            consumed[slot] = torch.cuda.Event()
            consumed[slot].record(compute)
            rows = next_rows
        torch.cuda.current_stream(self.device).synchronize()


def _stages_through_pinned_buffers(device):
    """Whether chunks go to ``device`` through the pinned buffers (a CUDA device)."""
    return device.type == "cuda"


def _pinned_empty(shape, dtype):
    return torch.empty(shape, dtype=dtype, pin_memory=True)


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

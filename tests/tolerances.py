"""The one tolerance table: relative tolerance of a backend against the float64
reference, by the dtype the backend computed in."""

import numpy as np

RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 2e-4}


def assert_close(actual, expected, dtype, scale=None, err_msg=""):
    """|actual - expected| <= rtol * (|expected| + scale), elementwise; ``actual``
    may be a device array (read back to the host)."""
    from tests.conftest import to_numpy

    actual = np.asarray(to_numpy(actual), dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.max(np.abs(expected)) if scale is None and expected.size else (scale or 0.0)
    rtol = RTOL[np.dtype(dtype)]
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=err_msg)

"""The emulator's NumPy-backed cupy keeps CuPy's rules (fake_cupy.py): what would
fail on a GPU fails here, and what works there works here."""

import copy
import pickle

import numpy as np
import pytest

from tests.kernels import fake_cupy


@pytest.fixture
def cp():
    return fake_cupy.fake_cupy()


def test_no_implicit_trip_to_the_host(cp):
    a = cp.asarray(np.arange(6.0).reshape(2, 3))
    for to_host in (np.asarray, np.array, lambda x: np.testing.assert_allclose(x, 0)):
        with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
            to_host(a)
    np.testing.assert_array_equal(a.get(), np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(cp.asnumpy(a), a.get())
    assert a.get() is not a._array  # a copy, as a transfer is
    cp.testing.assert_array_equal(a, a)


@pytest.mark.parametrize("combine", [
    lambda d, h: d + h, lambda d, h: h + d, lambda d, h: h * d, lambda d, h: d @ h.T,
    lambda d, h: d < h, lambda d, h: np.add(d, h), lambda d, h: np.concatenate([d, h]),
], ids=["add", "radd", "rmul", "matmul", "less", "ufunc", "array_function"])
def test_host_arrays_in_device_work_raise(cp, combine):
    d, h = cp.ones((2, 3)), np.ones((2, 3))
    with pytest.raises(TypeError, match="Unsupported type"):
        combine(d, h)


def test_cupy_functions_refuse_host_arrays_but_the_converters(cp):
    h = np.ones((2, 2))
    for call in (lambda: cp.matmul(h, cp.ones((2, 2))), lambda: cp.stack([h, h]),
                 lambda: cp.linalg.cholesky(h), lambda: cp.where(h > 0, h, 0)):
        with pytest.raises(TypeError, match="Unsupported type"):
            call()
    with pytest.raises(TypeError, match="expected cupy.ndarray"):
        cp.ascontiguousarray(h)
    for convert in (cp.asarray, cp.array, cp.asanyarray):
        d = convert(h)
        assert isinstance(d, cp.ndarray) and not np.shares_memory(d._array, h)
    d = cp.asarray(h)
    assert cp.asarray(d)._array is d._array  # on the device already: no copy
    assert isinstance(cp.asarray([d[0], d[1]]), cp.ndarray)


def test_assignment_takes_host_arrays_only_through_advanced_indices(cp):
    d = cp.zeros((3, 2))
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for fill"):
        d[0] = np.ones(2)
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for fill"):
        d.fill(np.ones(2))
    d[np.array([0, 2])] = np.array([[1.0, 2.0], [3.0, 4.0]])  # scattered: copied over
    d[1] = cp.asarray([5.0, 6.0])
    d[:, 0] = np.float64(7.0)  # a scalar
    np.testing.assert_array_equal(d.get(), [[7, 2], [7, 6], [7, 4]])
    assert d[np.array([1])].shape == (1, 2)  # host indices are fine to read with
    d[cp.asarray([True, False, True])] = 9.0  # a mask (outside a capture)
    np.testing.assert_array_equal(d[d > 8].get(), [9, 9, 9, 9])


def test_reductions_and_scalar_indexing_give_0d_device_arrays(cp):
    d = cp.asarray(np.arange(4.0))
    for value in (d.sum(), cp.max(d), np.sum(d), d[2], cp.linalg.norm(d)):
        assert isinstance(value, cp.ndarray) and value.shape == ()
    assert float(d[2]) == 2.0 and int(d.argmax()) == 3 and bool(d[1] > 0)
    assert f"{d[3]:.1f}" == "3.0"
    assert isinstance(np.exp(d), cp.ndarray) and isinstance(d.T, cp.ndarray)
    assert d.shape == (4,) and d.dtype == np.float64 and len(d) == 4
    assert all(isinstance(row, cp.ndarray) for row in d)


def test_operators_in_place_and_out(cp):
    d = cp.ones(3)
    same = d
    d += 1.0
    d *= cp.asarray([1.0, 2.0, 3.0])
    assert d is same
    out = cp.empty(3)
    assert np.add(d, 1.0, out=out) is out and cp.add(d, d, out=out) is out
    np.testing.assert_array_equal(out.get(), [4, 8, 12])
    np.testing.assert_array_equal((-d).get(), [-2, -4, -6])
    np.testing.assert_array_equal((2.0 ** d).get(), [4, 16, 64])


def test_device_copies_and_pickles(cp):
    d = cp.asarray(np.arange(3.0))
    assert d.device == cp.cuda.Device(0) and d.device.id == 0
    with d.device:
        pass
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        cp.cuda.Device(1)
    for twin in (copy.copy(d), copy.deepcopy(d), pickle.loads(pickle.dumps(d))):
        assert isinstance(twin, cp.ndarray) and not np.shares_memory(twin._array, d._array)
        np.testing.assert_array_equal(twin.get(), d.get())


def test_a_capture_refuses_reads_back_to_the_host(cp):
    d = cp.ones(2)
    stream = cp.cuda.Stream()
    with stream:
        stream.begin_capture()
        with pytest.raises(RuntimeError, match="D2H transfers are disallowed"):
            d.get()
        for read in (cp.asnumpy, float, bool, repr, lambda a: a.item(), lambda a: a.tolist(),
                     lambda a: f"{a[0]:.1f}", cp.nonzero, cp.unique, lambda a: a[a > 0],
                     lambda a: a.__setitem__(a > 0, 2.0)):
            with pytest.raises(RuntimeError, match="D2H transfers are disallowed"):
                read(d[:1])
        stream.end_capture()
    assert d.get().tolist() == [1.0, 1.0]


def test_a_capture_refuses_copies_of_host_data_to_the_device(cp):
    """CuPy stages such a copy through a pinned buffer it reuses once the copy is
    done, so a graph replaying it would read whatever the buffer holds by then."""
    d, index = cp.zeros(3), cp.asarray([0, 2])
    stream = cp.cuda.Stream()
    with stream:
        stream.begin_capture()
        for copy_up in (cp.asarray, cp.array, lambda h: d.set(h),
                        lambda h: d.__setitem__([0, 1, 2], h), lambda h: d[np.arange(3)],
                        lambda h: d[[0, 2]]):
            with pytest.raises(RuntimeError, match="cannot be part of the graph"):
                copy_up(np.ones(3))
        cp.asarray(d)  # a device array is no copy up
        d[1:] = 2.0  # a scalar is a kernel's argument
        d[index] = d[1]  # an index already on the device
        stream.end_capture()
    assert d.get().tolist() == [2.0, 2.0, 2.0]


def test_fresh_memory_and_failed_factorisations(cp):
    assert np.isnan(cp.empty(3).get()).all()
    assert np.isnan(cp.empty_like(cp.zeros((2, 2))).get()).all()
    bad = cp.asarray(np.array([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, 1.0]]]))
    factors = cp.linalg.cholesky(bad).get()  # no exception, as CuPy's default
    np.testing.assert_array_equal(factors[0], np.eye(2))
    assert np.isnan(factors[1]).all()
    assert cp.get_array_module(bad) is cp and cp.get_array_module(np.ones(1)) is np


def test_floating_point_errors_pass_silently_as_on_a_gpu(cp):
    import warnings

    d = cp.asarray(np.array([0.0, 1e308]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = [(1.0 / d).get(), (d * 10).get(), np.log(d).get(), cp.log(d).get()]
    assert values[0][0] == np.inf and values[1][1] == np.inf and values[2][0] == -np.inf


def test_the_module_is_no_package_and_says_it_is_emulated(cp):
    assert cp.EMULATED and cp.__name__ == "cupy"
    for name in ("__file__", "__path__", "__version__"):
        assert not hasattr(cp, name), name


def test_a_graph_replays_the_device_work_captured_into_the_same_arrays(cp):
    """The capture runs its work as issued (the first launch stands for that run);
    each later launch runs it again on the current contents: operations, in-place
    updates, assignments, fills, factorisations and kernel launches, into the
    arrays the capture gave out.  Host arithmetic of the capture does not rerun."""
    from tests.kernels import cuda_emulator

    if not cuda_emulator.AVAILABLE:
        pytest.skip("the CUDA emulator needs g++ on Linux")
    kernel = cuda_emulator.EmulatedRawModule("""
template <typename T>
__global__ void twice(const T* x, T* y, long long n) {
    if (threadIdx.x < n) y[threadIdx.x] = 2 * x[threadIdx.x];
}
""").get_function("twice<double>")
    a, y, acc = cp.asarray([1.0, 2.0]), cp.zeros(2), cp.zeros(2)
    host_scale = 3.0
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        b = a * host_scale + 1.0  # a new array, made again by each replay
        kernel((1,), (32,), (a, y, np.int64(2)))
        acc += b  # accumulates once a launch
        chol = cp.linalg.cholesky(cp.eye(2) * (b[0] + 0))
        b[1] = 0.0
        graph = stream.end_capture()
    host_scale = 100.0  # host arithmetic of the capture is not replayed
    graph.launch()  # stands for the captured run
    np.testing.assert_array_equal(b.get(), [4.0, 0.0])
    a[...] = cp.asarray([10.0, 20.0])
    graph.launch()
    graph.launch()
    np.testing.assert_array_equal(b.get(), [31.0, 0.0])
    np.testing.assert_array_equal(y.get(), [20.0, 40.0])
    np.testing.assert_array_equal(acc.get(), [4.0 + 31 + 31, 7.0 + 61 + 61])
    np.testing.assert_allclose(chol.get(), np.sqrt(31.0) * np.eye(2))
    assert graph.launches == 3 and host_scale == 100.0

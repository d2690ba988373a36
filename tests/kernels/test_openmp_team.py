"""The kernels' spans on torch's OpenMP threads (kernels/_openmp_team.py and its
use in kernels/_thread_spans.py)."""

import multiprocessing
import os
import threading
import time

import numba
import numpy as np
import pytest

from fastlvm.kernels import _openmp_team as ot
from fastlvm.kernels import _thread_spans as ts
from tests.kernels.span_recorder import record_spans

torch = pytest.importorskip("torch")
LIBRARY = ot.torch_openmp_library()
needs_team = pytest.mark.skipif(
    LIBRARY is None, reason="this torch has no OpenMP runtime of its own exporting GOMP_parallel")
needs_two = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2 or os.cpu_count() < 2,
                               reason="needs two threads")


@pytest.fixture
def span_threads(monkeypatch):
    """Set FASTLVM_SPAN_THREADS's value for the test, with the team looked for anew."""
    def choose(value):
        monkeypatch.setattr(ts, "SPAN_THREADS", value)
        monkeypatch.setattr(ts, "_TEAM", None)
        monkeypatch.setattr(ts, "_TEAM_SEARCHED", False)
    return choose


def test_torchs_own_libgomp_is_found_where_the_wheel_ships_it():
    """The Linux wheels load torch/lib/libgomp.so.1: the team must be found there
    (otherwise every other test here would skip)."""
    shipped = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    if not os.path.exists(shipped):
        pytest.skip("this torch ships no libgomp.so.1")
    assert "parallel backend: OpenMP" in torch.__config__.parallel_info()
    assert LIBRARY is not None
    assert os.path.samefile(LIBRARY._name, shipped)


@needs_team
def test_torchs_runtime_is_found_and_runs_work_on_a_team_of_threads():
    team = ot.OpenMPTeam(LIBRARY)
    seen = []
    assert team.run(lambda: (time.sleep(0.01), seen.append(threading.get_ident())), 2)
    assert len(seen) == 2  # work() once on each thread of the team
    assert threading.get_ident() in seen and len(set(seen)) == 2


@needs_team
def test_a_team_raises_a_threads_error_and_stays_usable():
    team = ot.OpenMPTeam(LIBRARY)
    caller = threading.get_ident()

    def fail_off_the_caller():
        if threading.get_ident() != caller:
            raise RuntimeError("team thread failed")

    with pytest.raises(RuntimeError, match="team thread failed"):
        team.run(fail_off_the_caller, 2)
    seen = []
    assert team.run(lambda: seen.append(1), 2) and seen == [1, 1]


@needs_team
def test_a_busy_team_runs_nothing_and_run_spans_runs_inline(span_threads):
    """A second Python thread's call while a job holds the team gets False from
    the team, and run_spans runs its loop in that thread, in one span."""
    span_threads("auto")
    team = ts._team()
    started, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=team.run,
                              args=(lambda: (started.set(), release.wait(10)), 1))
    holder.start()
    try:
        assert started.wait(10)
        assert team.run(lambda: pytest.fail("ran while busy"), 2) is False
        seen, out = [], np.zeros(8)
        ts.run_spans(record_spans(seen), 8, out)
        np.testing.assert_array_equal(out, 1)
        assert [(b0, b1) for _, _, b0, b1 in seen] == [(0, 8)]
    finally:
        release.set()
        holder.join(10)


@needs_team
@needs_two
def test_run_spans_takes_torchs_threads_once_torch_is_imported(span_threads):
    """auto: every span once, on the caller and a thread that is not the span
    pool's; pool: the pool's threads, never the team's."""
    for choice, pool_threads in (("auto", False), ("pool", True)):
        span_threads(choice)
        for _ in range(10):  # until a second thread has taken a span
            seen, out = [], np.zeros(32)
            ts.run_spans(record_spans(seen, 0.002), 32, out)
            np.testing.assert_array_equal(out, 1)
            assert sorted((b0, b1) for *_, b0, b1 in seen) == ts.spans(32, len(seen))
            others = {name for ident, name, _, _ in seen if ident != threading.get_ident()}
            if others:
                break
        assert others, choice
        assert all(n.startswith("fastlvm-kernel") == pool_threads for n in others), others
        assert (ts._TEAM is not None) == (choice == "auto")


@needs_team
@needs_two
def test_a_span_error_on_the_team_is_raised_after_every_span_ran(span_threads):
    span_threads("auto")
    caller = threading.get_ident()
    for _ in range(20):  # until a team thread has taken a span
        out, failed = np.zeros(16), []

        def fail_off_the_caller(out, b0, b1):
            time.sleep(0.002)
            if threading.get_ident() != caller:
                failed.extend(range(b0, b1))
                raise ValueError("span failed on the team")
            out[b0:b1] = 1

        try:
            ts.run_spans(fail_off_the_caller, 16, out)
        except ValueError as error:
            assert "span failed on the team" in str(error)
            ran = np.flatnonzero(out)
            assert len(ran) + len(failed) == 16  # every other span still ran
            break
    else:
        pytest.fail("no team thread took a span")


@needs_team
@needs_two
def test_a_call_from_a_team_span_runs_its_spans_inline(span_threads):
    span_threads("auto")
    caller, inner_spans = threading.get_ident(), []

    def outer(out, b0, b1):
        time.sleep(0.002)
        if threading.get_ident() != caller:
            seen = []
            ts.run_spans(record_spans(seen), 8, np.zeros(8))
            inner_spans.append([(b0, b1) for *_, b0, b1 in seen])
        out[b0:b1] += 1

    for _ in range(20):
        out = np.zeros(16)
        ts.run_spans(outer, 16, out)
        np.testing.assert_array_equal(out, 1)
        if inner_spans:
            break
    assert inner_spans and all(s == [(0, 8)] for s in inner_spans)


@needs_team
def test_kernels_give_the_same_bits_on_the_team_and_on_the_pool(span_threads):
    """The fused ELBO with its gradients (one launch each way) and a 'full'
    E-step's statistics, at sizes that split into several spans."""
    from fastlvm.kernels import elbo, estep_stats

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(300, 784, generator=g) > 0.5).float()
    logits = torch.randn(1, 300, 784, generator=g).requires_grad_()
    mu = torch.randn(300, 8, generator=g).requires_grad_()
    logvar = (0.1 * torch.randn(300, 8, generator=g)).requires_grad_()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20000, 6))
    means = rng.standard_normal((4, 6))
    prec_chol = np.broadcast_to(np.eye(6), (4, 6, 6)).copy()
    weights = np.full(4, 0.25)
    results = {}
    for choice in ("pool", "auto"):
        span_threads(choice)
        out = elbo(x, logits, mu, logvar)
        grads = torch.autograd.grad((out * torch.linspace(0.5, 2.0, 300)).sum(),
                                    [logits, mu, logvar])
        stats = estep_stats(X, weights, means, prec_chol, "full")
        results[choice] = [out.detach().numpy(), *(t.numpy() for t in grads),
                           *(np.asarray(s) for s in stats)]
    for a, b in zip(results["pool"], results["auto"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_span_threads_pool_keeps_the_pool_and_a_bad_value_names_the_variable(span_threads):
    span_threads("pool")
    assert ts._team() is None
    span_threads("threads")
    with pytest.raises(ValueError, match="FASTLVM_SPAN_THREADS='threads'"):
        ts.run_spans(record_spans([]), 8, np.zeros(8))


def test_span_threads_openmp_without_torchs_runtime_says_so(span_threads, monkeypatch):
    span_threads("openmp")
    monkeypatch.setattr(ts, "torch_openmp_library", lambda: None)
    with pytest.raises(RuntimeError, match="FASTLVM_SPAN_THREADS=openmp.*import torch first"):
        ts._team()


_PARENTS_TEAM = []


@needs_team
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_team_is_not_used_in_a_forked_child(span_threads):
    """GNU libgomp does not survive fork: the parent's team refuses to run in a
    child, and the child's spans run on a span pool of its own."""
    span_threads("auto")
    team = ts._team()
    assert team.run(lambda: None, 2)  # the parent's team has threads
    _PARENTS_TEAM[:] = [team]  # the child inherits it
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            refused, team_in_child, total = pool.apply_async(_team_in_child).get(timeout=60)
    finally:
        _PARENTS_TEAM.clear()
    assert refused is False and team_in_child is None and total == 64 * 65 // 2


def _team_in_child():
    out = np.zeros(64)
    ts.run_spans(lambda out, b0, b1: out.__setitem__(slice(b0, b1), np.arange(b0, b1) + 1),
                 64, out)
    return _PARENTS_TEAM[0].run(lambda: None, 2), ts._team(), float(out.sum())

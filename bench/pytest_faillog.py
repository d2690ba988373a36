"""pytest plugin for the device stages, which a time cap can cut off (losing pytest's
closing summary):

- ``FASTLVM_FAILLOG``: each failure's report is appended to this file the moment it
  happens, so the stage still says what failed and why;
- ``FASTLVM_DONELOG``: each finished test is appended as ``outcome seconds nodeid``,
  so the stage says which tests ran (and which were slow) and which never did;
- ``FASTLVM_RESUME``: a done log from an earlier run; the tests it lists are
  deselected, so a second call on the same machine runs only the rest.

    FASTLVM_FAILLOG=out/failures.log python -m pytest -p pytest_faillog ...

(with ``bench/`` on ``PYTHONPATH``).  Under pytest-xdist the controller writes the
reports it receives from the workers (the workers write nothing), and every worker
deselects the same tests.
"""

import os


def _append(variable, text):
    path = os.environ.get(variable)
    if path and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as log:
            log.write(text)


def pytest_runtest_logreport(report):
    if report.failed:
        text = report.longreprtext
        if len(text) > 8000:  # a chained error's cause comes first, its last frame last
            text = text[:4000] + "\n[...]\n" + text[-4000:]
        _append("FASTLVM_FAILLOG", f"==== {report.nodeid} ({report.when})\n{text}\n")
    # a test is done after its call, or at a set-up that skipped or failed
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _append("FASTLVM_DONELOG", f"{report.outcome} {report.duration:.2f} {report.nodeid}\n")


def done_tests(path):
    """The node ids a done log lists."""
    with open(path) as log:
        return {line.rstrip("\n").split(" ", 2)[2] for line in log if line.count(" ") >= 2}


def pytest_collection_modifyitems(config, items):
    path = os.environ.get("FASTLVM_RESUME")
    if not path or not os.path.exists(path):
        return
    done = done_tests(path)
    kept = [item for item in items if item.nodeid not in done]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
        items[:] = kept

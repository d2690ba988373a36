"""pytest plugin for the device stages: each failure's report is appended to the file
named by ``FASTLVM_FAILLOG`` the moment it happens, so a stage cut off by its time cap
(which loses pytest's closing summary) still says what failed and why.

    FASTLVM_FAILLOG=out/failures.log python -m pytest -p pytest_faillog ...

(with ``bench/`` on ``PYTHONPATH``).  Under pytest-xdist the controller writes the
reports it receives from the workers; the workers write nothing.
"""

import os


def pytest_runtest_logreport(report):
    path = os.environ.get("FASTLVM_FAILLOG")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    with open(path, "a") as log:
        text = report.longreprtext
        if len(text) > 8000:  # a chained error's cause comes first, its last frame last
            text = text[:4000] + "\n[...]\n" + text[-4000:]
        log.write(f"==== {report.nodeid} ({report.when})\n{text}\n")

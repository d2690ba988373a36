"""The wheel's only top-level import name is `fastlvm` (never `kernels`)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _clean_copy(dest):
    """The source tree's files (tracked and untracked, not ignored) copied to dest:
    a wheel built there cannot pick up a stale build/ directory's leftovers."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.mark.slow
def test_wheel_has_only_fastlvm_top_level(tmp_path):
    source = _clean_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o",
                    str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("fastlvm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fastlvm"}, top
    assert "fastlvm/kernels/estep_stats/_numba.py" in names
    for source in ("_cupy_rows.cu", "_cupy_mstep.cu", "_cupy_estep.cu",
                   "_cupy_device.cuh"):  # the CuPy backend compiles them
        assert f"fastlvm/kernels/{source}" in names
    assert not any(n.startswith("kernels/") for n in names)
    # every package of the source tree ships (pyproject lists them one by one)
    for root, prefix in ((ROOT / "kernels", "fastlvm/kernels"), (ROOT / "fastlvm", "fastlvm")):
        for init in root.rglob("__init__.py"):
            path = f"{prefix}/{init.relative_to(root).as_posix()}"
            assert path in names, f"{path} is missing from the wheel: list its package in " \
                                  "pyproject.toml"


def test_no_top_level_kernels_import_anywhere():
    for path in list((ROOT / "fastlvm").rglob("*.py")) + list((ROOT / "kernels").rglob("*.py")):
        text = path.read_text()
        assert "from kernels" not in text and "import kernels" not in text, path


def test_console_command_help():
    out = subprocess.run([sys.executable, "-m", "fastlvm.cli", "--help"], check=True,
                         capture_output=True, text=True).stdout
    assert "fit" in out and "bench" in out


def test_cli_fit_on_digits(tmp_path):
    model = tmp_path / "m.joblib"
    out = subprocess.run([sys.executable, "-m", "fastlvm.cli", "fit", "-k", "3",
                          "--covariance-type", "diag", "--no-progress", "-o", str(model)],
                         check=True, capture_output=True, text=True).stdout
    assert "lower bound" in out and "BIC" in out and model.exists()
    import joblib

    assert joblib.load(model).n_components == 3


def test_cli_fit_csv(tmp_path):
    import numpy as np

    data = tmp_path / "x.csv"
    np.savetxt(data, np.random.default_rng(0).standard_normal((200, 2)), delimiter=",")
    out = subprocess.run([sys.executable, "-m", "fastlvm.cli", "fit", str(data), "-k", "2",
                          "-o", str(tmp_path / "m.joblib")], check=True, capture_output=True,
                         text=True)
    assert "200 rows x 2 features" in out.stdout


def test_cli_fit_reads_a_header_and_keeps_a_float32_file_float32(tmp_path, capsys):
    import numpy as np

    from fastlvm.cli import main

    rows = np.random.default_rng(0).standard_normal((120, 2))
    data = tmp_path / "h.csv"
    np.savetxt(data, rows, delimiter=",", header="height,weight", comments="")
    assert main(["fit", str(data), "-k", "2", "--no-progress",
                 "-o", str(tmp_path / "m.joblib")]) == 0
    assert "120 rows x 2 features, float64" in capsys.readouterr().out
    np.save(tmp_path / "x.npy", rows.astype(np.float32))  # fitted in place, not copied
    assert main(["fit", str(tmp_path / "x.npy"), "-k", "2", "--no-progress",
                 "-o", str(tmp_path / "m.joblib")]) == 0
    assert "120 rows x 2 features, float32" in capsys.readouterr().out


def test_cli_fit_shows_progress_once_per_iteration(tmp_path, capsys, monkeypatch):
    """A tqdm bar with the bound, drawn once per EM iteration (and once more as it
    closes); without tqdm, a text line."""
    import joblib
    import numpy as np
    pytest.importorskip("tqdm")

    from fastlvm.cli import main

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((300, 2)))
    model = str(tmp_path / "m.joblib")
    assert main(["fit", str(tmp_path / "x.npy"), "-k", "3", "-o", model]) == 0
    err = capsys.readouterr().err
    n_iter = joblib.load(model).n_iter_
    assert err.count("bound=") == n_iter + 1 and "init=0" in err
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    assert main(["fit", str(tmp_path / "x.npy"), "-k", "3", "-o", model]) == 0
    err = capsys.readouterr().err
    assert "init 1/1 [" in err and f"iter {n_iter}/100 bound" in err


def test_cli_fit_reports_bad_input_in_one_line(tmp_path, capsys):
    """The data's or the parameters' errors, without a traceback, exit status 1."""
    import numpy as np

    from fastlvm.cli import main

    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan], [2.0, 3.0], [4.0, 1.0]]))
    (tmp_path / "x.txt").write_text("1,2\n")
    for args, message in [([str(tmp_path / "missing.npy")], "No such file"),
                          ([str(tmp_path / "nan.npy")], "Input X contains NaN"),
                          ([str(tmp_path / "x.txt")], "expected a .npy or .csv file"),
                          (["-k", "0"], "'n_components' parameter")]:
        assert main(["fit", *args, "--no-progress", "-o", str(tmp_path / "m.joblib")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("fastlvm fit: error: ") and message in err


def test_readme_test_command_is_what_ci_runs():
    """The README promises its test command is exactly what `.ci/run` runs: each
    step of it is a line of the script, in the same order."""
    readme = (ROOT / "README.md").read_text()
    intro = "Install and run the tests (this is exactly what `.ci/run` runs):"
    block = readme.split(intro, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    steps = [s.strip() for s in block.strip().split("&&")]
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    found = [lines.index(s) if s in lines else -1 for s in steps]
    assert -1 not in found, (steps, "not all in .ci/run")
    assert found == sorted(found), "the steps run in another order in .ci/run"
    assert any("python -m pytest" in s for s in steps)

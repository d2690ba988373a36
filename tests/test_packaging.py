"""The wheel's only top-level import name is `fastlvm` (never `kernels`)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_has_only_fastlvm_top_level(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("fastlvm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fastlvm"}, top
    assert "fastlvm/kernels/estep_stats/_numba.py" in names
    assert "fastlvm/kernels/_cupy_rows.cu" in names  # the CuPy backend compiles it
    assert not any(n.startswith("kernels/") for n in names)


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

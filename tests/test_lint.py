"""ruff (pyflakes, syntax errors, bugbear; see pyproject.toml) passes on the whole project."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed: `make test` installs requirements-test.txt"
    result = subprocess.run([ruff, "check", "stylegan", "anomaly", "bench", "tests"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

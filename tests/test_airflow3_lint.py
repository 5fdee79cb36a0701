"""Airflow 3 compatibility: ruff's AIR3 rules (removed or moved Airflow 2 imports and arguments) over the
code Airflow loads. A failure names the file, the line and the replacement to use."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dags_and_plugins_use_only_airflow3_interfaces():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is installed with requirements-dev.txt"
    result = subprocess.run([ruff, "check", "--preview", "--select", "AIR3", "--output-format", "concise",
                             "dags", "plugins", "include"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

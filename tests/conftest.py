"""Test configuration shared by every test.

Airflow reads its configuration when it is first imported, so the environment is set here, at module
top, before anything imports ``airflow``: a private AIRFLOW_HOME per test session, the project's
``dags/`` and ``plugins/``, no examples, SQLite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_HOME = Path(tempfile.mkdtemp(prefix="defender-sn-tests-"))

os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__EXECUTOR"] = "LocalExecutor"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_HOME / 'airflow.db'}"
os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")
os.environ.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", "test-only-jwt-secret-" + "x" * 64)
# Settings are read when DAG files are parsed; tests set their own values with monkeypatch.
for _name in ("DEFENDER_SOURCES", "DEFENDER_SYNC_FREQUENCY_MINUTES", "SERVICENOW_CONN_ID",
              "DEFENDER_FORWARDING_RULES_FILE"):
    os.environ.pop(_name, None)

pytest_plugins = [
    "tests.fixtures.servicenow",
    "tests.fixtures.defender",
    "tests.fixtures.azure",
]


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated metadata DB for ``dag.test()`` (done once per session, ~10 s)."""
    marker = _HOME / ".migrated"
    if not marker.exists():
        subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            check=True, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        marker.touch()
    return _HOME

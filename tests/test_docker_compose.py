"""Structural checks of docker-compose.yaml, Dockerfile and .env.example (Docker cannot run here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (ROOT / "docker-compose.yaml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
AIRFLOW_SERVICES = {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                    "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer",
                    "airflow-worker": "celery worker"}
# ${VAR}, ${VAR:-default}, ${VAR:?message}; $${VAR} is an escaped literal for the container's shell.
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?+][^}]*)?\}")


def _env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not NAME=value: {line!r}"
            values[name.strip()] = value
    return values


def test_services_follow_the_official_airflow_compose():
    assert set(AIRFLOW_SERVICES) | {"postgres", "redis", "airflow-init"} <= set(SERVICES)
    for name, command in AIRFLOW_SERVICES.items():
        assert SERVICES[name]["command"] == command
        assert SERVICES[name]["restart"] == "always"
        assert SERVICES[name]["depends_on"]["airflow-init"] == {"condition": "service_completed_successfully"}
        assert SERVICES[name]["depends_on"]["postgres"] == {"condition": "service_healthy"}
        assert SERVICES[name]["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert SERVICES["airflow-worker"]["depends_on"]["airflow-apiserver"] == {"condition": "service_healthy"}
    assert SERVICES["postgres"]["image"].startswith("postgres:")
    assert SERVICES["redis"]["image"].startswith("redis:")
    init_env = SERVICES["airflow-init"]["environment"]
    assert init_env["_AIRFLOW_DB_MIGRATE"] == "true" and init_env["_AIRFLOW_WWW_USER_CREATE"] == "true"


def test_every_airflow_service_shares_the_common_anchor():
    common = COMPOSE["x-airflow-common"]
    assert common["build"] == "."
    assert "&airflow-common-env" in COMPOSE_TEXT and "<<: *airflow-common" in COMPOSE_TEXT
    for name in [*AIRFLOW_SERVICES, "airflow-init"]:
        service = SERVICES[name]
        assert service["image"] == common["image"]
        env = service["environment"]
        for key, value in common["environment"].items():  # the worker/init only add keys
            assert env[key] == value, f"{name}: {key}"


def test_shared_environment():
    env = COMPOSE["x-airflow-common"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres/airflow")
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://") and "@redis:6379" in env["AIRFLOW__CELERY__BROKER_URL"]
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    # Secrets are required (no insecure default) and shared by every component.
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"].startswith("${AIRFLOW_JWT_SECRET:?")
    assert env["AIRFLOW__CORE__FERNET_KEY"].startswith("${AIRFLOW_FERNET_KEY:?")
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"
    # The user-facing contract (interface.md): connections and settings come from .env.
    for name in ("AIRFLOW_CONN_SERVICENOW_DEFAULT", "AIRFLOW_CONN_DEFENDER_IOT_DEFAULT", "DEFENDER_SOURCES",
                 "DEFENDER_SYNC_FREQUENCY_MINUTES", "SERVICENOW_CONN_ID", "DEFENDER_FORWARDING_RULES_FILE"):
        assert env[name].startswith("${" + name), name


def test_healthchecks():
    expected = {"postgres": "pg_isready", "redis": "redis-cli", "airflow-apiserver": "/api/v2/version",
                "airflow-scheduler": ":8974/health", "airflow-dag-processor": "DagProcessorJob",
                "airflow-triggerer": "TriggererJob", "airflow-worker": "inspect ping",
                "servicenow-sim": "/sim/state", "defender-sim": "/sim/state"}
    for name, probe in expected.items():
        test = SERVICES[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and probe in " ".join(test), name
    assert COMPOSE["x-airflow-common"]["environment"]["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "true"


def test_simulators_are_an_optional_profile_on_loopback():
    for name in ("servicenow-sim", "defender-sim"):
        service = SERVICES[name]
        assert service["profiles"] == ["simulators"]
        assert all(port.startswith("127.0.0.1:") for port in service["ports"])
        assert f"include.simulators.{name.replace('-sim', '_sim')}" in service["command"][0]
    for name, service in SERVICES.items():  # nothing else may need the simulators to be running
        if name not in ("servicenow-sim", "defender-sim"):
            assert not set(service.get("depends_on", {})) & {"servicenow-sim", "defender-sim"}
    example = _env_example()
    assert "servicenow-sim:8000" in (ROOT / ".env.example").read_text()
    assert "defender-sim:8000" in (ROOT / ".env.example").read_text()
    assert example["AIRFLOW_CONN_SERVICENOW_DEFAULT"]


def test_every_compose_variable_is_documented_in_env_example():
    used = set(VARIABLE.findall(COMPOSE_TEXT))
    assert {"AIRFLOW_JWT_SECRET", "AIRFLOW_FERNET_KEY", "POSTGRES_PASSWORD"} <= used
    documented = set(_env_example())
    assert not used - documented, f"undocumented in .env.example: {sorted(used - documented)}"
    # Every documented variable has an explanatory comment right above it (or above its group).
    lines = (ROOT / ".env.example").read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert any(lines[j].startswith("#") for j in range(max(0, i - 3), i)), line


def test_every_setting_the_package_reads_reaches_the_containers():
    """Only the variables listed in x-airflow-common's environment reach the containers: a setting the
    package reads but compose does not pass is silently ignored when set in .env."""
    read = set()
    for path in (ROOT / "plugins" / "defender_servicenow").rglob("*.py"):
        read |= set(re.findall(r'"((?:DEFENDER|SERVICENOW|AIRFLOW_API)_[A-Z_]+)"', path.read_text()))
    assert {"DEFENDER_SOURCES", "DEFENDER_ALERT_RECONCILE_HOURS"} <= read
    passed = set(COMPOSE["x-airflow-common"]["environment"])
    assert not read - passed, f"read by the package but not passed by docker-compose.yaml: {sorted(read - passed)}"
    assert not read - set(_env_example()), f"not documented in .env.example: {sorted(read - set(_env_example()))}"


def test_env_example_has_no_real_secrets():
    example = _env_example()
    for name in ("AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "POSTGRES_PASSWORD", "_AIRFLOW_WWW_USER_PASSWORD"):
        assert example[name] == "", f"{name} must be left empty in .env.example"


@pytest.mark.parametrize("settings_var", ["DEFENDER_SOURCES", "DEFENDER_SYNC_FREQUENCY_MINUTES",
                                          "SERVICENOW_CONN_ID", "DEFENDER_FORWARDING_RULES_FILE",
                                          "DEFENDER_ALERT_POLL_SECONDS", "DEFENDER_ALERT_LOOKBACK_MINUTES",
                                          "DEFENDER_ALERT_SAFETY_RUN_MINUTES", "DEFENDER_RETIRE_AFTER_MISSING_RUNS",
                                          "DEFENDER_HANDLE_ALERTS_ON_CLOSE", "DEFENDER_SYNC_MATCH_BY_NAME",
                                          "DEFENDER_ALERT_RECONCILE_HOURS", "SERVICENOW_AUTH_COOLDOWN_MINUTES",
                                          "DEFENDER_AUTH_COOLDOWN_MINUTES"])
def test_env_example_defaults_pass_the_settings_validation(settings_var):
    from defender_servicenow import settings

    example = {k: v for k, v in _env_example().items() if k == settings_var}
    getter = {"DEFENDER_SOURCES": settings.defender_sources,
              "DEFENDER_SYNC_FREQUENCY_MINUTES": settings.sync_frequency_minutes,
              "SERVICENOW_CONN_ID": settings.servicenow_conn_id,
              "DEFENDER_FORWARDING_RULES_FILE": settings.rules_file,
              "DEFENDER_ALERT_POLL_SECONDS": settings.alert_poll_seconds,
              "DEFENDER_ALERT_LOOKBACK_MINUTES": settings.alert_lookback_minutes,
              "DEFENDER_ALERT_SAFETY_RUN_MINUTES": settings.alert_safety_run_minutes,
              "DEFENDER_RETIRE_AFTER_MISSING_RUNS": settings.retire_after_missing_runs,
              "DEFENDER_HANDLE_ALERTS_ON_CLOSE": settings.handle_alerts_on_close,
              "DEFENDER_SYNC_MATCH_BY_NAME": settings.sync_match_by_name,
              "DEFENDER_ALERT_RECONCILE_HOURS": settings.alert_reconcile_hours,
              "SERVICENOW_AUTH_COOLDOWN_MINUTES": settings.servicenow_auth_cooldown_minutes,
              "DEFENDER_AUTH_COOLDOWN_MINUTES": settings.defender_auth_cooldown_minutes}[settings_var]
    getter(example)  # raises ConfigError on an invalid example value


def test_dockerfile_base_image_matches_requirements():
    dockerfile = (ROOT / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert len(bases) == 1
    pin = re.search(r"^apache-airflow==(\S+)\s*$", (ROOT / "requirements.txt").read_text(), flags=re.MULTILINE)
    assert pin, "requirements.txt must pin apache-airflow"
    assert bases[0] == f"apache/airflow:{pin.group(1)}"
    image_pin = re.search(r"^apache-airflow==(\S+)\s*$", (ROOT / "requirements-image.txt").read_text(),
                          flags=re.MULTILINE)
    assert image_pin and image_pin.group(1) == pin.group(1), "requirements-image.txt must keep the same Airflow"


def test_dockerfile_installs_requirements_then_the_package():
    steps = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("RUN ")]
    requirements = next(i for i, s in enumerate(steps) if "-r requirements-image.txt" in s)
    package = next(i for i, s in enumerate(steps) if "--no-deps" in s and s.rstrip().endswith("."))
    assert requirements < package
    copied = " ".join(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY"))
    for path in ("requirements-image.txt", "pyproject.toml", "README.md", "plugins/defender_servicenow",
                 "include", "dags"):
        assert path in copied
        assert (ROOT / path).exists(), f"the Dockerfile copies {path}, which does not exist"


def test_compose_runs_the_engine_the_distributed_test_proves():
    """Executor, metadata DB, broker and result backend are those of tests/test_distributed.py."""
    from scripts.services import celery_engine_env

    env = COMPOSE["x-airflow-common"]["environment"]
    database = "airflow:${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}@postgres/airflow"
    expected = celery_engine_env(database, ":@redis:6379/0")
    assert {key: env[key] for key in expected} == expected
    assert SERVICES["airflow-worker"]["command"] == "celery worker"


def _compose_url(key: str) -> str:
    env = COMPOSE["x-airflow-common"]["environment"]
    return env[key].replace("${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}", "pw")


def _pins(name: str) -> dict[str, str]:
    text = (ROOT / name).read_text()
    return {k.lower(): v for k, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, flags=re.MULTILINE)}


def test_the_image_carries_the_drivers_those_urls_need(tmp_path):
    """psycopg2 for the (explicit) sync URLs, asyncpg for the URL the API server derives from them.

    The async URL is read from ``airflow.settings`` in a fresh process given compose's environment (the
    derivation the API server runs), not from a copy of its rule.
    """
    from sqlalchemy.engine import make_url

    env = COMPOSE["x-airflow-common"]["environment"]
    assert not any(k.startswith("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC") for k in env)
    sync_url = _compose_url("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
    backend = _compose_url("AIRFLOW__CELERY__RESULT_BACKEND").removeprefix("db+")
    derived = subprocess.run(
        [sys.executable, "-c", "from airflow import settings; print(settings.SQL_ALCHEMY_CONN_ASYNC)"],
        env={**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sync_url},
        capture_output=True, text=True, timeout=120, check=True).stdout.strip().splitlines()[-1]
    assert derived.startswith("postgresql+asyncpg://"), derived
    drivers = {make_url(url).get_dialect().driver for url in (sync_url, backend, derived)}
    assert drivers == {"psycopg2", "asyncpg"}
    # Why the URLs name psycopg2: with the pinned SQLAlchemy a bare postgresql:// selects psycopg 3, which
    # neither the venv nor the image pins.
    assert make_url("postgresql://airflow:pw@postgres/airflow").get_dialect().driver == "psycopg"
    package = {"psycopg2": "psycopg2-binary", "asyncpg": "asyncpg"}
    pins, image, constraints = _pins("requirements.txt"), _pins("requirements-image.txt"), _pins("constraints.txt")
    assert "psycopg" not in image and "psycopg" not in constraints
    assert constraints["sqlalchemy"] == __import__("sqlalchemy").__version__
    for name in [package[d] for d in drivers] + ["apache-airflow-providers-celery"]:
        assert name in pins and image.get(name) == pins[name] == constraints.get(name), name
    # Celery's Redis transport: the celery provider requires celery[redis]; the venv resolves it.
    assert "redis" in constraints and "celery" in constraints
